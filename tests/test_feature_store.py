"""The track index: written with each part, repaired, built on an old-layout store; compaction and its crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import current_features

from genre_batch.analysis.columns import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.cluster import session
from genre_batch.library.discovery import INVENTORY_SCHEMA, fingerprint, track_id
from genre_batch.stages import compact
from genre_batch.storage import feature_store as fstore
from genre_batch.storage.store import Store

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
WINDOWS = 3


def files(names: list[str], version: str = "v1") -> list[dict]:
    """Inventory rows of files /music/<name>.mp3 at a file version."""
    uris = [f"/music/{n}.mp3" for n in names]
    return [{"uri": u, "track_id": track_id(u), "fingerprint": fingerprint(100, f"{u}:{version}"), "size": 100, "version": f"{u}:{version}"} for u in uris]


def write_shard(store: Store, name: str, shard: list[dict], run_id: str, at: datetime, failing: tuple[str, ...] = ()) -> None:
    """Write a shard as extraction does: window rows with distinct values per file and extraction, then the index."""
    rows, matrices, index = [], [], []
    for file in shard:
        stamp = {"feature_version": FEATURE_VERSION, "run_id": run_id, "extracted_at": at}
        if file["uri"] in failing:
            index.append({**file, **stamp, "family": "librosa", "row_count": 0, "row_start": 0, "error_type": "undecodable", "error_stage": "decode", "error_message": "bad"})
            continue
        meta = {"duration_s": 30.0, "sample_rate": 22050, "channels": 1, "offset_s": 0.0, "analysed_s": 30.0, "tag_genre": "rock", "tag_artist": None, "tag_album": None}
        index.append({**file, **meta, **stamp, "family": "librosa", "part": name, "row_start": len(rows), "row_count": WINDOWS})
        rows += [{**file, **meta, **stamp, "window": w, "window_offset_s": 10.0 * w} for w in range(WINDOWS)]
        seed = zlib.crc32(f"{file['uri']}|{file['fingerprint']}|{run_id}".encode())
        matrices.append(np.random.default_rng(seed).normal(size=(WINDOWS, len(FEATURE_NAMES))).astype(np.float32))
    fstore.write_shard(store, name, fstore.feature_table(rows, matrices), fstore.index_table(index))


def set_inventory(store: Store, listed: list[dict]) -> pa.Table:
    """Record a library listing."""
    table = pa.Table.from_pylist(sorted(listed, key=lambda f: f["uri"]), schema=INVENTORY_SCHEMA).replace_schema_metadata({"library": "/music"})
    fstore.write_inventory(store, table)
    return table


def window_keys(store: Store) -> list[tuple]:
    """(uri, track_id, window, first feature) of every current window: what readers see."""
    table = current_features(store)
    if table.num_rows == 0:
        return []
    return sorted(zip(*(table[c].to_pylist() for c in ("uri", "track_id", "window", FEATURE_NAMES[0]))))


def busy_store(root: Path) -> tuple[Store, list[tuple]]:
    """A store with many small parts: changed files, a removed file, a failed file and a late duplicate shard."""
    store = Store(str(root))
    library = files([f"t{i:03d}" for i in range(40)])
    for shard in range(8):  # run 1: 8 shards of 5 files
        write_shard(store, f"run1-{shard:05d}.parquet", library[shard * 5:(shard + 1) * 5], "run1", T0, failing=("/music/t007.mp3",))
    changed = files(["t001", "t002"], "v2")
    write_shard(store, "run2-00000.parquet", changed, "run2", T0 + timedelta(days=1))
    write_shard(store, "run2-00001.parquet", files(["t003"]), "run2", T0 + timedelta(days=1))  # a shard of a dead run finishing late
    listed = [f for f in library if f["uri"] not in ("/music/t001.mp3", "/music/t002.mp3", "/music/t039.mp3")] + changed
    set_inventory(store, listed)
    return store, window_keys(store)


def test_index_lists_current_rows_and_errors(tmp_path: Path) -> None:
    store, seen = busy_store(tmp_path)
    tracks = fstore.current_tracks(store)
    assert tracks.num_rows == 38 and len(set(tracks["uri"].to_pylist())) == 38  # 40 files - t039 (removed) - t007 (failed)
    assert "/music/t039.mp3" not in tracks["uri"].to_pylist()
    assert {r["uri"]: r["run_id"] for r in tracks.to_pylist()}["/music/t001.mp3"] == "run2"  # the changed content
    assert {r["uri"]: r["run_id"] for r in tracks.to_pylist()}["/music/t003.mp3"] == "run2"  # the late duplicate is newer
    assert len(seen) == 38 * WINDOWS
    [error] = fstore.current_errors(store).to_pylist()
    assert (error["uri"], error["error_type"], error["stage"]) == ("/music/t007.mp3", "undecodable", "decode")
    plan = fstore.plan(fstore.read_inventory(store), fstore.read_index(store))
    assert (plan.todo.num_rows, plan.moved.num_rows, plan.unchanged) == (0, 0, 39)


def test_repair_indexes_only_parts_the_index_does_not_list(tmp_path: Path) -> None:
    store, seen = busy_store(tmp_path)
    os.remove(f"{store.index}/run1-00003.parquet")  # as if the shard was killed between its part and its index
    assert fstore.unindexed(store, fstore.stored_index(store)) == ["run1-00003.parquet"]
    assert window_keys(store) == seen  # readers compute the missing rows meanwhile
    assert fstore.repair(store) == ["run1-00003.parquet"]
    assert fstore.unindexed(store, fstore.stored_index(store)) == [] and fstore.repair(store) == []
    assert window_keys(store) == seen


def test_index_is_built_on_a_store_written_before_it(tmp_path: Path) -> None:
    """The old layout: feature parts and error parts, no index folder."""
    store = Store(str(tmp_path))
    library = files(["a", "b", "c", "d"])
    write_shard(store, "old-00000.parquet", library[:2], "old", T0)
    write_shard(store, "old-00001.parquet", library[2:3], "old", T0)
    error = {**library[3], "stage": "decode", "error_type": "too_short", "message": "0.2 s", "feature_version": FEATURE_VERSION,
             "run_id": "old", "occurred_at": T0}
    store.write_table(f"{store.error_parts}/old-00001.parquet", pa.Table.from_pylist([error], schema=fstore.ERROR_SCHEMA))
    for name in os.listdir(store.index):
        os.remove(f"{store.index}/{name}")
    os.rmdir(store.index)
    set_inventory(store, library)

    assert [r["uri"] for r in fstore.current_tracks(store).to_pylist()] == [f["uri"] for f in library[:3]]
    assert [(r["uri"], r["error_type"]) for r in fstore.current_errors(store).to_pylist()] == [(library[3]["uri"], "too_short")]
    assert fstore.repair(store) == ["old-00000.parquet", "old-00001.parquet"]
    assert sorted(os.listdir(store.index)) == ["old-00000.parquet", "old-00001.parquet"]
    plan = fstore.plan(fstore.read_inventory(store), fstore.read_index(store))
    assert plan.todo.num_rows == 0 and plan.unchanged == 4  # nothing is extracted again


def test_a_moved_file_keeps_its_features_and_track_id(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    library = files(["a", "b"])
    write_shard(store, "r1-00000.parquet", library, "r1", T0)
    moved = {**library[1], "uri": "/music/renamed/b.mp3", "track_id": track_id("/music/renamed/b.mp3")}
    inventory = set_inventory(store, [library[0], moved])
    plan = fstore.plan(inventory, fstore.read_index(store))
    assert plan.todo.num_rows == 0 and plan.moved["uri"].to_pylist() == [moved["uri"]]
    assert plan.moved["track_id"].to_pylist() == [library[1]["track_id"]]  # the old identity
    store.write_table(f"{store.index}/r2-moves.parquet", plan.moved)
    tracks = {r["uri"]: r["track_id"] for r in fstore.current_tracks(store).to_pylist()}
    assert tracks == {library[0]["uri"]: library[0]["track_id"], moved["uri"]: library[1]["track_id"]}
    windows = current_features(store)
    assert set(windows["uri"].to_pylist()) == set(tracks) and windows.num_rows == 2 * WINDOWS


def test_compaction_keeps_current_rows_once_and_drops_the_rest(tmp_path: Path, dask_scheduler: str) -> None:
    store, seen = busy_store(tmp_path)
    with session(dask_scheduler) as cluster:
        summary = compact.compact(store, cluster, target_windows=60)
    assert (summary.parts_before, summary.parts_after, summary.tracks) == (10, 3, 38)
    assert window_keys(store) == seen
    parts = sorted(os.listdir(store.feature_parts))
    assert len(parts) == 3 and all(p.startswith("compact-") for p in parts)  # parts of at most 60 windows, never split
    index = sorted(os.listdir(store.index))  # one piece per part, one of failures, then the commit file (no rows)
    assert [fstore.compaction_of(n)[1] for n in index] == [False, False, False, False, True]
    assert index[:3] == parts and fstore.stored_index(store).num_rows == 39  # 38 tracks and the failure
    assert pa.parquet.read_metadata(f"{store.index}/{index[-1]}").num_rows == 0
    assert fstore.current_errors(store)["uri"].to_pylist() == ["/music/t007.mp3"]
    total = sum(pa.parquet.read_metadata(f"{store.feature_parts}/{p}").num_rows for p in parts)
    assert total == 38 * WINDOWS  # superseded, removed and duplicated rows are gone


CRASHES = {
    "before-commit": "import genre_batch.stages.compact as c; c.commit_compaction = die",
    "index-half-written": "import os; real = os.fsync\n"
                          "def fsync(fd):\n    os.ftruncate(fd, os.fstat(fd).st_size // 2); die()\n"
                          "os.fsync = fsync",
    "some-pieces-written": "from genre_batch.cluster import Session; real = Session.run\n"
                           "def run(self, calls):\n    real(self, calls[:2]); die()\n"
                           "Session.run = run",
    "after-commit": "import genre_batch.stages.compact as c; c.finish_compactions = die",
    "deleting-index": "from genre_batch.storage.store import Store; real = Store.delete\n"
                      "def delete(self, paths):\n    real(self, paths[:1]); die() if '/index/' in ''.join(paths) else None; real(self, paths)\n"
                      "Store.delete = delete",
    "deleting-parts": "from genre_batch.storage.store import Store; real = Store.delete\n"
                      "def delete(self, paths):\n    real(self, paths[:1]); die() if '/parts/' in ''.join(paths) else None; real(self, paths)\n"
                      "Store.delete = delete",
}
"""Where a compaction dies (SIGKILL of the flow process): each step of compact.compact."""


@pytest.mark.parametrize("step", list(CRASHES))
def test_compaction_killed_at_each_step_loses_and_doubles_nothing(tmp_path: Path, dask_scheduler: str, step: str) -> None:
    store, seen = busy_store(tmp_path)
    child = (
        "import os, signal\n"
        "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        f"{CRASHES[step]}\n"
        "from genre_batch.cluster import session\nfrom genre_batch.stages import compact\nfrom genre_batch.storage.store import Store\n"
        f"with session({dask_scheduler!r}) as cluster:\n    compact.compact(Store({str(tmp_path)!r}), cluster, target_windows=60)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pieces = [n for n in os.listdir(store.index) if n.startswith("compact-") and ".tmp-" not in n]
    assert len(pieces) == {"some-pieces-written": 2, "before-commit": 4, "index-half-written": 4}.get(step, 5)  # + the commit file
    assert window_keys(store) == seen  # readers see every current row exactly once, right after the crash
    fstore.repair(store)  # what the next run does first
    assert window_keys(store) == seen
    parts = os.listdir(store.feature_parts)
    committed = step not in ("some-pieces-written", "before-commit", "index-half-written")
    assert all(p.startswith("compact-") for p in parts) == committed and len(parts) == (3 if committed else 10)
    assert not [n for n in os.listdir(store.index) + parts if ".tmp-" in n]
    assert len([n for n in os.listdir(store.index) if n.startswith("compact-")]) == (5 if committed else 0)  # no orphan piece
    with session(dask_scheduler) as cluster:  # and the next compaction finishes the work
        compact.compact(store, cluster, target_windows=60)
    assert window_keys(store) == seen and len(os.listdir(store.feature_parts)) == 3


def test_a_compaction_committed_before_index_pieces_is_read_and_replaced(tmp_path: Path, dask_scheduler: str) -> None:
    """Index version 1 compactions wrote their rows into the commit file itself: such a store reads and compacts again."""
    store, seen = busy_store(tmp_path)
    files = fstore.index_files(store)
    rows = fstore.current_tracks(store)
    rows = pa.concat_tables([rows, fstore.resolved_outcome(fstore.read_index(store), fstore.read_inventory(store), fstore.LIBROSA, True)])
    meta = {**fstore.INDEX_SCHEMA.metadata, b"genre_batch.replaces_index": json.dumps([p.rsplit("/", 1)[-1] for p in files]).encode(),
            b"genre_batch.replaces_parts": b"[]"}
    store.write_table(fstore.compacted_index_path(store, "20250101T000000000000Z-abcdef"), rows.replace_schema_metadata(meta))
    fstore.repair(store)
    assert os.listdir(store.index) == ["compact-20250101T000000000000Z-abcdef.parquet"] and window_keys(store) == seen
    with session(dask_scheduler) as cluster:
        compact.compact(store, cluster, target_windows=60)
    assert window_keys(store) == seen and len(os.listdir(store.feature_parts)) == 3 and len(os.listdir(store.index)) == 5


def test_current_rows_are_chosen_as_the_rule_says_on_a_random_index() -> None:
    """resolved_keys (hash lookup + numeric sort) against the rule written out: per listed file, among its rows of the
    listed fingerprint and the family's version, the newest success, else the newest failure; files in URI order."""
    rng = np.random.default_rng(7)
    uris = [f"/music/{i:03d}.mp3" for i in rng.permutation(60)]
    listed = {u: f"fp{rng.integers(3)}" for u in uris[:50]}  # 10 URIs only in the index: removed files
    rows = [
        {"uri": uris[rng.integers(60)], "fingerprint": f"fp{rng.integers(3)}", "family": ["librosa", "musicnn"][rng.integers(2)],
         "feature_version": int(FEATURE_VERSION - rng.integers(2)), "error_type": [None, None, "io_error"][rng.integers(3)],
         "extracted_at": T0 + timedelta(hours=int(rng.integers(5)))}
        for _ in range(400)
    ]
    index = pa.Table.from_pylist(rows, schema=pa.schema([fstore.INDEX_SCHEMA.field(c) for c in fstore.CHOICE_COLUMNS]))
    inventory = pa.table({"uri": list(listed), "fingerprint": list(listed.values())})  # not in URI order
    expected = []
    for uri in sorted(listed):
        mine = [(r["error_type"] is not None, -r["extracted_at"].timestamp(), i) for i, r in enumerate(rows)
                if r["uri"] == uri and r["fingerprint"] == listed[uri] and r["family"] == "librosa" and r["feature_version"] == FEATURE_VERSION]
        if mine:
            failed, _, row = min(mine)
            expected.append((row, failed, list(listed).index(uri)))
    got = fstore.resolved_keys(index, inventory)
    assert list(zip(got["_row"].to_pylist(), got["_failed"].to_pylist(), got["_at"].to_pylist())) == expected
    plan = fstore.plan(inventory, index)
    done = {list(listed)[at] for row, failed, at in expected if rows[row]["error_type"] is None}
    assert plan.todo["uri"].to_pylist() == sorted(plan.todo["uri"].to_pylist()) and plan.unchanged == len(done)
    assert sorted(plan.todo["uri"].to_pylist() + plan.moved["uri"].to_pylist()) == sorted(set(listed) - done)  # same fingerprints: moves
