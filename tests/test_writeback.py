"""Write-back (#15 item 4): predicted genres written into generated files' tags, recorded, undone; features kept."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mutagen
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import s3fs
import soundfile as sf
from conftest import cli
from test_feature_store import T0
from test_operations import register
from test_s3 import s3, s3_endpoint  # noqa: F401 - fixtures: a real S3 server (SeaweedFS)

from genre_batch import GenreBatchError
from genre_batch.analysis import audio
from genre_batch.analysis.columns import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.cluster import session
from genre_batch.library import labels, writeback
from genre_batch.library.discovery import discover
from genre_batch.library.synth import render, write_audio
from genre_batch.modelling import registry
from genre_batch.publishing import catalog, similar, vectors
from genre_batch.publishing.tagging import tag_groups
from genre_batch.stages import retrain
from genre_batch.stages import tag as tag_stage
from genre_batch.storage import feature_store as fstore
from genre_batch.storage import lease
from genre_batch.storage.store import Store

TAGGED = {"a.mp3": "Jazz", "b.flac": "Jazz", "c.ogg": None, "d.m4a": None, "e.wav": None, "f.opus": "Jazz", "g.mp3": None}
"""Generated files and the genre tag each starts with; the model calls every one 'rock'."""


def make_files(folder: Path) -> None:
    """Short generated clips in every writable format, some with a genre tag, and one AU file (no tags to write)."""
    folder.mkdir(parents=True)
    for i, (name, genre) in enumerate(TAGGED.items()):
        write_audio(folder / name, render("chiptune", 2.0, i), audio.SAMPLE_RATE, {"genre": genre} if genre else None)
    sf.write(folder / "h.au", render("ambient", 2.0, 9), audio.SAMPLE_RATE, format="AU")


def index_listing(store: Store, listing: pa.Table) -> None:
    """Index the listed files as an extraction would (their real tags; windows near 0, which the model calls rock)."""
    rows, matrices, index = [], [], []
    for file in listing.to_pylist():
        tags = audio.read_tags(file["uri"])
        meta = {"duration_s": 2.0, "sample_rate": 22050, "channels": 1, "offset_s": 0.0, "analysed_s": 2.0,
                "tag_genre": tags.genre, "tag_artist": None, "tag_album": None, "feature_version": FEATURE_VERSION,
                "run_id": "r1", "extracted_at": T0}
        index.append({**file, **meta, "family": "librosa", "part": "r1-00000.parquet", "row_start": len(rows), "row_count": 1})
        rows.append({**file, **meta, "window": 0, "window_offset_s": 0.0})
        matrices.append(np.random.default_rng(len(rows)).normal(size=(1, len(FEATURE_NAMES))).astype(np.float32))
    fstore.write_shard(store, "r1-00000.parquet", fstore.feature_table(rows, matrices), fstore.index_table(index))
    fstore.write_inventory(store, listing)


def tag(store: Store, dask_scheduler: str, run_id: str) -> tag_stage.TagSummary:
    """Publish a catalog snapshot of the store's current tracks with its current model."""
    with session(dask_scheduler) as cluster:
        return tag_stage.tag(store, run_id, cluster)


def decoded(path: Path) -> np.ndarray:
    """Every decoded sample of a file."""
    segments, _ = audio.decode(str(path))
    return np.concatenate([s.samples for s in segments])


def raw_genre(path: Path) -> list[str]:
    """The genre tag's raw values in a file."""
    return writeback.genre_values(mutagen.File(path)) if mutagen.File(path) is not None and mutagen.File(path).tags is not None else []


def digest(path: Path) -> str:
    """A hash of a file's bytes."""
    return hashlib.sha1(path.read_bytes()).hexdigest()


def tag_in_process(store: Store) -> pa.Table:
    """Tag the store's current tracks with model m-1 in this process and publish the rows (vector space fitted here)."""
    tracks, musicnn = fstore.current_tracks(store), fstore.current_tracks(store, family=fstore.MUSICNN)
    family = vectors.space_family(tracks.num_rows, tracks.num_rows - musicnn.num_rows)  # the tag stage's choice
    space = vectors.fitted(store, family, musicnn if family == fstore.MUSICNN else tracks, similar.in_process)
    rows = tag_groups(store, "m-1", fstore.by_part(tracks), "t1", T0, space, musicnn)
    catalog.publish(store, rows, "t1", "m-1", space.describe())
    return rows


@pytest.fixture
def tagged(tmp_path: Path) -> tuple[Path, Store]:
    """A library of generated files, indexed, with a catalog calling every file rock (tagged in this process)."""
    library = tmp_path / "library"
    make_files(library)
    store = Store(str(tmp_path / "store"))
    index_listing(store, discover(str(library)))
    register(store, "m-1", passed=True)
    registry.promote(store, "m-1")
    rows = tag_in_process(store)
    assert rows["genre"].to_pylist() == ["rock"] * 8 and sum(rows["disagrees_with_tag"].fill_null(False).to_pylist()) == 3  # the Jazz tags
    return library, store


def test_preview_writes_nothing_and_apply_changes_only_the_genre_tag(tagged: tuple[Path, Store], dask_scheduler: str) -> None:
    library, store = tagged
    before = {p.name: (digest(p), decoded(p)) for p in sorted(library.iterdir())}

    code, out, err = cli("write-tags", "--store", store.url, "--format", "json")
    preview = json.loads(out)
    assert code == 0 and preview["applied"] is False and preview["run_id"] is None, err
    assert sorted(Path(f["uri"]).name for f in preview["files"]) == sorted(before)
    assert {f["new_tag"][0] for f in preview["files"]} == {"rock"} and all(0 < f["confidence"] <= 1 for f in preview["files"])
    code, out, _ = cli("write-tags", "--store", store.url, "--only-missing", "--format", "json")
    assert sorted(Path(f["uri"]).name for f in json.loads(out)["files"]) == ["c.ogg", "d.m4a", "e.wav", "g.mp3", "h.au"]
    code, out, _ = cli("write-tags", "--store", store.url, "--min-confidence", "1")
    assert code == 0 and "0 files would be written" in out
    assert {p.name: digest(p) for p in library.iterdir()} == {n: d for n, (d, _) in before.items()}  # nothing written
    assert not store.exists(writeback.writes_folder(store))

    os.chmod(library / "g.mp3", 0o444)  # read-only: left alone
    write_audio(library / "b.flac", render("ambient", 2.0, 5), audio.SAMPLE_RATE, {"genre": "Blues"})  # changed since tagging
    (library / "f.opus").unlink()  # vanished
    code, out, err = cli("write-tags", "--store", store.url, "--apply", "--format", "json")
    result = json.loads(out)
    assert code == 0 and result["applied"] and result["written"] == 4 and result["failed"] == 4, err
    outcome = {Path(f["uri"]).name: (f["outcome"], f["error_type"]) for f in result["files"]}
    assert outcome == {
        "a.mp3": ("written", None), "c.ogg": ("written", None), "d.m4a": ("written", None), "e.wav": ("written", None),
        "b.flac": ("failed", "changed_since_tagging"), "f.opus": ("failed", "vanished"), "g.mp3": ("failed", "read_only"),
        "h.au": ("failed", "unsupported_format"),
    }
    for name in ("a.mp3", "c.ogg", "d.m4a", "e.wav"):
        assert raw_genre(library / name) == ["rock"] and audio.read_tags(str(library / name)).genre == "rock"
        assert np.array_equal(decoded(library / name), before[name][1])  # the audio is untouched
    for name in ("g.mp3", "h.au"):
        assert digest(library / name) == before[name][0]
    assert not [p for p in library.iterdir() if p.name.startswith(".")]  # no temporary copy left
    assert raw_genre(library / "b.flac") == ["Blues"]

    code, out, _ = cli("query", "--store", store.url, "--format", "json",
                       "SELECT regexp_extract(uri, '[^/]+$') AS f, old_tag, new_tag, model_version, outcome, error_type FROM writes ORDER BY f")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 8
    assert rows[0] == {"f": "a.mp3", "old_tag": ["Jazz"], "new_tag": ["rock"], "model_version": "m-1", "outcome": "written", "error_type": None}
    assert rows[2]["old_tag"] == [] and rows[2]["f"] == "c.ogg"

    # the written files keep their features: the next extraction has nothing to do for them
    os.chmod(library / "g.mp3", 0o644)
    plan = fstore.plan(discover(str(library)), fstore.read_index(store))
    assert sorted(Path(u).name for u in plan.todo["uri"].to_pylist()) == ["b.flac"]  # only the file changed by hand
    written = writeback.written(store)
    assert sorted(Path(u).name for u in written["uri"].to_pylist()) == ["a.mp3", "c.ogg", "d.m4a", "e.wav"]
    # and their tags are neither labels nor disagreements
    with pytest.raises(GenreBatchError, match=r"found \{'jazz': 2\}"):  # training's labels: b.flac's and f.opus's Jazz, no rock
        retrain.labelled(store, "tags")
    assert labels.resolve("tags", fstore.current_tracks(store), str(library))["genre"].to_pylist().count("rock") == 4  # without the record
    again = tag(store, dask_scheduler, "t2")
    assert (again.mode, again.predicted, again.disagreements) == ("incremental", 4, 2)  # the 4 written re-tagged; b.flac and f.opus: Jazz (carried)
    by_name = {Path(r["uri"]).name: r for r in catalog.read(store).to_pylist()}
    assert by_name["a.mp3"]["embedded_genre"] is None and by_name["a.mp3"]["disagrees_with_tag"] is None
    code, out, _ = cli("write-tags", "--store", store.url, "--format", "json")  # nothing left to write for them
    assert sorted(Path(f["uri"]).name for f in json.loads(out)["files"]) == ["b.flac", "f.opus", "g.mp3", "h.au"]


def test_undo_restores_the_old_tags_of_files_not_changed_since(tagged: tuple[Path, Store]) -> None:
    library, store = tagged
    original = {p.name: raw_genre(p) for p in library.iterdir()}
    code, out, _ = cli("write-tags", "--store", store.url, "--apply", "--format", "json")
    run = json.loads(out)["run_id"]
    assert code == 0 and json.loads(out)["written"] == 7
    audio_file = mutagen.File(library / "c.ogg")
    writeback.set_genre(audio_file, ["Hand Edited"])  # changed by a person since
    code, out, err = cli("write-tags", "--store", store.url, "--undo", run, "--format", "json")
    result = json.loads(out)
    assert code == 0 and result["undoes"] == run and result["written"] == 6 and result["failed"] == 1, err
    assert [(Path(f["uri"]).name, f["error_type"]) for f in result["files"] if f["outcome"] == "failed"] == [("c.ogg", "changed_since_tagging")]
    for name, values in original.items():
        if name not in ("c.ogg", "h.au"):
            assert raw_genre(library / name) == values
    assert raw_genre(library / "c.ogg") == ["Hand Edited"]
    assert writeback.written(store).num_rows == 7  # the write run's rows stay; their contents are gone from the library
    code, out, _ = cli("write-tags", "--store", store.url, "--undo", run, "--format", "json")  # again: only the file that failed
    assert code == 0 and [(Path(f["uri"]).name, f["outcome"]) for f in json.loads(out)["files"]] == [("c.ogg", "failed")]
    plan = fstore.plan(discover(str(library)), fstore.read_index(store))
    assert [Path(u).name for u in plan.todo["uri"].to_pylist()] == ["c.ogg"]  # restored files keep their features too


def test_undo_of_a_run_that_filled_only_missing_tags_clears_them_again(tagged: tuple[Path, Store]) -> None:
    """Every value restored is 'no tag' (an undone --only-missing run): the undo used to end in a traceback."""
    library, store = tagged
    code, out, _ = cli("write-tags", "--store", store.url, "--only-missing", "--apply", "--format", "json")
    run = json.loads(out)["run_id"]
    assert code == 0 and json.loads(out)["written"] == 4  # c.ogg, d.m4a, e.wav, g.mp3 (h.au has no tags to write)
    code, out, err = cli("write-tags", "--store", store.url, "--undo", run, "--format", "json")
    assert code == 0 and json.loads(out)["written"] == 4 and "Traceback" not in err, err
    assert all(raw_genre(library / name) == [] for name in ("c.ogg", "d.m4a", "e.wav", "g.mp3"))
    assert fstore.plan(discover(str(library)), fstore.read_index(store)).todo.num_rows == 0  # features kept, re-keyed
    undo_run = json.loads(out)["run_id"]
    code, out, err = cli("write-tags", "--store", store.url, "--undo", run)  # every file is restored: nothing left to undo
    assert (code, out) == (2, "") and err.strip() == f"error: write-back run {run} was already undone by run {undo_run}: to write its tags again, undo {undo_run}"
    code, out, _ = cli("write-tags", "--store", store.url, "--undo", undo_run, "--format", "json")  # the tags come back
    assert code == 0 and json.loads(out)["written"] == 4 and all(raw_genre(library / name) != [] for name in ("c.ogg", "d.m4a", "e.wav", "g.mp3"))
    redo_run = json.loads(out)["run_id"]
    code, _, err = cli("write-tags", "--store", store.url, "--undo", undo_run)  # undone in turn
    assert code == 2 and err.strip().endswith(f"was already undone by run {redo_run}: to write its tags again, undo {redo_run}")


@pytest.mark.parametrize("name", ["a::b [Remastered].wav", "ü" * 123 + ".wav"])
def test_a_local_name_with_url_syntax_or_at_the_length_limit_is_written(tmp_path: Path, name: str) -> None:
    """Local paths are not URLs: fsspec reads '::' as a chain of filesystems (the file was reported changed); a name of
    250 bytes left no room for the temporary copy's name (File name too long)."""
    path = tmp_path / "Live [2001]" / name
    path.parent.mkdir()
    write_audio(path, render("chiptune", 1.0, 1), audio.SAMPLE_RATE, None)
    old, (fingerprint, size, _) = writeback.replace(str(path), writeback.local_fingerprint(str(path))[0], ["rock"])
    assert old == [] and raw_genre(path) == ["rock"] and (fingerprint, size) == writeback.local_fingerprint(str(path))[:2]
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temporary copy left


def test_usage_errors_and_the_lease(tagged: tuple[Path, Store]) -> None:
    _, store = tagged
    code, _, err = cli("write-tags", "--store", store.url, "--min-confidence", "1.5")
    assert code == 2 and "Invalid value for '--min-confidence'" in err
    code, _, err = cli("write-tags", "--store", store.url, "--undo", "nope", "--apply")
    assert code == 2 and err.startswith("error: --undo restores a write-back run's old tags by itself: drop --apply")
    code, _, err = cli("write-tags", "--store", store.url, "--undo", "nope")
    assert code == 2 and err.startswith("error: no write-back run nope in the store")
    lease.acquire(store, "other-run")
    code, _, err = cli("write-tags", "--store", store.url, "--apply")
    assert code == 1 and "in use by run other-run" in err and not store.exists(writeback.writes_folder(store))


def test_s3_objects_are_replaced_with_if_match_and_a_concurrent_change_is_not_overwritten(
    s3: s3fs.S3FileSystem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    write_audio(local / "a.mp3", render("chiptune", 2.0, 1), audio.SAMPLE_RATE, {"genre": "Jazz"})
    write_audio(local / "b.flac", render("chiptune", 2.0, 2), audio.SAMPLE_RATE)
    s3.mkdir("wbtest")
    s3.put(str(local), "wbtest/lib", recursive=True)
    library = "s3://wbtest/lib"
    store = Store(str(tmp_path / "store"))
    index_listing(store, discover(library))
    register(store, "m-1", passed=True)
    registry.promote(store, "m-1")
    tag_in_process(store)

    concurrent = (local / "other.flac")
    write_audio(concurrent, render("ambient", 2.0, 3), audio.SAMPLE_RATE, {"genre": "Folk"})
    tag_copy = writeback.retag

    def another_writer_meanwhile(path: str, values: list[str]) -> list[str]:
        """b.flac is rewritten by someone else while genre-batch tags its downloaded copy."""
        if path.endswith(".flac"):
            s3.pipe_file("wbtest/lib/b.flac", concurrent.read_bytes())
        return tag_copy(path, values)

    monkeypatch.setattr(writeback, "retag", another_writer_meanwhile)
    code, out, err = cli("write-tags", "--store", store.url, "--apply", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert code == 0 and (result["written"], result["failed"]) == (1, 1), err
    failed = [f for f in result["files"] if f["outcome"] == "failed"]
    assert [(Path(f["uri"]).name, f["error_type"]) for f in failed] == [("b.flac", "changed_since_tagging")]
    s3.invalidate_cache()
    assert s3.cat_file("wbtest/lib/b.flac") == concurrent.read_bytes()  # the other writer's version stands

    s3.get("wbtest/lib/a.mp3", str(tmp_path / "after.mp3"))
    assert raw_genre(tmp_path / "after.mp3") == ["rock"]
    assert np.array_equal(decoded(tmp_path / "after.mp3"), decoded(local / "a.mp3"))
    listing = discover(library)
    written = writeback.written(store)
    assert written.to_pylist() == [{"uri": "s3://wbtest/lib/a.mp3", "fingerprint": listing.filter(pc.equal(listing["uri"], "s3://wbtest/lib/a.mp3"))["fingerprint"][0].as_py()}]
    assert fstore.plan(listing, fstore.read_index(store)).todo["uri"].to_pylist() == ["s3://wbtest/lib/b.flac"]
