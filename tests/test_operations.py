"""Running unattended (#13): models verbs, guards on the catalog, a refused gate, status, errors before a catalog."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import xgboost as xgb
from conftest import cli
from test_feature_store import T0, files, set_inventory, write_shard

from genre_batch import PublishRefused, progress
from genre_batch.analysis.columns import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.cluster import session
from genre_batch.modelling import registry
from genre_batch.modelling.model import PARAMS, XGBoostModel
from genre_batch.publishing import catalog
from genre_batch.publishing.pointer import published
from genre_batch.stages import extract as extract_stage
from genre_batch.stages import runs
from genre_batch.stages import tag as tag_stage
from genre_batch.storage.store import Store

GENRES = ["jazz", "rock"]


def register(store: Store, version: str, passed: bool, flip: bool = False) -> None:
    """Register a real XGBoost model on synthetic windows: it calls the store's tracks (features near 0) 'rock', or
    'jazz' when `flip`."""
    X = np.random.default_rng(0).normal(size=(200, len(FEATURE_NAMES))).astype(np.float32)
    X[100:, 0] += 10.0  # the other genre lies far away
    y = np.repeat([0, 1] if flip else [1, 0], 100).astype(np.int32)  # GENRES: 0 jazz, 1 rock
    booster = xgb.train({**PARAMS, "num_class": 2}, XGBoostModel.dmatrix(X, FEATURE_NAMES, y), num_boost_round=5)
    accuracy = 0.9 if passed else 0.3
    meta = {
        "created_at": datetime.now(timezone.utc).isoformat(), "genres": GENRES, "label_source": "tags",
        "feature_version": FEATURE_VERSION, "tracks": 200, "labelled_tracks": 200, "temperature": 1.0, "abstain_below": 0.0,
        "cross_validation": {"accuracy": accuracy}, "holdout": {"accuracy": accuracy, "confusion": [[1, 0], [0, 1]]},
        "gate": {"passed": passed, "reason": f"cross-validated accuracy {accuracy:.3f} vs majority baseline 0.500"},
    }
    registry.register(store, version, XGBoostModel(booster, 5), meta, b"", pa.table({k: pa.array([], pa.string()) for k in ("uri", "fingerprint", "genre")}))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store of 20 synthetic tracks and three models: m-1 (passed), m-2 (refused by the gate), m-3 (passed, flips every genre)."""
    s = Store(str(tmp_path / "store"))
    library = files([f"t{i:02d}" for i in range(20)])
    write_shard(s, "r1-00000.parquet", library, "r1", T0)
    set_inventory(s, library)
    register(s, "m-1", passed=True)
    register(s, "m-2", passed=False)
    register(s, "m-3", passed=True, flip=True)
    registry.promote(s, "m-1")
    return s


def test_models_verbs(store: Store, dask_scheduler: str) -> None:
    code, out, _ = cli("models", "list", "--store", store.url, "--format", "json")
    listed = json.loads(out)
    assert code == 0 and [(m["version"], m["current"], m["gate_passed"]) for m in listed] == [("m-1", True, True), ("m-2", False, False), ("m-3", False, True)]
    code, out, _ = cli("models", "show", "m-2", "--store", store.url)
    assert code == 0 and json.loads(out)["gate"]["passed"] is False and json.loads(out)["version"] == "m-2"

    code, _, err = cli("models", "promote", "m-2", "--store", store.url)  # refused by the gate: needs --force
    assert code == 1 and err.startswith("error: model m-2 failed the promotion gate (cross-validated accuracy 0.300") and "--force" in err
    assert registry.current_version(store) == "m-1"
    code, out, _ = cli("models", "promote", "m-2", "--store", store.url, "--force")
    assert code == 0 and "current model is m-2" in out and "not re-tagged now" in out
    code, out, _ = cli("models", "promote", "m-2", "--store", store.url, "--force")  # the current model again: nothing changes
    assert code == 0 and "current model is m-2 (unchanged)" in out and "re-tagged" not in out
    assert registry.pointer(store).history == ("m-1",)
    code, out, _ = cli("models", "rollback", "--store", store.url, "--format", "json")
    assert code == 0 and json.loads(out)["version"] == "m-1" and registry.current_version(store) == "m-1"
    assert registry.pointer(store).history == ()
    assert cli("models", "rollback", "--store", store.url)[0] == 1  # nothing earlier to go back to
    promoted_twice = {"version": "m-3", "pinned": False, "promoted_at": "2026-12-01T00:00:00+00:00", "history": ["m-1", "m-3", "m-3"]}
    store.write_json(f"{store.models}/{registry.POINTER}", promoted_twice)  # as promoting the current model left it before
    assert registry.rollback(store).version == "m-1" and registry.pointer(store).history == ()

    code, out, _ = cli("models", "pin", "--store", store.url)
    assert code == 0 and out.strip() == "models: current model is m-1 (pinned)" and registry.pinned(store)
    code, out, _ = cli("models", "list", "--store", store.url)
    current = next(line for line in out.splitlines() if "*P" in line)
    assert "m-1" in current and f"{listed[0]['classifier']} {listed[0]['features']}" in current  # whole, and the model kind
    assert cli("models", "pin", "--store", store.url, "--unpin")[0] == 0 and not registry.pinned(store)
    assert cli("models", "show", "m-9", "--store", store.url)[0] == 1


def test_promote_does_not_retag_until_the_next_tag_which_retags_everything(store: Store, dask_scheduler: str) -> None:
    heard: list[progress.Report] = []
    with session(dask_scheduler) as cluster, progress.listening(heard.append):  # the CLI's bars listen so
        first = tag_stage.tag(store, "run-1", cluster)
        assert (first.mode, first.model_version, first.genres) == ("full", "m-1", {"rock": 20})
        tagged = [(r.done, r.total) for r in heard if r.stage == "tag"]  # tracks predicted, as the tag tasks end
        assert tagged[-1] == (20, 20) and [d for d, _ in tagged] == sorted(d for d, _ in tagged)
        assert [(r.done, r.note) for r in heard if r.stage == "publish"] == [*enumerate(tag_stage.PUBLISH_STEPS), (5, "published")]
        registry.promote_checked(store, "m-2", force=True)  # the same predictions: no guard applies
        assert published(store).model_version == "m-1"  # promoting re-tags nothing by itself
        second = tag_stage.tag(store, "run-2", cluster)
    assert (second.mode, second.predicted, second.model_version) == ("full", 20, "m-2")
    assert set(catalog.read(store)["model_version"].to_pylist()) == {"m-2"}


def test_a_model_flipping_most_genres_is_not_published_without_force(store: Store, dask_scheduler: str) -> None:
    with session(dask_scheduler) as cluster:
        tag_stage.tag(store, "run-1", cluster)
        before = published(store)
        registry.promote_checked(store, "m-3")
        with pytest.raises(PublishRefused, match=r"model m-3 gives 100% of the catalog's tracks another genre than model m-1 \(over the 30% limit\)"):
            tag_stage.tag(store, "run-2", cluster)
        assert published(store) == before and catalog.snapshot_names(store) == [before.snapshot]  # nothing left behind
        forced = tag_stage.tag(store, "run-3", cluster, force=True)
    assert forced.genres == {"jazz": 20} and published(store).model_version == "m-3"


def test_prune_keeps_the_newest_and_never_the_current_model(store: Store) -> None:
    registry.promote(store, "m-3")  # history: m-1
    code, out, _ = cli("prune", "--store", store.url, "--keep-models", "1", "--format", "json")
    assert code == 0 and json.loads(out) == {"models": ["m-2"], "run_records": [], "evaluations": []}  # m-1 is in the history
    assert registry.versions(store) == ["m-1", "m-3"]


def test_prune_keeps_the_newest_run_records_and_evaluation_reports(store: Store) -> None:
    for _ in range(3):
        with runs.run_record(store, "tag"):
            pass
    for n in range(3):
        store.write_json(f"{store.evaluations}/e-{n}/report.json", {"n": n})
    records = sorted(p.rsplit("/", 1)[-1] for p in store.list(store.runs, ".json"))
    code, out, _ = cli("prune", "--store", store.url, "--keep-runs", "1", "--keep-evaluations", "2", "--format", "json")
    assert (code, json.loads(out)) == (0, {"models": [], "run_records": records[:2], "evaluations": ["e-0"]})
    assert [p.rsplit("/", 1)[-1] for p in store.list(store.runs, ".json")] == records[2:]
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.evaluations, detail=False)) == ["e-1", "e-2"]


def test_prune_never_deletes_a_model_a_rollback_can_return_to(store: Store) -> None:
    registry.promote(store, "m-2")
    registry.promote(store, "m-3")  # history: m-1, m-2 (longer than --keep-models)
    code, out, _ = cli("prune", "--store", store.url, "--keep-models", "1", "--format", "json")
    assert code == 0 and json.loads(out)["models"] == []
    for earlier in ("m-2", "m-1"):
        registry.rollback(store)
        assert registry.current_version(store) == earlier and earlier in registry.versions(store)


def test_status_shows_the_store_at_a_glance(store: Store, dask_scheduler: str) -> None:
    code, out, _ = cli("status", "--store", store.url, "--format", "json")
    facts = json.loads(out)
    assert code == 0 and facts["model"]["version"] == "m-1" and facts["catalog"] is None and facts["tracks"] == 20
    assert facts["lease"] is None and facts["last_runs"] == [] and facts["errors_by_kind"] == {}
    code, out, _ = cli("status", "--store", store.url)
    assert code == 0 and "model: m-1, CV accuracy 0.900" in out and "catalog: none published" in out and "lease: free" in out

    with runs.run_record(store, "tag"):
        pass
    with pytest.raises(ValueError), runs.run_record(store, "extract"):
        raise ValueError("the library is gone")
    code, out, _ = cli("status", "--store", store.url, "--format", "json")
    by_flow = {run["flow"]: run for run in json.loads(out)["last_runs"]}  # each run's outcome, duration and error
    failed, completed = by_flow["extract"], by_flow["tag"]  # (started in the same second: their order is the run ids')
    assert set(failed) == set(completed) == {"run_id", "flow", "status", "started_at", "duration_s", "error"}
    assert (failed["flow"], failed["status"], failed["error"]) == ("extract", "failed", "ValueError: the library is gone")
    assert (completed["flow"], completed["status"], completed["error"]) == ("tag", "completed", None) and completed["duration_s"] >= 0
    code, out, _ = cli("status", "--store", store.url)
    assert f"run {failed['run_id']} (extract): failed in 0 s: ValueError: the library is gone" in out


def test_another_library_of_as_many_files_is_refused_and_the_same_files_moved_are_not(
    library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str
) -> None:
    """A store given another library (or a wrong folder) of as many files would drop every track and extract anew: the
    listing guard refuses it unless forced. The same files under another root are moved, not gone: accepted."""
    first, other = library_factory(per_style=1, name="first"), library_factory(per_style=1, name="other", seed=1)
    n = sum(1 for p in first.rglob("*") if p.is_file())
    store, inventory = Store(str(tmp_path / "store")), tmp_path / "store" / "features" / "inventory.parquet"
    with session(dask_scheduler) as cluster:
        assert extract_stage.extract(str(first), store, "r1", cluster, features=("librosa",)).extracted == n
        listed = inventory.read_bytes()
        message = rf"{n} of the {n} files of the previous listing \(100%\) are not in the listing of {other} \(nor moved in it\)"
        with pytest.raises(PublishRefused, match=message):
            extract_stage.extract(str(other), store, "r2", cluster, features=("librosa",))
        assert inventory.read_bytes() == listed and not list((tmp_path / "store" / "features" / "index").glob("r2-*"))
        assert extract_stage.dry_run(str(other), store, features=("librosa",)).refused.startswith(f"{n} of the {n} files")
        renamed = first.rename(tmp_path / "renamed")  # the same files (same size and mtime) under another root
        moved = extract_stage.extract(str(renamed), store, "r3", cluster, features=("librosa",))
        assert (moved.moved, moved.removed, moved.extracted) == (n, n, 0)
        forced = extract_stage.extract(str(other), store, "r4", cluster, features=("librosa",), allow_shrink=True)
    assert (forced.extracted, forced.removed) == (n, n)


def test_shrunken_listing_is_refused_and_a_refused_gate_says_what_happened(
    library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str, prefect_server: None
) -> None:
    library, store = library_factory(per_style=3), str(tmp_path / "store")
    (library / "broken.mp3").write_bytes(b"\x00" * 100)
    clips = sorted(p for p in library.rglob("*") if p.is_file() and p.name != "broken.mp3")
    labels = tmp_path / "labels.csv"  # one clip labelled as another genre: no model can reach accuracy 1.0 on these
    labels.write_text("file,genre\n" + "".join(f"{p},{'percussion' if i == 0 else p.parent.name}\n" for i, p in enumerate(clips)))
    code, out, err = cli("run", str(library), "--store", store, "--labels", str(labels), "--min-accuracy", "1.0", "--features", "librosa", "--scheduler", dask_scheduler,
                         "--format", "json")
    assert code == 4, out + err  # the gate refused the only model: extraction kept, a distinct status and the next step
    assert err.strip().startswith("error: no current model in") and "the promotion gate refused model m-" in err
    summary = json.loads(out)  # a script still gets the run's summary
    assert (summary["flow"], summary["status"], summary["extract"]["extracted"], summary["train"]["promoted"], summary["tag"]) == ("nightly", "failed", 12, False, None)
    assert summary["error"] == "NoModel: " + err.strip().removeprefix("error: ")
    assert "vs majority baseline" in err and "and minimum 1.000" in err and "models promote" in err
    code, out, _ = cli("query", "--store", store, "--format", "json", "SELECT uri, error_type FROM errors")
    assert code == 0 and json.loads(out) == [{"uri": str(library / "broken.mp3"), "error_type": "undecodable"}]  # no catalog needed
    assert cli("query", "--store", store, "SELECT count(*) FROM catalog")[0] == 1

    refused = err.split("models promote ")[1].split(" --force")[0]
    assert cli("models", "promote", refused, "--store", store, "--force")[0] == 0
    code, out, err = cli("run", str(library), "--store", store, "--labels", str(labels), "--min-accuracy", "1.0", "--retrain", "always", "--features", "librosa",
                         "--scheduler", dask_scheduler)
    assert code == 0, out + err  # a current model exists: the refused retrain leaves it tagging, and the summary says so
    assert "REFUSED by the promotion gate, not made current" in out and f"tracks with model {refused}" in out

    inventory = (tmp_path / "store" / "features" / "inventory.parquet").read_bytes()
    for path in clips:
        if path.suffix != ".ogg":
            path.unlink()  # 8 of 13 files gone: 62 % fewer
    code, out, err = cli("extract", str(library), "--store", store, "--features", "librosa", "--scheduler", dask_scheduler, "--format", "json")
    assert code == 5 and "has 5 audio files, the previous one 13: 62% fewer, over the 30% limit" in err
    assert (json.loads(out)["flow"], json.loads(out)["status"], json.loads(out)["error"]) == ("extract", "failed", "PublishRefused: " + err.strip().removeprefix("error: "))
    assert (tmp_path / "store" / "features" / "inventory.parquet").read_bytes() == inventory  # nothing changed
    code, out, _ = cli("extract", str(library), "--store", store, "--features", "librosa", "--scheduler", dask_scheduler, "--force")
    assert code == 0 and "5 audio files" in out
