"""Similar tracks: a faiss IVFFlat index of a snapshot's embeddings and each track's top SIMILAR_K neighbour list.

The index's cells (inner product = cosine on the L2-normalised embeddings; nlist = 4 sqrt(n), searched with nprobe
NPROBE: bench/ann.py measured recall@10 0.99 at 1M x 200) are split into buckets, contiguous ranges of cells holding
about BUCKET_TRACKS tracks each, and every piece of the similarity work is per bucket (layout 2). A snapshot's
`similar/` folder holds `cells.faiss` (the cells' centroids, a flat index), per bucket `index-<bucket>.faiss` (an
IVFFlat index of the bucket's cells only), `vectors-<bucket>.parquet` (vid, track_id, cell, embedding of the bucket's
tracks, in vid order), the similar table's piece `part-<bucket>.parquet` (the bucket's tracks' lists, row groups of
PIECE_ROW_GROUP rows in track_id order: one track's list is read without the rest) and the private deep lists
`deep-<bucket>.parquet`; and two lookups in partitions of about LOOKUP_TRACKS tracks, `by_vid-<p>.parquet` (vid,
track_id, uri, genre, cell) in vid order and `by_uri-<p>.parquet` (uri, vid) in uri order, in row groups of
LOOKUP_ROW_GROUP: `genre-batch similar` finds a named track, its bucket and its neighbours from a few row groups (a
track_id's vid is its hash; `partition_of` a vid or a uri's hash names its partition). Searches memory-map every part
and stack their cells into one index (faiss.VStackInvertedLists): no process holds the library's vectors.

A full build runs as tasks: one trains the cells on a sample and numbers them by region (`by_region`); one per row
group of the snapshot's files assigns its tracks to cells (`_routed-<n>.parquet`, in cell order) and splits its
lookup rows by partition (`spread`); one per bucket gathers its cells' tracks from those files into its index and
vectors parts, beside one per lookup partition gathering its rows (`write_lookup`); then one per bucket queries its
tracks' lists. A snapshot written by an earlier version (one
`index.faiss` and one `vectors.parquet` in buckets by vid hash: layout 1) is still answered by `similar`, and the
next snapshot after it is a full build.

With the vector space unchanged a snapshot updates the previous one instead (the cells and buckets stay): each bucket
task rewrites its parts without the departed and changed tracks and with the new and changed ones in its cells, and
new tracks get full queries. Every snapshot also keeps deep lists (top K + SPARE per track, and the floor above
which a list holds every track): an existing list drops its departed and changed members and takes exactly the added
tracks a with score(a, x) >= its floor(x), and is queried again only when fewer than K members remain above its
floor. Those pairs come from one reverse scan (a task of its own, over the previous index): each added track scans
the nprobe cells its own search would scan and keeps every track there that it scores at or above the floor of
(exact inner products, no depth cut). A rebuild's search of x scans x's nprobe cells instead, so each list equals a
rebuild's up to the index's recall (exactly, when nlist <= nprobe: both scans are then exhaustive).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genre_batch import GenreBatchError
from genre_batch.library.labels import canonical
from genre_batch.publishing import catalog
from genre_batch.publishing.catalog import SIMILAR_K, SIMILAR_SCHEMA, VECTOR_DIM
from genre_batch.publishing.pointer import CatalogPointer, SimilarRecord, required
from genre_batch.storage.store import TEMP_MARK, Store

if TYPE_CHECKING:
    import faiss

NPROBE = 32
TRAIN_PER_LIST = 64
"""Vectors per cell that train the cells' k-means (faiss advises 39 to 256): at 1M tracks a sample of 256k, at 10M of
810k (0.4 GB in the cells task), not all of them."""
BUCKET_TRACKS = 25_000
"""Tracks per bucket (a range of cells: its index and vectors parts, its query task) when an index is built; an
incremental update keeps the previous buckets."""
LAYOUT = 2
"""The similar folder's layout recorded in the pointer (absent: 1, one index and one vectors file)."""
CELLS_FILE = "cells.faiss"
INCREMENTAL_MAX_SHARE = 0.1
"""Past this share of added + removed tracks a snapshot rebuilds its index (centroids trained afresh) instead."""
BUCKET_GROWTH = 2
"""Past this many times BUCKET_TRACKS in one bucket a snapshot rebuilds its index: nights of small additions (each
below INCREMENTAL_MAX_SHARE) do not grow a bucket's tasks without bound."""
ROW_GROUP = 10_000
SPARE = 10
"""Entries kept past K in the deep lists: a list that lost members keeps its top K without a query while it holds K."""
PIECE_ROW_GROUP = 20_000
"""Rows per row group of a similar piece (1,000 tracks' lists)."""
LOOKUP_ROW_GROUP = 4_096
"""Rows per row group of the lookup files: a named track or a neighbour costs one such group."""
LOOKUP_TRACKS = 250_000
"""Tracks per lookup partition when an index is built (an update keeps the previous partitions)."""

VECTORS_VERSION = 3
VECTORS_SCHEMA = pa.schema(
    [("vid", pa.int64()), ("track_id", pa.string()), ("cell", pa.int32()), ("embedding", pa.binary(4 * VECTOR_DIM))],
    metadata={"genre_batch.vectors_version": str(VECTORS_VERSION)},
)
"""The vectors parts (in vid order), the routed files (in cell order) and ADDED_FILE: each track's index cell, and
its embedding as VECTOR_DIM little-endian float32 in one fixed-size binary value (Parquet reads and writes it as one
block; as a list of floats, version 1, every float carried its own repetition level: 4x the CPU). Layout 1's
`vectors.parquet` (versions 1 and 2: a `bucket` column, no cell) is read by `stored_vector` (as_matrix takes both
embedding types)."""
REVERSE_SCHEMA = pa.schema([("bucket", pa.int32()), ("vid", pa.int64()), ("added", pa.int64()), ("score", pa.float32())])
"""`_reverse.parquet` of an incremental update (deleted when the lists are written), in bucket order: the added track
`added` scores `score` with the existing track `vid`, at or above that track's floor."""
DEEP_VERSION = 1
DEEP_SCHEMA = pa.schema([("vid", pa.int64()), ("floor", pa.float32()), ("neighbours", pa.list_(pa.int64())), ("scores", pa.list_(pa.float32()))],
                        metadata={"genre_batch.deep_version": str(DEEP_VERSION)})
"""`deep-<bucket>.parquet`, in vid order: each track's top K + SPARE neighbours (vids, scores, nearest first) and its
floor: the list holds every track scoring above it (-inf: every other track)."""
LOOKUP_SCHEMA = pa.schema([("vid", pa.int64()), ("track_id", pa.string()), ("uri", pa.string()), ("genre", pa.string()), ("cell", pa.int32())])
"""The vid lookup partitions (`by_vid-<p>.parquet`, in vid order): every catalog track with its index cell (layout 1's
files have no cell)."""
URI_SCHEMA = pa.schema([("uri", pa.string()), ("vid", pa.int64())])
"""The uri lookup partitions (`by_uri-<p>.parquet`, in uri order): a uri's vid. Snapshots before partitions had one
file of each, with every LOOKUP_SCHEMA column in both."""
LOOKUPS = {"vid": LOOKUP_SCHEMA, "uri": URI_SCHEMA}
"""A snapshot's lookups: by vid and by uri."""

# Parquet writer options per file: random floats and 64-bit hashes do not compress (zstd of the vectors file cost 7 s
# and saved 9 %), nor do their dictionaries pay; strings keep zstd; statistics only on the columns row groups are
# found by. Files written with zstd everywhere (before these options) read the same.
VECTORS_OPTIONS = {"compression": {"vid": "none", "track_id": "zstd", "cell": "zstd", "embedding": "none"},
                   "use_dictionary": False, "write_statistics": ["vid", "cell"]}
DEEP_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": ["vid"]}
"""Deep lists and `_reverse.parquet`: hashes and scores only."""
PIECE_OPTIONS = {"compression": {"track_id": "zstd", "neighbour_id": "zstd", "rank": "zstd", "score": "none"}, "use_dictionary": ["track_id", "rank"],
                 "write_statistics": ["track_id", "rank"]}
"""The published pieces: 20 rows per track_id (dictionary), distinct neighbour ids (zstd, no dictionary), raw scores;
statistics on what a reader filters by."""
LOOKUP_OPTIONS = {
    "vid": {"compression": {"vid": "none", "track_id": "zstd", "uri": "zstd", "genre": "zstd", "cell": "zstd"}, "use_dictionary": ["genre"], "write_statistics": ["vid"]},
    "uri": {"compression": {"uri": "zstd", "vid": "none"}, "use_dictionary": False, "write_statistics": ["uri"]},
}
"""Per lookup column, its partitions' options (row groups are found by that column)."""
SPREAD_OPTIONS = {"compression": "zstd", "use_dictionary": ["genre"], "write_statistics": ["partition"]}


@dataclass(frozen=True)
class Update:
    """How a snapshot's index follows the previous one: the tracks (track_id) to add and to remove."""

    previous: str
    """The previous snapshot's `similar` folder, relative to the catalog."""
    added: list[str]
    removed: list[str]
    bounds: list[int]
    """The previous snapshot's buckets: bucket b holds cells bounds[b] to bounds[b + 1] - 1."""
    lookup: list[str]
    """The previous snapshot's vid lookup files, in partition order (the update keeps their number)."""
    added_vids: np.ndarray = field(default=None, compare=False)  # type: ignore[assignment]
    """The vids of `added`, sorted (hashed once, not by every task); None: hashed from `added`."""
    removed_vids: np.ndarray = field(default=None, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        """Hash the added and removed tracks' vids unless given."""
        for name, tracks in (("added_vids", self.added), ("removed_vids", self.removed)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.sort(vector_ids(tracks)))

    @property
    def buckets(self) -> int:
        """How many buckets the snapshots have."""
        return len(self.bounds) - 1


ADDED_FILE = "_added.parquet"
"""An incremental update's added tracks (VECTORS_SCHEMA, in cell order), read from the catalog once for the bucket,
reverse scan and lookup tasks; deleted with `_reverse.parquet` when the lists are written."""


@dataclass(frozen=True)
class Added:
    """An update's added tracks, as read from ADDED_FILE."""

    track_ids: pa.Array
    vids: np.ndarray
    matrix: np.ndarray
    """Their embeddings [n, VECTOR_DIM]."""


def folder(snapshot: str) -> str:
    """A snapshot's similar folder, relative to the catalog."""
    return f"snapshots/{snapshot}/similar"


def piece(similar_folder: str, bucket: int) -> str:
    """The similar table's piece of one bucket."""
    return f"{similar_folder}/part-{bucket:05d}.parquet"


def deep_piece(similar_folder: str, bucket: int) -> str:
    """The deep lists of one bucket (private: the next incremental update reads them)."""
    return f"{similar_folder}/deep-{bucket:05d}.parquet"


def vector_ids(track_ids: list[str]) -> np.ndarray:
    """Stable int64 index ids of track ids (8 bytes of their BLAKE2b hash)."""
    raw = b"".join(hashlib.blake2b(t.encode(), digest_size=8).digest() for t in track_ids)
    return np.frombuffer(raw, dtype="<i8").astype(np.int64) if raw else np.zeros(0, np.int64)


def buckets_of(vids: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket (query task) of each index id."""
    return (vids.view(np.uint64) % np.uint64(buckets)).astype(np.int32)


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: 4 sqrt(n) (bench/ann.py), at least 1, at most n."""
    return max(1, min(n, round(4 * math.sqrt(n))))


def buffer_view(column: pa.ChunkedArray | pa.Array, dtype: type) -> np.ndarray:
    """A primitive Arrow column without nulls as a read-only numpy view of its buffer (Arrow's to_numpy imports
    pandas: 0.3-1 s of a CLI start)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros(0, dtype)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * np.dtype(dtype).itemsize)


def as_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An embedding column (fixed-size list of float32, or VECTORS_SCHEMA's fixed-size binary) as a read-only float32
    matrix [n, VECTOR_DIM]."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_binary(array.type):
        if len(array) == 0:
            return np.zeros((0, VECTOR_DIM), np.float32)
        return np.frombuffer(array.buffers()[1], np.float32, count=len(array) * VECTOR_DIM, offset=array.offset * 4 * VECTOR_DIM).reshape(-1, VECTOR_DIM)
    return buffer_view(array.flatten(), np.float32).reshape(-1, VECTOR_DIM)


def embedding_column(matrix: np.ndarray) -> pa.Array:
    """A float32 matrix [n, VECTOR_DIM] as VECTORS_SCHEMA's embedding column (one copy at most: none when contiguous)."""
    matrix = np.ascontiguousarray(matrix, np.float32)
    return pa.FixedSizeBinaryArray.from_buffers(VECTORS_SCHEMA.field("embedding").type, len(matrix), [None, pa.py_buffer(matrix)])


Unit = tuple[str, int, int]
"""A row group of a snapshot file: (file relative to the catalog, row group, rows)."""


def units_of(store: Store, files: list[str]) -> list[Unit]:
    """The row groups of snapshot files (their footers only)."""
    units = []
    for f in files:
        with store.open(f"{store.catalog}/{f}") as handle:
            metadata = pq.ParquetFile(handle).metadata
        units += [(f, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
    return units


def unit_embeddings(store: Store, unit: Unit) -> tuple[pa.Array, np.ndarray]:
    """track_ids and embeddings (a read-only view of the column) of one row group of a snapshot file."""
    with store.open(f"{store.catalog}/{unit[0]}") as f:
        table = pq.ParquetFile(f).read_row_group(unit[1], ["track_id", "embedding"])
    return table["track_id"].combine_chunks(), as_matrix(table["embedding"])


def read_embeddings(store: Store, files: list[str], only: list[str]) -> tuple[pa.Array, np.ndarray]:
    """track_ids and embeddings of some tracks (`only`) of snapshot files (relative to the catalog), read a row group
    at a time."""
    import pyarrow.compute as pc
    wanted, ids, matrices = pa.array(only, pa.string()), [], []
    for unit in units_of(store, files):
        track_ids, vectors = unit_embeddings(store, unit)
        keep = pc.is_in(track_ids, value_set=wanted)
        ids.append(track_ids.filter(keep))
        matrices.append(vectors[keep.to_numpy(zero_copy_only=False)])
    return pa.concat_arrays(ids) if ids else pa.array([], pa.string()), np.concatenate(matrices) if matrices else np.zeros((0, VECTOR_DIM), np.float32)


def index_part(similar_folder: str, bucket: int) -> str:
    """The index part of one bucket: an IVFFlat index of its cells."""
    return f"{similar_folder}/index-{bucket:05d}.faiss"


def vectors_part(similar_folder: str, bucket: int) -> str:
    """The vectors part of one bucket (VECTORS_SCHEMA, in vid order)."""
    return f"{similar_folder}/vectors-{bucket:05d}.parquet"


def routed_file(similar_folder: str, position: int) -> str:
    """The tracks of one catalog file with their cells, in cell order (a full build's; deleted when the lists are written)."""
    return f"{similar_folder}/_routed-{position:05d}.parquet"


def lookup_file(similar_folder: str, column: str, partition: int) -> str:
    """Partition `partition` of a snapshot's lookup by `column` (vid or uri)."""
    return f"{similar_folder}/by_{column}-{partition:05d}.parquet"


def spread_file(similar_folder: str, column: str, position: int) -> str:
    """The lookup rows by `column` of one row group of the snapshot files, in partition order (deleted when the lists
    are written)."""
    return f"{similar_folder}/_by_{column}-{position:05d}.parquet"


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The lookup partition of int64 hash keys (vids, hashed uris): `partitions` ranges of equal width in signed order,
    so that a vid lookup's partitions, one after another, are in vid order."""
    high = (keys.view(np.uint64) ^ np.uint64(1 << 63)) >> np.uint64(32)
    return (high * np.uint64(partitions) >> np.uint64(32)).astype(np.int32)


def lookup_keys(column: str, values: list) -> np.ndarray:
    """The hash keys that place lookup rows in partitions: the vid itself, a uri's hash (no Arrow array: pa.array
    imports pandas, 0.3-1 s of a CLI start)."""
    return np.array(values, np.int64) if column == "vid" else vector_ids(values)


CACHE_IDLE_S = 3600
"""A snapshot's copies in the local cache of object-store index files are deleted once unused this long, when the
next snapshot's first copy is made (a nightly's new parts would otherwise add the whole index to the disk each night)."""


def local_file(store: Store, relative: str) -> str:
    """A local path of a catalog file for faiss to memory-map: a file of an object store is copied once to a cache,
    one folder per snapshot folder (`prune_cache` deletes the idle ones)."""
    path = f"{store.catalog}/{relative}"
    if store.local:
        return path
    folder_of, name = relative.rsplit("/", 1)
    root = os.path.join(tempfile.gettempdir(), "genre-batch-similar")
    mine = os.path.join(root, hashlib.sha1(store.fs.unstrip_protocol(f"{store.catalog}/{folder_of}").encode()).hexdigest())
    cache = os.path.join(mine, name)
    if not os.path.exists(cache):  # workers of one host may copy the same file at once: each to its own name, then renamed
        if not os.path.isdir(mine):
            prune_cache(root, CACHE_IDLE_S)
        os.makedirs(mine, exist_ok=True)
        copy = f"{cache}{TEMP_MARK}{uuid.uuid4().hex}"
        store.fs.get_file(path, copy)
        os.replace(copy, cache)
    os.utime(mine)  # in use: not idle
    return cache


def prune_cache(root: str, idle_s: float) -> None:
    """Delete what the cache folder holds that has not been used for `idle_s` (a process that mapped a file keeps its
    pages: Linux frees them when it unmaps)."""
    import shutil
    import time

    if not os.path.isdir(root):
        return
    for entry in os.scandir(root):
        with suppress(FileNotFoundError):  # another worker of the host pruned it first
            if time.time() - entry.stat().st_mtime <= idle_s:
                continue
            if entry.is_dir():
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def read_cells(store: Store, similar_folder: str) -> faiss.Index:
    """A snapshot's cells: the flat inner-product index of their centroids."""
    import faiss  # imported here, like pyarrow.compute: `similar` answering from the stored lists needs neither (0.15 s CPU)
    return faiss.read_index(local_file(store, f"{similar_folder}/{CELLS_FILE}"))


def open_index(store: Store, info: SimilarRecord) -> faiss.Index:
    """A snapshot's index (`info`: what the pointer records of its similar folder), searching NPROBE cells: its parts
    stacked (open_parts; layout 1: its one file, memory-mapped)."""
    import faiss
    if info.layout < 2:
        index = faiss.read_index(local_file(store, info.index_file), faiss.IO_FLAG_MMAP_IFC)
        index.nprobe = NPROBE
        return index
    return open_parts(store, info.folder, info.bounds)


def open_parts(store: Store, similar_folder: str, bounds: list[int]) -> faiss.Index:
    """The index of a snapshot folder of layout 2 (`bounds`: its buckets' cells), searching NPROBE cells: its parts
    memory-mapped (read-only) and stacked into one."""
    import faiss
    quantizer = read_cells(store, similar_folder)
    parts = [faiss.read_index(local_file(store, index_part(similar_folder, b)), faiss.IO_FLAG_MMAP_IFC) for b in range(len(bounds) - 1)]
    stacked = faiss.InvertedListsPtrVector()
    for part in parts:
        stacked.push_back(part.invlists)
    invlists = faiss.VStackInvertedLists(stacked.size(), stacked.data())  # list c of the stack: list c - bounds[b] of part b
    index = faiss.IndexIVFFlat(quantizer, VECTOR_DIM, quantizer.ntotal, faiss.METRIC_INNER_PRODUCT)
    index.replace_invlists(invlists, False)
    index.ntotal, index.nprobe = sum(part.ntotal for part in parts), NPROBE
    index.referenced_objects = [quantizer, parts, stacked, invlists]  # the index borrows them: they live as long as it does
    return index


@contextmanager
def local_target(store: Store, relative: str) -> Iterator[str]:
    """A local path to write a catalog file of an (unpublished) snapshot to: on a local store a temporary name next to
    it, renamed when the block ends; on an object store a temporary file, copied there."""
    path = f"{store.catalog}/{relative}"
    if store.local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        local = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
        try:
            yield local
            os.replace(local, path)
        finally:
            if os.path.exists(local):
                os.remove(local)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield os.path.join(tmp, os.path.basename(path))
        store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        store.fs.put_file(os.path.join(tmp, os.path.basename(path)), path)


def save_index(store: Store, index: faiss.Index, relative: str) -> None:
    """Write an index file into an (unpublished) snapshot folder."""
    import faiss
    with local_target(store, relative) as local:
        faiss.write_index(index, local)


def write_parquet(store: Store, relative: str, table: pa.Table, row_group: int, options: dict) -> None:
    """Write a table as one catalog file (relative to the catalog), atomically, with its Parquet writer options."""
    store.write_table(f"{store.catalog}/{relative}", table, row_group, options)


def new_index(sample: np.ndarray, nlist: int) -> faiss.Index:
    """An empty IVFFlat inner-product index of `nlist` lists trained on a sample of the vectors (faiss' k-means is
    seeded: deterministic)."""
    import faiss
    quantizer = faiss.IndexFlatIP(VECTOR_DIM)
    index = faiss.IndexIVFFlat(quantizer, VECTOR_DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the index owns (and frees) its quantizer
    index.cp.min_points_per_centroid = 1  # a small library trains fewer points per list than faiss advises: no warning
    index.train(sample)
    return index


def training_rows(sizes: list[int], nlist: int) -> list[np.ndarray]:
    """Per file of `sizes` rows, the sorted rows of the index's training sample: TRAIN_PER_LIST x nlist rows drawn
    without replacement from all (seeded), or every row when there are not more."""
    total = sum(sizes)
    wanted = min(total, TRAIN_PER_LIST * nlist)
    chosen = np.sort(np.random.default_rng(0).choice(total, wanted, replace=False)) if wanted < total else np.arange(total)
    bounds = np.cumsum([0, *sizes])
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def vectors_table(track_ids: pa.Array, vids: np.ndarray, matrix: np.ndarray, cells: np.ndarray) -> pa.Table:
    """Tracks' vectors with their ids and cells, in the matrix's order (the embedding column is a view of it)."""
    return pa.table({"vid": vids, "track_id": track_ids, "cell": cells.astype(np.int32), "embedding": embedding_column(matrix)}, schema=VECTORS_SCHEMA)


def assign(quantizer: faiss.Index, matrix: np.ndarray) -> np.ndarray:
    """The cell of each vector: its nearest centroid (as IndexIVF.add assigns it)."""
    if len(matrix) == 0:
        return np.zeros(0, np.int32)
    return quantizer.search(np.ascontiguousarray(matrix, np.float32), 1)[1][:, 0].astype(np.int32)


def bounds_for(counts: np.ndarray, buckets: int) -> list[int]:
    """Bounds of `buckets` contiguous ranges of cells (tracks per cell: `counts`) holding about equal numbers of
    tracks, each at least one cell: bucket b holds cells bounds[b] to bounds[b + 1] - 1."""
    nlist = len(counts)
    buckets = max(1, min(buckets, nlist))
    total = np.cumsum(counts)
    cuts = np.searchsorted(total, total[-1] * np.arange(1, buckets) / buckets, side="left") + 1 if nlist else np.zeros(0, np.int64)
    bounds = [0]
    for b, cut in enumerate(cuts.tolist(), start=1):
        bounds.append(min(max(cut, bounds[-1] + 1), nlist - (buckets - b)))
    return [*bounds, nlist]


def bucket_of(cells: np.ndarray, bounds: list[int]) -> np.ndarray:
    """The bucket of each cell."""
    return (np.searchsorted(np.asarray(bounds), cells, side="right") - 1).astype(np.int32)


def write_cells(store: Store, out: str, units: list[Unit]) -> int:
    """Train the index's cells (k-means) on a sample of the snapshot's embeddings (`training_rows`), read a row group
    at a time, and write them as CELLS_FILE, numbered by region (`by_region`; runs on one worker: it holds the sample);
    returns their number."""
    import faiss
    drop_cached()
    sizes = [rows for _, _, rows in units]
    nlist = nlist_for(sum(sizes))
    sample = np.concatenate([unit_embeddings(store, unit)[1][rows] for unit, rows in zip(units, training_rows(sizes, nlist)) if len(rows)])
    trained = new_index(sample, nlist)  # it owns its quantizer: held while the centroids are read
    centroids = trained.quantizer.reconstruct_n(0, nlist)
    cells = faiss.IndexFlatIP(VECTOR_DIM)
    cells.add(centroids[by_region(centroids, math.ceil(sum(sizes) / BUCKET_TRACKS))])
    save_index(store, cells, f"{out}/{CELLS_FILE}")
    return nlist


def by_region(centroids: np.ndarray, regions: int) -> np.ndarray:
    """An order of the cells in which neighbouring cells are mostly near each other: by region, the centroids clustered
    into `regions` (k-means, seeded), so that a bucket's tracks, a range of cells, mostly search the cells of their
    own region: a list task touches a part of the mapped index, not all of it."""
    import faiss
    if regions <= 1 or len(centroids) <= regions:
        return np.arange(len(centroids))
    kmeans = faiss.Kmeans(VECTOR_DIM, regions, niter=20, seed=1, spherical=True, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(centroids))
    return np.argsort(kmeans.index.search(np.ascontiguousarray(centroids), 1)[1][:, 0], kind="stable")


def route(store: Store, out: str, position: int, unit: Unit, partitions: int) -> np.ndarray:
    """Write the tracks of a row group of a snapshot file with their vids and cells as routed file `position`, in
    (cell, vid) order (row groups found by cell), and its lookup rows with their cells (`spread`); returns its tracks
    per cell."""
    drop_cached()
    quantizer = read_cells(store, out)
    ids, matrix = unit_embeddings(store, unit)
    vids = vector_ids(ids.to_pylist())
    cells = assign(quantizer, matrix)
    order = np.lexsort((vids, cells))
    write_parquet(store, routed_file(out, position), vectors_table(ids.take(pa.array(order)), vids[order], matrix[order], cells[order]), ROW_GROUP, VECTORS_OPTIONS)
    spread(store, out, position, unit, partitions, (vids, cells))
    return np.bincount(cells, minlength=quantizer.ntotal)


def spread(store: Store, out: str, position: int, unit: Unit, partitions: int, routed: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Write the lookup rows of a row group of a snapshot file (LOOKUP_SCHEMA) as its spread files, one per lookup
    column, in the order of that column's partitions (row groups found by a `partition` column). `routed`: the row
    group's vids and cells, in its order, as routing computed them; without, the vids are hashed and cells left null
    (an update's)."""
    drop_cached()
    with store.open(f"{store.catalog}/{unit[0]}") as f:
        read = pq.ParquetFile(f).read_row_group(unit[1], ["track_id", "uri", "genre"])
    vids, cells = routed if routed is not None else (vector_ids(read["track_id"].to_pylist()), None)
    cell = pa.nulls(read.num_rows, pa.int32()) if cells is None else pa.array(cells, pa.int32())
    table = pa.table({"vid": vids, **{c: read[c] for c in ("track_id", "uri", "genre")}, "cell": cell}, schema=LOOKUP_SCHEMA)
    keys = {"vid": vids, "uri": lookup_keys("uri", read["uri"].to_pylist())}
    for column, schema in LOOKUPS.items():
        part = partition_of(keys[column], partitions)
        order = pa.array(np.argsort(part, kind="stable"))
        rows = table.select(schema.names).take(order).append_column("partition", pa.array(part).take(order))
        write_parquet(store, spread_file(out, column, position), rows, LOOKUP_ROW_GROUP, SPREAD_OPTIONS)


def rows_between(store: Store, relative: str, column: str, lo: int, hi: int) -> pa.Table:
    """The rows of a file in `column` order (an int32 column: the cell of a routed file or ADDED_FILE, the partition of
    a spread file) whose `column` is in [lo, hi), from the row groups that may hold them."""
    with store.open(f"{store.catalog}/{relative}") as f:
        parquet = pq.ParquetFile(f)
        index = parquet.schema_arrow.get_field_index(column)
        groups = [g for g in range(parquet.num_row_groups) if overlaps(parquet.metadata.row_group(g).column(index).statistics, lo, hi - 1)]
        table = parquet.read_row_groups(groups)
    values = buffer_view(table[column], np.int32)
    return table.filter(pa.array((values >= lo) & (values < hi)))


def overlaps(stats: pq.Statistics | None, lo: object, hi: object) -> bool:
    """Whether a row group's min/max statistics may hold a value in [lo, hi] (a group without them may)."""
    return stats is None or not stats.has_min_max or (stats.min <= hi and lo <= stats.max)


def write_part(store: Store, out: str, bucket: int, bounds: list[int], sources: list[str]) -> int:
    """Write one bucket's index and vectors parts from the rows of its cells in `sources` (the routed files); returns
    its tracks."""
    drop_cached()
    lo, hi = bounds[bucket], bounds[bucket + 1]
    return put_part(store, out, bucket, lo, hi, pa.concat_tables([rows_between(store, s, "cell", lo, hi) for s in sources]))


def update_part(store: Store, out: str, bucket: int, update: Update) -> int:
    """Write one bucket's index and vectors parts of an update: the previous snapshot's without the removed tracks,
    with the added tracks in its cells (ADDED_FILE); returns its tracks."""
    drop_cached()
    lo, hi = update.bounds[bucket], update.bounds[bucket + 1]
    previous = store.read_table(f"{store.catalog}/{vectors_part(update.previous, bucket)}")
    kept = previous.filter(pa.array(~member(buffer_view(previous["vid"], np.int64), update.removed_vids)))
    return put_part(store, out, bucket, lo, hi, pa.concat_tables([kept, rows_between(store, f"{out}/{ADDED_FILE}", "cell", lo, hi)]))


def put_part(store: Store, out: str, bucket: int, lo: int, hi: int, table: pa.Table) -> int:
    """Write a bucket's vectors part (`table`, in vid order) and its index part: an IVFFlat index of cells [lo, hi)
    (their centroids its quantizer) holding the table's vectors in their cells; returns the table's rows."""
    import faiss
    table = table.take(pa.array(np.argsort(buffer_view(table["vid"], np.int64), kind="stable")))
    write_parquet(store, vectors_part(out, bucket), table, ROW_GROUP, VECTORS_OPTIONS)
    quantizer = faiss.IndexFlatIP(VECTOR_DIM)
    quantizer.add(read_cells(store, out).reconstruct_n(lo, hi - lo))
    index = faiss.IndexIVFFlat(quantizer, VECTOR_DIM, hi - lo, faiss.METRIC_INNER_PRODUCT)
    matrix, vids = np.ascontiguousarray(as_matrix(table["embedding"])), np.ascontiguousarray(buffer_view(table["vid"], np.int64))
    cells = buffer_view(table["cell"], np.int32).astype(np.int64) - lo
    index.add_core(len(vids), faiss.swig_ptr(matrix), faiss.swig_ptr(vids), faiss.swig_ptr(cells))  # cells as routed: no second assignment
    save_index(store, index, index_part(out, bucket))
    return table.num_rows


def tracks_table(store: Store, files: list[str]) -> pa.Table:
    """(vid, track_id, uri, genre, cell) of every track of snapshot files (relative to the catalog), without cells: a
    scan for snapshots published before lookup files."""
    table = catalog.read_files(store, files, ["track_id", "uri", "genre"])
    vids = vector_ids(table["track_id"].to_pylist())
    return pa.table({"vid": vids, **{c: table[c] for c in ("track_id", "uri", "genre")}, "cell": pa.nulls(len(vids), pa.int32())}, schema=LOOKUP_SCHEMA)


def write_lookup(store: Store, out: str, partition: int, positions: int, update: Update | None) -> int:
    """Write partition `partition` of a snapshot's lookups, by vid and by uri, from the spread files of its `positions`
    row groups; an update's spread files have no cells: its tracks take theirs from ADDED_FILE, else from the previous
    snapshot's partition. Returns the partition's tracks."""
    drop_cached()
    for column, schema in LOOKUPS.items():
        spreads = [rows_between(store, spread_file(out, column, n), "partition", partition, partition + 1).drop_columns("partition") for n in range(positions)]
        table = pa.concat_tables([schema.empty_table(), *spreads])
        if column == "vid" and update is not None:
            table = table.set_column(4, "cell", cells_of(store, out, buffer_view(table["vid"], np.int64), update.lookup[partition]))
        table = table.take(pa.array(np.argsort(buffer_view(table["vid"], np.int64), kind="stable"))) if column == "vid" else table.sort_by("uri")
        write_parquet(store, lookup_file(out, column, partition), table, LOOKUP_ROW_GROUP, LOOKUP_OPTIONS[column])
    return table.num_rows


def cells_of(store: Store, out: str, vids: np.ndarray, previous: str) -> pa.Array:
    """The cells of an update's tracks (`vids`): an added track's from ADDED_FILE, any other's from the previous
    snapshot's lookup file `previous` (the partition holding them)."""
    import pyarrow.compute as pc
    known = pa.concat_tables([store.read_table(f"{store.catalog}/{f}", ["vid", "cell"]) for f in (f"{out}/{ADDED_FILE}", previous)])
    at = pc.index_in(pa.array(vids), value_set=known["vid"].combine_chunks())  # the first row of a track counts: added first
    return known["cell"].combine_chunks().take(at)


def write_added(store: Store, out: str, files: list[str], update: Update) -> int:
    """Write ADDED_FILE: the added tracks of an update with their vids, cells (the previous snapshot's, copied into
    this one) and embeddings, in cell order (one read of the catalog's embedding column); returns its rows."""
    drop_cached()
    store.write_bytes(f"{store.catalog}/{out}/{CELLS_FILE}", store.fs.cat_file(f"{store.catalog}/{update.previous}/{CELLS_FILE}"))
    ids, matrix = read_embeddings(store, files, update.added)
    cells = assign(read_cells(store, out), matrix)
    order = np.lexsort((vector_ids(ids.to_pylist()), cells))
    ids, matrix = ids.take(pa.array(order)), matrix[order]
    write_parquet(store, f"{out}/{ADDED_FILE}", vectors_table(ids, vector_ids(ids.to_pylist()), matrix, cells[order]), ROW_GROUP, VECTORS_OPTIONS)
    return len(ids)


def read_added(store: Store, out: str) -> Added:
    """An update's added tracks from its ADDED_FILE."""
    table = store.read_table(f"{store.catalog}/{out}/{ADDED_FILE}")
    return Added(table["track_id"].combine_chunks(), buffer_view(table["vid"], np.int64), as_matrix(table["embedding"]))


def reverse_scan(store: Store, out: str, update: Update) -> None:
    """The added tracks' reverse scan (write_reverse) over the previous index, memory-mapped, while other tasks
    write the new one: the cells and the kept tracks' lists are the same in both, an added track's own vid has an
    infinite floor and a removed track's rows match no list of the new snapshot."""
    drop_cached()
    added = read_added(store, out)
    index = open_parts(store, update.previous, update.bounds)
    write_reverse(store, out, index, added.vids, added.matrix, previous_floors(store, update), update.bounds)


def write_reverse(store: Store, out: str, index: faiss.Index, vids: np.ndarray, matrix: np.ndarray, floors: tuple[np.ndarray, np.ndarray],
                  bounds: list[int]) -> None:
    """Write `_reverse.parquet`: every (existing track x, added track a) with score(a, x) >= floor(x) (`floors`: sorted
    vids and their floors; a track without one has -inf) among the cells a's own search scans, cell by cell."""
    import faiss
    probes = index.quantizer.search(np.ascontiguousarray(matrix), min(index.nprobe, index.nlist))[1] if len(vids) else np.zeros((0, 1), np.int64)
    cell, who = probes.reshape(-1), np.repeat(np.arange(len(vids)), probes.shape[1])
    order = np.argsort(cell, kind="stable")
    cell, who = cell[order], who[order]
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]]) if len(cell) else np.zeros(0, np.int64)
    invlists = faiss.downcast_InvertedLists(index.invlists)
    lists = [list_ids(invlists, int(c)) for c in cell[starts]]
    bounds_of_lists = np.cumsum([0] + [len(ids) for ids in lists])
    floor = floor_at(floors, np.concatenate(lists) if lists else np.zeros(0, np.int64), np.sort(vids))  # one lookup for all lists
    hits, by, scores, buckets = [], [], [], []
    for j, (start, stop) in enumerate(zip(starts, np.r_[starts[1:], len(cell)].astype(np.int64))):
        ids = lists[j]
        if len(ids) == 0:
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(int(cell[start])), len(ids) * VECTOR_DIM * 4).view(np.float32).reshape(len(ids), VECTOR_DIM)
        exact = matrix[who[start:stop]] @ codes.T
        row, column = np.nonzero(exact >= floor[bounds_of_lists[j] : bounds_of_lists[j + 1]][None, :])
        hits.append(ids[column])
        by.append(vids[who[start:stop]][row])
        scores.append(exact[row, column])
        buckets.append(np.full(len(row), bucket_of(np.array([cell[start]]), bounds)[0], np.int32))
    write_parquet(store, f"{out}/_reverse.parquet", reverse_table(hits, by, scores, buckets), ROW_GROUP, DEEP_OPTIONS)


def list_ids(invlists: faiss.InvertedLists, cell: int) -> np.ndarray:
    """The ids of one inverted list (a copy)."""
    import faiss
    size = invlists.list_size(cell)
    return faiss.rev_swig_ptr(invlists.get_ids(cell), size).copy() if size else np.zeros(0, np.int64)


def floor_at(floors: tuple[np.ndarray, np.ndarray], ids: np.ndarray, added: np.ndarray) -> np.ndarray:
    """The floors of tracks `ids` (-inf for a track without one; +inf for the added (sorted), whose lists are queried
    in full)."""
    known, values = floors
    order = np.argsort(ids)  # searched in sorted order: a binary search of sorted values stays in cache (a third of the CPU)
    ordered, out = ids[order], np.full(len(ids), -np.inf, np.float32)
    if len(known):
        row = np.minimum(np.searchsorted(known, ordered), len(known) - 1)
        out[order] = np.where(known[row] == ordered, values[row], -np.inf)
    if len(added):
        out[order[added[np.minimum(np.searchsorted(added, ordered), len(added) - 1)] == ordered]] = np.inf
    return out


def reverse_table(hits: list[np.ndarray], by: list[np.ndarray], scores: list[np.ndarray], buckets: list[np.ndarray]) -> pa.Table:
    """Rows (bucket, vid, added, score) of the reverse scan (`buckets`: the bucket of each hit's track), in (bucket,
    vid, added) order."""
    hit, added, score, bucket = (np.concatenate(x) if x else np.zeros(0, t) for x, t in ((hits, np.int64), (by, np.int64), (scores, np.float32), (buckets, np.int32)))
    order = np.lexsort((added, hit, bucket))
    return pa.table({"bucket": bucket[order], "vid": hit[order], "added": added[order], "score": score[order].astype(np.float32)}, schema=REVERSE_SCHEMA)


def previous_floors(store: Store, update: Update) -> tuple[np.ndarray, np.ndarray]:
    """The floors of the previous snapshot's lists, from its deep lists, as (sorted vids, floors)."""
    table = pa.concat_tables([store.read_table(f"{store.catalog}/{deep_piece(update.previous, b)}", ["vid", "floor"]) for b in range(update.buckets)])
    vids, floors = buffer_view(table["vid"], np.int64), buffer_view(table["floor"], np.float32)
    order = np.argsort(vids)
    return vids[order], floors[order]


def row_groups_holding(parquet: pq.ParquetFile, column: str, values: list) -> list[int]:
    """Row groups of a Parquet file whose min/max statistics of `column` may hold one of `values` (every group
    without statistics)."""
    index = parquet.schema_arrow.get_field_index(column)
    return [g for g in range(parquet.num_row_groups) if any(overlaps(parquet.metadata.row_group(g).column(index).statistics, v, v) for v in values)]


def rows_where(store: Store, relative: str, column: str, values: list, columns: list[str] | None = None) -> pa.Table:
    """The rows of a catalog file sorted by `column` whose `column` is one of `values`, read from the row groups that
    may hold them (`columns`, which must include `column`: all by default). The rows are found by bisection, not
    with pyarrow.compute: its first call with a Python value imports pandas (0.3-1 s of a CLI start)."""
    with store.open(f"{store.catalog}/{relative}") as f:
        parquet = pq.ParquetFile(f)
        table = parquet.read_row_groups(row_groups_holding(parquet, column, values), columns)
    keys = table[column].to_pylist()
    runs = [(bisect.bisect_left(keys, v), bisect.bisect_right(keys, v)) for v in sorted(set(values))]
    return pa.concat_tables([table.slice(lo, hi - lo) for lo, hi in runs]) if runs else table.slice(0, 0)


def track_ids_of(vids: np.ndarray, ids: tuple[np.ndarray, pa.Array]) -> pa.Array:
    """track_ids of index ids (all of which are in `ids`), found in sorted order (a binary search of sorted values
    stays in cache: a third of the CPU of searching them as they come)."""
    order = np.argsort(vids)
    at = np.empty(len(vids), np.int64)
    at[order] = np.searchsorted(ids[0], vids[order])
    return ids[1].take(pa.array(at))


def search(index: faiss.Index, queries: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k (vid [n, k], score [n, k]) of each query, its own id left out; -1 pads short results."""
    scores, found = index.search(np.ascontiguousarray(queries, np.float32), k + 1)
    return best(np.where(found == own[:, None], -1, found), scores, k)


def best(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, the best k entries [n, *] (score descending, then id; -1 ids are no entry), -1 padded."""
    scores = np.where(ids == -1, -np.inf, scores)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    return ids, np.where(ids == -1, 0, scores).astype(np.float32)


def lists_table(track_ids: pa.Array, neighbour_ids: np.ndarray, scores: np.ndarray, ids: tuple[np.ndarray, pa.Array]) -> pa.Table:
    """Rows of the similar table from result matrices (padding dropped), in (track_id, rank) order: the lists are
    taken in track_id order (a sort of n strings, not of n x k rows)."""
    import pyarrow.compute as pc
    n, k = neighbour_ids.shape
    order = buffer_view(pc.sort_indices(track_ids), np.uint64).astype(np.int64)
    neighbour_ids, scores = neighbour_ids[order], scores[order]
    valid = neighbour_ids.reshape(-1) != -1
    flat = neighbour_ids.reshape(-1)[valid]
    return pa.table(
        {"track_id": track_ids.take(pa.array(np.repeat(order, k)[valid])),
         "neighbour_id": track_ids_of(flat, ids),
         "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), n)[valid]),
         "score": pa.array(scores.reshape(-1)[valid])},
        schema=SIMILAR_SCHEMA,
    )


Lists = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Neighbour lists of some tracks: vids [n, depth] (-1 padded), scores [n, depth] and floors [n] (DEEP_SCHEMA)."""


def previous_lists(store: Store, update: Update, bucket: int, vids: np.ndarray) -> tuple[Lists, np.ndarray]:
    """The previous snapshot's deep lists of a bucket's tracks (`vids`, sorted) and which tracks had one."""
    table = store.read_table(f"{store.catalog}/{deep_piece(update.previous, bucket)}")
    previous = buffer_view(table["vid"], np.int64)
    row = np.minimum(np.searchsorted(previous, vids), max(0, len(previous) - 1))
    known = previous[row] == vids if len(previous) else np.zeros(len(vids), bool)
    lists = (list_matrix(table["neighbours"], np.int64, -1), list_matrix(table["scores"], np.float32, 0), buffer_view(table["floor"], np.float32))
    return tuple(x[row] for x in lists), known  # type: ignore[return-value]


def list_matrix(column: pa.ChunkedArray, dtype: type, pad: float) -> np.ndarray:
    """A list column as a matrix [n, its longest list], `pad` filled."""
    array = column.combine_chunks()
    lengths = np.diff(buffer_view(array.offsets, np.int32)) if len(array) else np.zeros(0, np.int32)
    out = np.full((len(array), int(lengths.max()) if len(lengths) else 0), pad, dtype)
    out[np.arange(out.shape[1])[None, :] < lengths[:, None]] = buffer_view(array.flatten(), dtype)
    return out


_ID_MAP: dict[tuple, tuple[np.ndarray, pa.Array]] = {}
"""The last vid lookup's id map in this (worker) process, keyed by its files' paths and versions: one read per
process, not one per bucket task."""


def drop_cached() -> None:
    """Forget this process's id map (of an earlier snapshot's list tasks): a task writing the next snapshot (cells,
    parts, lookup files, added tracks, reverse scan) does not read it."""
    _ID_MAP.clear()


def cached_id_map(store: Store, files: list[str]) -> tuple[np.ndarray, pa.Array]:
    """(sorted vids, their track_ids) of a vid lookup (its partitions, in order: vid order), for mapping search results
    back to tracks (Arrow strings: no Python object per track); read once per process while its files are unchanged
    (path, size and mtime or ETag)."""
    paths = [f"{store.catalog}/{f}" for f in files]
    key = tuple((store.fs.unstrip_protocol(p), i.get("size"), i.get("ETag") or i.get("mtime")) for p, i in zip(paths, map(store.fs.info, paths)))
    if key not in _ID_MAP:
        _ID_MAP.clear()
        table = pa.concat_tables([store.read_table(p, ["vid", "track_id"]) for p in paths])
        _ID_MAP[key] = buffer_view(table["vid"], np.int64), table["track_id"].combine_chunks()
    return _ID_MAP[key]


def query_bucket(store: Store, out: str, bucket: int, bounds: list[int], update: Update | None, partitions: int, k: int = SIMILAR_K) -> int:
    """Write the similar piece and the deep lists of one bucket (runs on a worker, the index memory-mapped; the
    snapshot's vid lookup has `partitions`); returns the piece's rows."""
    depth = k + SPARE
    ids = cached_id_map(store, [lookup_file(out, "vid", p) for p in range(partitions)])
    mine = store.read_table(f"{store.catalog}/{vectors_part(out, bucket)}")
    track_ids = mine["track_id"].combine_chunks()
    vids, queries = buffer_view(mine["vid"], np.int64), as_matrix(mine["embedding"])
    found, scores, floors = np.full((len(vids), depth), -1, np.int64), np.zeros((len(vids), depth), np.float32), np.full(len(vids), -np.inf, np.float32)
    if len(vids):
        redo = np.ones(len(vids), bool)
        if update is not None:
            redo = refresh(store, update, out, bucket, k, vids, (found, scores, floors))
        if redo.any():
            index = open_parts(store, out, bounds)  # per task: its pages unmapped when it ends
            found[redo], scores[redo] = search(index, queries[redo], vids[redo], depth)
            floors[redo] = floor_of(found[redo], scores[redo])
    write_parquet(store, deep_piece(out, bucket), deep_table(vids, found, scores, floors), PIECE_ROW_GROUP, DEEP_OPTIONS)
    write_parquet(store, piece(out, bucket), lists_table(track_ids, found[:, :k], scores[:, :k], ids), PIECE_ROW_GROUP, PIECE_OPTIONS)
    return int((found[:, :k] != -1).sum())


def deep_table(vids: np.ndarray, found: np.ndarray, scores: np.ndarray, floors: np.ndarray) -> pa.Table:
    """Rows of a deep-lists file (DEEP_SCHEMA) from result matrices (padding dropped)."""
    valid = found != -1
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
    return pa.table({"vid": vids, "floor": floors, "neighbours": pa.ListArray.from_arrays(offsets, pa.array(found[valid])),
                     "scores": pa.ListArray.from_arrays(offsets, pa.array(scores[valid]))}, schema=DEEP_SCHEMA)


def refresh(store: Store, update: Update, out: str, bucket: int, k: int, vids: np.ndarray, lists: Lists) -> np.ndarray:
    """Fill the deep lists of a bucket's existing tracks (in place) from their previous lists without the removed
    tracks and with the added tracks that reach their floor; returns which tracks need a full query: new ones, and
    those whose list fell short of K above its floor."""
    (old_ids, old_scores, old_floors), known = previous_lists(store, update, bucket, vids)
    removed = member(old_ids, update.removed_vids)
    redo = member(vids, update.added_vids) | ~known
    candidates = reverse_candidates(store, out, bucket, vids) if update.added else (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    touched = removed.any(axis=1)
    touched[candidates[0]] = True
    depth = lists[0].shape[1]
    width = min(depth, old_ids.shape[1])
    lists[0][:, :width], lists[1][:, :width], lists[2][:] = old_ids[:, :width], old_scores[:, :width], old_floors  # untouched lists stay
    held = (old_ids != -1).sum(axis=1)
    change = np.flatnonzero(touched & ~redo)
    at = np.full(len(vids), -1)
    at[change] = np.arange(len(change))
    mine = at[candidates[0]] != -1
    entries = (np.repeat(np.arange(len(change)), old_ids.shape[1]), np.where(removed[change], -1, old_ids[change]).reshape(-1), old_scores[change].reshape(-1))
    entries = tuple(np.concatenate(pair) for pair in zip(entries, (at[candidates[0][mine]], candidates[1][mine], candidates[2][mine])))
    lists[0][change], lists[1][change], held[change] = top_per_row(entries, len(change), depth)
    lists[2][:] = np.where(held > depth, lists[1][:, -1], lists[2])  # cut at the depth: the list now holds what scores above its last
    short = (np.minimum(held, depth) < k) & (lists[2] > -np.inf)
    return redo | short


Entries = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Candidate list entries as three flat arrays: list row, neighbour vid (-1: none), score."""


def floor_of(found: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The floor of searched lists: their last score when full (the index may hold more below it), else -inf."""
    return np.where(found[:, -1] == -1, -np.inf, scores[:, -1]).astype(np.float32)


def reverse_candidates(store: Store, out: str, bucket: int, vids: np.ndarray) -> Entries:
    """The added tracks that reach the floors of the lists of tracks `vids` (sorted), from the bucket's rows of
    `_reverse.parquet`, as entries (row in `vids`, added vid, score)."""
    hits = rows_where(store, f"{out}/_reverse.parquet", "bucket", [bucket])
    hit, added, score = (buffer_view(hits[c], t) for c, t in (("vid", np.int64), ("added", np.int64), ("score", np.float32)))
    row = np.minimum(np.searchsorted(vids, hit), max(0, len(vids) - 1))
    mine = vids[row] == hit if len(vids) else np.zeros(len(hit), bool)
    return row[mine], added[mine], score[mine]


def top_per_row(entries: Entries, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best k entries of each of n rows (score descending, then vid) as (vids, scores) [n, k], -1 padded, and
    how many entries each row had. Sorted by one float64 key row * 4 + 1 - score (the scores, in [-1, 1], keep their
    float32 order), then the entries of equal keys (equal scores in one row: rare) by vid: one sort of all entries
    instead of a three-key lexsort."""
    rows, ids, scores = entries
    valid = np.flatnonzero(ids != -1)
    key = rows[valid] * 4.0 + (1.0 - scores[valid].astype(np.float64))
    order = np.argsort(key)
    tied = key[order][1:] == key[order][:-1]
    if tied.any():
        at = np.flatnonzero(np.r_[tied, False] | np.r_[False, tied])  # whole runs of equal keys, in key order
        order[at] = order[at][np.lexsort((ids[valid][order[at]], key[order[at]]))]
    order = valid[order]
    rows, ids, scores = rows[order], ids[order], scores[order]
    held = np.bincount(rows, minlength=n)
    rank = np.arange(len(rows)) - np.repeat(np.cumsum(held) - held, held)
    top = rank < k
    found, best_scores = np.full((n, k), -1, np.int64), np.zeros((n, k), np.float32)
    found[rows[top], rank[top]], best_scores[rows[top], rank[top]] = ids[top], scores[top]
    return found, best_scores, held


MEMBER_BITS = 1 << 20
"""Slots of member's prefilter: for 10,000 set ids, 1 % of other values pass it to the binary search."""


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of `values` (int64 hashes) are in `sorted_set`: a bitmap of their low bits first, a binary search only
    for the few values it passes (no sort of `values`)."""
    if len(sorted_set) == 0:
        return np.zeros(values.shape, bool)
    slots = np.zeros(MEMBER_BITS, bool)
    slots[sorted_set & (MEMBER_BITS - 1)] = True
    out = slots[values & (MEMBER_BITS - 1)]
    maybe = np.flatnonzero(out)
    found = values.reshape(-1)[maybe]
    out.reshape(-1)[maybe] = sorted_set[np.minimum(np.searchsorted(sorted_set, found), len(sorted_set) - 1)] == found
    return out


KEYS = ["track_id", "fingerprint"]
"""A track whose (track_id, fingerprint) is in both snapshots kept its embedding (same content, same space)."""


def plan_update(store: Store, previous: CatalogPointer | None, space_name: str, after: pa.Table) -> Update | None:
    """How the new snapshot's index follows the previous one (`after`: the new snapshot's KEYS); None: rebuild it (no
    previous index, one of layout 1, another vector space or K, a bucket grown past BUCKET_GROWTH x BUCKET_TRACKS, or more
    than INCREMENTAL_MAX_SHARE of the tracks changed)."""
    similar = previous.similar if previous else None
    if (not similar or not similar.has_index or similar.layout != LAYOUT or previous.space_name != space_name
            or similar.k != SIMILAR_K or max(similar.sizes or [0]) > BUCKET_GROWTH * BUCKET_TRACKS):
        return None
    before = catalog.read_files(store, previous.files, KEYS)
    added = after.join(before, keys=KEYS, join_type="left anti")["track_id"].to_pylist()
    removed = before.join(after, keys=KEYS, join_type="left anti")["track_id"].to_pylist()
    if len(added) + len(removed) > INCREMENTAL_MAX_SHARE * max(1, after.num_rows):
        return None
    return Update(similar.folder, sorted(added), sorted(removed), similar.bounds, similar.lookup.get("vid", []))


Runner = Callable[[list[tuple]], list]


def build(store: Store, snapshot: str, files: list[str], update: Update | None, run: Runner) -> dict:
    """Index, similar table and lookups of a written snapshot, the work run by `run` (Dask tasks, or in process), by
    row group of the snapshot files, by bucket and by lookup partition; returns what the pointer records under
    `similar`."""
    out = folder(snapshot)
    tracks = sum(store.parquet_rows(f"{store.catalog}/{f}") for f in files)
    units = units_of(store, files) if tracks else []  # row groups of ROW_GROUP_ROWS (100,000) tracks
    partitions = max(1, math.ceil(tracks / LOOKUP_TRACKS)) if update is None else len(update.lookup)
    lookups = [(write_lookup, store, out, p, len(units), update) for p in range(partitions)]
    if update is None:  # cells; routing (and spreading) per row group; parts per bucket beside lookups per partition
        run([(write_cells, store, out, units)] if tracks else [])
        counts = run([(route, store, out, i, unit, partitions) for i, unit in enumerate(units)])
        bounds = bounds_for(np.sum(counts, axis=0), math.ceil(tracks / BUCKET_TRACKS)) if tracks else [0]
        routed = [routed_file(out, i) for i in range(len(counts))]
        sizes = run([(write_part, store, out, b, bounds, routed) for b in range(len(bounds) - 1)] + lookups)[: len(bounds) - 1]
    else:  # the added tracks read once into ADDED_FILE (beside spreading), then read by the reverse scan, parts and lookups
        bounds, routed = update.bounds, []
        run([(write_added, store, out, files, update)] + [(spread, store, out, i, unit, partitions) for i, unit in enumerate(units)])
        sizes = run([(reverse_scan, store, out, update)] + [(update_part, store, out, b, update) for b in range(update.buckets)] + lookups)[1 : update.buckets + 1]
    buckets = len(bounds) - 1
    rows = run([(query_bucket, store, out, b, bounds, update, partitions) for b in range(buckets)])
    spreads = [spread_file(out, c, i) for c in LOOKUPS for i in range(len(units))]
    store.delete([f"{store.catalog}/{f}" for f in (f"{out}/_reverse.parquet", f"{out}/{ADDED_FILE}", *routed, *spreads)])
    return {
        "layout": LAYOUT, "folder": out, "k": SIMILAR_K, "deep": DEEP_VERSION, "depth": SIMILAR_K + SPARE,
        "index": [index_part(out, b) for b in range(buckets)] or None, "cells": f"{out}/{CELLS_FILE}" if buckets else None,
        "lookup": {c: [lookup_file(out, c, p) for p in range(partitions)] for c in LOOKUPS},
        "vectors": [vectors_part(out, b) for b in range(buckets)], "files": [piece(out, b) for b in range(buckets)],
        "rows": sum(rows), "tracks": sum(sizes), "buckets": buckets, "bounds": bounds, "sizes": sizes, "nlist": bounds[-1], "nprobe": NPROBE,
        "mode": "full" if update is None else "incremental",
        "added": None if update is None else len(update.added), "removed": None if update is None else len(update.removed),
    }


def in_process(calls: list[tuple]) -> list:
    """Run calls `(function, *args)` here, in order (catalog.publish of a table held in this process)."""
    return [function(*args) for function, *args in calls]


# `genre-batch similar`: answers for catalog tracks (from the table or the index) and for files outside the catalog


@dataclass(frozen=True)
class Answer:
    """The neighbours of one track named on the command line."""

    track: str
    """As named (track_id, uri or file)."""
    source: str
    """`table` (the stored lists), `index` (searched) or `file` (extracted now, searched)."""
    track_id: str | None
    uri: str
    genre: str | None
    neighbours: list[dict]
    """{rank, track_id, uri, genre, score}, nearest first."""


@dataclass(frozen=True)
class Unanswered:
    """A track named on the command line that is neither in the catalog nor a readable audio file, and why."""

    track: str
    error: str


def lookup(store: Store, pointer: CatalogPointer, column: str, values: list) -> pa.Table:
    """(vid, track_id, uri, genre, cell) of the published catalog's tracks whose `column` (vid or uri) is one of
    `values`: from the partitions of the snapshot's lookup by that column that hold them (a few row groups each; a uri
    gives its vid, looked up by vid; layout 1's files have no cell: null), or by a scan of the catalog for snapshots
    published before lookup files existed."""
    files = pointer.similar.lookup.get(column, [])
    if files:
        keys = partition_of(lookup_keys(column, values), len(files))
        found = pa.concat_tables([rows_where(store, files[p], column, [v for v, at in zip(values, keys) if at == p], ["vid", column] if column == "uri" else None)
                                  for p in sorted(set(keys.tolist())) or [0]])  # no values: no rows, from no row group (an empty table imports pandas)
        if column == "uri":
            return lookup(store, pointer, "vid", found["vid"].to_pylist())
        return found if "cell" in found.column_names else found.append_column("cell", pa.nulls(found.num_rows, pa.int32()))
    import pyarrow.compute as pc

    table = tracks_table(store, pointer.files)
    return table.filter(pc.is_in(table[column], value_set=pa.array(values, LOOKUP_SCHEMA.field(column).type)))


def bucket_in(info: SimilarRecord, row: dict) -> int:
    """The bucket of a catalog track (a lookup row) in a snapshot's similar folder (`info`): its cell's (layout 1:
    its vid's hash)."""
    if info.layout < 2:
        return int(buckets_of(np.array([row["vid"]], np.int64), info.buckets)[0])
    return int(bucket_of(np.array([row["cell"]]), info.bounds)[0])


def stored_list(store: Store, pointer: CatalogPointer, row: dict, top: int) -> list[tuple[int, float]]:
    """The first `top` entries of a catalog track's (a lookup row's) stored list: (neighbour vid, score)."""
    info = pointer.similar
    table = rows_where(store, piece(info.folder, bucket_in(info, row)), "track_id", [row["track_id"]]).slice(0, top)  # in rank order
    return list(zip(vector_ids(table["neighbour_id"].to_pylist()).tolist(), table["score"].to_pylist()))


def stored_vector(store: Store, pointer: CatalogPointer, row: dict) -> np.ndarray:
    """A catalog track's (a lookup row's) embedding, from the row group of its bucket's vectors part whose vid
    statistics hold it (layout 1: of the vectors file, whose bucket and vid statistics hold it)."""
    info, vid = pointer.similar, row["vid"]
    bucket = bucket_in(info, row)
    with store.open(f"{store.catalog}/{vectors_part(info.folder, bucket) if info.layout >= 2 else info.vectors_file}") as f:
        parquet = pq.ParquetFile(f)
        groups = set(row_groups_holding(parquet, "vid", [vid]))
        if info.layout < 2:
            groups &= set(row_groups_holding(parquet, "bucket", [bucket]))
        rows = parquet.read_row_groups(sorted(groups), ["vid", "embedding"])
    return as_matrix(rows["embedding"])[int(np.flatnonzero(buffer_view(rows["vid"], np.int64) == vid)[0])]


def nearest(store: Store, pointer: CatalogPointer, vector: np.ndarray, own: int, top: int, allowed: np.ndarray | None) -> list[tuple[dict, float]]:
    """The `top` nearest tracks (lookup row, score) to a vector in the memory-mapped index, `own` id left out; with
    `allowed` (vids), only those tracks, searching ever deeper (x4) until `top` are found or the index is exhausted."""
    index = open_index(store, pointer.similar)
    k = top if allowed is None else 4 * top
    while True:
        found, scores = search(index, vector[None, :], np.array([own], np.int64), min(k, index.ntotal))
        keep = (found[0] != -1) & (True if allowed is None else np.isin(found[0], allowed))
        if keep.sum() >= top or k >= index.ntotal:
            return described(store, pointer, list(zip(found[0][keep][:top].tolist(), scores[0][keep][:top].tolist())))
        k *= 4


def genre_vids(store: Store, pointer: CatalogPointer, genre: str) -> np.ndarray:
    """The vids of one genre's tracks of the published catalog: from the vid lookup partitions' genre column read
    dictionary-encoded (compared as codes: neither a Python string per track nor pyarrow.compute, which imports pandas),
    or, for a snapshot without lookup files, by hashing the track_ids of the genre's catalog file."""
    files = [f for f, g in pointer.genres.items() if g == genre]
    if not files:
        raise GenreBatchError(f"--genre {genre}: no such genre in the published catalog; it has {', '.join(sorted(set(pointer.genres.values())))}")
    by_vid = pointer.similar.lookup.get("vid", [])
    if not by_vid:
        return vector_ids(catalog.read_files(store, files, ["track_id"])["track_id"].to_pylist())
    found = []
    for part in by_vid:
        with store.open(f"{store.catalog}/{part}") as f:
            table = pq.ParquetFile(f, read_dictionary=["genre"]).read(["vid", "genre"])
        vids, start = buffer_view(table["vid"], np.int64), 0
        for codes in table["genre"].chunks:
            names = codes.dictionary.to_pylist()
            if genre in names:
                found.append(vids[start:start + len(codes)][buffer_view(codes.indices, np.int32) == names.index(genre)])
            start += len(codes)
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def described(store: Store, pointer: CatalogPointer, hits: list[tuple[int, float]]) -> list[tuple[dict, float]]:
    """Hits (vid, score) with their lookup rows (track_id, uri, genre)."""
    rows = {r["vid"]: r for r in lookup(store, pointer, "vid", [v for v, _ in hits]).to_pylist()}
    return [(rows[v], s) for v, s in hits]


def entries(hits: list[tuple[dict, float]]) -> list[dict]:
    """Neighbour entries {rank, track_id, uri, genre, score}, nearest first."""
    return [{"rank": i + 1, "track_id": r["track_id"], "uri": r["uri"], "genre": r["genre"], "score": round(float(s), 6)}
            for i, (r, s) in enumerate(hits)]


def answer(store: Store, names: list[tuple[str, str]], top: int, genre: str | None) -> list[Answer | Unanswered]:
    """Neighbours of tracks named (as given, as an absolute URI): catalog tracks by track_id or uri from the stored
    lists (top <= SIMILAR_K, no genre, which is compared as the catalog writes names) or the index; audio files outside the catalog
    extracted now (nothing stored). A name that is neither is Unanswered, the others answered all the same."""
    genre = canonical(genre) if genre is not None else None  # `unknown` too: the genre of abstentions
    pointer = required(store)
    if not (pointer.similar and pointer.similar.has_index):
        raise GenreBatchError(f"the published catalog of {store.url} has no similar tracks (catalog version {pointer.catalog_version}): "
                              "run 'genre-batch tag' to publish one that has")
    allowed = genre_vids(store, pointer, genre) if genre is not None else None
    known = pa.concat_tables([lookup(store, pointer, "vid", vector_ids([n for n, _ in names]).tolist()),
                              lookup(store, pointer, "uri", [u for _, u in names])])
    by_name = {**{r["uri"]: r for r in known.to_pylist()}, **{r["track_id"]: r for r in known.to_pylist()}}
    answers: list[Answer | Unanswered] = []
    for name, uri in names:
        row = by_name.get(name) or by_name.get(uri)
        if row is not None and genre is None and top <= pointer.similar.k:
            hits, source = described(store, pointer, stored_list(store, pointer, row, top)), "table"
        elif row is not None:
            hits, source = nearest(store, pointer, stored_vector(store, pointer, row), row["vid"], top, allowed), "index"
        else:
            # the feature code (librosa, onnxruntime): only for files outside the catalog
            from genre_batch.analysis import audio
            from genre_batch.publishing import vectors

            try:
                vector, _ = vectors.file_vector(vectors.load(store, pointer.vector_space), uri)
            except (audio.AudioError, vectors.MissingSpace) as e:
                why = "nor a readable audio file" if isinstance(e, audio.AudioError) else "and files outside it cannot be embedded"
                answers.append(Unanswered(name, f"{name}: not a track_id or uri of the published catalog, {why}: {e}"))
                continue
            hits, source = nearest(store, pointer, vector, -1, top, allowed), "file"
        answers.append(Answer(name, source, row and row["track_id"], row["uri"] if row else uri, row and row["genre"], entries(hits)))
    return answers
