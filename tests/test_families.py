"""Feature families (#14 items 2 and 4): musicnn rows beside the librosa windows, planned, backfilled under a cap,
compacted, and checked against the model's families when tagging."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import current_features, make_library
from test_feature_store import T0, files, set_inventory, write_shard

from genre_batch import GenreBatchError
from genre_batch.analysis import audio, features
from genre_batch.analysis.columns import EMBEDDING_VERSION, FEATURE_NAMES, TAG_NAMES
from genre_batch.analysis.extraction import MUSICNN_PATCHES, extract_shard, musicnn_vector
from genre_batch.cluster import session
from genre_batch.library.synth import render, write_audio
from genre_batch.modelling import registry, training
from genre_batch.publishing import catalog, tagging
from genre_batch.stages import compact, runs
from genre_batch.stages import extract as extract_stage
from genre_batch.stages import tag as tag_stage
from genre_batch.stages import train as train_stage
from genre_batch.storage import feature_store as fstore
from genre_batch.storage.store import Store


def musicnn_rows(store: Store) -> pa.Table:
    """The current musicnn rows of the library, sorted by URI."""
    tracks = fstore.current_tracks(store, family=fstore.MUSICNN)
    groups = fstore.by_part(tracks)
    if not groups:
        return fstore.MUSICNN_SCHEMA.empty_table()
    return pa.concat_tables([fstore.read_windows(store, g, family=fstore.MUSICNN) for g in groups]).sort_by("uri")


def librosa_part_bytes(store: Path) -> dict[str, str]:
    """SHA-256 of every librosa part file."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (store / "features" / "parts").glob("*.parquet")}


def test_musicnn_columns_are_documented_slugs() -> None:
    assert len(fstore.TAG_COLUMNS) == len(set(fstore.TAG_COLUMNS)) == len(TAG_NAMES) == 50
    assert fstore.tag_slug("female vocalists") == "tag_female_vocalists" and fstore.tag_slug("Hip-Hop") == "tag_hip_hop"
    assert fstore.MUSICNN_SCHEMA.names[-1] == "patches" and fstore.MUSICNN_SCHEMA.names[6:8] == ["emb_000", "emb_001"]
    assert fstore.MUSICNN == fstore.Family("musicnn", EMBEDDING_VERSION, "musicnn")


def test_musicnn_features_are_deterministic_for_a_generated_signal(tmp_path: Path) -> None:
    path = tmp_path / "electronic.flac"
    write_audio(path, render("electronic", 40.0, 7), audio.SAMPLE_RATE, {"genre": "electronic"})
    segments, _, _ = audio.load(str(path), features.window_spans)
    first, patches = musicnn_vector(segments)
    second, _ = musicnn_vector(segments)
    assert first.dtype == np.float32 and first.shape == (250,) and np.isfinite(first).all()
    assert np.array_equal(first, second) and patches == MUSICNN_PATCHES
    assert ((first[200:] >= 0) & (first[200:] <= 1)).all()  # tag scores are sigmoid outputs

    # the same file extracted by two shards gives identical musicnn rows, one per track, indexed with row_count 1
    listing = pa.table({"uri": [str(path)], "track_id": ["t"], "fingerprint": ["f"], "size": [1], "version": ["v"],
                        "families": [["librosa", "musicnn"]]})
    rows = []
    for name in ("a", "b"):
        store = Store(str(tmp_path / name))
        extract_shard(store, listing, "run", 0)
        index = fstore.stored_index(store)
        assert sorted(zip(index["family"].to_pylist(), index["row_count"].to_pylist())) == [("librosa", 4), ("musicnn", 1)]
        part = store.read_table(fstore.part_path(store, "run-00000.parquet", fstore.MUSICNN))
        assert part.schema.equals(fstore.MUSICNN_SCHEMA) and part["patches"].to_pylist() == [MUSICNN_PATCHES]
        rows.append(part.select(fstore.MUSICNN_COLUMNS))
    assert rows[0].equals(rows[1])
    assert np.allclose(np.array([rows[0][c][0].as_py() for c in fstore.MUSICNN_COLUMNS]), first)

    # classify decodes a file into the same joined rows as tagging reads from the store, for every family set
    inventory = pa.table({k: listing[k] for k in ("uri", "track_id", "fingerprint", "size", "version")})
    located = training.located(store, fstore.current_tracks(store, inventory), inventory, ["librosa", "musicnn"])
    for families in (["librosa", "musicnn"], ["musicnn"], ["librosa"]):
        stored = training.matrix(training.family_rows(store, located, families), training.columns_of(families))
        assert np.array_equal(tagging.file_rows(str(path), families), stored)


def test_an_unexpected_failure_decoding_one_file_is_its_error_row_not_the_shard_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not an AudioError (a library's bug: '::' in an S3 key once raised TypeError in fsspec): the other files go on."""
    good, bad = tmp_path / "good.wav", tmp_path / "bad.wav"
    for path in (good, bad):
        write_audio(path, render("electronic", 12.0, 1), audio.SAMPLE_RATE)
    load = audio.load

    def failing(uri: str, spans: audio.SpanPlan) -> tuple:
        """audio.load, raising TypeError for the bad file."""
        if uri == str(bad):
            raise TypeError("boom")
        return load(uri, spans)

    monkeypatch.setattr(audio, "load", failing)
    listing = pa.table({"uri": [str(bad), str(good)], "track_id": ["b", "g"], "fingerprint": ["f1", "f2"], "size": [1, 1], "version": ["v", "v"],
                        "families": [["librosa"], ["librosa"]]})
    store = Store(str(tmp_path / "store"))
    result = extract_shard(store, listing, "run", 0)
    assert (result.extracted, result.failed) == (1, 1)
    index = {r["uri"]: r for r in fstore.stored_index(store).to_pylist()}
    assert (index[str(bad)]["error_stage"], index[str(bad)]["error_type"], index[str(bad)]["error_message"]) == ("decode", "TypeError", "boom")
    assert index[str(good)]["error_type"] is None and index[str(good)]["row_count"] > 0


def musicnn_shard(store: Store, name: str, shard: list[dict], run_id: str) -> None:
    """Write a shard holding only musicnn rows, as a backfill does."""
    stamp = {"feature_version": EMBEDDING_VERSION, "run_id": run_id, "extracted_at": T0}
    rows = [{**f, **stamp} for f in shard]
    index = [{**f, **stamp, "family": "musicnn", "part": name, "row_start": i, "row_count": 1} for i, f in enumerate(shard)]
    vectors = [np.full(len(fstore.MUSICNN_COLUMNS), i, np.float32) for i in range(len(shard))]
    fstore.write_parts(store, name, {fstore.MUSICNN: fstore.musicnn_table(rows, vectors, [4] * len(shard))}, fstore.index_table(index))


def test_training_and_tagging_join_the_families_per_track(tmp_path: Path) -> None:
    """Librosa windows and musicnn rows of the same (uri, fingerprint), in other parts and orders, joined per track."""
    store = Store(str(tmp_path))
    library = files([f"t{i}" for i in range(5)])
    write_shard(store, "run1-00000.parquet", library, "run1", T0)
    musicnn_shard(store, "run2-00000.parquet", library[3:0:-1], "run2")  # t3, t2, t1: vectors 0, 1, 2
    inventory = set_inventory(store, library)
    tracks = fstore.current_tracks(store, inventory)
    current = fstore.current_positions(store, inventory).positions()
    assert fstore.lacking(current, ["librosa", "musicnn"]) == fstore.lacking(current, ("musicnn",)) == {"musicnn": 2}
    assert fstore.lacking(current, ["librosa"]) == {}

    located = training.located(store, tracks, inventory, ["musicnn", "librosa"])
    assert located["uri"].to_pylist() == ["/music/t1.mp3", "/music/t2.mp3", "/music/t3.mp3"]
    rows = training.family_rows(store, located, ["librosa", "musicnn"])
    assert rows.column_names == ["uri", *training.columns_of(["librosa", "musicnn"])] and rows.num_rows == 9  # 3 windows each
    expected = {"/music/t1.mp3": 2.0, "/music/t2.mp3": 1.0, "/music/t3.mp3": 0.0}
    assert [v for v in rows["emb_000"].to_pylist()] == [expected[u] for u in rows["uri"].to_pylist()]
    assert rows["uri"].to_pylist() == [u for u in located["uri"].to_pylist() for _ in range(3)]
    librosa = training.family_rows(store, located, ["librosa"])
    assert rows.select(["uri", *FEATURE_NAMES]).equals(librosa)

    # defaults without a current model: librosa + musicnn with linear once every current track has musicnn, else librosa
    assert train_stage.choices(store, None, None) == (["librosa"], "xgboost")
    assert train_stage.choices(store, ["musicnn", "librosa"], None) == (["librosa", "musicnn"], "linear")
    musicnn_shard(store, "run3-00000.parquet", [library[0], library[4]], "run3")
    assert train_stage.choices(store, None, None) == (["librosa", "musicnn"], "linear")
    assert train_stage.choices(store, ["librosa"], None) == (["librosa"], "xgboost")
    assert train_stage.choices(store, None, "xgboost") == (["librosa", "musicnn"], "xgboost")

    alone = training.family_rows(store, located, ["musicnn"])
    assert alone.num_rows == 3 and alone["tag_rock"].to_pylist() == [2.0, 1.0, 0.0]
    assert training.columns_of(["musicnn", "librosa"]) == [*FEATURE_NAMES, *fstore.MUSICNN_COLUMNS]


def test_plan_backfills_only_the_missing_family_under_the_cap(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    library = files([f"t{i}" for i in range(6)])
    write_shard(store, "run1-00000.parquet", library, "run1", T0)
    musicnn_shard(store, "run2-00000.parquet", library[:1], "run2")
    listed = library + files(["new"])
    inventory = set_inventory(store, listed)
    index = fstore.read_index(store)

    only_librosa = fstore.plan_run(inventory, index, [fstore.LIBROSA])
    assert only_librosa.todo["families"].to_pylist() == [["librosa"]] and only_librosa.backfill == 0

    capped = fstore.plan_run(inventory, index, [fstore.LIBROSA, fstore.MUSICNN], backfill_cap=2)
    todo = dict(zip(capped.todo["uri"].to_pylist(), capped.todo["families"].to_pylist()))
    assert todo == {"/music/new.mp3": ["librosa", "musicnn"], "/music/t1.mp3": ["musicnn"], "/music/t2.mp3": ["musicnn"]}
    assert (capped.backfill, capped.backfill_left, capped.unchanged) == (2, 3, 4)

    uncapped = fstore.plan_run(inventory, index, [fstore.LIBROSA, fstore.MUSICNN])
    assert (uncapped.backfill, uncapped.backfill_left, uncapped.todo.num_rows) == (5, 0, 6)

    # a file that moved keeps the rows of both families
    moved = [{**library[0], "uri": "/music/moved.mp3"}] + library[1:]
    inventory = set_inventory(store, moved)
    after_move = fstore.plan_run(inventory, index, [fstore.LIBROSA, fstore.MUSICNN], backfill_cap=0)
    assert sorted(zip(after_move.moved["uri"].to_pylist(), after_move.moved["family"].to_pylist())) == [
        ("/music/moved.mp3", "librosa"), ("/music/moved.mp3", "musicnn")]
    assert after_move.todo.num_rows == 0 and after_move.backfill_left == 5


def test_compaction_carries_both_families(tmp_path: Path, dask_scheduler: str) -> None:
    store = Store(str(tmp_path))
    library = files([f"t{i}" for i in range(6)])
    write_shard(store, "run1-00000.parquet", library[:3], "run1", T0)
    write_shard(store, "run1-00001.parquet", library[3:], "run1", T0)
    musicnn_shard(store, "run2-00000.parquet", library[:2], "run2")
    musicnn_shard(store, "run2-00001.parquet", library[2:4], "run2")
    set_inventory(store, library)
    windows, embeddings = current_features(store), musicnn_rows(store)
    assert embeddings.num_rows == 4
    index = fstore.stored_index(store, fstore.CHOICE_COLUMNS)
    assert compact.current_rows(index, fstore.read_inventory(store)) == index.num_rows == 10
    assert not compact.needed(store)  # no row is superseded: musicnn rows are current rows too
    with session(dask_scheduler) as cluster:
        summary = compact.compact(store, cluster)
    assert (summary.tracks, summary.parts_after) == (6, 1)
    assert current_features(store).equals(windows) and musicnn_rows(store).select(fstore.MUSICNN_COLUMNS).equals(
        embeddings.select(fstore.MUSICNN_COLUMNS))
    for folder in ("parts", "musicnn"):
        assert [p.name.startswith(fstore.COMPACT_PREFIX) for p in (tmp_path / "features" / folder).iterdir()] == [True]
    index = sorted(p.name for p in (tmp_path / "features" / "index").iterdir())  # a piece per family's part, the commit file
    assert [fstore.compaction_of(n)[1] for n in index] == [False, False, True]


def extract(library: Path, store: Path, scheduler: str, names: tuple[str, ...], cap: int = fstore.BACKFILL_CAP) -> extract_stage.ExtractSummary:
    """Run the extract stage for some families."""
    with session(scheduler) as cluster:
        return extract_stage.extract(str(library), Store(str(store)), runs.new_run_id(), cluster, features=names, backfill_cap=cap)


def tag(store: Path, scheduler: str, full: bool = False) -> tag_stage.TagSummary:
    """Run the tag stage."""
    with session(scheduler) as cluster:
        return tag_stage.tag(Store(str(store)), runs.new_run_id(), cluster, full=full)


def promote_copy(store: Store, version: str, families: dict[str, int]) -> str:
    """Register the model `version` again under a card naming other feature families (as a later version trains), promoted."""
    folder = f"{store.models}/{version}"
    meta = {k: v for k, v in registry.card(store, version).document.items() if k != "version"}
    copy = registry.new_version()
    for path in store.fs.ls(folder, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name != registry.METADATA_FILE:
            store.write_bytes(f"{store.models}/{copy}/{name}", store.fs.cat_file(path))
    store.write_json(f"{store.models}/{copy}/{registry.METADATA_FILE}", {**meta, "feature_families": families, "version": copy})
    registry.promote(store, copy)
    return copy


def test_adding_the_family_backfills_it_and_the_old_model_keeps_tagging(
    library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str
) -> None:
    library, path = library_factory(per_style=3), tmp_path / "store"
    store = Store(str(path))
    assert extract(library, path, dask_scheduler, ("librosa",)).extracted == 12
    with session(dask_scheduler) as cluster:
        trained = train_stage.train(store, "folders", "run-train", cluster)
    assert trained.promoted and registry.card(store, trained.version).families == {"librosa": fstore.LIBROSA.version}
    assert trained.hint is None  # no current model: the defaults for this store (librosa alone) were trained
    assert tag(path, dask_scheduler).rows == 12
    librosa_before, windows_before = librosa_part_bytes(path), current_features(store)

    # the dry run tells the backfill the first night with the family will do, and none without the family
    planned = extract_stage.dry_run(str(library), store, features=("librosa", "musicnn"), backfill_cap=5)
    assert (planned.new, planned.changed, planned.retried, planned.backfill, planned.backfill_left, planned.unchanged) == (0, 0, 0, 5, 7, 7)
    alone = extract_stage.dry_run(str(library), store, features=("librosa",), backfill_cap=5)
    assert (alone.backfill, alone.backfill_left, alone.unchanged) == (0, 0, 12)
    forced = extract_stage.dry_run(str(library), store, force=True, features=("librosa", "musicnn"), backfill_cap=5)
    assert (forced.forced, forced.backfill, forced.backfill_left, forced.unchanged) == (12, 0, 0, 0)

    # first night with the family: 5 files backfilled, musicnn only; librosa parts untouched; the catalog keeps 12 tracks
    first = extract(library, path, dask_scheduler, ("librosa", "musicnn"), cap=5)
    assert (first.extracted, first.backfilled, first.backfill_left, first.unchanged) == (5, 5, 7, 7)
    assert librosa_part_bytes(path) == librosa_before and current_features(store).equals(windows_before)
    assert musicnn_rows(store).num_rows == 5
    assert tag(path, dask_scheduler).rows == 12

    # training on the family meanwhile registers a model the gate refuses: the librosa model stays current and tags
    with session(dask_scheduler) as cluster:
        early = train_stage.train(store, "folders", "run-train", cluster, families=["librosa", "musicnn"])
    assert not early.promoted and "feature families incomplete (7 tracks lack musicnn)" in early.reason
    assert early.hint is None and train_stage.families_hint(store) is None  # families given; musicnn still incomplete
    assert early.sampled_tracks == 5 and registry.current_version(store) == trained.version

    # a model trained on the family is refused while some tracks lack it, naming the family and how to backfill it
    needing = promote_copy(store, trained.version, {"librosa": fstore.LIBROSA.version, "musicnn": EMBEDDING_VERSION})
    with pytest.raises(GenreBatchError, match=rf"model {needing} needs feature family musicnn \(version 1\), which 7 of the 12 tracks"):
        tag(path, dask_scheduler)
    registry.promote(store, trained.version)

    # a new file gets every family; the next night finishes the backfill, still without touching librosa parts
    make_library(library, 1, seed=5, styles=("ambient",))
    planned = extract_stage.dry_run(str(library), store, features=("librosa", "musicnn"))
    assert (planned.new, planned.backfill, planned.backfill_left, planned.unchanged) == (1, 7, 0, 5)
    second = extract(library, path, dask_scheduler, ("librosa", "musicnn"))
    assert (second.extracted, second.backfilled, second.backfill_left) == (8, 7, 0)
    assert set(librosa_before.items()) < set(librosa_part_bytes(path).items())
    new = fstore.current_tracks(store, family=fstore.MUSICNN)
    assert new.num_rows == 13 and set(pc.unique(new["row_count"]).to_pylist()) == {1}
    assert extract(library, path, dask_scheduler, ("librosa", "musicnn")).extracted == 0
    assert tag(path, dask_scheduler).rows == 13

    # compaction keeps both families; tagging still works on the compacted store
    embeddings = musicnn_rows(store).select(["uri", *fstore.MUSICNN_COLUMNS])
    with session(dask_scheduler) as cluster:
        compact.compact(store, cluster)
    assert musicnn_rows(store).select(["uri", *fstore.MUSICNN_COLUMNS]).equals(embeddings)
    assert tag(path, dask_scheduler, full=True).rows == 13

    # complete: a linear model on both families and one on musicnn alone are promoted and tag every track with them
    for families, kind in ((["librosa", "musicnn"], "linear"), (["musicnn"], "xgboost")):
        with session(dask_scheduler) as cluster:
            both = train_stage.train(store, "folders", "run-train", cluster, families=families, classifier=kind)
        card = registry.card(store, both.version)
        assert both.promoted and both.sampled_tracks == 13, both.reason
        assert card.classifier == kind and card.families == {f: fstore.FAMILIES[f].version for f in families}
        tagged = tag(path, dask_scheduler)
        assert (tagged.rows, tagged.model_version, tagged.mode) == (13, both.version, "full")
        rows = catalog.read(store, ["model_version", "probabilities"])
        assert set(rows["model_version"].to_pylist()) == {both.version}
        assert np.allclose([sum(p for _, p in row) for row in rows["probabilities"].to_pylist()], 1.0)
    # the next retrain keeps the current model's families and classifier
    with session(dask_scheduler) as cluster:
        again = train_stage.train(store, "folders", "run-train", cluster)
    assert (again.features, again.classifier) == (["musicnn"], "xgboost")
    # ... and says how to train the default now that every track has both families
    assert again.hint == (f"trained on musicnn like the current model {both.version}; every track has librosa,musicnn now: "
                          "--features librosa,musicnn trains the default (linear on librosa,musicnn)")
