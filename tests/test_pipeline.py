"""The stages end to end on a real 2-process Dask cluster, without Prefect.

The trained store is made with the defaults (librosa and musicnn extracted, the linear model on both): the pipeline a
fresh store gets. Tests of one stage's behaviour on a fresh store extract librosa alone (the musicnn family has its
own tests: test_families, test_musicnn), so that they do not pay its extraction CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import current_features, keep_pristine, make_library, restored

from genre_batch import GenreBatchError, progress
from genre_batch.analysis.audio import SAMPLE_RATE
from genre_batch.analysis.columns import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.cluster import session
from genre_batch.library.synth import STYLES, render, write_audio
from genre_batch.modelling import registry
from genre_batch.publishing import catalog, query, tagging
from genre_batch.publishing.pointer import published
from genre_batch.publishing.tagging import classify_files
from genre_batch.stages import extract as extract_stage
from genre_batch.stages import retrain, runs
from genre_batch.stages import tag as tag_stage
from genre_batch.stages import train as train_stage
from genre_batch.storage.feature_store import LIBROSA, MUSICNN, current_errors
from genre_batch.storage.store import Store


LIBROSA_ONLY = (LIBROSA.name,)
"""The families of the tests of one stage on a fresh store: librosa alone."""


def part_files(store: Path) -> dict[str, float]:
    """Every file under the store's features folder with its mtime."""
    return {str(p): p.stat().st_mtime_ns for p in (store / "features").rglob("*") if p.is_file()}


def extract(library: Path, store: Path, scheduler: str, features: tuple[str, ...] = extract_stage.DEFAULT_FEATURES) -> extract_stage.ExtractSummary:
    """Run the extract stage (the default families unless given)."""
    with session(scheduler) as cluster:
        return extract_stage.extract(str(library), Store(str(store)), runs.new_run_id(), cluster, features=features)


def train(store: Path, spec: str, run_id: str, scheduler: str) -> train_stage.TrainSummary:
    """Run the train stage."""
    with session(scheduler) as cluster:
        return train_stage.train(Store(str(store)), spec, run_id, cluster)


def tag(store: Path, run_id: str, scheduler: str, full: bool = False) -> tag_stage.TagSummary:
    """Run the tag stage."""
    with session(scheduler) as cluster:
        return tag_stage.tag(Store(str(store)), run_id, cluster, full=full)


def test_incremental_extraction(library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str) -> None:
    library, store = library_factory(per_style=2), tmp_path / "store"
    first = extract(library, store, dask_scheduler, LIBROSA_ONLY)
    assert (first.discovered, first.extracted, first.failed) == (8, 8, 0)
    features = current_features(Store(str(store)))
    assert features.num_rows == 8
    matrix = np.column_stack([features[n].to_numpy() for n in FEATURE_NAMES])
    assert matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert set(features["feature_version"].to_pylist()) == {FEATURE_VERSION}
    assert all(d == pytest.approx(3.0, abs=0.1) for d in features["duration_s"].to_pylist())

    # unchanged library: nothing extracted, no feature data written at all
    before = part_files(store)
    second = extract(library, store, dask_scheduler, LIBROSA_ONLY)
    assert (second.extracted, second.unchanged) == (0, 8)
    assert part_files(store) == before

    # one file rewritten: exactly that file is re-extracted, its old row superseded
    touched = sorted(library.rglob("*.flac"))[0]
    write_audio(touched, render("ambient", 3.0, seed=99), SAMPLE_RATE, {"genre": "ambient"})
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    third = extract(library, store, dask_scheduler, LIBROSA_ONLY)
    assert (third.extracted, third.unchanged) == (1, 7)
    features = current_features(Store(str(store)))
    assert features.num_rows == 8 and len(set(features["uri"].to_pylist())) == 8
    runs = {r["uri"]: r["run_id"] for r in features.to_pylist()}
    assert len({run for uri, run in runs.items() if uri != str(touched)}) == 1  # the 7 others: first run
    assert runs[str(touched)] not in {run for uri, run in runs.items() if uri != str(touched)}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory, dask_scheduler: str) -> tuple[Path, Path]:
    """A library of 5 clips per style, extracted and trained with folder labels with the defaults (librosa and musicnn,
    the linear model), built once per module; a pristine copy of both (file times kept, so fingerprints match) sits
    next to them."""
    root = tmp_path_factory.mktemp("trained")
    library, store = root / "library", root / "store"
    make_library(library, 5)
    extract(library, store, dask_scheduler)
    summary = train(store, "folders", "run-train", dask_scheduler)
    assert summary.promoted and summary.genres == sorted(STYLES)
    assert (summary.features, summary.classifier) == (["librosa", "musicnn"], "linear")  # the default model of a fresh store
    return keep_pristine((library, store))


@pytest.fixture
def trained_store(trained_once: tuple[Path, Path]) -> Iterator[tuple[Path, Path]]:
    """The trained library and store, restored to their pristine state after the test."""
    yield from restored(trained_once)


def test_model_classifies_held_out_synthetic_files(trained_store: tuple[Path, Path], tmp_path: Path, dask_scheduler: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """In process and as Dask tasks (chunks of 3 files here): the same answers in the files' order, progress reported
    chunk by chunk with the errors so far."""
    _, store = trained_store
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    files = []
    for style in STYLES:
        for seed in (7001, 7002):
            files.append(write_audio(unseen / f"{seed}.{style}.ogg", render(style, 3.0, seed), SAMPLE_RATE))
    broken = unseen / "broken.ogg"
    broken.write_bytes(b"not audio")
    uris, n = [str(broken)] + [str(f) for f in files], len(files) + 1
    monkeypatch.setattr(tagging, "CLASSIFY_CHUNK", 3)
    reports: list[progress.Report] = []
    with progress.listening(reports.append):  # the CLI's progress bar listens so
        results = classify_files(Store(str(store)), uris, top=2)
    assert [u for u, _ in results] == uris and isinstance(results[0][1], str)
    assert [r[0][0] for _, r in results[1:]] == [f.name.split(".")[1] for f in files]
    assert [(r.stage, r.done, r.total, r.errors) for r in reports] == [("classify", min(i, n), n, 1) for i in range(3, n + 3, 3)]
    reports.clear()
    with session(dask_scheduler) as cluster, progress.listening(reports.append):
        on_cluster = classify_files(Store(str(store)), uris, top=2, cluster=cluster)
    assert [u for u, _ in on_cluster] == uris and on_cluster[0] == results[0]
    for (_, a), (_, b) in zip(on_cluster[1:], results[1:]):  # single-threaded BLAS on the workers: equal to rounding
        assert [g for g, _ in a] == [g for g, _ in b] and [p for _, p in a] == pytest.approx([p for _, p in b], rel=1e-5, abs=1e-12)
    assert len(reports) == -(-n // 3) and [r.done for r in reports] == sorted({r.done for r in reports}) and (reports[-1].done, reports[-1].errors) == (n, 1)


def test_a_model_of_another_feature_version_is_refused_by_tag_and_classify(trained_store: tuple[Path, Path]) -> None:
    """A model whose features this genre-batch no longer extracts is never fed today's columns: tag and classify both say so."""
    from conftest import cli

    library, store = trained_store
    s = Store(str(store))
    version = registry.current_version(s)
    card = f"{s.models}/{version}/{registry.METADATA_FILE}"
    s.write_json(card, {**s.read_json(card), "feature_version": FEATURE_VERSION - 1})
    line = (f"error: current model {version} was trained on feature version {FEATURE_VERSION - 1}, the store holds version "
            f"{FEATURE_VERSION}: retrain with 'genre-batch train'\n")
    for argv in (["tag"], ["classify", str(next(p for p in library.rglob("*") if p.is_file()))]):
        assert cli(argv[0], "--store", str(store), *argv[1:]) == (1, "", line)


def test_training_metadata_and_current_pointer(trained_store: tuple[Path, Path]) -> None:
    _, store = trained_store
    s = Store(str(store))
    card = registry.current(s)
    meta = card.document
    assert card.label_source == "folders" and card.feature_version == FEATURE_VERSION and card.labelled_tracks == 20
    assert card.classifier == "linear" and card.families == {"librosa": LIBROSA.version, "musicnn": MUSICNN.version}
    assert meta["tracks"] == 20 and meta["cross_validation"]["folds"] == 5
    sample = meta["sample"]  # far below the budget: nothing thinned
    assert sample["windows_per_track"] == round(meta["windows"] / 20, 2) and sample["min_windows"] == 2
    assert sample["cap_per_genre"] == int(sample["rows_per_genre"] // min(max(1.0, sample["windows_per_track"]), sample["min_windows"]))
    assert sample["matrix_bytes"] <= sample["memory_budget_bytes"]
    fit, fits = meta["fit"], meta["cross_validation"]["fits"]  # what each fit cost: its rows, the C it chose, CPU seconds
    assert fit["tracks"] == 20 and fit["windows"] == meta["windows"] and fit["C"] == meta["params"]["C"] and fit["cpu_s"] >= 0
    assert len(fits) == 5 and sum(f["tracks"] for f in fits) == 4 * 20 and all(f["cpu_s"] >= 0 and "C" in f for f in fits)
    assert meta["cross_validation"]["accuracy"] >= 0.8 > meta["majority_baseline"]
    assert set(meta["holdout"]["per_genre"]) == set(STYLES)
    assert len(meta["training_fingerprint"]) == 16
    folder = store / "models" / card.version
    assert (folder / "model.npz").stat().st_size > 0 and not (folder / "model.ubj").exists()  # coefficients and scaler, no pickle
    assert (folder / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert retrain.retrain_decision(s, "folders") == (False, f"current model {card.version} was trained on the same labelled data")
    assert retrain.retrain_decision(s, "tags")[0]  # another label source: another training set


def test_bad_files_become_error_records_and_the_rest_succeed(
    library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str
) -> None:
    library, store = library_factory(per_style=5), tmp_path / "store"
    bad = library / "bad"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    (bad / "random.mp3").write_bytes(np.random.default_rng(0).bytes(5000))
    (bad / "notes.flac").write_text("this is a text file, not audio\n")
    write_audio(bad / "short.wav", render("chiptune", 0.2, 1), SAMPLE_RATE)
    (bad / "cover.jpg").write_bytes(b"\xff\xd8\xff")  # not an audio extension: ignored
    summary = extract(library, store, dask_scheduler, LIBROSA_ONLY)
    assert (summary.discovered, summary.extracted, summary.failed) == (24, 20, 4)
    errors = {Path(r["uri"]).name: r for r in current_errors(Store(str(store))).to_pylist()}
    assert {n: e["error_type"] for n, e in errors.items()} == {
        "empty.wav": "empty",
        "random.mp3": "undecodable",
        "notes.flac": "undecodable",
        "short.wav": "too_short",
    }
    assert all(e["stage"] == "decode" and e["message"] and e["run_id"] for e in errors.values())
    # failed files are not retried while unchanged
    assert extract(library, store, dask_scheduler, LIBROSA_ONLY).extracted == 0
    # and they stay out of training (folder 'bad' has no features) and out of the catalog
    train(store, "folders", "run-1", dask_scheduler)
    tag(store, "run-1", dask_scheduler)
    assert catalog.read(Store(str(store))).num_rows == 20


def test_deleted_file_leaves_the_next_catalog(trained_store: tuple[Path, Path], dask_scheduler: str) -> None:
    library, store = trained_store
    tag(store, "run-1", dask_scheduler)
    gone = sorted(library.rglob("*.mp3"))[0]
    assert str(gone) in catalog.read(Store(str(store)))["uri"].to_pylist()
    gone.unlink()
    summary = extract(library, store, dask_scheduler)
    assert (summary.removed, summary.extracted) == (1, 0)
    tag(store, "run-2", dask_scheduler)
    uris = catalog.read(Store(str(store)))["uri"].to_pylist()
    assert str(gone) not in uris and len(uris) == 19


def test_catalog_rows_carry_probabilities_and_provenance(trained_store: tuple[Path, Path], dask_scheduler: str) -> None:
    _, store = trained_store
    summary = tag(store, "run-xyz", dask_scheduler)
    table = catalog.read(Store(str(store)))
    assert summary.rows == table.num_rows == 20
    for row in table.to_pylist():
        probs = dict(row["probabilities"])
        assert set(probs) == set(STYLES) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert row["confidence"] == pytest.approx(max(probs.values()))
        assert row["genre"] == max(probs, key=probs.get)
        assert row["model_version"] == summary.model_version and row["feature_version"] == FEATURE_VERSION
        assert row["run_id"] == "run-xyz" and row["embedded_genre"] in STYLES
        assert row["disagrees_with_tag"] == (row["genre"] != row["embedded_genre"])


def test_query_formats(trained_store: tuple[Path, Path], dask_scheduler: str) -> None:
    _, store = trained_store
    tag(store, "run-1", dask_scheduler)
    s = Store(str(store))
    table = query.run(s, "SELECT genre, count(*) AS n FROM catalog GROUP BY genre ORDER BY genre")
    assert table.to_pylist() == [{"genre": g, "n": 5} for g in sorted(STYLES)]
    as_json = query.to_json(query.fetch(s, "SELECT uri, probabilities FROM catalog ORDER BY uri LIMIT 2"))
    parsed = json.loads(as_json)
    assert len(parsed) == 2 and set(parsed[0]["probabilities"]) == set(STYLES)
    csv = query.to_csv(table).splitlines()
    assert csv[0] == '"genre","n"' and len(csv) == 5
    assert query.run(s, "SELECT count(*) AS n FROM errors").to_pylist() == [{"n": 0}]
    with pytest.raises(GenreBatchError, match="query failed"):
        query.run(s, "SELECT nope FROM catalog")


def catalog_by_uri(store: Path) -> dict[str, tuple]:
    """(track_id, genre, probabilities) of every catalog row, by URI."""
    return {r["uri"]: (r["track_id"], r["genre"], dict(r["probabilities"])) for r in catalog.read(Store(str(store))).to_pylist()}


def test_distributed_tagging_equals_the_single_process_result(trained_store: tuple[Path, Path], dask_scheduler: str) -> None:
    from datetime import datetime, timezone

    from genre_batch.modelling import training
    from genre_batch.publishing import vectors
    from genre_batch.publishing.tagging import families_of, tag_groups
    from genre_batch.storage.feature_store import KEYS, by_part, current_tracks, read_inventory

    _, store = trained_store
    summary = tag(store, "run-d", dask_scheduler)
    assert summary.mode == "full" and summary.predicted == summary.rows == 20
    s = Store(str(store))
    space = vectors.load(s, published(s).vector_space)
    assert space.family == MUSICNN.name  # the default extraction gives every track musicnn: its embeddings are the space
    inventory = read_inventory(s, KEYS)
    # as the stage: each track's rows of the model's other families located beside its librosa rows, then by part
    tracks = training.located(s, current_tracks(s, inventory), inventory, families_of(registry.card(s, summary.model_version)))
    local = tag_groups(s, summary.model_version, by_part(tracks), "run-d", datetime.now(timezone.utc), space, current_tracks(s, inventory, MUSICNN))
    expected = {r["uri"]: (r["track_id"], r["genre"], dict(r["probabilities"])) for r in local.to_pylist()}
    assert catalog_by_uri(store) == expected  # row for row: same tracks, genres, probabilities
    embeddings = {r["uri"]: r["embedding"] for r in catalog.read(s, ["uri", "embedding"]).to_pylist()}
    assert embeddings == {r["uri"]: r["embedding"] for r in local.to_pylist()}  # and the same embeddings


def test_incremental_tagging_equals_a_full_retag(trained_store: tuple[Path, Path], dask_scheduler: str, tmp_path: Path) -> None:
    library, store = trained_store
    tag(store, "run-1", dask_scheduler)
    assert tag(store, "run-2", dask_scheduler).mode == "unchanged"  # nothing changed: nothing predicted, nothing published
    changed, gone = sorted(library.rglob("*.wav"))[:2]
    write_audio(changed, render("percussion", 3.0, seed=77), SAMPLE_RATE, {"genre": "percussion"})
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    gone.unlink()
    write_audio(library / "chiptune" / "new.ogg", render("chiptune", 3.0, seed=78), SAMPLE_RATE)
    extract(library, store, dask_scheduler)
    incremental = tag(store, "run-3", dask_scheduler)
    assert (incremental.mode, incremental.predicted, incremental.carried, incremental.dropped) == ("incremental", 2, 18, 2)
    after = catalog_by_uri(store)
    assert str(gone) not in after and str(library / "chiptune" / "new.ogg") in after and len(after) == 20
    full = tag(store, "run-4", dask_scheduler, full=True)
    assert full.mode == "full" and full.predicted == 20
    retagged = catalog_by_uri(store)
    assert retagged.keys() == after.keys()
    for uri, (track, genre, probabilities) in retagged.items():
        assert after[uri][:2] == (track, genre)
        assert after[uri][2] == probabilities  # exactly: a row's probabilities do not depend on its batch


def test_moved_file_keeps_its_track_id_and_is_not_extracted_again(trained_store: tuple[Path, Path], dask_scheduler: str) -> None:
    library, store = trained_store
    tag(store, "run-1", dask_scheduler)
    before = catalog_by_uri(store)
    source = sorted(library.rglob("*.flac"))[0]
    target = library / "moved" / source.name
    target.parent.mkdir()
    source.rename(target)  # a rename keeps size and mtime
    summary = extract(library, store, dask_scheduler)
    assert (summary.extracted, summary.moved, summary.removed) == (0, 1, 1)
    tag(store, "run-2", dask_scheduler)
    after = catalog_by_uri(store)
    assert str(source) not in after and after[str(target)][0] == before[str(source)][0]
    (genre, probabilities), (genre_before, probabilities_before) = after[str(target)][1:], before[str(source)][1:]
    assert genre == genre_before
    assert probabilities == probabilities_before  # predicted alone now, with its part's other tracks before: the same


def test_training_sample_is_capped_deterministic_and_keeps_groups_whole() -> None:
    from genre_batch.modelling import training

    uris = [f"/m/{g}/{a}-{i}.mp3" for g in ("rock", "jazz") for a in range(10) for i in range(3)]
    tracks = pa.table({
        "uri": uris,
        "genre": [u.split("/")[2] for u in uris],
        "tag_artist": [u.split("/")[3].split("-")[0] for u in uris],
    })
    first = training.sample(tracks, training.Cap(9, 54), "artist")
    assert first.equals(training.sample(tracks.take(list(reversed(range(tracks.num_rows)))), training.Cap(9, 54), "artist"))
    counts = {g: first["genre"].to_pylist().count(g) for g in ("rock", "jazz")}
    assert counts == {"rock": 9, "jazz": 9}
    per_artist: dict[tuple, int] = {}
    for u in first["uri"].to_pylist():
        key = (u.split("/")[2], u.split("/")[3].split("-")[0])
        per_artist[key] = per_artist.get(key, 0) + 1
    assert sorted(per_artist.values()) == [3] * 6  # three whole artists per genre
    assert training.sample(tracks, None, "artist").equals(tracks)
    rows = training.TRAINING_BUDGET_BYTES // (10 * len(FEATURE_NAMES) * 4)
    assert training.cap_per_genre(10, 6.0) == training.Cap(rows // training.MIN_WINDOWS, rows)  # windows thinned to MIN_WINDOWS
    assert training.cap_per_genre(10, 1.0) == training.Cap(rows, rows)  # one row per track: nothing to thin


def test_retrain_policy_decisions(trained_store: tuple[Path, Path], tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    library, store = trained_store
    s = Store(str(store))
    version = registry.current_version(s)
    uris = sorted(str(p) for p in library.rglob("*") if p.is_file())
    labels_file = tmp_path / "labels.csv"

    def relabel(n: int) -> str:
        """A label file giving the folder genres, with the first n tracks relabelled."""
        other = {g: STYLES[(STYLES.index(g) + 1) % len(STYLES)] for g in STYLES}  # a genre that is not the folder's
        rows = [f"{u},{other[Path(u).parent.name] if i < n else Path(u).parent.name}" for i, u in enumerate(uris)]
        labels_file.write_text("file,genre\n" + "\n".join(rows) + "\n")
        return str(labels_file)

    assert retrain.retrain_decision(s, "folders", "always") == (True, "--retrain always")
    assert retrain.retrain_decision(s, "folders", "never")[0] is False
    assert retrain.retrain_decision(s, relabel(0))[1].startswith("label source changed")  # folders -> file
    code = ("import json, sys; from genre_batch.stages.retrain import retrain_decision; from genre_batch.storage.store import Store; "
            f"print(json.dumps([retrain_decision(Store({str(store)!r}), 'folders'), sorted({{m.split('.')[0] for m in sys.modules}})]))")
    decided, modules = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout)
    assert decided == [False, f"current model {version} was trained on the same labelled data"]  # read the index and the registry
    assert not {"xgboost", "sklearn", "librosa", "numba", "matplotlib"} & set(modules)  # run --dry-run and a no-op nightly stay cheap
    model, card = registry.load(s, version)
    labelled = retrain.labelled_keys(retrain.labelled(s, relabel(0)))
    registry.register(s, "m-file", model, {**card.document, "label_source": "file:labels.csv"}, b"", labelled)
    registry.promote(s, "m-file")
    assert retrain.retrain_decision(s, relabel(0)) == (False, "current model m-file was trained on the same labelled data")
    one = retrain.retrain_decision(s, relabel(1))  # 1 of 20 relabelled: 5 %, not above
    assert one == (False, "only 5.0% of the labelled set changed (retrain above 5%): current model m-file kept")
    two = retrain.retrain_decision(s, relabel(2))  # 2 of 20: 10 % > 5 %
    assert two[0] and "10.0% of the labelled set changed" in two[1]
    registry.promote(s, "m-file", pinned=True)
    assert retrain.retrain_decision(s, relabel(1)) == (False, "current model m-file is pinned")
    assert registry.pointer(s).history[-1:] == (version,)  # promoting the current model to pin it adds no history
    registry.promote(s, "m-file")
    late = datetime.now(timezone.utc) + timedelta(days=retrain.RETRAIN_AFTER_DAYS + 1)
    many = [f"{u},{Path(u).parent.name}" for u in uris] + ["/elsewhere/x.mp3,rock"]  # ignored: outside the library
    labels_file.write_text("file,genre\n" + "\n".join(many) + "\n")
    assert retrain.retrain_decision(s, str(labels_file), now=late)[0] is False  # unchanged, however old


def test_dry_run_prints_the_plan_and_writes_nothing(trained_store: tuple[Path, Path]) -> None:
    from conftest import cli

    library, store = trained_store
    tree = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    changed, gone = sorted(library.rglob("*.wav"))[:2]
    write_audio(changed, render("percussion", 3.0, seed=91), SAMPLE_RATE)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    gone.unlink()
    write_audio(library / "ambient" / "new.ogg", render("ambient", 3.0, seed=92), SAMPLE_RATE)
    code, out, _ = cli("run", str(library), "--store", str(store), "--labels", "folders", "--dry-run", "--format", "json")
    plan = json.loads(out)
    counts = ("discovered", "new", "changed", "retried", "forced", "moved", "removed", "unchanged")
    assert code == 0 and {k: plan[k] for k in counts} == {
        "discovered": 20, "new": 1, "changed": 1, "retried": 0, "forced": 0, "moved": 0, "removed": 1, "unchanged": 18}
    assert plan["would_train"] is False and plan["train_reason"].endswith("judged on the features already extracted: 2 new or changed files not counted")
    assert plan["refused"] is None
    code, out, _ = cli("run", str(library), "--store", str(store), "--labels", "folders", "--dry-run", "--force", "--format", "json")
    assert (code, json.loads(out)) == (0, plan)  # run's --force passes the guards: it re-extracts nothing
    code, out, _ = cli("extract", str(library), "--store", str(store), "--dry-run")
    assert code == 0 and "1 new, 1 changed, 0 to retry, 0 moved, 1 removed, 18 unchanged" in out and "nothing was written" in out
    code, out, _ = cli("extract", str(library), "--store", str(store), "--dry-run", "--force", "--format", "json")
    forced = json.loads(out)  # extract's --force re-extracts the unchanged files: forced, not failed before
    assert code == 0 and {k: forced[k] for k in counts} == {**{k: plan[k] for k in counts}, "forced": 18, "unchanged": 0}
    code, out, _ = cli("extract", str(library), "--store", str(store), "--dry-run", "--force")
    assert code == 0 and "1 new, 1 changed, 0 to retry, 18 re-extracted by --force, 0 moved, 1 removed, 0 unchanged" in out
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == tree  # no lease, no record, nothing


def test_the_changed_share_counts_a_track_once_and_a_tag_written_back_not_at_all() -> None:
    """A track with new content or a new label differs in a row of each set: it counts once. A fingerprint that only
    genre-batch's tag writes changed (the writes table's new and old fingerprints, a write then an undo) is no change."""
    uris = list("abcdefghij")
    before = pa.table({"uri": uris, "fingerprint": ["1"] * 10, "genre": ["rock"] * 10})
    now = pa.table({"uri": [*uris[:9], "k"], "fingerprint": ["3", *["1"] * 9], "genre": ["rock", "pop", *["rock"] * 8]})
    assert retrain.changed_share(before, now) == pytest.approx(0.4)  # a (content), b (label), j (gone), k (new)
    rewrites = pa.table({"uri": ["a", "a"], "new_fingerprint": ["2", "3"], "old_fingerprint": ["1", "2"]})  # written, then undone
    assert retrain.untagged(now, rewrites).sort_by("uri")["fingerprint"].to_pylist()[:2] == ["1", "1"]
    assert retrain.changed_share(retrain.untagged(before, rewrites), retrain.untagged(now, rewrites)) == pytest.approx(0.3)
    back_and_forth = pa.table({"uri": ["b"] * 3, "new_fingerprint": ["2", "1", "2"], "old_fingerprint": ["1", "2", "1"]})  # a restore gave the old bytes back
    was, is_now = (pa.table({"uri": ["b"], "fingerprint": [f], "genre": ["rock"]}) for f in ("1", "2"))
    assert retrain.untagged(is_now, back_and_forth).to_pylist() == [{"uri": "b", "fingerprint": "1", "genre": "rock"}]  # one row, no cycle
    assert retrain.changed_share(retrain.untagged(was, back_and_forth), retrain.untagged(is_now, back_and_forth)) == 0


def test_all_tracks_option_fits_on_every_labelled_track_with_xgboost_dask(trained_store: tuple[Path, Path], dask_scheduler: str) -> None:
    _, store = trained_store
    s = Store(str(store))
    with session(dask_scheduler) as cluster:
        assert registry.current(s).classifier == "linear"
        summary = train_stage.train(s, "folders", "run-all", cluster, all_tracks=True)  # xgboost.dask's option: xgboost without being told
        assert summary.promoted and summary.tracks == 20 and summary.classifier == "xgboost"
        card = registry.card(s, summary.version).document
        assert card["fit"] == {"tracks": 20, "engine": "xgboost.dask", "on": "every labelled track"} and card["params"]["num_boost_round"] > 0
        tagged = tag_stage.tag(s, "run-all", cluster)
    assert tagged.model_version == summary.version and tagged.mode == "full"
    right = [r["genre"] == Path(r["uri"]).parent.name for r in catalog.read(s).to_pylist()]
    assert sum(right) >= 18  # the model learned the styles of the tracks it was fitted on
