"""One model interface for every classifier kind: fit on feature rows, class probabilities per row, files in the registry.

Kinds (`KINDS`): `xgboost`, gradient-boosted trees saved in XGBoost's own UBJSON format; `linear`, a standardised L2
logistic regression fitted with scikit-learn and saved as plain arrays (.npz, loaded with allow_pickle=False).
Models are never pickled. Calibration (temperature), abstention and the promotion gate work on the probabilities a
model gives, so they apply to every kind alike.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Callable
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
PREDICT_CHUNK = 8_192
"""Rows copied at a time when a model reads some rows of a matrix (scoring, standardising, XGBoost's quantised
matrix): fits and predictions never copy all the chosen rows of a training set at once."""
ABSENT_CLASS_LOGIT = -30.0
"""Intercept of a genre the linear model's training rows lacked (a fold can miss one): probability ~0."""


Step = Callable[[str], None]
"""Told what a fit is doing, as a short phrase ("round 120, validation log-loss 0.6120", "C 0.01")."""


def quiet(step: str) -> None:
    """A step listener that ignores steps."""


def everything(rows: np.ndarray | None, n: int) -> np.ndarray:
    """The given row numbers, or all n rows."""
    return np.arange(n) if rows is None else rows


def chunks(rows: np.ndarray, size: int = PREDICT_CHUNK) -> list[np.ndarray]:
    """Consecutive pieces of an array of row numbers, at most `size` long each."""
    return [rows[start : start + size] for start in range(0, len(rows), size)]


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


def calibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities: softmax(log p / T); rows sum to 1."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


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
    def fit(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str],
            rows: np.ndarray | None = None, refit: bool = True, on_step: Step = quiet) -> GenreModel:
        """Fit on the rows `rows` of X (default all; y, weights and split groups are given for every row of X), its
        hyper-parameters chosen on a grouped validation fold of those rows, then (`refit`) fitted again on all of them
        with that choice; without `refit`, the model of the choice as fitted on the rows outside the validation fold
        (what a cross-validation fold needs: one fit instead of two). Rows too few for a validation fold: one fit on all
        of them with the default setting, either way. The chosen rows are read PREDICT_CHUNK at a time. `on_step` hears
        each step (a boosting round, a C tried)."""

    @abstractmethod
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, one row per feature row (rows sum to 1)."""

    def predict_rows(self, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Class probabilities of some rows of X, PREDICT_CHUNK rows copied at a time."""
        if len(rows) == 0:
            return self.predict_proba(X[:0])
        return np.vstack([self.predict_proba(X[piece]) for piece in chunks(rows)])

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


class RowBatches(xgb.DataIter):
    """Some rows of a matrix with their labels and weights, handed to XGBoost PREDICT_CHUNK rows at a time: a
    QuantileDMatrix is built from them (one byte per value) without a copy of them all."""

    def __init__(self, X: np.ndarray, rows: np.ndarray, y: np.ndarray, weight: np.ndarray, columns: list[str]) -> None:
        super().__init__(release_data=True)
        self.X, self.pieces, self.y, self.weight, self.columns, self.at = X, chunks(rows), y, weight, list(columns), 0

    def next(self, input_data: Callable) -> bool:
        """Hand the next piece to XGBoost; False after the last."""
        if self.at == len(self.pieces):
            return False
        piece = self.pieces[self.at]
        input_data(data=self.X[piece], label=self.y[piece], weight=self.weight[piece], feature_names=self.columns)
        self.at += 1
        return True

    def reset(self) -> None:
        """Start again from the first piece."""
        self.at = 0


class Rounds(xgb.callback.TrainingCallback):
    """Tells a step listener each boosting round: with the latest validation log-loss while early stopping, with the
    number of rounds when it is known (`of`)."""

    def __init__(self, on_step: Step, of: int | None = None) -> None:
        super().__init__()
        self.on_step, self.of = on_step, of

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
        """Report the round; never stops the training."""
        loss = evals_log.get("validation", {}).get("mlogloss")
        where = f" of {self.of}" if self.of else f", validation log-loss {loss[-1]:.4f}" if loss else ""
        self.on_step(f"{'refit ' if self.of else ''}round {epoch + 1}{where}")
        return False


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

    @staticmethod
    def quantised(X: np.ndarray, rows: np.ndarray, y: np.ndarray, weight: np.ndarray, columns: list[str],
                  ref: xgb.QuantileDMatrix | None = None) -> xgb.QuantileDMatrix:
        """XGBoost's quantised matrix of some rows of X (bins of `ref` when given), built a chunk at a time."""
        return xgb.QuantileDMatrix(RowBatches(X, rows, y, weight, columns), ref=ref, nthread=PARAMS["nthread"])

    @classmethod
    def early_stopped(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int,
                      columns: list[str], rows: np.ndarray | None = None, on_step: Step = quiet) -> xgb.Booster | None:
        """The booster early-stopped on a grouped, stratified validation fold of `rows` (fitted on the others), sliced
        to its best iteration (`booster[: best_iteration + 1]`: exactly the chosen rounds); None without a fold."""
        rows = everything(rows, len(y))
        split = validation_split(y[rows], groups[rows])
        if split is None:
            return None
        fitting = cls.quantised(X, rows[split[0]], y, weight, columns)
        booster = xgb.train(
            {**PARAMS, "num_class": n_classes},
            fitting,
            num_boost_round=MAX_ROUNDS,
            evals=[(cls.quantised(X, rows[split[1]], y, weight, columns, ref=fitting), "validation")],
            early_stopping_rounds=EARLY_STOPPING,
            verbose_eval=False,
            callbacks=[Rounds(on_step)],
        )
        return booster[: booster.best_iteration + 1]

    @classmethod
    def rounds_for(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str],
                   rows: np.ndarray | None = None, on_step: Step = quiet) -> int:
        """Rounds chosen by early stopping on a grouped, stratified validation fold of `rows` (DEFAULT_ROUNDS without one)."""
        booster = cls.early_stopped(X, y, weight, groups, n_classes, columns, rows, on_step)
        return DEFAULT_ROUNDS if booster is None else booster.num_boosted_rounds()

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str],
            rows: np.ndarray | None = None, refit: bool = True, on_step: Step = quiet) -> XGBoostModel:
        """Early-stopped rounds on a validation fold, then all the rows for that many rounds (`refit`), else the
        early-stopped booster itself (cut to its best iteration)."""
        stopped = cls.early_stopped(X, y, weight, groups, n_classes, columns, rows, on_step)
        if stopped is not None and not refit:
            return cls(stopped, stopped.num_boosted_rounds())
        rounds = DEFAULT_ROUNDS if stopped is None else stopped.num_boosted_rounds()
        matrix = cls.quantised(X, everything(rows, len(y)), y, weight, columns)
        return cls(xgb.train({**PARAMS, "num_class": n_classes}, matrix, num_boost_round=rounds, callbacks=[Rounds(on_step, rounds)]), rounds)

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
        """Class probabilities of the booster, PREDICT_CHUNK rows at a time, straight from the array (no DMatrix copy)."""
        if len(X) == 0:
            return self.booster.predict(self.dmatrix(X, self.booster.feature_names or []))
        return np.vstack([self.booster.inplace_predict(X[start : start + PREDICT_CHUNK]) for start in range(0, len(X), PREDICT_CHUNK)])

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
        self.coef, self.intercept, self.mean, self.scale, self.C = np.ascontiguousarray(coef, np.float64), intercept, mean, scale, C

    @staticmethod
    def standardiser(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of each column over some rows (1 where a column is constant), in float64
        a chunk at a time (two passes: no float64 copy of the rows)."""
        mean = sum(X[piece].sum(axis=0, dtype=np.float64) for piece in chunks(rows)) / len(rows)
        square = sum(np.square(X[piece] - mean).sum(axis=0) for piece in chunks(rows)) / len(rows)
        scale = np.sqrt(square)
        return mean, np.where(scale > 0, scale, 1.0)

    @staticmethod
    def standardised(X: np.ndarray, rows: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The z-scores of some rows of X as float32: the one copy of the rows a fit makes, filled a chunk at a time."""
        Z = np.empty((len(rows), X.shape[1]), np.float32)
        mean32, scale32 = mean.astype(np.float32), scale.astype(np.float32)
        for start in range(0, len(rows), PREDICT_CHUNK):
            piece = rows[start : start + PREDICT_CHUNK]
            Z[start : start + len(piece)] = (X[piece] - mean32) / scale32
        return Z

    @classmethod
    def fit_C(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, n_classes: int, C: float, rows: np.ndarray | None = None) -> LinearModel:
        """Fit for one C on some rows (default all); genres absent from them get zero weights and a very low intercept."""
        from sklearn.linear_model import LogisticRegression

        rows = everything(rows, len(y))
        mean, scale = cls.standardiser(X, rows)
        Z = cls.standardised(X, rows, mean, scale)
        fitted = LogisticRegression(C=C, max_iter=MAX_ITER).fit(Z, y[rows], sample_weight=weight[rows])
        del Z
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
    def fit(cls, X: np.ndarray, y: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_classes: int, columns: list[str],
            rows: np.ndarray | None = None, refit: bool = True, on_step: Step = quiet) -> LinearModel:
        """C with the least weighted log-loss on a validation fold (DEFAULT_C without one), then all the rows (`refit`),
        else that C's model as fitted on the rows outside the validation fold."""
        rows = everything(rows, len(y))
        split = validation_split(y[rows], groups[rows])
        if split is None:
            on_step(f"C {DEFAULT_C}")
            return cls.fit_C(X, y, weight, n_classes, DEFAULT_C, rows)
        fit_rows, check_rows = rows[split[0]], rows[split[1]]
        candidates = []  # a few coefficient arrays each
        for number, c in enumerate(C_GRID, 1):
            on_step(f"C {c} ({number} of {len(C_GRID)})")
            candidates.append(cls.fit_C(X, y, weight, n_classes, c, fit_rows))
        chosen = candidates[int(np.argmin([m.log_loss(X, y, weight, check_rows) for m in candidates]))]
        if not refit:
            return chosen
        on_step(f"refit with C {chosen.C}")
        return cls.fit_C(X, y, weight, n_classes, chosen.C, rows)

    def log_loss(self, X: np.ndarray, y: np.ndarray, weight: np.ndarray, rows: np.ndarray) -> float:
        """Weighted log-loss of some rows of X (their probabilities of the true genre clipped at 1e-12)."""
        p = self.predict_rows(X, rows)
        truth = np.clip(p[np.arange(len(rows)), y[rows]], 1e-12, 1.0)
        return float(-np.average(np.log(truth), weights=weight[rows]))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """softmax of the standardised rows' logits, PREDICT_CHUNK rows at a time; each row's result depends on that row
        alone (see `logits`), so a track predicted alone or in any batch gets the same probabilities."""
        if X.shape[1] != self.coef.shape[1]:
            raise GenreBatchError(f"the linear model expects {self.coef.shape[1]} feature columns, got {X.shape[1]}")
        out = np.empty((len(X), len(self.intercept)), np.float64)
        for start in range(0, len(X), PREDICT_CHUNK):
            rows = X[start : start + PREDICT_CHUNK]
            out[start : start + len(rows)] = softmax(self.logits(rows))
        return out

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """z-scores @ coef.T + intercept in float64, each row's sums in one fixed order: np.einsum's own loop, not BLAS,
        whose matrix products (`@`) sum in an order that depends on the batch's shape (1 row: matrix-vector; a few:
        small-matrix kernels; more: blocked), so a row's logits moved with its batch (~1e-5 in float32)."""
        z = rows.astype(np.float64, order="C")  # rows and coef both C-ordered: the sum runs along each row
        z -= self.mean
        z /= self.scale
        return np.einsum("nc,gc->ng", z, self.coef, optimize=False) + self.intercept

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
