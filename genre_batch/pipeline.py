"""The stages of a run (extract, train, tag), callable with or without Prefect."""

from __future__ import annotations

import platform
import uuid
from collections.abc import Iterator
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genre_batch import GenreBatchError, catalog, labels, lease
from genre_batch.cluster import dask_client
from genre_batch.discovery import discover
from genre_batch.extraction import Progress, run_shards
from genre_batch.feature_store import PROVENANCE_COLUMNS, current_features, plan, read_inventory, tracks, write_inventory
from genre_batch.features import FEATURE_VERSION
from genre_batch.store import Store, write_bytes, write_json

if TYPE_CHECKING:  # imported where used: extraction alone must not load xgboost, scikit-learn or matplotlib (README, Cheap start)
    from genre_batch import training


def new_run_id() -> str:
    """A sortable, unique run id."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def no_progress(done: int, total: int, errors: int) -> None:
    """A progress callback that ignores progress."""


@dataclass
class ExtractSummary:
    """What an extraction did."""

    library: str
    discovered: int = 0
    extracted: int = 0
    failed: int = 0
    unchanged: int = 0
    removed: int = 0
    shards: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


@dataclass
class TrainSummary:
    """What a training did."""

    version: str
    promoted: bool
    reason: str
    label_source: str
    tracks: int
    genres: list[str]
    cv_accuracy: float
    cv_macro_f1: float
    holdout_accuracy: float
    holdout_macro_f1: float
    grouping: str
    dropped_genres: dict[str, int] = field(default_factory=dict)


@dataclass
class TagSummary:
    """What a tagging published."""

    snapshot: str
    rows: int
    model_version: str
    genres: dict[str, int]
    disagreements: int


def extract(
    library: str,
    store_url: str,
    run_id: str,
    scheduler: str | None = None,
    force: bool = False,
    on_progress: Progress = no_progress,
) -> ExtractSummary:
    """Discover the library, extract new and changed files on Dask, then record the library listing."""
    store = Store(store_url)
    inventory = discover(library)
    previous = read_inventory(store)
    todo = plan(inventory, store, force)
    summary = ExtractSummary(library=inventory.schema.metadata[b"library"].decode(), discovered=inventory.num_rows)
    summary.unchanged = inventory.num_rows - todo.num_rows
    if todo.num_rows:
        with dask_client(scheduler) as client:
            result = run_shards(client, store_url, todo, run_id, on_progress)
        if result.shard_failures:
            raise GenreBatchError("extraction failed on the cluster: " + "; ".join(result.shard_failures))
        summary.extracted, summary.failed, summary.shards = result.extracted, result.failed, result.shards
        summary.wall_s, summary.cpu_s = round(result.wall_s, 3), round(result.cpu_s, 3)
    summary.removed = int(pc.sum(pc.invert(pc.is_in(previous["uri"], value_set=inventory["uri"]))).as_py() or 0)
    write_inventory(store, inventory)
    return summary


def library_of(store: Store) -> str:
    """The library the store's inventory was listed from."""
    meta = read_inventory(store).schema.metadata or {}
    if b"library" not in meta:
        raise GenreBatchError(f"the store {store.url} has no extracted library yet: run 'genre-batch extract' first")
    return meta[b"library"].decode()


def track_labels(store: Store, spec: str, windows: pa.Table) -> pa.Table:
    """The genres a label spec gives the tracks of a feature table of the store."""
    return labels.resolve(spec, tracks(windows), library_of(store))


def training_data(store: Store, spec: str, grouping: str = "auto") -> training.TrainingSet:
    """The labelled training set of the store for a label spec."""
    from genre_batch import training
    windows = current_features(store)
    return training.training_set(windows, track_labels(store, spec, windows), labels.label_source(spec), grouping)


def needs_training(store_url: str, spec: str) -> tuple[bool, str]:
    """Whether the labelled data differs from what the current model was trained on, and why."""
    from genre_batch import registry, training
    store = Store(store_url)
    version = registry.current_version(store)
    if version is None:
        return True, "no current model"
    trained_on = registry.metadata(store, version).get("training_fingerprint")
    windows = current_features(store, PROVENANCE_COLUMNS)  # no feature columns: only the fingerprint is needed
    *_, fingerprint = training.labelled_tracks(tracks(windows), track_labels(store, spec, windows), labels.label_source(spec))
    if trained_on != fingerprint:
        return True, "labels or features changed since the current model was trained"
    return False, f"current model {version} was trained on the same labelled data"


def cross_validation(data: training.TrainingSet, oof: np.ndarray) -> dict:
    """Grouped k-fold scores of the out-of-fold track probabilities `oof`, raw and calibrated, with the fitted temperature."""
    from genre_batch import evaluation, training
    temperature = evaluation.fit_temperature(oof, data.y_track)
    return {
        **evaluation.scores(data.y_track, oof.argmax(axis=1), data.genres),
        "folds": training.folds(data),
        "grouping": data.grouping,
        "groups": int(len(set(data.groups.tolist()))),
        "temperature": temperature,
        **evaluation.calibration_errors(oof, data.y_track, temperature),
    }


def holdout(data: training.TrainingSet, oof: np.ndarray, temperature: float) -> dict:
    """Scores of the model fitted without the first grouped, stratified fold, on that fold's tracks.

    That model is the first one of the cross-validation, so its predictions are the out-of-fold ones `oof` of that fold.
    """
    from genre_batch import evaluation, training
    _, test_tracks = training.splits(data, training.folds(data))[0]
    probabilities, truth = oof[test_tracks], data.y_track[test_tracks]
    return {
        **evaluation.scores(truth, probabilities.argmax(axis=1), data.genres),
        "fraction": round(len(test_tracks) / len(data.y_track), 3),
        **evaluation.calibration_errors(probabilities, truth, temperature),
    }


def evaluate(store_url: str, spec: str, grouping: str = "auto") -> dict:
    """Grouped cross-validation report of the store's labelled tracks, written to evaluations/ with its picture."""
    from genre_batch import evaluation, training
    store = Store(store_url)
    data = training_data(store, spec, grouping)
    report = {
        "evaluated_at": datetime.now(timezone.utc).isoformat(),
        "label_source": labels.label_source(spec),
        "feature_version": FEATURE_VERSION,
        "tracks": len(data.y_track),
        "windows": len(data.y),
        "genres": data.genres,
        "majority_baseline": evaluation.majority_baseline(data.y_track),
        "cross_validation": cross_validation(data, training.out_of_fold(data)),
    }
    folder = f"{store.path('evaluations')}/{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    cv = report["cross_validation"]
    write_bytes(store.fs, f"{folder}/confusion_matrix.png", evaluation.confusion_png(cv["confusion"], data.genres, f"{cv['folds']}-fold CV grouped by {data.grouping}"))
    write_json(store.fs, f"{folder}/report.json", report)
    return {**report, "report": folder}


def train(store_url: str, spec: str, run_id: str, min_accuracy: float = 0.0, abstain_below: float = 0.0, grouping: str = "auto") -> TrainSummary:
    """Cross-validate and hold out (grouped), fit on all labelled tracks, calibrate, register; promote if it passes."""
    import xgboost as xgb

    from genre_batch import evaluation, registry, training
    store = Store(store_url)
    data = training_data(store, spec, grouping)
    oof = training.out_of_fold(data)
    cv = cross_validation(data, oof)
    held = holdout(data, oof, cv["temperature"])
    baseline = evaluation.majority_baseline(data.y_track)
    passes = cv["accuracy"] > baseline and cv["accuracy"] >= min_accuracy
    reason = (
        f"cross-validated accuracy {cv['accuracy']:.3f} vs majority baseline {baseline:.3f}"
        + (f" and minimum {min_accuracy:.3f}" if min_accuracy else "")
    )
    version = registry.new_version()
    metadata = {
        "created_at": datetime.now(timezone.utc).isoformat(),
        "run_id": run_id,
        "genres": data.genres,
        "label_source": labels.label_source(spec),
        "feature_version": FEATURE_VERSION,
        "training_fingerprint": data.fingerprint,
        "tracks": len(data.y_track),
        "windows": len(data.y),
        "tracks_per_genre": dict(Counter(data.genres[i] for i in data.y_track)),
        "dropped_genres": data.dropped,
        "params": {**training.PARAMS, "max_rounds": training.MAX_ROUNDS, "early_stopping_rounds": training.EARLY_STOPPING},
        "weights": "balanced: every genre the same total weight, every track of a genre the same share",
        "temperature": cv["temperature"],
        "abstain_below": abstain_below,
        "cross_validation": cv,
        "holdout": held,
        "majority_baseline": baseline,
        "gate": {"passed": passes, "reason": reason, "min_accuracy": min_accuracy},
        "xgboost_version": xgb.__version__,
        "python": platform.python_version(),
    }
    png = evaluation.confusion_png(held["confusion"], data.genres, f"{version} (held-out {held['n']} tracks)")
    model, metadata["params"]["num_boost_round"] = training.fit_tracks(data, np.arange(len(data.y_track)))
    registry.register(store, version, model, metadata, png)
    if passes:
        registry.promote(store, version)
    return TrainSummary(
        version=version,
        promoted=passes,
        reason=reason,
        label_source=metadata["label_source"],
        tracks=len(data.y_track),
        genres=data.genres,
        cv_accuracy=round(cv["accuracy"], 4),
        cv_macro_f1=round(cv["macro_f1"], 4),
        holdout_accuracy=round(held["accuracy"], 4),
        holdout_macro_f1=round(held["macro_f1"], 4),
        grouping=data.grouping,
        dropped_genres=data.dropped,
    )


def tag(store_url: str, run_id: str, keep: int = catalog.KEEP_SNAPSHOTS) -> TagSummary:
    """Predict every current track with the current model and publish a catalog snapshot."""
    from genre_batch import registry
    from genre_batch.tagging import tag as tag_tracks
    store = Store(store_url)
    version, booster, meta = registry.load_current(store)
    if meta["feature_version"] != FEATURE_VERSION:
        raise GenreBatchError(
            f"current model {version} was trained on feature version {meta['feature_version']}, "
            f"the store holds version {FEATURE_VERSION}: retrain with 'genre-batch train'"
        )
    table = tag_tracks(current_features(store), booster, meta, version, run_id, datetime.now(timezone.utc))
    pointer = catalog.publish(store, table, run_id, version, keep)
    disagreements = int(np.sum(table["disagrees_with_tag"].fill_null(False).to_numpy(zero_copy_only=False)))
    return TagSummary(
        snapshot=pointer["snapshot"],
        rows=table.num_rows,
        model_version=version,
        genres=dict(Counter(table["genre"].to_pylist()).most_common()),
        disagreements=disagreements,
    )


@contextmanager
def run_record(store_url: str, flow: str) -> Iterator[dict]:
    """A run record to fill in, under the store's run lease; written to the store's runs/ when the block ends, failed or not.

    A run refused because another run holds the lease writes nothing.
    """
    record: dict = {"run_id": new_run_id(), "flow": flow, "started_at": datetime.now(timezone.utc).isoformat()}
    with lease.held(store_url, record["run_id"]):
        try:
            yield record
        except BaseException as e:
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
            with suppress(OSError):  # the store may be what failed: the run's own error is the one to report
                write_record(store_url, record)
            raise
        record["status"] = "completed"
        write_record(store_url, record)


def write_record(store_url: str, record: dict) -> None:
    """Stamp a run record's end and write it to the store's runs/."""
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    store = Store(store_url)
    write_json(store.fs, f"{store.runs}/{record['run_id']}.json", record)


def as_record(summary: object) -> dict:
    """A stage summary as a plain dict."""
    return asdict(summary)
