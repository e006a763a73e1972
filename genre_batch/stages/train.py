"""The train stage: a capped, grouped sample of the labelled tracks read by the workers; cross-validation, the
model registered and promoted if it passes; evaluation reports (the retrain policy of nightly runs: `retrain`)."""

from __future__ import annotations

import math
import platform
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from typing import Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sklearn
import xgboost as xgb
from distributed import Client, Future

from genre_batch import GenreBatchError
from genre_batch.analysis.columns import FEATURE_VERSION
from genre_batch.cluster import Session, tell, trim_memory
from genre_batch.modelling import evaluation, registry, training
from genre_batch.modelling.model import XGBoostModel, default_kind, model_class
from genre_batch.progress import Listener, Report
from genre_batch.stages.retrain import Labelled, labelled, labelled_keys
from genre_batch.storage.feature_store import KEYS, LIBROSA, batches, current_positions, lacking, read_inventory
from genre_batch.storage.store import Store

READ_BATCH_WINDOWS = 20_000
"""Window rows per reading task of the training sample (~48 MB of librosa features: what the flow process receives
at a time while it fills the sample's matrix)."""

STEP_EVERY_S = 30.0
"""A fit on a worker tells the flow process what it is doing (`Steps`) at most this often."""

T = TypeVar("T")



def unheard(news: Report) -> None:
    """A progress listener that ignores progress."""


@dataclass
class TrainSummary:
    """What a training did."""

    version: str
    promoted: bool
    reason: str
    label_source: str
    tracks: int
    sampled_tracks: int
    genres: list[str]
    cv_accuracy: float
    cv_macro_f1: float
    holdout_accuracy: float
    holdout_macro_f1: float
    grouping: str
    classifier: str
    features: list[str]
    dropped_genres: dict[str, int] = field(default_factory=dict)
    hint: str | None = None
    """How to train the default families when this training kept the current model's other ones (`families_hint`)."""


def on_worker(session: Session | None, function: Callable[..., T], *args: object) -> T:
    """`function(*args)` run as one task on a Dask worker, so that its whole-index tables never enter this (the flow)
    process; run in this process when no session is given."""
    return function(*args) if session is None else session.run([(function, *args)])[0]


def missing_families(store: Store, families: list[str] | tuple[str, ...]) -> dict[str, int]:
    """How many current tracks of the store lack each of the families (`lacking`; reads the index's choice columns)."""
    return lacking(current_positions(store, read_inventory(store, KEYS)).positions(), families)


def default_families(store: Store, session: Session | None = None) -> list[str]:
    """training.DEFAULT_FAMILIES when every current track of the store has them, else training.FALLBACK_FAMILIES."""
    missing = on_worker(session, missing_families, store, training.DEFAULT_FAMILIES)
    return list(training.FALLBACK_FAMILIES if missing else training.DEFAULT_FAMILIES)


def choices(store: Store, families: list[str] | None, classifier: str | None, session: Session | None = None) -> tuple[list[str], str]:
    """The feature families and classifier to train with: as given, else the current model's (a nightly retrain keeps
    them), else the defaults (`default_families`, checked on a worker of `session` if given; `model.default_kind` of
    the families)."""
    card = registry.current_card(store)
    own = training.ordered_families(list(card.families)) if card else None
    families = training.ordered_families(families) if families is not None else own or default_families(store, session)
    if classifier is None:
        classifier = card.classifier if card and families == own else default_kind(families)
    model_class(classifier)
    return families, classifier


def families_hint(store: Store, session: Session | None = None) -> str | None:
    """When the current model's families are not training.DEFAULT_FAMILIES although every current track now has those
    (a backfill completed), the option that trains the default; else None."""
    card = registry.current_card(store)
    own = training.ordered_families(list(card.families)) if card else None
    default = list(training.DEFAULT_FAMILIES)
    if own is None or own == default or default_families(store, session) != default:
        return None
    return (f"trained on {','.join(own)} like the current model {card.version}; every track has {','.join(default)} now: "
            f"--features {','.join(default)} trains the default ({default_kind(default)} on {','.join(default)})")


def read_sample(store: Store, sample: pa.Table, session: Session, families: list[str],
                on_progress: Listener = unheard) -> tuple[np.ndarray, np.ndarray]:
    """The feature matrix of sampled tracks (sorted by URI; the families' columns joined per track) and the position in
    `sample` of each row's track. The workers read the parts and send float32 matrices of READ_BATCH_WINDOWS rows;
    this process fills one preallocated matrix as they arrive (each batch has its place: the order is deterministic)
    and never holds a feature table. `on_progress` hears each batch arrive (stage `read`)."""
    from distributed import as_completed

    located = sample.append_column("_track", pa.array(np.arange(sample.num_rows)))
    groups = batches(located, READ_BATCH_WINDOWS)
    ends = np.cumsum([sum(training.windows_in(g, families) for g in batch) for batch in groups], dtype=np.int64)
    X = np.empty((int(ends[-1]) if len(ends) else 0, len(training.columns_of(families))), np.float32)
    track = np.empty(len(X), np.int64)
    if not groups:
        return X, track
    client = session.client
    futures = {client.submit(read_batch, store, batch, families, pure=False): i for i, batch in enumerate(groups)}
    note = f"{len(X)} windows of {sample.num_rows} sampled tracks"
    on_progress(Report("read", 0, len(groups), note=note))
    for done, (future, (rows, owners)) in enumerate(as_completed(list(futures), with_results=True), 1):
        end = int(ends[futures.pop(future)])
        X[end - len(rows) : end], track[end - len(rows) : end] = rows, owners
        future.release()
        on_progress(Report("read", done, len(groups), note=note))
    return X, track


def read_batch(store: Store, groups: list[pa.Table], families: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The float32 feature matrix of some parts' index rows (the families joined per track) and the `_track` of each
    row's track (runs on a worker)."""
    columns = training.columns_of(families)
    parts = [training.matrix(training.family_rows(store, g, families), columns) for g in groups]
    counts = [g["row_count"].to_numpy().astype(np.int64) if LIBROSA.name in families else np.ones(g.num_rows, np.int64) for g in groups]
    return np.vstack(parts), np.concatenate([np.repeat(g["_track"].to_numpy(), n) for g, n in zip(groups, counts)])


def labelled_sample(store: Store, spec: str, grouping: str, capped: bool, families: list[str]) -> tuple[pa.Table, Labelled, str, training.Cap | None]:
    """The capped sample of a store's labelled tracks that have every family (located index rows with their genre,
    sorted by URI), the labelled set as its keys only (`labelled_keys`), the grouping resolved and the cap (runs on a
    worker: it reads the index columns of every current track; only the sample and the keys go back)."""
    data = labelled(store, spec, grouping)
    tracks = training.located(store, data.tracks, read_inventory(store, KEYS), families)
    data = replace(data, tracks=labelled_keys(data))
    if tracks.num_rows == 0:
        raise GenreBatchError(f"no labelled track of {store.url} has every feature family {', '.join(families)}: extract them "
                              f"with 'genre-batch extract LIBRARY --features librosa,musicnn' first")
    grouping = training.resolve_grouping(tracks, grouping)
    rows_per_track = float(pc.mean(tracks["row_count"]).as_py() or 1.0) if LIBROSA.name in families else 1.0
    cap = training.cap_per_genre(len(data.genres), rows_per_track, n_columns=len(training.columns_of(families))) if capped else None
    sample = training.sample(tracks, cap, grouping)
    if cap is not None and LIBROSA.name in families:
        sample = training.thinned(sample, cap.rows)
    del tracks
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages: give them back before the reading tasks
    return sample, data, grouping, cap


def training_data(store: Store, spec: str, session: Session, grouping: str = "auto", capped: bool = True,
                  families: list[str] | None = None, on_progress: Listener = unheard) -> tuple[training.TrainingSet, Labelled, training.Cap | None]:
    """The training set of the store for a label spec and feature families (default librosa): the labelled tracks
    that have every family, a deterministic sample capped per genre (unless not `capped`), with the cap. A worker
    chooses the sample (`labelled_sample`: the index of every current track never enters this process, which holds the
    sample's index rows and the labelled set's keys), then the workers read its features (`read_sample`)."""
    families = training.ordered_families(families or list(training.FALLBACK_FAMILIES))
    sample, data, grouping, cap = on_worker(session, labelled_sample, store, spec, grouping, capped, families)
    X, track = read_sample(store, sample, session, families, on_progress)
    columns = training.columns_of(families)
    return training.training_set(X, track, sample, data.genres, grouping, data.fingerprint, data.dropped, columns), data, cap


def windows_batch(store: Store, groups: list[pa.Table], genres: dict[str, int], per_genre: dict[str, int], scale: float,
                  families: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, genre and balanced weight of the rows of some parts' labelled index rows (runs on a worker)."""
    tracks = pa.concat_tables(groups)
    rows = pa.concat_tables([training.family_rows(store, g, families) for g in groups])
    counts = tracks["row_count"].to_numpy().astype(np.int64) if LIBROSA.name in families else np.ones(tracks.num_rows, np.int64)
    genre = np.array([genres[g] for g in tracks["genre"].to_pylist()], np.int32)
    share = np.array([scale / per_genre[g] for g in tracks["genre"].to_pylist()])
    return training.matrix(rows, training.columns_of(families)), np.repeat(genre, counts), np.repeat(share / counts, counts)


def fit_all(store: Store, tracks: pa.Table, genre_names: list[str], session: Session, rounds: int, families: list[str]) -> XGBoostModel:
    """Fit XGBoost on the rows of every labelled track (`tracks`, located) with xgboost.dask: the workers read their
    parts, nothing of the feature table comes to this process. Weights as training.balanced_weights (every genre the
    same total, mean 1)."""
    import dask
    import dask.array as da

    genres = {g: i for i, g in enumerate(genre_names)}
    per_genre = dict(Counter(tracks["genre"].to_pylist()))
    columns = training.columns_of(families)
    total = float(pc.sum(tracks["row_count"]).as_py()) if LIBROSA.name in families else float(tracks.num_rows)
    scale = total / len(genres)
    parts = []
    for batch in batches(tracks, READ_BATCH_WINDOWS):
        n = int(sum(pc.sum(g["row_count"]).as_py() for g in batch)) if LIBROSA.name in families else sum(g.num_rows for g in batch)
        x, y, w = dask.delayed(windows_batch, nout=3, pure=True)(store, batch, genres, per_genre, scale, families)
        parts.append((da.from_delayed(x, (n, len(columns)), np.float32), da.from_delayed(y, (n,), np.int32), da.from_delayed(w, (n,), np.float64)))
    X, y, w = (da.concatenate([p[i] for p in parts]) for i in range(3))
    return XGBoostModel.fit_dask(session.client, X, y, w, len(genres), columns, rounds)


def sample_rounds(data: training.TrainingSet, on_step: Callable[[str], None] | None = None) -> int:
    """Boosting rounds early stopping chooses on a training set (what `--all-tracks` fits every labelled track for; runs
    on a worker; `on_step` hears each round)."""
    from genre_batch.modelling.model import quiet

    weight = training.balanced_weights(data.y, data.track)
    return XGBoostModel.rounds_for(data.X, data.y, weight, data.groups[data.track], len(data.genres), data.columns, on_step=on_step or quiet)


@dataclass
class Steps:
    """A fit's step listener on a worker: sends the step to the flow process's client (`cluster.tell` on the training's
    own topic), at most one every STEP_EVERY_S seconds."""

    topic: str
    fit: str
    last: float = -math.inf

    def __call__(self, step: str) -> None:
        """Send the step unless one was sent less than STEP_EVERY_S ago."""
        now = time.monotonic()
        if now - self.last >= STEP_EVERY_S:
            self.last = now
            tell(self.topic, {"fit": self.fit, "step": step})


@dataclass(frozen=True)
class WorkerFits(Generic[T]):
    """The fits of one training set running as tasks on the workers, which hold its rows (`submit_fits`): the
    cross-validation's folds (`training.fold`) and a final task (the final fit, or the sample's rounds)."""

    client: Client
    rows: Future
    folds: list[Future]
    final: Future | None
    n_tracks: int
    n_genres: int
    topic: str
    names: dict[str, str]
    """Each fit's name ("fold 2/5", "final fit") by its future's key."""

    def results(self, on_progress: Listener = unheard) -> tuple[training.OutOfFold, T | None]:
        """The folds' out-of-fold probabilities and the final task's result (None without one), gathered as they finish
        (`on_progress` hears each fit finish and the steps the fits send, stage `fit`); then the workers drop the rows
        and give the memory back."""
        from distributed import as_completed

        fits = [*self.folds, *([self.final] if self.final is not None else [])]
        finished: dict[str, object] = {}  # each fit's result by its future's key, in the order they finished
        told = lambda note: on_progress(Report("fit", len(finished), len(fits), note=note))  # noqa: E731
        self.client.subscribe_topic(self.topic, lambda event: told(f"{event[1]['fit']}: {event[1]['step']}"))
        try:
            told(f"{len(fits)} fits started on the workers")
            for future, result in as_completed(fits, with_results=True):  # a fit's error stops the training here
                finished[future.key] = result
                told(f"{self.names[future.key]} done")
        finally:
            self.client.unsubscribe_topic(self.topic)
        done = [finished[f.key] for f in self.folds]
        outcome = finished[self.final.key] if self.final is not None else None
        for future in [*fits, self.rows]:
            future.release()
        self.client.run(trim_memory)
        return training.out_of_fold_of(done, self.n_tracks, self.n_genres), outcome


def submit_fits(session: Session, data: training.TrainingSet, kind: str,
                final: Callable[..., T] | None = None, final_name: str = "final fit") -> WorkerFits[T]:
    """Send a training set to the workers once (scattered straight to one worker, which the others copy it from:
    numpy arrays travel as buffers) and submit at once the k cross-validation folds of a model kind and `final`
    (first, as it is the longest; it waits for no fold; called with the rows and `on_step`): each fit one thread
    (`model.PARAMS`), one task per worker thread, each telling its steps (`Steps`) on a topic of its own. The caller
    drops its own matrix after this (`training.without_rows`)."""
    splits = training.splits(data, training.folds(data))  # too few groups: an error before anything is sent
    client, topic = session.client, f"genre-batch-fits-{uuid.uuid4().hex}"
    rows = client.scatter(data, broadcast=True, direct=True, hash=False)
    later = client.submit(final, rows, on_step=Steps(topic, final_name), pure=False, priority=1) if final is not None else None
    folds = [client.submit(training.fold, rows, train, test, kind, Steps(topic, f"fold {i}/{len(splits)}"), pure=False)
             for i, (train, test) in enumerate(splits, 1)]
    names = {f.key: f"fold {i}/{len(folds)}" for i, f in enumerate(folds, 1)} | ({later.key: final_name} if later is not None else {})
    return WorkerFits(client, rows, folds, later, len(data.y_track), len(data.genres), topic, names)


def cross_validation(data: training.TrainingSet, oof: training.OutOfFold) -> dict:
    """Grouped k-fold scores of the out-of-fold track probabilities, raw and calibrated, with the fitted temperature and
    each fold's fit cost (`fits`: tracks, windows, rounds or C, CPU seconds)."""
    temperature = evaluation.fit_temperature(oof.probabilities, data.y_track)
    return {
        **evaluation.scores(data.y_track, oof.probabilities.argmax(axis=1), data.genres),
        "folds": training.folds(data),
        "grouping": data.grouping,
        "groups": int(len(set(data.groups.tolist()))),
        "temperature": temperature,
        **evaluation.calibration_errors(oof.probabilities, data.y_track, temperature),
        "fits": oof.fits,
    }


def holdout(data: training.TrainingSet, oof: np.ndarray, temperature: float) -> dict:
    """Scores of the model fitted without the first grouped, stratified fold, on that fold's tracks.

    That model is the first one of the cross-validation (not refitted: `training.fold`), so its predictions are the
    out-of-fold ones `oof` of that fold.
    """
    _, test_tracks = training.splits(data, training.folds(data))[0]
    probabilities, truth = oof[test_tracks], data.y_track[test_tracks]
    return {
        **evaluation.scores(truth, probabilities.argmax(axis=1), data.genres),
        "fraction": round(len(test_tracks) / len(data.y_track), 3),
        **evaluation.calibration_errors(probabilities, truth, temperature),
    }


def evaluate(store: Store, spec: str, session: Session, grouping: str = "auto", families: list[str] | None = None,
             classifier: str | None = None, on_progress: Listener = unheard) -> dict:
    """Grouped cross-validation report of the store's labelled tracks for feature families and a classifier (default:
    the current model's, else the defaults), written to evaluations/ with its picture (`on_progress` hears the sample's
    reading and the fits)."""
    families, classifier = choices(store, families, classifier, session)
    data, labelled_set, cap = training_data(store, spec, session, grouping, families=families, on_progress=on_progress)
    fits = submit_fits(session, data, classifier)
    data = training.without_rows(data)  # the workers hold the rows now
    oof, _ = fits.results(on_progress)
    report = {
        "evaluated_at": datetime.now(timezone.utc).isoformat(),
        "label_source": labelled_set.source,
        "feature_version": FEATURE_VERSION,
        "feature_families": training.versions_of(families),
        "classifier": classifier,
        "tracks": len(data.y_track),
        "labelled_tracks": labelled_set.tracks.num_rows,
        "cap_per_genre": cap.tracks if cap else None,
        "rows_per_genre": cap.rows if cap else None,
        "windows": len(data.y),
        "windows_per_track": round(len(data.y) / len(data.y_track), 2),
        "genres": data.genres,
        "majority_baseline": evaluation.majority_baseline(data.y_track),
        "cross_validation": cross_validation(data, oof),
    }
    folder = f"{store.evaluations}/{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    cv = report["cross_validation"]
    store.write_bytes(f"{folder}/confusion_matrix.png", evaluation.confusion_png(cv["confusion"], data.genres, f"{cv['folds']}-fold CV grouped by {data.grouping}"))
    store.write_json(f"{folder}/report.json", report)
    return {**report, "report": folder}


def gate(store: Store, cv_accuracy: float, baseline: float, min_accuracy: float, families: list[str],
         session: Session | None = None) -> tuple[bool, str]:
    """The promotion gate: cross-validated accuracy above the majority baseline and at least `min_accuracy`, and every
    current track of the store has the model's families (else tagging would refuse it: the previous model stays;
    checked on a worker of `session` if given)."""
    passes = cv_accuracy > baseline and cv_accuracy >= min_accuracy
    reason = f"cross-validated accuracy {cv_accuracy:.3f} vs majority baseline {baseline:.3f}" + (f" and minimum {min_accuracy:.3f}" if min_accuracy else "")
    if families == [LIBROSA.name]:  # every current track has librosa features
        return passes, reason
    missing = on_worker(session, missing_families, store, families)
    if missing:
        lacking = ", ".join(f"{n} tracks lack {name}" for name, n in missing.items())
        return False, f"{reason}; feature families incomplete ({lacking}): the current model keeps tagging until the backfill completes"
    return passes, reason


def train(store: Store, spec: str, run_id: str, session: Session, min_accuracy: float = 0.0, abstain_below: float = 0.0,
          grouping: str = "auto", all_tracks: bool = False, families: list[str] | None = None, classifier: str | None = None,
          on_progress: Listener = unheard) -> TrainSummary:
    """Cross-validate and hold out (grouped) on the capped sample, fit on it (or, with `all_tracks`, XGBoost on every
    labelled track with xgboost.dask, for the rounds early stopping chose on the sample), calibrate, register; promote
    if it passes. Families and classifier: as given, else the current model's, else the defaults (`choices`; xgboost with
    `all_tracks`, which the CLI allows with no other classifier);
    `on_progress` hears the sample's reading and the fits on the workers."""
    hint = families_hint(store, session) if families is None else None
    if all_tracks and classifier not in (None, XGBoostModel.kind):
        raise GenreBatchError(f"--all-tracks fits with xgboost.dask: it cannot be used with --classifier {classifier}")
    families, classifier = choices(store, families, XGBoostModel.kind if all_tracks and classifier is None else classifier, session)
    data, labelled_set, cap = training_data(store, spec, session, grouping, families=families, on_progress=on_progress)
    matrix_bytes = int(data.X.nbytes)
    final = (sample_rounds, "rounds for --all-tracks") if all_tracks else (partial(training.final_fit, kind=classifier), "final fit")
    fits = submit_fits(session, data, classifier, *final)
    data = training.without_rows(data)  # the workers hold the rows now
    oof, outcome = fits.results(on_progress)
    cv = cross_validation(data, oof)
    held = holdout(data, oof.probabilities, cv["temperature"])
    baseline = evaluation.majority_baseline(data.y_track)
    passes, reason = gate(store, cv["accuracy"], baseline, min_accuracy, families, session)
    version = registry.new_version()
    metadata = {
        "created_at": datetime.now(timezone.utc).isoformat(),
        "run_id": run_id,
        "genres": data.genres,
        "label_source": labelled_set.source,
        "feature_version": FEATURE_VERSION,
        "feature_families": training.versions_of(families),
        "feature_columns": len(data.columns),
        "training_fingerprint": data.fingerprint,
        "labelled_tracks": labelled_set.tracks.num_rows,
        "tracks": len(data.y_track),
        "windows": len(data.y),
        "sample": {"cap_per_genre": cap.tracks, "rows_per_genre": cap.rows, "min_windows": training.MIN_WINDOWS,
                   "windows_per_track": round(len(data.y) / len(data.y_track), 2),
                   "memory_budget_bytes": training.TRAINING_BUDGET_BYTES, "matrix_bytes": matrix_bytes,
                   "rule": "per genre, tracks ordered by a hash of their split group then of their URI; the first cap kept; "
                           "each kept track of a genre of n keeps at most max(min_windows, rows_per_genre // n) consecutive "
                           "windows from an offset hashed from its URI"},
        "tracks_per_genre": dict(Counter(data.genres[i] for i in data.y_track)),
        "dropped_genres": data.dropped,
        "weights": "balanced: every genre the same total weight, every track of a genre the same share",
        "temperature": cv["temperature"],
        "abstain_below": abstain_below,
        "cross_validation": cv,
        "holdout": held,
        "majority_baseline": baseline,
        "gate": {"passed": passes, "reason": reason, "min_accuracy": min_accuracy},
        "xgboost_version": xgb.__version__,
        "sklearn_version": sklearn.__version__,
        "python": platform.python_version(),
    }
    png = evaluation.confusion_png(held["confusion"], data.genres, f"{version} (held-out {held['n']} tracks)")
    if all_tracks:
        located = training.located(store, labelled(store, spec, grouping).tracks, read_inventory(store, KEYS), families)
        model = fit_all(store, located, data.genres, session, outcome, families)
        metadata["fit"] = {"tracks": located.num_rows, "engine": "xgboost.dask", "on": "every labelled track"}
    else:
        fitted = outcome.unpacked()
        model = fitted.model
        metadata["fit"] = {**fitted.cost(), "engine": classifier, "on": "the capped sample"}
    metadata["params"] = model.params()
    registry.register(store, version, model, metadata, png, labelled_keys(labelled_set))
    if passes:
        registry.promote(store, version)
    return TrainSummary(
        version=version,
        promoted=passes,
        reason=reason,
        label_source=labelled_set.source,
        tracks=labelled_set.tracks.num_rows,
        sampled_tracks=len(data.y_track),
        genres=data.genres,
        cv_accuracy=round(cv["accuracy"], 4),
        cv_macro_f1=round(cv["macro_f1"], 4),
        holdout_accuracy=round(held["accuracy"], 4),
        holdout_macro_f1=round(held["macro_f1"], 4),
        grouping=data.grouping,
        classifier=classifier,
        features=families,
        dropped_genres=data.dropped,
        hint=hint,
    )
