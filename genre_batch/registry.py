"""Model registry: versioned XGBoost models (own UBJSON format, never pickle) and a CURRENT pointer."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from genre_batch import GenreBatchError
from genre_batch.store import Store, read_json, write_bytes, write_json

MODEL_FILE = "model.ubj"
METADATA_FILE = "metadata.json"
CONFUSION_FILE = "confusion_matrix.png"

if TYPE_CHECKING:  # imported in load(): reading the pointer must not load xgboost (README, Cheap start)
    import xgboost as xgb


def new_version() -> str:
    """A sortable, unique model version."""
    return f"m-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def register(store: Store, version: str, booster: xgb.Booster, metadata: dict, confusion_png: bytes) -> str:
    """Store a model with its metadata and confusion matrix; the metadata is written last."""
    folder = f"{store.models}/{version}"
    write_bytes(store.fs, f"{folder}/{MODEL_FILE}", bytes(booster.save_raw("ubj")))
    write_bytes(store.fs, f"{folder}/{CONFUSION_FILE}", confusion_png)
    write_json(store.fs, f"{folder}/{METADATA_FILE}", {**metadata, "version": version})
    return folder


def promote(store: Store, version: str) -> None:
    """Make a registered model the current one (one atomic write)."""
    write_json(store.fs, f"{store.models}/CURRENT.json", {"version": version})


def current_version(store: Store) -> str | None:
    """The current model's version, or None when no model was promoted."""
    pointer = f"{store.models}/CURRENT.json"
    return read_json(store.fs, pointer)["version"] if store.fs.exists(pointer) else None


def metadata(store: Store, version: str) -> dict:
    """A registered model's metadata."""
    return read_json(store.fs, f"{store.models}/{version}/{METADATA_FILE}")


def load(store: Store, version: str) -> tuple[xgb.Booster, dict]:
    """Load a registered model and its metadata."""
    import xgboost as xgb

    booster = xgb.Booster()
    with store.fs.open(f"{store.models}/{version}/{MODEL_FILE}", "rb") as f:
        booster.load_model(bytearray(f.read()))
    return booster, metadata(store, version)


def load_current(store: Store) -> tuple[str, xgb.Booster, dict]:
    """The current model, or a clear error when there is none."""
    version = current_version(store)
    if version is None:
        raise GenreBatchError(f"no current model in {store.url}: run 'genre-batch train --labels ...' first")
    booster, meta = load(store, version)
    return version, booster, meta
