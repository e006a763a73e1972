"""The stages end to end on a real 2-process Dask cluster, without Prefect."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import current_features

from genre_batch import GenreBatchError, catalog, query, registry
from genre_batch.audio import SAMPLE_RATE
from genre_batch.cluster import session
from genre_batch.feature_store import current_errors
from genre_batch.features import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.stages import extract as extract_stage, runs, tag as tag_stage, train as train_stage
from genre_batch.store import Store
from genre_batch.synth import STYLES, render, write_audio
from genre_batch.tagging import classify_files


def part_files(store: Path) -> dict[str, float]:
    """Every file under the store's features folder with its mtime."""
    return {str(p): p.stat().st_mtime_ns for p in (store / "features").rglob("*") if p.is_file()}


def extract(library: Path, store: Path, scheduler: str) -> extract_stage.ExtractSummary:
    """Run the extract stage."""
    with session(scheduler) as cluster:
        return extract_stage.extract(str(library), Store(str(store)), runs.new_run_id(), cluster)


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
    first = extract(library, store, dask_scheduler)
    assert (first.discovered, first.extracted, first.failed) == (8, 8, 0)
    features = current_features(Store(str(store)))
    assert features.num_rows == 8
    matrix = np.column_stack([features[n].to_numpy() for n in FEATURE_NAMES])
    assert matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert set(features["feature_version"].to_pylist()) == {FEATURE_VERSION}
    assert all(d == pytest.approx(3.0, abs=0.1) for d in features["duration_s"].to_pylist())

    # unchanged library: nothing extracted, no feature data written at all
    before = part_files(store)
    second = extract(library, store, dask_scheduler)
    assert (second.extracted, second.unchanged) == (0, 8)
    assert part_files(store) == before

    # one file rewritten: exactly that file is re-extracted, its old row superseded
    touched = sorted(library.rglob("*.flac"))[0]
    write_audio(touched, render("ambient", 3.0, seed=99), SAMPLE_RATE, {"genre": "ambient"})
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    third = extract(library, store, dask_scheduler)
    assert (third.extracted, third.unchanged) == (1, 7)
    features = current_features(Store(str(store)))
    assert features.num_rows == 8 and len(set(features["uri"].to_pylist())) == 8
    runs = {r["uri"]: r["run_id"] for r in features.to_pylist()}
    assert len({run for uri, run in runs.items() if uri != str(touched)}) == 1  # the 7 others: first run
    assert runs[str(touched)] not in {run for uri, run in runs.items() if uri != str(touched)}


@pytest.fixture
def trained_store(library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str) -> tuple[Path, Path]:
    """A library of 5 clips per style, extracted and trained with folder labels."""
    library, store = library_factory(per_style=5), tmp_path / "store"
    extract(library, store, dask_scheduler)
    summary = train(store, "folders", "run-train", dask_scheduler)
    assert summary.promoted and summary.genres == sorted(STYLES)
    return library, store


def test_model_classifies_held_out_synthetic_files(trained_store: tuple[Path, Path], tmp_path: Path) -> None:
    _, store = trained_store
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    files = []
    for style in STYLES:
        for seed in (7001, 7002):
            files.append(write_audio(unseen / f"{seed}.{style}.ogg", render(style, 3.0, seed), SAMPLE_RATE))
    results = classify_files(Store(str(store)), [str(f) for f in files], top=2)
    predicted = [r[0][0] for _, r in results]
    assert predicted == [f.name.split(".")[1] for f in files]


def test_training_metadata_and_current_pointer(trained_store: tuple[Path, Path]) -> None:
    _, store = trained_store
    s = Store(str(store))
    version, _, meta = registry.load_current(s)
    assert meta["label_source"] == "folders" and meta["feature_version"] == FEATURE_VERSION
    assert meta["tracks"] == 20 and meta["cross_validation"]["folds"] == 5
    assert meta["cross_validation"]["accuracy"] >= 0.8 > meta["majority_baseline"]
    assert set(meta["holdout"]["per_genre"]) == set(STYLES)
    assert len(meta["training_fingerprint"]) == 16
    folder = store / "models" / version
    assert (folder / "model.ubj").stat().st_size > 0
    assert (folder / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train_stage.retrain_decision(s, "folders") == (False, f"current model {version} was trained on the same labelled data")
    assert train_stage.retrain_decision(s, "tags")[0]  # another label source: another training set


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
    summary = extract(library, store, dask_scheduler)
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
    assert extract(library, store, dask_scheduler).extracted == 0
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
    as_json = query.to_json(query.run(s, "SELECT uri, probabilities FROM catalog ORDER BY uri LIMIT 2"))
    import json

    parsed = json.loads(as_json)
    assert len(parsed) == 2 and set(parsed[0]["probabilities"]) == set(STYLES)
    csv = query.to_csv(table).splitlines()
    assert csv[0] == '"genre","n"' and len(csv) == 5
    assert query.run(s, "SELECT count(*) AS n FROM errors").to_pylist() == [{"n": 0}]
    with pytest.raises(GenreBatchError, match="query failed"):
        query.run(s, "SELECT nope FROM catalog")
