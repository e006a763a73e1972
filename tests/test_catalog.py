"""Catalog publishing: atomic pointer switch, crash safety, pruning; atomic store writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from genre_batch import GenreBatchError
from genre_batch.publishing import catalog
from genre_batch.publishing.pointer import CatalogPointer, published
from genre_batch.storage import store as store_mod
from genre_batch.storage.store import Store

SPACE = {"name": "test-space", "family": "test", "family_version": 1, "dim": catalog.VECTOR_DIM, "pooling": "none (test vectors)",
         "scaler": "none (test vectors)", "sample_tracks": 0, "file": "spaces/test-space.npz"}
"""A vector space as the pointer records it, for catalogs of test vectors (its arrays are not stored)."""
"""The vector space tables of rows() are in (a description for CURRENT.json)."""


def unit_vectors(n: int) -> np.ndarray:
    """n random L2-normalised float32 vectors of the catalog's dimension (row i the same for every n)."""
    v = np.random.default_rng(0).standard_normal((n, catalog.VECTOR_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows(n: int, genre: str, run: str) -> pa.Table:
    """A catalog table of n tracks all tagged `genre` (track t<i> has embedding unit_vectors(n)[i])."""
    return pa.table(
        {
            "track_id": [f"t{i}" for i in range(n)],
            "uri": [f"/music/{i}.mp3" for i in range(n)],
            "fingerprint": [f"f{i}" for i in range(n)],
            "genre": [genre] * n,
            "confidence": [0.9] * n,
            "probabilities": [[(genre, 0.9), ("other", 0.1)]] * n,
            "embedded_genre": [None] * n,
            "disagrees_with_tag": [None] * n,
            "duration_s": [30.0] * n,
            "model_version": ["m-1"] * n,
            "feature_version": [1] * n,
            "run_id": [run] * n,
            "tagged_at": [datetime.now(timezone.utc)] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(unit_vectors(n).reshape(-1)), catalog.VECTOR_DIM),
            "tags": [["rock", "guitar"]] * n,
        },
        schema=catalog.CATALOG_SCHEMA,
    )


def test_read_before_first_publish_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GenreBatchError, match="no published catalog"):
        catalog.read(Store(str(tmp_path)))


def test_publish_switches_readers_to_the_new_snapshot(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    catalog.publish(s, rows(3, "rock", "run-a"), "run-a", "m-1", SPACE)
    pointer = catalog.publish(s, rows(5, "jazz", "run-b"), "run-b", "m-1", SPACE)
    table = catalog.read(s)
    assert table.num_rows == 5 and set(table["genre"].to_pylist()) == {"jazz"}
    assert pointer.rows == 5 and pointer.catalog_version == catalog.CATALOG_VERSION
    assert table.schema.metadata[b"genre_batch.catalog_version"] == str(catalog.CATALOG_VERSION).encode()


def test_snapshot_holds_one_file_per_genre_sorted_by_confidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each genre's rows are one file, most confident first, in row groups: a query on one genre reads one file."""
    monkeypatch.setattr(catalog, "ROW_GROUP_ROWS", 1_000)  # row groups of 1,000 rows: the layout at 2,005 rows
    s = Store(str(tmp_path))
    n = 2 * catalog.ROW_GROUP_ROWS + 5
    genres = ["rock", "jazz", "pop", "blues", "metal"]
    shuffled = rows(n, "x", "run-a")
    shuffled = shuffled.set_column(3, "genre", pa.array([genres[(i * 7) % 5] for i in range(n)]))
    shuffled = shuffled.set_column(4, "confidence", pa.array([((i * 7919) % n) / n for i in range(n)]))
    pointer = catalog.publish(s, shuffled, "run-a", "m-1", SPACE)
    table = catalog.read(s)
    assert table.num_rows == n and sorted(table["confidence"].to_pylist()) == sorted(shuffled["confidence"].to_pylist())
    assert sorted(pointer.genres.values()) == sorted(genres) and len(catalog.files(s)) == 5
    for path in catalog.files(s):
        part = pq.read_table(path)
        assert set(part["genre"].to_pylist()) == {pointer.genres[path.split("/catalog/", 1)[1]]}
        confidence = part["confidence"].to_pylist()
        assert confidence == sorted(confidence, reverse=True) and part.num_rows in (n // 5, n // 5 + 1)
        assert pq.ParquetFile(path).metadata.row_group(0).num_rows == min(part.num_rows, catalog.ROW_GROUP_ROWS)


def test_crash_before_pointer_switch_leaves_previous_catalog_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(str(tmp_path))
    catalog.publish(s, rows(4, "rock", "run-a"), "run-a", "m-1", SPACE)
    before = published(s)

    def crash(*args: object) -> None:
        raise KeyboardInterrupt("killed during publish")

    monkeypatch.setattr(catalog, "promote", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.publish(s, rows(9, "jazz", "run-b"), "run-b", "m-1", SPACE)
    assert published(s) == before
    table = catalog.read(s)
    assert table.num_rows == 4 and set(table["genre"].to_pylist()) == {"rock"}
    monkeypatch.undo()
    catalog.publish(s, rows(9, "jazz", "run-c"), "run-c", "m-1", SPACE)  # the next run publishes
    assert catalog.read(s).num_rows == 9


def test_crash_while_writing_the_pointer_leaves_the_old_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(str(tmp_path))
    catalog.publish(s, rows(2, "rock", "run-a"), "run-a", "m-1", SPACE)
    real_replace = os.replace

    def die(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store_mod.os, "replace", die)
    with pytest.raises(OSError):
        catalog.publish(s, rows(7, "jazz", "run-b"), "run-b", "m-1", SPACE)
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert catalog.read(s).num_rows == 2
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # no temp files left behind


def test_old_snapshots_are_pruned_keeping_the_last_n(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    for i in range(7):
        catalog.publish(s, rows(1, "rock", f"run-{i}"), f"run-{i}", "m-1", SPACE, keep=3)
    kept = sorted(p.name for p in (tmp_path / "catalog" / "snapshots").iterdir())
    assert len(kept) == 3
    assert published(s).snapshot == kept[-1]


def test_a_damaged_snapshot_file_is_named_and_a_lost_pointer_costs_no_snapshot(tmp_path: Path) -> None:
    """A truncated catalog file: every read names it, `errors` stays queryable; the README's way out (move the pointer
    aside, publish again) keeps the earlier snapshots."""
    from conftest import cli

    s = Store(str(tmp_path))
    for i in range(3):
        catalog.publish(s, rows(2, "rock", f"run-{i}"), f"run-{i}", "m-1", SPACE)
    damaged = f"{s.catalog}/{published(s).files[0]}"
    Path(damaged).write_bytes(Path(damaged).read_bytes()[:100])
    with pytest.raises(GenreBatchError, match=f"^damaged Parquet file in the store: {damaged} \\(.*magic bytes.*\\); see the README, Reliability$"):
        catalog.read(s)
    code, out, err = cli("query", "--store", str(tmp_path), "SELECT count(*) FROM catalog")
    assert code == 1 and err.startswith("error: cannot read the published catalog: ") and damaged in err and err.count("\n") == 1
    assert cli("query", "--store", str(tmp_path), "--format", "json", "SELECT count(*) AS n FROM errors")[:2] == (0, '[{"n": 0}]\n')
    before = sorted(p.name for p in (tmp_path / "catalog" / "snapshots").iterdir())
    crashed = tmp_path / "catalog" / "snapshots" / "20000101T000000000000Z-crashed"  # a publish that died before its switch
    crashed.mkdir()
    (crashed / "genre-000.parquet.tmp-1").write_bytes(b"PAR1")
    (tmp_path / "catalog" / "CURRENT.json").rename(tmp_path / "catalog" / "CURRENT.json.damaged")
    catalog.publish(s, rows(2, "jazz", "run-3"), "run-3", "m-1", SPACE)
    after = sorted(p.name for p in (tmp_path / "catalog" / "snapshots").iterdir())
    assert after[:-1] == before and published(s).history == after and catalog.read(s).num_rows == 2


def test_a_pointer_of_the_first_version_is_read_and_the_next_publish_keeps_its_snapshots(tmp_path: Path) -> None:
    """catalog/CURRENT.json as the first genre-batch wrote it (no history, genres, change feed, vector space or similar):
    read with those empty, the snapshots up to it count as published, and the next publish writes today's pointer."""
    s = Store(str(tmp_path))
    for i in range(2):
        first = catalog.publish(s, rows(2, "rock", f"run-{i}"), f"run-{i}", "m-1", SPACE)
    keys = ("snapshot", "files", "rows", "catalog_version", "model_version", "run_id", "published_at")
    s.write_json(s.pointer, {**{k: first.document[k] for k in keys}, "catalog_version": 1})
    old = published(s)
    assert (old.snapshot, old.rows, old.catalog_version, old.published_at.isoformat()) == (first.snapshot, 2, 1, first.document["published_at"])
    assert (old.history, old.genres, old.genre_rows, old.changes, old.vector_space, old.similar, old.space_name) == (None, {}, {}, None, None, None, None)
    assert catalog.published_history(s, old, 5) == snapshot_names(tmp_path) and catalog.read(s).num_rows == 2
    new = catalog.publish(s, rows(3, "jazz", "run-2"), "run-2", "m-1", SPACE)
    assert new.history == snapshot_names(tmp_path) and len(new.history) == 3 and new.catalog_version == catalog.CATALOG_VERSION
    s.write_json(s.pointer, {k: v for k, v in new.document.items() if k != "published_at"})
    with pytest.raises(GenreBatchError, match=f"^damaged JSON file in the store: {s.pointer} \\(no field 'published_at'\\)$"):
        published(s)


def test_a_pointer_whose_similar_or_vector_space_lacks_a_field_is_a_one_line_error(tmp_path: Path) -> None:
    """The pointer's `similar` and `vector_space` are read with it: one that lacks a field every version wrote makes
    the pointer damaged, named in one line."""
    from conftest import cli

    s = Store(str(tmp_path))
    pointer = catalog.publish(s, rows(3, "rock", "run-a"), "run-a", "m-1", SPACE)
    assert (pointer.similar.folder, pointer.vector_space.name) == (pointer.document["similar"]["folder"], "test-space")
    for key, field in (("similar", "folder"), ("vector_space", "name")):
        s.write_json(s.pointer, {**pointer.document, key: {k: v for k, v in pointer.document[key].items() if k != field}})
        with pytest.raises(GenreBatchError, match=f"^damaged JSON file in the store: {s.pointer} \\(no field '{field}'\\)$"):
            published(s)
        code, out, err = cli("similar", "--store", str(tmp_path), "t0")
        assert (code, out, err) == (1, "", f"error: damaged JSON file in the store: {s.pointer} (no field '{field}')\n")


def test_write_bytes_is_all_or_nothing(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    path = s.path("x", "file.bin")
    store_mod.write_bytes(s.fs, path, b"old")
    store_mod.write_bytes(s.fs, path, b"new")
    assert Path(path).read_bytes() == b"new"
    assert [p.name for p in Path(path).parent.iterdir()] == ["file.bin"]


# ----------------------------------------------------------------------------------------------------------------
# A publishing process killed (SIGKILL: no exception handler, no finally) at each step of catalog.publish
# ----------------------------------------------------------------------------------------------------------------

OLD = (("rock", 2), ("pop", 3), ("folk", 4))  # published before the crash, oldest first
NEW, NEXT, LAST = ("jazz", 7), ("blues", 9), ("metal", 5)


def kill_self(*args: object, **kwargs: object) -> None:
    """Die at once, as from SIGKILL or a power cut."""
    os.kill(os.getpid(), signal.SIGKILL)


def die_at_fsync(nth: int) -> Callable[[int], None]:
    """An os.fsync that, at its nth call, cuts the file being written to half its length and dies."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == nth:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            kill_self()
        real(fd)

    return fsync


def die_at_pointer_rename() -> Callable[[str, str], None]:
    """An os.replace that dies instead of renaming a finished temp file onto the pointer."""
    real = os.replace
    return lambda src, dst: kill_self() if dst.endswith(catalog.POINTER) else real(src, dst)


def die_after_first_rm() -> Callable[..., None]:
    """LocalFileSystem.rm that deletes one old snapshot, then dies."""
    real = LocalFileSystem.rm

    def rm(self: LocalFileSystem, path: str, *args: object, **kwargs: object) -> None:
        real(self, path, *args, **kwargs)
        kill_self()

    return rm


CRASHES: dict[str, Callable[[], None]] = {
    "snapshot-half-written": lambda: setattr(os, "fsync", die_at_fsync(1)),
    "before-switch": lambda: setattr(catalog, "promote", kill_self),
    "pointer-half-written": lambda: setattr(os, "fsync", die_at_fsync(11)),  # 1: the genre file, 2: the change feed, 3: the similar routed file, 4-5: its spread lookup rows, 6: its vectors part, 7-8: its lookups, 9: its deep lists, 10: its piece, 11: the pointer
    "pointer-before-rename": lambda: setattr(os, "replace", die_at_pointer_rename()),
    "before-prune": lambda: setattr(catalog, "prune", kill_self),
    "during-prune": lambda: setattr(LocalFileSystem, "rm", die_after_first_rm()),
}
"""Where publish dies: each step of catalog.publish (write_snapshot, promote, prune), inside and between them."""


def crash_publish(store: str, step: str) -> None:
    """(In a child process.) Publish the NEW catalog with keep=2 and get killed at `step`."""
    CRASHES[step]()
    catalog.publish(Store(store), rows(NEW[1], NEW[0], "run-new"), "run-new", "m-1", SPACE, keep=2)


def snapshot_names(store: Path) -> list[str]:
    """Names of the snapshot folders, oldest first."""
    return sorted(p.name for p in (store / "catalog" / "snapshots").iterdir())


def assert_published(s: Store, genre: str, n: int) -> None:
    """The pointer names complete files that read whole as the catalog of `n` tracks of `genre`."""
    table = catalog.read(s)
    assert (table.num_rows, set(table["genre"].to_pylist())) == (n, {genre})
    assert published(s).rows == n and table.schema.metadata[b"genre_batch.catalog_version"] == str(catalog.CATALOG_VERSION).encode()


@pytest.mark.parametrize(
    "step, switched, old_left, snapshot_written",
    [
        ("snapshot-half-written", False, 3, False),
        ("before-switch", False, 3, True),
        ("pointer-half-written", False, 3, True),
        ("pointer-before-rename", False, 3, True),
        ("before-prune", True, 3, True),
        ("during-prune", True, 2, True),
    ],
)
def test_publisher_killed_at_each_step(tmp_path: Path, step: str, switched: bool, old_left: int, snapshot_written: bool) -> None:
    s = Store(str(tmp_path))
    for i, (genre, n) in enumerate(OLD):
        catalog.publish(s, rows(n, genre, f"run-old-{i}"), f"run-old-{i}", "m-1", SPACE, keep=10)
    old = snapshot_names(tmp_path)
    previous = published(s)

    child = subprocess.run(
        [sys.executable, "-c", f"import test_catalog; test_catalog.crash_publish({str(tmp_path)!r}, {step!r})"],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120, check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr

    # Readers see one complete catalog: the previous one until the switch, the new one from the switch on.
    if switched:
        assert_published(s, *NEW)
        assert published(s).run_id == "run-new"
    else:
        assert published(s) == previous
        assert_published(s, *OLD[-1])
    [new] = [name for name in snapshot_names(tmp_path) if name not in old]
    assert snapshot_names(tmp_path) == old[3 - old_left:] + [new]  # prune deletes oldest first
    written = tmp_path / "catalog" / "snapshots" / new / "genre-000.parquet"
    assert written.exists() == snapshot_written  # never a partial file under the final name
    if snapshot_written:
        assert pq.read_table(written).num_rows == NEW[1]
    else:
        [partial] = list(written.parent.iterdir())  # the half-written temp file, named so that nothing reads it
        assert ".tmp-" in partial.name and partial.stat().st_size > 0
    leftovers = sorted(p.name for p in (tmp_path / "catalog").iterdir() if ".tmp-" in p.name)
    assert len(leftovers) == (step in ("pointer-half-written", "pointer-before-rename"))

    # The next run publishes; its prune keeps the two newest published snapshots (keep=2) and removes everything else,
    # a snapshot the crash left unpublished included: it never counts among the kept ones.
    catalog.publish(s, rows(NEXT[1], NEXT[0], "run-next"), "run-next", "m-1", SPACE, keep=2)
    assert_published(s, *NEXT)
    [next_name] = [n for n in snapshot_names(tmp_path) if n not in old and n != new]
    assert snapshot_names(tmp_path) == ([new] if switched else [old[-1]]) + [next_name]
    catalog.publish(s, rows(LAST[1], LAST[0], "run-last"), "run-last", "m-1", SPACE, keep=2)
    assert_published(s, *LAST)
    assert len(snapshot_names(tmp_path)) == 2 and new not in snapshot_names(tmp_path)


def test_change_feed_matches_a_diff_of_two_snapshots(tmp_path: Path) -> None:
    from genre_batch.publishing import query

    s = Store(str(tmp_path))
    first = rows(5, "rock", "run-a")
    catalog.publish(s, first, "run-a", "m-1", SPACE)
    assert {r["change"] for r in query.run(s, "SELECT change FROM changes").to_pylist()} == {"added"}  # the first: all added
    second = rows(6, "rock", "run-b").filter(pc.not_equal(pa.array([f"t{i}" for i in range(6)]), "t0"))  # t0 removed, t5 added
    genres = ["jazz" if t == "t1" else "rock" for t in second["track_id"].to_pylist()]  # t1 changes genre
    uris = ["/music/moved/2.mp3" if t == "t2" else u for t, u in zip(second["track_id"].to_pylist(), second["uri"].to_pylist())]  # t2 moves
    second = second.set_column(3, "genre", pa.array(genres)).set_column(1, "uri", pa.array(uris))
    catalog.publish(s, second, "run-b", "m-1", SPACE)
    feed = {r["track_id"]: r for r in query.run(s, "SELECT * FROM changes").to_pylist()}
    assert {t: r["change"] for t, r in feed.items()} == {"t0": "removed", "t1": "genre_changed", "t2": "moved", "t5": "added"}
    assert (feed["t1"]["old_genre"], feed["t1"]["new_genre"], feed["t1"]["old_confidence"]) == ("rock", "jazz", 0.9)
    assert (feed["t2"]["uri"], feed["t2"]["old_uri"]) == ("/music/moved/2.mp3", "/music/2.mp3")
    assert (feed["t0"]["uri"], feed["t0"]["new_genre"], feed["t5"]["old_genre"]) == ("/music/0.mp3", None, None)
    before = {r["track_id"]: (r["uri"], r["genre"]) for r in first.to_pylist()}  # the feed applied to the old catalog is the new one
    for t, r in feed.items():
        if r["change"] == "removed":
            del before[t]
        else:
            before[t] = (r["uri"], r["new_genre"])
    assert before == {r["track_id"]: (r["uri"], r["genre"]) for r in catalog.read(s).to_pylist()}


def test_change_feed_gathered_from_per_genre_pieces_equals_the_whole_diff(tmp_path: Path) -> None:
    from genre_batch.stages.tag import change_groups

    s = Store(str(tmp_path))
    first = rows(8, "rock", "run-a")
    first = first.set_column(3, "genre", pa.array(["rock", "jazz", "rock", "jazz", "pop", "rock", "jazz", "pop"]))
    before = catalog.publish(s, first, "run-a", "m-1", SPACE)
    second = rows(9, "rock", "run-b").filter(pc.not_equal(pa.array([f"t{i}" for i in range(9)]), "t0"))  # t0 removed, t8 added
    genres = ["jazz", "blues", "jazz", "rock", "rock", "jazz", "pop", "rock"]  # t2 rock -> blues, t4 pop -> rock
    uris = [f"/music/moved/{t}.mp3" if t in ("t3", "t4") else u for t, u in zip(second["track_id"].to_pylist(), second["uri"].to_pylist())]
    second = second.set_column(3, "genre", pa.array(genres)).set_column(1, "uri", pa.array(uris))  # t3 moves, t4 moves and changes genre
    after = catalog.publish(s, second, "run-b", "m-1", SPACE)
    whole = s.read_table(f"{s.catalog}/{after.changes}")
    groups = change_groups(before, after.genres)
    assert [len(b) + len(a) for b, a in groups] == [1, 2, 2, 2]  # blues (new), jazz, pop, rock
    for n, (old, new) in enumerate(groups):
        catalog.diff_genre(s, "again", n, old, new)
    kinds = catalog.gather_changes(s, "again")
    gathered = s.read_table(f"{s.catalog}/{catalog.changes_file('again')}")
    assert gathered.equals(whole) and gathered.schema == catalog.CHANGES_SCHEMA
    assert kinds == {"removed": 1, "added": 1, "genre_changed": 2, "moved": 1}
    assert not s.exists(catalog.changes_folder(s, "again"))
    unnamed = CatalogPointer.parse({k: v for k, v in before.document.items() if k != "genres"})  # a pointer that does not name its genres: one group
    for n, (old, new) in enumerate(change_groups(unnamed, after.genres)):
        catalog.diff_genre(s, "unnamed", n, old, new)
    catalog.gather_changes(s, "unnamed")
    assert s.read_table(f"{s.catalog}/{catalog.changes_file('unnamed')}").equals(whole)


def test_carried_rows_are_matched_on_listing_positions_and_merged_by_row_number(tmp_path: Path) -> None:
    """Which rows of the published snapshot a nightly carries over, drops and predicts (tag.carried_over), and the
    genre file a merge task writes from the carried rows less those dropped (by number) plus the new pieces."""
    from genre_batch.publishing.tagging import merge_genre
    from genre_batch.stages.tag import carried_over

    s = Store(str(tmp_path))
    first = rows(6, "rock", "run-a")
    first = first.set_column(3, "genre", pa.array(["rock", "jazz", "rock", "jazz", "rock", "jazz"]))
    previous = catalog.publish(s, first, "run-a", "m-1", SPACE)
    # the listing now: t0 and t1 unchanged, t2 changed (new fingerprint), t3 gone, t4 without current features, t5 unchanged, t9 new
    listing = [("/music/0.mp3", "f0"), ("/music/1.mp3", "f1"), ("/music/2.mp3", "f2-new"), ("/music/4.mp3", "f4"),
               ("/music/5.mp3", "f5"), ("/music/9.mp3", "f9")]
    inventory = pa.table({"uri": [u for u, _ in listing], "fingerprint": [f for _, f in listing]})
    tracks = np.array([0, 1, 2, 4, 5])  # listing rows with current features (not /music/4.mp3)
    carried = carried_over(s, previous, inventory, tracks)
    assert sorted(carried.todo.tolist()) == [2, 5]  # the changed and the new file
    assert sorted(carried.kept["track_id"].to_pylist()) == ["t0", "t1", "t5"] and carried.kept.column_names == ["track_id", "fingerprint"]
    by_genre = {previous.genres[f]: s.read_table(f"{s.catalog}/{f}", ["track_id"])["track_id"].to_pylist() for f in previous.files}
    dropped = {previous.genres[f]: sorted(by_genre[previous.genres[f]][i] for i in lines) for f, lines in carried.dropped.items()}
    assert dropped == {"rock": ["t2", "t4"], "jazz": ["t3"]} and carried.dropped_rows == 3
    # the merge task of rock: the carried file less its dropped rows (by number), plus a new piece
    rock = next(f for f, g in previous.genres.items() if g == "rock")
    s.write_table(f"{catalog.pieces_folder(s, 'next')}/000/00000.parquet", rows(10, "rock", "run-b").slice(9))  # t9
    assert merge_genre(s, "next", 0, rock, carried.dropped[rock]) == (2, 0)
    merged = s.read_table(f"{s.catalog}/{catalog.genre_file('next', 0)}")
    assert sorted(merged["track_id"].to_pylist()) == ["t0", "t9"] and merged.schema == catalog.CATALOG_SCHEMA
    assert catalog.rows_by_file(s, [], ["uri"]).column_names == ["uri", "_file", "_line"]  # no previous files: no rows


def test_catalog_files_store_the_embedding_plain_and_read_back_the_same_rows(tmp_path: Path) -> None:
    """A genre file's embedding column is written uncompressed, without a dictionary or statistics, every other
    column zstd; the file reads back as the rows written, in FILE_ORDER, and DuckDB (the query verb) reads it too."""
    import duckdb

    s = Store(str(tmp_path))
    table = rows(300, "rock", "run-a").set_column(4, "confidence", pa.array(np.linspace(0.2, 0.9, 300)))
    assert catalog.write_genre(s, catalog.genre_file("snap", 0), table) == 300
    path = f"{s.catalog}/{catalog.genre_file('snap', 0)}"
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    embedding = columns.pop("embedding.list.element")
    assert embedding.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in embedding.encodings and not embedding.is_stats_set
    assert len(columns) == 15 and {c.compression for c in columns.values()} == {"ZSTD"} and all(c.is_stats_set for c in columns.values())
    assert "RLE_DICTIONARY" in columns["probabilities.key_value.key"].encodings  # the genres, once per row group
    written = s.read_table(path)
    assert written.equals(table.sort_by(catalog.FILE_ORDER)) and written.schema == catalog.CATALOG_SCHEMA
    first = duckdb.sql(f"SELECT uri, embedding FROM '{path}' LIMIT 1").fetchall()[0]
    assert first[0] == "/music/299.mp3" and np.allclose(first[1], unit_vectors(300)[299])


def test_merge_drops_carried_rows_by_number_and_counts_only_kept_disagreements(tmp_path: Path) -> None:
    """A merge task keeps the carried file's rows but those numbered dropped, adds the new pieces, writes them in
    FILE_ORDER and counts the disagreements of the rows it kept."""
    from genre_batch.publishing.tagging import merge_genre

    s = Store(str(tmp_path))
    old = rows(5, "rock", "run-a").set_column(4, "confidence", pa.array([0.9, 0.8, 0.7, 0.6, 0.5]))
    old = old.set_column(7, "disagrees_with_tag", pa.array([True, None, True, False, None]))
    catalog.write_genre(s, catalog.genre_file("prev", 0), old)
    new = rows(7, "rock", "run-b").slice(5).set_column(4, "confidence", pa.array([0.75, 0.95]))
    new = new.set_column(7, "disagrees_with_tag", pa.array([True, None]))
    catalog.write_rows(s, f"{catalog.pieces_folder(s, 'next')}/000/00000.parquet", new)
    assert merge_genre(s, "next", 0, catalog.genre_file("prev", 0), np.array([0, 3])) == (5, 2)
    merged = s.read_table(f"{s.catalog}/{catalog.genre_file('next', 0)}")
    assert merged["track_id"].to_pylist() == ["t6", "t1", "t5", "t2", "t4"]
    assert merged["confidence"].to_pylist() == [0.95, 0.8, 0.75, 0.7, 0.5]


def test_merge_diff_equals_the_diff_of_the_whole_files(tmp_path: Path) -> None:
    """The change piece a merge task computes from the rows it left out and the new ones equals the diff of the genre's
    previous file against the merged one: a changed, a moved, a removed and a new track among unchanged ones, and a
    new track that shares its track_id with a kept one (then the whole files are diffed)."""
    previous = rows(6, "rock", "run-a").select(catalog.DIFF_COLUMNS)
    kept = np.array([True, False, True, False, False, True])  # t1 changed, t3 moved, t4 removed
    new = pa.table({"track_id": ["t1", "t3", "t7"], "uri": ["/music/1.mp3", "/music/moved-3.mp3", "/music/7.mp3"],
                    "genre": ["rock"] * 3, "confidence": [0.5, 0.9, 0.8]})
    merged = pa.concat_tables([previous.filter(pa.array(kept)), new.cast(previous.schema)])
    whole = catalog.diff(previous, merged)
    assert catalog.merge_diff(previous, kept, new.cast(previous.schema)).equals(whole)
    assert sorted(whole["change"].to_pylist()) == ["added", "moved", "removed"]  # same genre: a changed confidence is no change
    clash = new.cast(previous.schema).set_column(0, "track_id", pa.array(["t1", "t3", "t5"]))  # t5 is also kept
    merged = pa.concat_tables([previous.filter(pa.array(kept)), clash])
    assert catalog.merge_diff(previous, kept, clash).equals(catalog.diff(previous, merged))
    assert catalog.merge_diff(previous.slice(0, 0), np.zeros(0, bool), clash).equals(catalog.diff(previous.slice(0, 0), clash))


def test_a_corrupt_page_is_a_damaged_file_named_by_direct_and_dataset_reads(tmp_path: Path) -> None:
    """A truncated file has no footer (ArrowInvalid); a corrupt page raises pyarrow's own OSError: both are named."""
    import pyarrow.dataset as ds

    s = Store(str(tmp_path))
    good, bad = (f"{tmp_path}/{name}.parquet" for name in ("good", "bad"))
    table = pa.table({"uri": [f"/music/{i:06d}.mp3" for i in range(50_000)]})
    for path in (good, bad):
        s.write_table(path, table)
    data = bytearray(Path(bad).read_bytes())
    data[100:20_000] = bytes(19_900)  # inside the first data page
    Path(bad).write_bytes(bytes(data))
    message = f"^damaged Parquet file in the store: {bad} \\(.+\\); see the README, Reliability$"
    with pytest.raises(GenreBatchError, match=message):
        s.read_table(bad)
    with pytest.raises(GenreBatchError, match=message), s.naming_damage([good, bad]):
        ds.dataset([good, bad], format="parquet").to_table()
    assert s.read_table(good).equals(table)
