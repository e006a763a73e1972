"""Training: XGBoost on the labelled tracks of the feature store, on one node."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xgboost as xgb
from sklearn.model_selection import StratifiedKFold, train_test_split

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
"""XGBoost parameters; one thread is stable on shared machines (see docs/GUIDE facts)."""

ROUNDS = 200
MAX_FOLDS = 5
HOLDOUT = 0.2
MIN_PER_GENRE = 2


@dataclass(frozen=True)
class TrainingSet:
    """Feature matrix and integer labels of the labelled tracks."""

    X: np.ndarray
    y: np.ndarray
    genres: list[str]
    uris: list[str]
    fingerprint: str
    dropped: dict[str, int]


def matrix(tracks: pa.Table) -> np.ndarray:
    """The float32 feature matrix of a feature table, columns in FEATURE_NAMES order."""
    return np.column_stack([tracks[name].to_numpy(zero_copy_only=False) for name in FEATURE_NAMES]).astype(np.float32)


def training_fingerprint(rows: list[tuple[str, str, str]], source: str) -> str:
    """Hash of (uri, content fingerprint, genre) rows, label source and feature version."""
    digest = hashlib.sha1(f"{source}|{FEATURE_VERSION}".encode())
    for row in sorted(rows):
        digest.update("\x00".join(row).encode())
    return digest.hexdigest()[:16]


def training_set(tracks: pa.Table, labels: pa.Table, source: str) -> TrainingSet:
    """Join features with labels, dropping genres with fewer than MIN_PER_GENRE tracks."""
    joined = tracks.join(labels, keys="uri", join_type="inner").sort_by("uri")
    counts = Counter(joined["genre"].to_pylist())
    dropped = {g: n for g, n in counts.items() if n < MIN_PER_GENRE}
    genres = sorted(g for g in counts if g not in dropped)
    if len(genres) < 2:
        raise GenreBatchError(
            f"training needs at least 2 genres with {MIN_PER_GENRE}+ labelled tracks each; "
            f"found {dict(counts) or 'no labelled tracks'} (label source: {source})"
        )
    keep = joined.filter(pc.is_in(joined["genre"], value_set=pa.array(genres)))
    index = {g: i for i, g in enumerate(genres)}
    rows = list(zip(keep["uri"].to_pylist(), keep["fingerprint"].to_pylist(), keep["genre"].to_pylist()))
    return TrainingSet(
        X=matrix(keep),
        y=np.array([index[g] for g in keep["genre"].to_pylist()], dtype=np.int32),
        genres=genres,
        uris=keep["uri"].to_pylist(),
        fingerprint=training_fingerprint(rows, source),
        dropped=dropped,
    )


def fit(X: np.ndarray, y: np.ndarray, n_classes: int) -> xgb.Booster:
    """Train a multi-class XGBoost booster."""
    dtrain = xgb.DMatrix(X, label=y, feature_names=list(FEATURE_NAMES))
    return xgb.train({**PARAMS, "num_class": n_classes}, dtrain, num_boost_round=ROUNDS)


def predict_proba(booster: xgb.Booster, X: np.ndarray) -> np.ndarray:
    """Class probabilities, one row per track."""
    return booster.predict(xgb.DMatrix(X, feature_names=list(FEATURE_NAMES)))


def folds(y: np.ndarray) -> int:
    """Number of cross-validation folds: up to MAX_FOLDS, at most the smallest genre's size."""
    return int(min(MAX_FOLDS, np.bincount(y).min()))


def cross_validated_predictions(X: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold predicted classes of stratified k-fold cross-validation."""
    predicted = np.empty_like(y)
    splitter = StratifiedKFold(n_splits=folds(y), shuffle=True, random_state=seed)
    for train, test in splitter.split(X, y):
        predicted[test] = predict_proba(fit(X[train], y[train], n_classes), X[test]).argmax(axis=1)
    return predicted


def holdout_split(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices, the test part holding at least one track per genre."""
    n_classes = int(y.max()) + 1
    test_size = max(HOLDOUT, n_classes / len(y))
    return train_test_split(np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed)
