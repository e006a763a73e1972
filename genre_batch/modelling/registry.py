"""Model registry: versioned models of any kind (genre_batch.modelling.model: XGBoost in its UBJSON format, linear as plain
arrays in .npz; never pickle) with their cards, and a CURRENT pointer with history.

The pointer `models/CURRENT.json` is {"version", "pinned", "history"}: switched by a conditional write (like the
catalog's), `history` the versions that were current before, newest last; a pinned model is never replaced by an
automatic retrain."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from genre_batch import GenreBatchError, NoModel
from genre_batch.analysis.columns import FEATURE_VERSION
from genre_batch.storage.store import Store

METADATA_FILE = "metadata.json"
CONFUSION_FILE = "confusion_matrix.png"
LABELLED_FILE = "labelled.parquet"
"""The labelled set a model was trained on: (uri, fingerprint, genre) of every labelled track, sampled or not."""
POINTER = "CURRENT.json"
HISTORY = 20

if TYPE_CHECKING:  # imported in load(): reading the pointer must not load xgboost or scikit-learn (README, Cheap start)
    from genre_batch.modelling.model import GenreModel


def new_version() -> str:
    """A sortable, unique model version."""
    return f"m-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def register(store: Store, version: str, model: GenreModel, metadata: dict, confusion_png: bytes, labelled: pa.Table) -> str:
    """Store a model's files with its labelled set, metadata and confusion matrix; the card (with the model's kind as
    `classifier`) is written last."""
    folder = f"{store.models}/{version}"
    for name, data in model.to_files().items():
        store.write_bytes(f"{folder}/{name}", data)
    store.write_bytes(f"{folder}/{CONFUSION_FILE}", confusion_png)
    store.write_table(f"{folder}/{LABELLED_FILE}", labelled)
    store.write_json(f"{folder}/{METADATA_FILE}", {**metadata, "classifier": model.kind, "version": version})
    return folder


def pointer(store: Store) -> dict | None:
    """The model pointer ({"version": ...} in stores before the history), or None when no model was promoted."""
    path = f"{store.models}/{POINTER}"
    return store.read_json(path) if store.exists(path) else None


def promote(store: Store, version: str, pinned: bool = False) -> dict:
    """Make a registered model the current one: a conditional switch of the pointer, the old version (when another one)
    into its history."""
    path = f"{store.models}/{POINTER}"
    expected = store.version_token(path)
    previous = pointer(store) or {}
    history = previous.get("history", []) + ([previous["version"]] if previous.get("version") not in (None, version) else [])
    new = {"version": version, "pinned": pinned, "promoted_at": datetime.now(timezone.utc).isoformat(), "history": history[-HISTORY:]}
    store.swap(path, json.dumps(new, indent=2, sort_keys=True).encode(), expected)
    return new


def current_version(store: Store) -> str | None:
    """The current model's version, or None when no model was promoted."""
    current = pointer(store)
    return current["version"] if current else None


def no_model(store: Store) -> NoModel:
    """Why there is no model to tag with, and what to do next."""
    refused = [v for v in versions(store) if not metadata(store, v)["gate"]["passed"]]
    if refused:
        reason = metadata(store, refused[-1])["gate"]["reason"]
        return NoModel(
            f"no current model in {store.url}: the promotion gate refused model {refused[-1]} ({reason}); the extraction "
            f"is kept. Next: add or fix labelled tracks and run again, or 'genre-batch models promote {refused[-1]} --force'"
        )
    return NoModel(f"no current model in {store.url}: run 'genre-batch train --labels ...' (or 'run' with --labels) first")


def pinned(store: Store) -> bool:
    """Whether the current model is pinned (never replaced by an automatic retrain)."""
    return bool((pointer(store) or {}).get("pinned"))


def labelled_set(store: Store, version: str) -> pa.Table | None:
    """The labelled set a model was trained on, or None for models registered before it was kept."""
    path = f"{store.models}/{version}/{LABELLED_FILE}"
    return store.read_table(path) if store.exists(path) else None


def metadata(store: Store, version: str) -> dict:
    """A registered model's metadata; a clear error when its card is missing (a damaged registry)."""
    path = f"{store.models}/{version}/{METADATA_FILE}"
    try:
        return store.read_json(path)
    except FileNotFoundError:
        raise GenreBatchError(f"model {version} has no card ({path} is missing): 'genre-batch models promote' another "
                              "version, or train again") from None


LEGACY_CLASSIFIER = "xgboost"
"""The classifier of a model whose card does not say (stores before model kinds): they were all XGBoost."""


def model_kind(meta: dict) -> str:
    """The classifier kind a model card records (`classifier`; xgboost for cards written before kinds)."""
    return meta.get("classifier", LEGACY_CLASSIFIER)


def model_families(meta: dict) -> dict[str, int]:
    """The feature families and versions a model was trained on (librosa alone for cards that do not say)."""
    return meta.get("feature_families") or {"librosa": meta["feature_version"]}


def load(store: Store, version: str) -> tuple[GenreModel, dict]:
    """Load a registered model (of the kind its card names; xgboost for cards before kinds) and its metadata."""
    from genre_batch.modelling.model import model_class

    meta = metadata(store, version)
    kind = model_class(model_kind(meta))
    return kind.from_files({name: store.fs.cat_file(f"{store.models}/{version}/{name}") for name in kind.files}), meta


def current(store: Store) -> tuple[str, dict]:
    """The current model's version and card: NoModel when there is none (why, and what to do next), a clear error when
    it was trained on another feature version than this genre-batch extracts."""
    version = current_version(store)
    if version is None:
        raise no_model(store)
    meta = metadata(store, version)
    if meta["feature_version"] != FEATURE_VERSION:
        raise GenreBatchError(
            f"current model {version} was trained on feature version {meta['feature_version']}, "
            f"the store holds version {FEATURE_VERSION}: retrain with 'genre-batch train'"
        )
    return version, meta


def versions(store: Store) -> list[str]:
    """Registered model versions, oldest first (only complete ones: their card is written last)."""
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.models, detail=False)
                  if store.exists(f"{p.rstrip('/')}/{METADATA_FILE}")) if store.exists(store.models) else []


def summary(meta: dict, current: dict | None) -> dict:
    """One line of `models list`: the card's key facts and whether it is current or pinned."""
    return {
        "version": meta["version"],
        "created_at": meta["created_at"],
        "tracks": meta.get("labelled_tracks", meta["tracks"]),
        "genres": len(meta["genres"]),
        "classifier": model_kind(meta),
        "features": ",".join(model_families(meta)),
        "cv_accuracy": round(meta["cross_validation"]["accuracy"], 4),
        "holdout_accuracy": round(meta["holdout"]["accuracy"], 4),
        "gate_passed": meta["gate"]["passed"],
        "current": bool(current and current["version"] == meta["version"]),
        "pinned": bool(current and current["version"] == meta["version"] and current.get("pinned")),
    }


def catalogue(store: Store) -> list[dict]:
    """`models list`: every registered model, oldest first."""
    current = pointer(store)
    return [summary(metadata(store, v), current) for v in versions(store)]


def promote_checked(store: Store, version: str, force: bool = False) -> dict:
    """Make a registered model current by hand; a model the promotion gate refused needs `force`."""
    if version not in versions(store):
        raise GenreBatchError(f"no model {version} in {store.url}: see 'genre-batch models list'")
    gate = metadata(store, version)["gate"]
    if not gate["passed"] and not force:
        raise GenreBatchError(f"model {version} failed the promotion gate ({gate['reason']}): pass --force to promote it anyway")
    return promote(store, version, pinned=bool((pointer(store) or {}).get("pinned")))


def rollback(store: Store) -> dict:
    """Make the model that was current before the current one current again (from the pointer's history; entries of the
    current model itself, which promoting the current model added before, are skipped)."""
    path = f"{store.models}/{POINTER}"
    expected = store.version_token(path)
    current = pointer(store) or {}
    history = list(current.get("history", []))
    while history and history[-1] == current.get("version"):
        history.pop()
    if not history:
        raise GenreBatchError(f"no earlier current model to roll back to in {store.url}")
    *history, previous = history
    new = {"version": previous, "pinned": current.get("pinned", False), "promoted_at": datetime.now(timezone.utc).isoformat(), "history": history}
    store.swap(path, json.dumps(new, indent=2, sort_keys=True).encode(), expected)
    return new


def pin(store: Store, pinned: bool = True) -> dict:
    """Pin (or unpin) the current model: a pinned model is never replaced by an automatic retrain."""
    path = f"{store.models}/{POINTER}"
    expected = store.version_token(path)
    current = pointer(store)
    if not current:
        raise GenreBatchError(f"no current model in {store.url} to pin")
    new = {**current, "pinned": pinned}
    store.swap(path, json.dumps(new, indent=2, sort_keys=True).encode(), expected)
    return new


def prune(store: Store, keep: int) -> list[str]:
    """Delete all but the `keep` newest models, never the current one nor a model in its history; returns those deleted."""
    current = pointer(store) or {}
    protected = {current.get("version"), *current.get("history", [])}  # what rollback can return to
    old = [v for v in versions(store)[:-keep] if v not in protected] if keep > 0 else []
    for version in old:
        store.fs.rm(f"{store.models}/{version}", recursive=True)
    return old
