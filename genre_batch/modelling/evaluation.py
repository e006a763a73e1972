"""Evaluation: accuracy, macro-F1, per-genre scores and a confusion-matrix picture."""

from __future__ import annotations

import io

import numpy as np

# matplotlib, scipy and sklearn are imported by the functions that use them: tagging needs only `calibrate` (their
# imports are 2 s of CPU in the flow process of every `tag` run).

from genre_batch.modelling.model import calibrate  # noqa: E402


def scores(y_true: np.ndarray, y_pred: np.ndarray, genres: list[str]) -> dict:
    """Accuracy, macro-F1, per-genre precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(genres)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_genre": {
            g: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for g, p, r, f, s in zip(genres, precision, recall, f1, support)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def majority_baseline(y: np.ndarray) -> float:
    """Accuracy of always answering the most frequent genre."""
    return float(np.bincount(y).max() / len(y)) if len(y) else 0.0


def confusion_png(confusion: list[list[int]], genres: list[str], title: str) -> bytes:
    """The confusion matrix drawn as a PNG (rows: true genre, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = 3 + 0.6 * len(genres)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(confusion), display_labels=genres).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over confidence bins, weighted by size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(
        sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b) for b in range(bins) if np.any(which == b))
    )


def calibration_errors(probabilities: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, float]:
    """Expected calibration error of probabilities as they are (`ece`) and scaled by `temperature` (`ece_calibrated`)."""
    return {
        "ece": expected_calibration_error(probabilities, y),
        "ece_calibrated": expected_calibration_error(calibrate(probabilities, temperature), y),
    }


def fit_temperature(probabilities: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of the true genres."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return float(-np.mean(np.log(np.clip(calibrate(probabilities, np.exp(log_t))[np.arange(len(y)), y], 1e-12, 1.0))))

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))
