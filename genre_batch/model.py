"""One model interface for every classifier kind: fit on feature rows, class probabilities per row, files in the registry.

Kinds (`KINDS`): `xgboost`, gradient-boosted trees saved in XGBoost's own UBJSON format; `linear`, a standardised L2
logistic regression fitted with scikit-learn and saved as plain arrays (.npz, loaded with allow_pickle=False).
Models are never pickled. Calibration (temperature), abstention and the promotion gate work on the probabilities a
model gives, so they apply to every kind alike.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import xgboost as xgb
from sklearn.model_selection import StratifiedGroupKFold

from genre_batch import GenreBatchError

SEED = 0
MAX_FOLDS = 5
PARAMS: dict = {
    "objective": "multi:softprob",
    "tree_method": "hist",
    "eta": 0.1,
    "max_depth": 4,
    "subsample": 0.8,
    "colsample_bytree": 0.5,
    "eval_metric": "mlogloss",
    "nthread": 1,
    "seed": SEED,
}
"""XGBoost parameters; one thread stays stable on shared machines."""

MAX_ROUNDS = 1000
EARLY_STOPPING = 30
DEFAULT_ROUNDS = 200
"""Rounds when a training set is too small for a validation fold (fewer than 2 groups in some genre)."""

C_GRID = (0.001, 0.01, 0.1, 1.0)
"""Inverse L2 strengths tried by the linear model on a grouped validation fold (weighted log-loss decides)."""
DEFAULT_C = 0.01
"""The linear model's C when a training set is too small for a validation fold."""
MAX_ITER = 2000
PREDICT_CHUNK = 50_000
"""Rows standardised and scored at a time by the linear model (bounds the float32 copy)."""
ABSENT_CLASS_LOGIT = -30.0
"""Intercept of a genre the linear model's training rows lacked (a fold can miss one): probability ~0."""


def groups_per_genre(y: np.ndarray, groups: np.ndarray) -> int:
    """How many distinct groups the genre with the fewest has."""
    return min(len(np.unique(groups[y == c])) for c in np.unique(y))


def validation_split(y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows to fit and rows to validate on: the first fold of a grouped, stratified split; None under 2 groups per genre."""
    smallest = groups_per_genre(y, groups)
    if smallest < 2:
        return None
    splitter = StratifiedGroupKFold(n_splits=min(MAX_FOLDS, smallest), shuffle=True, random_state=SEED)
    return next(splitter.split(np.zeros(len(y)), y, groups))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


class GenreModel(ABC):
    """A fitted genre classifier: probabilities per feature row, its files for the registry, its card parameters."""

    kind: ClassVar[str]
    files: ClassVar[tuple[str, ...]]
    """Names of the files it is saved as in its model folder."""

    @classmethod
    @abstractmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str]) -> GenreModel:
        """Fit on rows X (labels y, weights, the split group of each row), its hyper-parameters chosen on a grouped fold."""

    @abstractmethod
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, one row per feature row (rows sum to 1)."""

    @abstractmethod
    def to_files(self) -> dict[str, bytes]:
        """The model as files (name -> bytes), none of them a pickle."""

    @classmethod
    @abstractmethod
    def from_files(cls, files: dict[str, bytes]) -> GenreModel:
        """The model back from its files."""

    @abstractmethod
    def params(self) -> dict:
        """What the model card records of its settings."""


class XGBoostModel(GenreModel):
    """Gradient-boosted trees (XGBoost `hist`), rounds chosen by early stopping on a grouped validation fold."""

    kind = "xgboost"
    files = ("model.ubj",)

    def __init__(self, booster: xgb.Booster, rounds: int) -> None:
        self.booster, self.rounds = booster, rounds

    @staticmethod
    def dmatrix(X: np.ndarray, columns: list[str], y: np.ndarray | None = None, weight: np.ndarray | None = None) -> xgb.DMatrix:
        """An XGBoost matrix with the feature names."""
        return xgb.DMatrix(X, label=y, weight=weight, feature_names=list(columns))

    @classmethod
    def rounds_for(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str]) -> int:
        """Rounds chosen by early stopping on a grouped, stratified validation fold (DEFAULT_ROUNDS without one)."""
        split = validation_split(y, groups)
        if split is None:
            return DEFAULT_ROUNDS
        fit_rows, check_rows = split
        booster = xgb.train(
            {**PARAMS, "num_class": n_classes},
            cls.dmatrix(X[fit_rows], columns, y[fit_rows], weight[fit_rows]),
            num_boost_round=MAX_ROUNDS,
            evals=[(cls.dmatrix(X[check_rows], columns, y[check_rows], weight[check_rows]), "validation")],
            early_stopping_rounds=EARLY_STOPPING,
            verbose_eval=False,
        )
        return booster.best_iteration + 1

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str]) -> XGBoostModel:
        """Early-stopped rounds on a validation fold, then all rows for that many rounds."""
        rounds = cls.rounds_for(X, y, weight, groups, n_classes, columns)
        return cls(xgb.train({**PARAMS, "num_class": n_classes}, cls.dmatrix(X, columns, y, weight), num_boost_round=rounds), rounds)

    @classmethod
    def fit_dask(cls, client: object, X: object, y: object, weight: object, n_classes: int, columns: list[str], rounds: int) -> XGBoostModel:
        """Fit on Dask arrays with xgboost.dask on the cluster (rows stay on the workers) for the given rounds."""
        try:
            from xgboost import dask as dxgb
        except ImportError as e:  # xgboost.dask needs dask.dataframe, which needs pandas
            raise GenreBatchError(f"--all-tracks needs xgboost.dask ({e}): pip install 'genre-batch[dask-training]'") from None
        dtrain = dxgb.DaskDMatrix(client, X, y, weight=weight, feature_names=list(columns))
        return cls(dxgb.train(client, {**PARAMS, "num_class": n_classes}, dtrain, num_boost_round=rounds)["booster"], rounds)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities of the booster (column names as it was trained with)."""
        return self.booster.predict(self.dmatrix(X, self.booster.feature_names or []))

    def to_files(self) -> dict[str, bytes]:
        """The booster in XGBoost's UBJSON format."""
        return {"model.ubj": bytes(self.booster.save_raw("ubj"))}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> XGBoostModel:
        """Load the booster; its rounds are what it holds."""
        booster = xgb.Booster()
        booster.load_model(bytearray(files["model.ubj"]))
        return cls(booster, booster.num_boosted_rounds())

    def params(self) -> dict:
        """XGBoost parameters and rounds."""
        return {**PARAMS, "max_rounds": MAX_ROUNDS, "early_stopping_rounds": EARLY_STOPPING, "num_boost_round": self.rounds}


class LinearModel(GenreModel):
    """Standardised L2 logistic regression (multinomial, lbfgs): z-scores with the training rows' mean and standard
    deviation, then softmax(z @ coef.T + intercept). C is chosen from C_GRID on a grouped validation fold."""

    kind = "linear"
    files = ("model.npz",)

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray, C: float) -> None:
        self.coef, self.intercept, self.mean, self.scale, self.C = coef, intercept, mean, scale, C

    @staticmethod
    def standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of each column (1 where a column is constant)."""
        mean = X.mean(axis=0, dtype=np.float64)
        scale = X.std(axis=0, dtype=np.float64)
        return mean, np.where(scale > 0, scale, 1.0)

    @classmethod
    def fit_C(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, n_classes: int, C: float) -> LinearModel:
        """Fit for one C; genres absent from y get zero weights and a very low intercept."""
        from sklearn.linear_model import LogisticRegression

        mean, scale = cls.standardiser(X)
        Z = (X - mean.astype(np.float32)) / scale.astype(np.float32)  # float32: one copy the size of the sample
        fitted = LogisticRegression(C=C, max_iter=MAX_ITER).fit(Z, y, sample_weight=weight)
        coef = np.zeros((n_classes, X.shape[1]))
        intercept = np.full(n_classes, ABSENT_CLASS_LOGIT)
        present = fitted.classes_.astype(np.int64)
        if len(present) == 2:  # sklearn keeps one logit for two classes: split it so that softmax equals its sigmoid
            coef[present] = np.vstack([-fitted.coef_[0] / 2, fitted.coef_[0] / 2])
            intercept[present] = [-fitted.intercept_[0] / 2, fitted.intercept_[0] / 2]
        else:
            coef[present], intercept[present] = fitted.coef_, fitted.intercept_
        return cls(coef, intercept, mean, scale, C)

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str]) -> LinearModel:
        """C with the least weighted log-loss on a validation fold (DEFAULT_C without one), then all rows."""
        split = validation_split(y, groups)
        C = DEFAULT_C
        if split is not None:
            fit_rows, check_rows = split
            losses = []
            for c in C_GRID:
                p = cls.fit_C(X[fit_rows], y[fit_rows], weight[fit_rows], n_classes, c).predict_proba(X[check_rows])
                truth = np.clip(p[np.arange(len(check_rows)), y[check_rows]], 1e-12, 1.0)
                losses.append(float(-np.average(np.log(truth), weights=weight[check_rows])))
            C = C_GRID[int(np.argmin(losses))]
        return cls.fit_C(X, y, weight, n_classes, C)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """softmax of the standardised rows' logits, in chunks of PREDICT_CHUNK rows."""
        if X.shape[1] != self.coef.shape[1]:
            raise GenreBatchError(f"the linear model expects {self.coef.shape[1]} feature columns, got {X.shape[1]}")
        mean, scale = self.mean.astype(np.float32), self.scale.astype(np.float32)
        coef, intercept = self.coef.T.astype(np.float32), self.intercept.astype(np.float32)
        out = np.empty((len(X), len(self.intercept)), np.float64)
        for start in range(0, len(X), PREDICT_CHUNK):
            rows = X[start : start + PREDICT_CHUNK]
            out[start : start + len(rows)] = softmax((((rows - mean) / scale) @ coef + intercept).astype(np.float64))
        return out

    def to_files(self) -> dict[str, bytes]:
        """coef [genres x columns], intercept, mean, scale and C as float64 arrays in one .npz (no pickle)."""
        buffer = io.BytesIO()
        np.savez(buffer, coef=self.coef, intercept=self.intercept, mean=self.mean, scale=self.scale, C=np.array(self.C))
        return {"model.npz": buffer.getvalue()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> LinearModel:
        """Load the arrays with allow_pickle=False."""
        with np.load(io.BytesIO(files["model.npz"]), allow_pickle=False) as arrays:
            return cls(arrays["coef"], arrays["intercept"], arrays["mean"], arrays["scale"], float(arrays["C"]))

    def params(self) -> dict:
        """Regularisation and solver settings."""
        return {"penalty": "l2", "C": self.C, "C_grid": list(C_GRID), "solver": "lbfgs", "multinomial": True,
                "max_iter": MAX_ITER, "standardised": "z-scores of the training rows"}


KINDS: dict[str, type[GenreModel]] = {k.kind: k for k in (XGBoostModel, LinearModel)}
"""Every model kind, by the name the card's `classifier` and `train --classifier` use."""


def default_kind(families: list[str] | tuple[str, ...]) -> str:
    """The classifier of `train` when neither --classifier nor the current model says: linear when the families include
    musicnn (it won the paired comparison of #14 there), else xgboost (linear showed no clear win on librosa alone)."""
    return LinearModel.kind if "musicnn" in families else XGBoostModel.kind


def model_class(kind: str) -> type[GenreModel]:
    """The class of a classifier kind, or a clear error naming the known ones."""
    if kind not in KINDS:
        raise GenreBatchError(f"unknown classifier {kind!r}: this genre-batch knows {', '.join(KINDS)}")
    return KINDS[kind]
