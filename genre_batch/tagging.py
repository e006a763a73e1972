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
from genre_batch.training import matrix, predict_proba


def catalog_rows(
    tracks: pa.Table, probabilities: np.ndarray, genres: list[str], model_version: str, run_id: str, tagged_at: datetime
) -> pa.Table:
    """Catalog rows for feature rows and their predicted probabilities."""
    top = probabilities.argmax(axis=1) if len(tracks) else np.zeros(0, dtype=int)
    predicted = [genres[i] for i in top]
    embedded = [normalise(g) for g in tracks["tag_genre"].to_pylist()]
    n = tracks.num_rows
    return pa.table(
        {
            "track_id": tracks["track_id"],
            "uri": tracks["uri"],
            "genre": pa.array(predicted, pa.string()),
            "confidence": pa.array(probabilities.max(axis=1) if n else [], pa.float64()),
            "probabilities": pa.array(
                [list(zip(genres, map(float, row))) for row in probabilities], CATALOG_SCHEMA.field("probabilities").type
            ),
            "embedded_genre": pa.array(embedded, pa.string()),
            "disagrees_with_tag": pa.array([None if e is None else e != p for e, p in zip(embedded, predicted)], pa.bool_()),
            "duration_s": tracks["duration_s"],
            "model_version": pa.array([model_version] * n, pa.string()),
            "feature_version": tracks["feature_version"],
            "run_id": pa.array([run_id] * n, pa.string()),
            "tagged_at": pa.array([tagged_at] * n, CATALOG_SCHEMA.field("tagged_at").type),
        },
        schema=CATALOG_SCHEMA,
    )


def tag(tracks: pa.Table, booster: xgb.Booster, genres: list[str], model_version: str, run_id: str, tagged_at: datetime) -> pa.Table:
    """Predict every track's genre probabilities and build its catalog rows."""
    probabilities = predict_proba(booster, matrix(tracks)) if tracks.num_rows else np.zeros((0, len(genres)))
    return catalog_rows(tracks, probabilities, genres, model_version, run_id, tagged_at)


def classify_files(store: Store, uris: list[str], top: int) -> list[tuple[str, list[tuple[str, float]] | str]]:
    """The `top` genres and probabilities of each file with the current model, or the reason it failed."""
    _, booster, meta = registry.load_current(store)
    results: list[tuple[str, list[tuple[str, float]] | str]] = []
    for uri in uris:
        try:
            _, vector = extract_file(uri)
        except AudioError as e:
            results.append((uri, f"{e.kind}: {e}"))
            continue
        probabilities = predict_proba(booster, vector[None, :])[0]
        order = np.argsort(probabilities)[::-1][:top]
        results.append((uri, [(meta["genres"][i], float(probabilities[i])) for i in order]))
    return results
