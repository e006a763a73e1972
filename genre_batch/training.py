"""Training: XGBoost on the analysis windows of labelled tracks, evaluated on whole tracks in grouped splits."""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xgboost as xgb
from sklearn.model_selection import StratifiedGroupKFold

from genre_batch import GenreBatchError
from genre_batch.features import FEATURE_NAMES, FEATURE_VERSION

PARAMS: dict = {
    "objective": "multi:softprob",
    "tree_method": "hist",
    "eta": 0.1,
    "max_depth": 4,
    "subsample": 0.8,
    "colsample_bytree": 0.5,
    "eval_metric": "mlogloss",
    "nthread": 1,
    "seed": 0,
}
"""XGBoost parameters; one thread stays stable on shared machines."""

MAX_ROUNDS = 1000
EARLY_STOPPING = 30
DEFAULT_ROUNDS = 200
"""Rounds when a training set is too small for a validation fold (fewer than 2 groups in some genre)."""
MAX_FOLDS = 5
MIN_PER_GENRE = 2
GROUPINGS = ("auto", "track", "artist", "album", "folder")
"""Ways to group tracks in splits; any other value names a column of the feature store."""


@dataclass(frozen=True)
class TrainingSet:
    """Window feature matrix with labels, the track of each window, and the split group of each track."""

    X: np.ndarray
    y: np.ndarray
    track: np.ndarray
    y_track: np.ndarray
    groups: np.ndarray
    genres: list[str]
    uris: list[str]
    grouping: str
    fingerprint: str
    dropped: dict[str, int]


def matrix(windows: pa.Table) -> np.ndarray:
    """The float32 feature matrix of a feature table, columns in FEATURE_NAMES order."""
    return np.column_stack([windows[name].to_numpy(zero_copy_only=False) for name in FEATURE_NAMES]).astype(np.float32, copy=False)


def training_fingerprint(rows: list[tuple[str, str, str]], source: str) -> str:
    """Hash of (uri, content fingerprint, genre) rows, label source and feature version."""
    digest = hashlib.sha1(f"{source}|{FEATURE_VERSION}".encode())
    for row in sorted(rows):
        digest.update("\x00".join(row).encode())
    return digest.hexdigest()[:16]


def resolve_grouping(tracks: pa.Table, grouping: str) -> str:
    """The grouping to use: `auto` is artist tags when tracks have them, else album tags, else tracks."""
    if grouping != "auto":
        return grouping
    for name, column in (("artist", "tag_artist"), ("album", "tag_album")):
        if pc.sum(pc.is_valid(tracks[column])).as_py():
            return name
    return "track"


def group_keys(tracks: pa.Table, grouping: str) -> list[str]:
    """The split group of each track; a track without a value is a group of its own."""
    uris = tracks["uri"].to_pylist()
    if grouping == "track":
        return uris
    if grouping == "folder":
        return [posixpath.dirname(u) for u in uris]
    column = {"artist": "tag_artist", "album": "tag_album"}.get(grouping, grouping)
    if column not in tracks.column_names:
        raise GenreBatchError(f"cannot group by {grouping!r}: use one of {', '.join(GROUPINGS)} or a feature-store column")
    values = tracks[column].to_pylist()
    return [f"{column}={v}" if v not in (None, "") else u for v, u in zip(values, uris)]


def codes(values: list[str]) -> np.ndarray:
    """Integer codes of values, in order of first appearance."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(v, len(index)) for v in values], dtype=np.int64)


def labelled_tracks(tracks: pa.Table, labels: pa.Table, source: str) -> tuple[pa.Table, list[str], dict[str, int], str]:
    """Tracks kept for training (genres with MIN_PER_GENRE+ tracks) with their genre, the genres, the dropped ones, and their fingerprint."""
    joined = tracks.join(labels, keys="uri", join_type="inner").sort_by("uri")
    counts = Counter(joined["genre"].to_pylist())
    dropped = {g: n for g, n in counts.items() if n < MIN_PER_GENRE}
    genres = sorted(g for g in counts if g not in dropped)
    if len(genres) < 2:
        raise GenreBatchError(
            f"training needs at least 2 genres with {MIN_PER_GENRE}+ labelled tracks each; "
            f"found {dict(counts) or 'no labelled tracks'} (label source: {source})"
        )
    kept = joined.filter(pc.is_in(joined["genre"], value_set=pa.array(genres)))
    rows = list(zip(kept["uri"].to_pylist(), kept["fingerprint"].to_pylist(), kept["genre"].to_pylist()))
    return kept, genres, dropped, training_fingerprint(rows, source)


TRAINING_BUDGET_BYTES = 384 * 2**20
"""Memory for the float32 window features of a training sample: with the model's working copies, training stays
under 2 GB per process. The cap per genre follows from it (`cap_per_genre`)."""


def cap_per_genre(n_genres: int, windows_per_track: float, budget: int = TRAINING_BUDGET_BYTES) -> int:
    """Labelled tracks per genre that fit the memory budget."""
    per_track = max(1.0, windows_per_track) * len(FEATURE_NAMES) * 4
    return max(MIN_PER_GENRE, int(budget // (max(1, n_genres) * per_track)))


def digest(value: str) -> str:
    """A short stable hash, for deterministic ordering."""
    return hashlib.sha1(value.encode()).hexdigest()[:12]


def sample(tracks: pa.Table, cap: int | None, grouping: str) -> pa.Table:
    """At most `cap` tracks per genre, chosen deterministically: tracks ordered by a hash of their split group, then of
    their URI, so that whole groups (artists, albums) are kept together; all tracks when `cap` is None."""
    if cap is None:
        return tracks
    keys = [digest(g) + digest(u) for g, u in zip(group_keys(tracks, grouping), tracks["uri"].to_pylist())]
    ordered = tracks.append_column("_order", pa.array(keys)).sort_by([("genre", "ascending"), ("_order", "ascending")])
    genre = ordered["genre"].to_pylist()
    rank = np.zeros(len(genre), np.int64)
    for i in range(1, len(genre)):
        rank[i] = rank[i - 1] + 1 if genre[i] == genre[i - 1] else 0
    return ordered.filter(pa.array(rank < cap)).drop_columns("_order").sort_by("uri")


def training_set(windows: pa.Table, tracks: pa.Table, genres: list[str], grouping: str, fingerprint: str, dropped: dict[str, int]) -> TrainingSet:
    """The training set of labelled tracks (with a `genre` column, sorted by URI) and their window rows, in the order
    the rows come (deterministic: the workers read parts in index order); windows of other tracks are left out. One
    copy of the features is made (no join or sort of the window table: the sample's memory budget holds)."""
    index = {g: i for i, g in enumerate(genres)}
    y_track = np.array([index[g] for g in tracks["genre"].to_pylist()], dtype=np.int32)
    found = pc.index_in(windows["uri"], value_set=tracks["uri"])
    keep = pc.is_valid(found).to_numpy(zero_copy_only=False)
    track = found.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    X = matrix(windows)
    if not keep.all():
        X, track = X[keep], track[keep]
    return TrainingSet(
        X=X,
        y=y_track[track],
        track=track,
        y_track=y_track,
        groups=codes(group_keys(tracks, grouping)),
        genres=genres,
        uris=tracks["uri"].to_pylist(),
        grouping=grouping,
        fingerprint=fingerprint,
        dropped=dropped,
    )


def groups_per_genre(y: np.ndarray, groups: np.ndarray) -> int:
    """How many distinct groups the genre with the fewest has."""
    return min(len(np.unique(groups[y == c])) for c in np.unique(y))


def balanced_weights(y: np.ndarray, track: np.ndarray) -> np.ndarray:
    """Window weights giving every genre the same total weight and every track of a genre the same share (mean 1)."""
    windows_per_track = np.bincount(track)[track]
    genre_of_track = np.zeros(track.max() + 1, dtype=np.int64)
    genre_of_track[track] = y
    present = np.unique(track)
    tracks_per_genre = np.bincount(genre_of_track[present], minlength=int(y.max()) + 1)
    weights = 1.0 / (windows_per_track * tracks_per_genre[y])
    return weights * len(weights) / weights.sum()


def dmatrix(X: np.ndarray, y: np.ndarray | None = None, weight: np.ndarray | None = None) -> xgb.DMatrix:
    """An XGBoost matrix with the feature names."""
    return xgb.DMatrix(X, label=y, weight=weight, feature_names=list(FEATURE_NAMES))


def boosting_rounds(X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int) -> int:
    """Rounds chosen by early stopping on a grouped, stratified validation fold of the training windows."""
    smallest = groups_per_genre(y, groups)
    if smallest < 2:
        return DEFAULT_ROUNDS
    splitter = StratifiedGroupKFold(n_splits=min(MAX_FOLDS, smallest), shuffle=True, random_state=PARAMS["seed"])
    fit_rows, check_rows = next(splitter.split(X, y, groups))
    booster = xgb.train(
        {**PARAMS, "num_class": n_classes},
        dmatrix(X[fit_rows], y[fit_rows], weight[fit_rows]),
        num_boost_round=MAX_ROUNDS,
        evals=[(dmatrix(X[check_rows], y[check_rows], weight[check_rows]), "validation")],
        early_stopping_rounds=EARLY_STOPPING,
        verbose_eval=False,
    )
    return booster.best_iteration + 1


def fit(X: np.ndarray, y: np.ndarray, n_classes: int, track: np.ndarray, groups: np.ndarray) -> tuple[xgb.Booster, int]:
    """Train on windows (genre- and track-balanced weights) for early-stopped rounds; returns the model and its rounds."""
    weight = balanced_weights(y, track)
    rounds = boosting_rounds(X, y, weight, groups[track], n_classes)
    return xgb.train({**PARAMS, "num_class": n_classes}, dmatrix(X, y, weight), num_boost_round=rounds), rounds


def fit_tracks(data: TrainingSet, tracks: np.ndarray) -> tuple[xgb.Booster, int]:
    """Train on the windows of the given tracks of a training set."""
    rows = windows_of(data, tracks)
    return fit(data.X[rows], data.y[rows], len(data.genres), data.track[rows], data.groups)


def predict_proba(booster: xgb.Booster, X: np.ndarray) -> np.ndarray:
    """Class probabilities, one row per window."""
    return booster.predict(dmatrix(X))


def per_track(probabilities: np.ndarray, track: np.ndarray, n_tracks: int) -> np.ndarray:
    """Average window probabilities into track probabilities (rows sum to 1)."""
    sums = np.zeros((n_tracks, probabilities.shape[1]))
    np.add.at(sums, track, probabilities)
    return sums / np.maximum(np.bincount(track, minlength=n_tracks), 1)[:, None]


def folds(data: TrainingSet) -> int:
    """Number of folds: up to MAX_FOLDS, at most the number of groups of the smallest genre."""
    return int(min(MAX_FOLDS, groups_per_genre(data.y_track, data.groups)))


def splits(data: TrainingSet, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold over tracks: (train tracks, test tracks); a group is never on both sides."""
    if n_splits < 2:
        raise GenreBatchError(
            f"grouped evaluation needs 2+ {data.grouping} groups per genre; "
            f"use --group-by track or add labelled tracks"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(data.y_track)), data.y_track, data.groups))


def windows_of(data: TrainingSet, tracks: np.ndarray) -> np.ndarray:
    """Indices of the windows of the given tracks."""
    return np.flatnonzero(np.isin(data.track, tracks))


def predict_tracks(booster: xgb.Booster, data: TrainingSet, tracks: np.ndarray) -> np.ndarray:
    """Probabilities of the given tracks of a training set: their windows' predictions averaged."""
    rows = windows_of(data, tracks)
    return per_track(predict_proba(booster, data.X[rows]), data.track[rows], len(data.y_track))[tracks]


def out_of_fold(data: TrainingSet, seed: int = 0) -> np.ndarray:
    """Out-of-fold track probabilities of grouped, stratified k-fold cross-validation."""
    result = np.zeros((len(data.y_track), len(data.genres)))
    for train, test in splits(data, folds(data), seed):
        result[test] = predict_tracks(fit_tracks(data, train)[0], data, test)
    return result
