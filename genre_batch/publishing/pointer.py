"""The catalog pointer (`catalog/CURRENT.json`): which snapshot readers see and what describes it. Light to import
(no pyarrow): `query` and `status` read it before any table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from genre_batch import GenreBatchError
from genre_batch.storage.store import Store


@dataclass(frozen=True)
class SpaceRecord:
    """What the pointer records of the snapshot's vector space (`vector_space`, as VectorSpace.describe writes it)."""

    name: str
    family: str
    """The feature family it pools (librosa or musicnn)."""
    family_version: int
    dim: int
    """The embedding's dimension (VECTOR_DIM)."""
    pooling: str
    """How a track's inputs are pooled, in words."""
    scaler: str
    """How pooled inputs become an embedding, in words."""
    sample_tracks: int
    """The tracks of the sample the space was fitted on."""
    file: str
    """Its arrays, relative to the catalog folder."""

    @classmethod
    def parse(cls, document: dict) -> SpaceRecord:
        """A vector space record from the pointer's `vector_space`."""
        return cls(**{name: document[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SimilarRecord:
    """What the pointer records of the snapshot's similar folder (`similar`, as genre_batch.publishing.similar.build
    writes it), the forms earlier versions wrote made one: what a record of an earlier version lacks is None or empty.
    Its files are relative to the catalog folder."""

    layout: int
    """1 (none recorded: one index file and one vectors file, buckets by vid hash) or 2 (parts per range of cells)."""
    folder: str
    """The snapshot's similar folder."""
    k: int
    """Neighbours per track in the similar table."""
    index_file: str | None
    """Layout 1: the one index file (None in layout 2, and without tracks)."""
    vectors_file: str | None
    """Layout 1: the one vectors file (None in layout 2)."""
    index_parts: list[str]
    """Layout 2: the index parts, by bucket (empty in layout 1)."""
    vectors_parts: list[str]
    """Layout 2: the vectors parts, by bucket (empty in layout 1)."""
    cells: str | None
    """Layout 2: the cells' centroids (None in layout 1, and without tracks)."""
    files: list[str]
    """The similar table's pieces, by bucket."""
    lookup: dict[str, list[str]]
    """Per lookup column (vid, uri) its files in partition order: one file before partitions; empty before lookup files."""
    buckets: int
    bounds: list[int] | None
    """Layout 2: bucket b holds cells bounds[b] to bounds[b + 1] - 1 (None in layout 1)."""
    sizes: list[int]
    """Tracks per bucket (empty before they were recorded)."""
    nlist: int
    nprobe: int
    deep: int | None
    """The version of the deep lists (None: the snapshot has none)."""
    depth: int | None
    """Entries per deep list."""
    rows: int
    """Rows of the similar table."""
    tracks: int
    """Tracks in the index."""
    mode: str
    """`full` (built afresh) or `incremental` (the previous snapshot's updated)."""
    added: int | None
    """Tracks added by an incremental update (None: a full build)."""
    removed: int | None

    @classmethod
    def parse(cls, document: dict) -> SimilarRecord:
        """A similar record from the pointer's `similar`."""
        layout = document.get("layout", 1)
        one = layout < 2  # layout 1: one index file and one vectors file
        return cls(
            layout=layout, folder=document["folder"], k=document["k"],
            index_file=document["index"] if one else None, vectors_file=document["vectors"] if one else None,
            index_parts=[] if one else list(document["index"] or []), vectors_parts=[] if one else list(document["vectors"]),
            cells=document.get("cells"), files=list(document["files"]),
            lookup={c: [f] if isinstance(f, str) else list(f) for c, f in (document.get("lookup") or {}).items()},
            buckets=document["buckets"], bounds=None if one else list(document["bounds"]),
            sizes=list(document.get("sizes") or []), nlist=document["nlist"], nprobe=document["nprobe"],
            deep=document.get("deep"), depth=document.get("depth"), rows=document["rows"], tracks=document["tracks"],
            mode=document["mode"], added=document["added"], removed=document["removed"],
        )

    @property
    def has_index(self) -> bool:
        """Whether the snapshot has an index (a snapshot without tracks has none)."""
        return bool(self.index_file or self.index_parts)


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
    vector_space: SpaceRecord | None
    """The snapshot's vector space (genre_batch.publishing.vectors.load reads its arrays)."""
    similar: SimilarRecord | None
    """The snapshot's similar folder (genre_batch.publishing.similar reads it)."""
    document: dict

    @classmethod
    def parse(cls, document: dict) -> CatalogPointer:
        """A pointer from its stored JSON."""
        space, neighbours = document.get("vector_space"), document.get("similar")
        return cls(
            snapshot=document["snapshot"], files=list(document["files"]), genres=document.get("genres") or {},
            rows=document["rows"], catalog_version=document["catalog_version"], model_version=document["model_version"],
            run_id=document["run_id"], published_at=datetime.fromisoformat(document["published_at"]),
            history=document.get("history"), genre_rows=document.get("genre_rows") or {},
            disagreements=document.get("disagreements", 0), changes=document.get("changes"),
            vector_space=None if space is None else SpaceRecord.parse(space),
            similar=None if neighbours is None else SimilarRecord.parse(neighbours), document=document,
        )

    @property
    def space_name(self) -> str | None:
        """The name of the snapshot's vector space (None before catalog version 3)."""
        return self.vector_space.name if self.vector_space else None


def published(store: Store) -> CatalogPointer | None:
    """The published snapshot's pointer, or None before the first publish."""
    return store.read_parsed(store.pointer, CatalogPointer.parse) if store.exists(store.pointer) else None


def required(store: Store) -> CatalogPointer:
    """The published snapshot's pointer; a clear error before the first publish."""
    current = published(store)
    if current is None:
        raise GenreBatchError(f"no published catalog in {store.url}: run 'genre-batch tag' or 'run' first")
    return current
