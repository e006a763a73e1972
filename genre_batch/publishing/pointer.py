"""The catalog pointer (`catalog/CURRENT.json`): which snapshot readers see and what describes it. Light to import
(no pyarrow): `query` and `status` read it before any table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from genre_batch import GenreBatchError
from genre_batch.storage.store import Store


@dataclass(frozen=True)
class CatalogPointer:
    """`catalog/CURRENT.json`, read once: the published snapshot and what describes it (what a pointer written by an
    earlier version lacks is None or empty); `document` is the pointer as stored, which readers outside genre-batch read."""

    snapshot: str
    files: list[str]
    """The snapshot's files, relative to the catalog folder."""
    genres: dict[str, str]
    """The genre of each file (empty before catalog version 2)."""
    rows: int
    catalog_version: int
    model_version: str
    run_id: str
    published_at: datetime
    history: list[str] | None
    """The snapshots published up to this one, newest last (None: pointers before version 2 kept none)."""
    genre_rows: dict[str, int]
    disagreements: int
    changes: str | None
    """The change feed's file, relative to the catalog folder."""
    vector_space: dict | None
    """The snapshot's vector space (genre_batch.publishing.vectors.load reads it)."""
    similar: dict | None
    """The snapshot's similar folder (genre_batch.publishing.similar reads it)."""
    document: dict

    @classmethod
    def parse(cls, document: dict) -> CatalogPointer:
        """A pointer from its stored JSON."""
        return cls(
            snapshot=document["snapshot"], files=list(document["files"]), genres=document.get("genres") or {},
            rows=document["rows"], catalog_version=document["catalog_version"], model_version=document["model_version"],
            run_id=document["run_id"], published_at=datetime.fromisoformat(document["published_at"]),
            history=document.get("history"), genre_rows=document.get("genre_rows") or {},
            disagreements=document.get("disagreements", 0), changes=document.get("changes"),
            vector_space=document.get("vector_space"), similar=document.get("similar"), document=document,
        )

    @property
    def space_name(self) -> str | None:
        """The name of the snapshot's vector space (None before catalog version 3)."""
        return (self.vector_space or {}).get("name")


def published(store: Store) -> CatalogPointer | None:
    """The published snapshot's pointer, or None before the first publish."""
    return store.read_parsed(store.pointer, CatalogPointer.parse) if store.exists(store.pointer) else None


def required(store: Store) -> CatalogPointer:
    """The published snapshot's pointer; a clear error before the first publish."""
    current = published(store)
    if current is None:
        raise GenreBatchError(f"no published catalog in {store.url}: run 'genre-batch tag' or 'run' first")
    return current
