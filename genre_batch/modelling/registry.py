"""Model registry: versioned models of any kind (genre_batch.modelling.model: XGBoost in its UBJSON format, linear as plain
arrays in .npz; never pickle) with their cards, and a CURRENT pointer with history.

The pointer `models/CURRENT.json` (ModelPointer) is {"version", "pinned", "promoted_at", "history"}: switched by a conditional write (like the
catalog's), `history` the versions that were current before, newest last; a pinned model is never replaced by an
automatic retrain."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Callable

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


LEGACY_CLASSIFIER = "xgboost"
"""The classifier of a model whose card does not say (stores before model kinds): they were all XGBoost."""


@dataclass(frozen=True)
class ModelCard:
    """A registered model's card (`metadata.json`), read once: the facts stages act on, with the defaults of cards
    written before a field existed; `document` is the card as stored (`models show`)."""

    version: str
    created_at: datetime
    genres: tuple[str, ...]
    classifier: str
    families: dict[str, int]
    """The feature families and versions the model was trained on."""
    feature_version: int
    temperature: float
    abstain_below: float
    label_source: str | None
    training_fingerprint: str | None
    labelled_tracks: int
    cv_accuracy: float
    holdout_accuracy: float
    confusion: list[list[int]]
    """The held-out confusion matrix, rows the true genre, in `genres` order."""
    gate_passed: bool
    gate_reason: str
    document: dict

    @classmethod
    def parse(cls, document: dict) -> ModelCard:
        """A card from its stored JSON (xgboost on librosa alone, uncalibrated, for cards before kinds and families)."""
        return cls(
            version=document["version"],
            created_at=datetime.fromisoformat(document["created_at"]),
            genres=tuple(document["genres"]),
            classifier=document.get("classifier", LEGACY_CLASSIFIER),
            families=document.get("feature_families") or {"librosa": document["feature_version"]},
            feature_version=document["feature_version"],
            temperature=document.get("temperature", 1.0),
            abstain_below=document.get("abstain_below", 0.0),
            label_source=document.get("label_source"),
            training_fingerprint=document.get("training_fingerprint"),
            labelled_tracks=document.get("labelled_tracks", document["tracks"]),
            cv_accuracy=document["cross_validation"]["accuracy"],
            holdout_accuracy=document["holdout"]["accuracy"],
            confusion=document["holdout"]["confusion"],
            gate_passed=document["gate"]["passed"],
            gate_reason=document["gate"]["reason"],
            document=document,
        )


@dataclass(frozen=True)
class ModelPointer:
    """`models/CURRENT.json`: the current version, whether it is pinned, and the versions current before it (newest
    last; stores before the history have only `version`)."""

    version: str
    pinned: bool = False
    promoted_at: str | None = None
    history: tuple[str, ...] = ()

    @classmethod
    def parse(cls, document: dict) -> ModelPointer:
        """A pointer from its stored JSON."""
        return cls(document["version"], bool(document.get("pinned")), document.get("promoted_at"), tuple(document.get("history", ())))

    @property
    def document(self) -> dict:
        """The pointer as stored (and printed by `models promote/rollback/pin --format json`)."""
        return {"version": self.version, "pinned": self.pinned, "promoted_at": self.promoted_at, "history": list(self.history)}


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


def pointer(store: Store) -> ModelPointer | None:
    """The model pointer, or None when no model was promoted."""
    path = f"{store.models}/{POINTER}"
    return store.read_parsed(path, ModelPointer.parse) if store.exists(path) else None


def switched(store: Store, change: Callable[[ModelPointer | None], ModelPointer]) -> ModelPointer:
    """Replace the pointer by `change` of it, with a conditional write: a concurrent switch makes this one fail."""
    path = f"{store.models}/{POINTER}"
    expected = store.version_token(path)
    new = change(pointer(store))
    store.swap(path, json.dumps(new.document, indent=2, sort_keys=True).encode(), expected)
    return new


def now() -> str:
    """The time of a switch, as stored in the pointer."""
    return datetime.now(timezone.utc).isoformat()


def history_after(previous: ModelPointer | None, version: str) -> tuple[str, ...]:
    """The pointer's history once `version` replaces `previous` as current (the last HISTORY versions)."""
    if previous is None:
        return ()
    return (previous.history if previous.version == version else (*previous.history, previous.version))[-HISTORY:]


def promote(store: Store, version: str, pinned: bool | None = False) -> ModelPointer:
    """Make a registered model the current one, the old version (when another one) into the pointer's history; `pinned`
    None keeps the pin of the pointer it replaces."""
    def change(previous: ModelPointer | None) -> ModelPointer:
        pin = bool(previous and previous.pinned) if pinned is None else pinned
        return ModelPointer(version, pin, now(), history_after(previous, version))
    return switched(store, change)


def current_version(store: Store) -> str | None:
    """The current model's version, or None when no model was promoted."""
    current = pointer(store)
    return current.version if current else None


def no_model(store: Store) -> NoModel:
    """Why there is no model to tag with, and what to do next."""
    refused = [c for c in map(partial(card, store), versions(store)) if not c.gate_passed]
    if refused:
        return NoModel(
            f"no current model in {store.url}: the promotion gate refused model {refused[-1].version} ({refused[-1].gate_reason}); "
            f"the extraction is kept. Next: add or fix labelled tracks and run again, or 'genre-batch models promote "
            f"{refused[-1].version} --force'"
        )
    return NoModel(f"no current model in {store.url}: run 'genre-batch train --labels ...' (or 'run' with --labels) first")


def pinned(store: Store) -> bool:
    """Whether the current model is pinned (never replaced by an automatic retrain)."""
    current = pointer(store)
    return bool(current and current.pinned)


def labelled_set(store: Store, version: str) -> pa.Table | None:
    """The labelled set a model was trained on, or None for models registered before it was kept."""
    path = f"{store.models}/{version}/{LABELLED_FILE}"
    return store.read_table(path) if store.exists(path) else None


def card(store: Store, version: str) -> ModelCard:
    """A registered model's card; a clear error when it is missing or damaged."""
    path = f"{store.models}/{version}/{METADATA_FILE}"
    try:
        return store.read_parsed(path, ModelCard.parse)
    except FileNotFoundError:
        raise GenreBatchError(f"model {version} has no card ({path} is missing): 'genre-batch models promote' another "
                              "version, or train again") from None


def load(store: Store, version: str) -> tuple[GenreModel, ModelCard]:
    """Load a registered model (of the kind its card names) and its card."""
    from genre_batch.modelling.model import model_class

    found = card(store, version)
    kind = model_class(found.classifier)
    return kind.from_files({name: store.fs.cat_file(f"{store.models}/{version}/{name}") for name in kind.files}), found


def current_card(store: Store) -> ModelCard | None:
    """The current model's card, or None when no model was promoted."""
    version = current_version(store)
    return card(store, version) if version else None


def current(store: Store) -> ModelCard:
    """The current model's card to tag with: NoModel when there is none (why, and what to do next), a clear error when
    it was trained on another feature version than this genre-batch extracts."""
    found = current_card(store)
    if found is None:
        raise no_model(store)
    if found.feature_version != FEATURE_VERSION:
        raise GenreBatchError(
            f"current model {found.version} was trained on feature version {found.feature_version}, "
            f"the store holds version {FEATURE_VERSION}: retrain with 'genre-batch train'"
        )
    return found


def versions(store: Store) -> list[str]:
    """Registered model versions, oldest first (only complete ones: their card is written last)."""
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.models, detail=False)
                  if store.exists(f"{p.rstrip('/')}/{METADATA_FILE}")) if store.exists(store.models) else []


def summary(found: ModelCard, current: ModelPointer | None) -> dict:
    """One line of `models list`: the card's key facts and whether it is current or pinned."""
    is_current = bool(current and current.version == found.version)
    return {
        "version": found.version,
        "created_at": found.created_at.isoformat(),
        "tracks": found.labelled_tracks,
        "genres": len(found.genres),
        "classifier": found.classifier,
        "features": ",".join(found.families),
        "cv_accuracy": round(found.cv_accuracy, 4),
        "holdout_accuracy": round(found.holdout_accuracy, 4),
        "gate_passed": found.gate_passed,
        "current": is_current,
        "pinned": is_current and current.pinned,
    }


def catalogue(store: Store) -> list[dict]:
    """`models list`: every registered model, oldest first."""
    current = pointer(store)
    return [summary(card(store, v), current) for v in versions(store)]


def promote_checked(store: Store, version: str, force: bool = False) -> ModelPointer:
    """Make a registered model current by hand; a model the promotion gate refused needs `force`."""
    if version not in versions(store):
        raise GenreBatchError(f"no model {version} in {store.url}: see 'genre-batch models list'")
    found = card(store, version)
    if not found.gate_passed and not force:
        raise GenreBatchError(f"model {version} failed the promotion gate ({found.gate_reason}): pass --force to promote it anyway")
    return promote(store, version, pinned=None)


def rollback(store: Store) -> ModelPointer:
    """Make the model that was current before the current one current again (from the pointer's history; entries of the
    current model itself, which promoting the current model added before, are skipped)."""
    def change(current: ModelPointer | None) -> ModelPointer:
        history = list(current.history) if current else []
        while history and history[-1] == current.version:
            history.pop()
        if not history:
            raise GenreBatchError(f"no earlier current model to roll back to in {store.url}")
        *history, previous = history
        return ModelPointer(previous, current.pinned, now(), tuple(history))
    return switched(store, change)


def pin(store: Store, pinned: bool = True) -> ModelPointer:
    """Pin (or unpin) the current model: a pinned model is never replaced by an automatic retrain."""
    def change(current: ModelPointer | None) -> ModelPointer:
        if current is None:
            raise GenreBatchError(f"no current model in {store.url} to pin")
        return replace(current, pinned=pinned)
    return switched(store, change)


def prune(store: Store, keep: int) -> list[str]:
    """Delete all but the `keep` newest models, never the current one nor a model in its history; returns those deleted."""
    current = pointer(store)
    protected = {current.version, *current.history} if current else set()  # what rollback can return to
    old = [v for v in versions(store)[:-keep] if v not in protected] if keep > 0 else []
    for version in old:
        store.fs.rm(f"{store.models}/{version}", recursive=True)
    return old
