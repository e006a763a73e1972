"""Tagging: features x model -> one catalog row per track, with every genre's probability."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa
import xgboost as xgb

from genre_batch import registry
from genre_batch.audio import AudioError
from genre_batch.catalog import CATALOG_SCHEMA
from genre_batch.extraction import extract_file
from genre_batch.labels import normalise
from genre_batch.store import Store
from genre_batch.evaluation import calibrate
from genre_batch.feature_store import tracks
from genre_batch.training import matrix, per_track, predict_proba, track_index


UNKNOWN = "unknown"
"""Genre of a track whose confidence is under the model's abstain threshold."""


def calibrated(booster: xgb.Booster, X: np.ndarray, track: np.ndarray, n_tracks: int, meta: dict) -> np.ndarray:
    """Track probabilities from window features: predictions averaged per track, the model's temperature applied."""
    return calibrate(per_track(predict_proba(booster, X), track, n_tracks), meta.get("temperature", 1.0))


def track_probabilities(booster: xgb.Booster, windows: pa.Table, meta: dict) -> tuple[pa.Table, np.ndarray]:
    """One row per track and its calibrated probabilities: window predictions averaged, temperature applied."""
    first = tracks(windows)
    if first.num_rows == 0:
        return first, np.zeros((0, len(meta["genres"])))
    return first, calibrated(booster, matrix(windows), track_index(windows, first), first.num_rows, meta)


def catalog_rows(
    first: pa.Table, probabilities: np.ndarray, meta: dict, model_version: str, run_id: str, tagged_at: datetime
) -> pa.Table:
    """Catalog rows of tracks and their probabilities; under the abstain threshold the genre is `unknown`."""
    genres, n = meta["genres"], first.num_rows
    confidence = probabilities.max(axis=1) if n else np.zeros(0)
    top = [genres[i] for i in probabilities.argmax(axis=1)] if n else []
    predicted = [g if c >= meta.get("abstain_below", 0.0) else UNKNOWN for g, c in zip(top, confidence)]
    embedded = [normalise(g) for g in first["tag_genre"].to_pylist()]
    return pa.table(
        {
            "track_id": first["track_id"],
            "uri": first["uri"],
            "genre": pa.array(predicted, pa.string()),
            "confidence": pa.array(confidence, pa.float64()),
            "probabilities": pa.array(
                [list(zip(genres, map(float, row))) for row in probabilities], CATALOG_SCHEMA.field("probabilities").type
            ),
            "embedded_genre": pa.array(embedded, pa.string()),
            "disagrees_with_tag": pa.array([None if e is None else e != p for e, p in zip(embedded, predicted)], pa.bool_()),
            "duration_s": first["duration_s"],
            "model_version": pa.array([model_version] * n, pa.string()),
            "feature_version": first["feature_version"],
            "run_id": pa.array([run_id] * n, pa.string()),
            "tagged_at": pa.array([tagged_at] * n, CATALOG_SCHEMA.field("tagged_at").type),
        },
        schema=CATALOG_SCHEMA,
    )


def tag(windows: pa.Table, booster: xgb.Booster, meta: dict, model_version: str, run_id: str, tagged_at: datetime) -> pa.Table:
    """Predict every track's genre probabilities and build its catalog rows."""
    first, probabilities = track_probabilities(booster, windows, meta)
    return catalog_rows(first, probabilities, meta, model_version, run_id, tagged_at)


def classify_files(store: Store, uris: list[str], top: int) -> list[tuple[str, list[tuple[str, float]] | str]]:
    """The `top` genres and probabilities of each file with the current model, or the reason it failed."""
    _, booster, meta = registry.load_current(store)
    results: list[tuple[str, list[tuple[str, float]] | str]] = []
    for uri in uris:
        try:
            _, windows = extract_file(uri)
        except AudioError as e:
            results.append((uri, f"{e.kind}: {e}"))
            continue
        probabilities = calibrated(booster, windows, np.zeros(len(windows), np.int64), 1, meta)[0]  # one track
        order = np.argsort(probabilities)[::-1][:top]
        results.append((uri, [(meta["genres"][i], float(probabilities[i])) for i in order]))
    return results
