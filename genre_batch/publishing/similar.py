"""Similar tracks: a faiss IVFFlat index of a snapshot's embeddings and each track's top SIMILAR_K neighbour list.

Every snapshot's `similar/` folder holds `index.faiss` (inner product = cosine on the L2-normalised embeddings;
nlist = 4 sqrt(n), searched with nprobe NPROBE: bench/ann.py measured recall@10 0.99 at 1M x 200), `vectors.parquet`
(vid, track_id, bucket, embedding: the index's vectors by bucket of their id) and one piece `part-<bucket>.parquet`
of the `similar` table per bucket (row groups of PIECE_ROW_GROUP rows in track_id order: one track's list is read
without the rest), and two lookup files of (vid, track_id, uri, genre), `by_vid.parquet` in vid order and
`by_uri.parquet` in uri order, in row groups of LOOKUP_ROW_GROUP: `genre-batch similar` finds a named track and
describes its neighbours from a few row groups instead of scanning the catalog (a track_id's vid is its hash). The
index, the vectors file and the lookup files are written by worker tasks (the index task holds 1M x 128 float32
= 512 MB of vectors twice: as a matrix and in the index); then the lists are queried on the workers, one task per
bucket, each memory-mapping the index.

With the vector space unchanged a snapshot updates the previous one instead: departed and changed tracks leave the
index, new and changed ones are added (the centroids stay), and new tracks get full queries. Every snapshot also
keeps private deep lists (top K + SPARE per track, and the floor above which a list holds every track): an existing
list drops its departed and changed members and takes exactly the added tracks a with score(a, x) >= its floor(x),
and is queried again only when fewer than K members remain above its floor. Those pairs come from one reverse scan
(a task of its own, over the previous index while another task updates it): each added track scans the nprobe
inverted lists its own search would scan and keeps every track there that it scores at or above the floor of (exact
inner products, no depth cut). A rebuild's search of x scans
x's nprobe lists instead, so each list equals a rebuild's up to the index's recall (exactly, when nlist <= nprobe:
both scans are then exhaustive).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genre_batch import GenreBatchError
from genre_batch.publishing import catalog
from genre_batch.publishing.catalog import SIMILAR_K, SIMILAR_SCHEMA, VECTOR_DIM
from genre_batch.storage.store import TEMP_MARK, Store

if TYPE_CHECKING:
    import faiss

NPROBE = 32
TRAIN_PER_LIST = 64
"""Vectors per IVF list that train the index's k-means (faiss advises 39 to 256): at 1M tracks a sample of 256k, not all
of them, so the index task holds the vectors once (in the index) plus the sample, not twice."""
BUCKET_TRACKS = 25_000
"""Tracks per query task (bucket) when an index is built; an incremental update keeps the previous bucket count."""
INCREMENTAL_MAX_SHARE = 0.1
"""Past this share of added + removed tracks a snapshot rebuilds its index (centroids trained afresh) instead."""
ROW_GROUP = 10_000
SPARE = 10
"""Entries kept past K in the deep lists: a list that lost members keeps its top K without a query while it holds K."""
PIECE_ROW_GROUP = 20_000
"""Rows per row group of a similar piece (1,000 tracks' lists)."""
LOOKUP_ROW_GROUP = 4_096
"""Rows per row group of the lookup files: a named track or a neighbour costs one such group."""

VECTORS_VERSION = 2
VECTORS_SCHEMA = pa.schema(
    [("vid", pa.int64()), ("track_id", pa.string()), ("bucket", pa.int32()), ("embedding", pa.binary(4 * VECTOR_DIM))],
    metadata={"genre_batch.vectors_version": str(VECTORS_VERSION)},
)
"""`vectors.parquet`: each embedding as VECTOR_DIM little-endian float32 in one fixed-size binary value (Parquet reads
and writes it as one block; as a list of floats, version 1, every float carried its own repetition level: 4x the
CPU). Version 1 files read the same (as_matrix takes both)."""
REVERSE_SCHEMA = pa.schema([("bucket", pa.int32()), ("vid", pa.int64()), ("added", pa.int64()), ("score", pa.float32())])
"""`_reverse.parquet` of an incremental update (deleted when the lists are written), in bucket order: the added track
`added` scores `score` with the existing track `vid`, at or above that track's floor."""
DEEP_VERSION = 1
DEEP_SCHEMA = pa.schema([("vid", pa.int64()), ("floor", pa.float32()), ("neighbours", pa.list_(pa.int64())), ("scores", pa.list_(pa.float32()))],
                        metadata={"genre_batch.deep_version": str(DEEP_VERSION)})
"""`deep-<bucket>.parquet`, in vid order: each track's top K + SPARE neighbours (vids, scores, nearest first) and its
floor: the list holds every track scoring above it (-inf: every other track)."""
LOOKUP_SCHEMA = pa.schema([("vid", pa.int64()), ("track_id", pa.string()), ("uri", pa.string()), ("genre", pa.string())])
"""The lookup files of a snapshot's similar folder (by_vid.parquet, by_uri.parquet): every catalog track."""
LOOKUP_FILES = {"vid": "by_vid.parquet", "uri": "by_uri.parquet"}

# Parquet writer options per file: random floats and 64-bit hashes do not compress (zstd of the vectors file cost 7 s
# and saved 9 %), nor do their dictionaries pay; strings keep zstd; statistics only on the columns row groups are
# found by. Files written with zstd everywhere (before these options) read the same.
VECTORS_OPTIONS = {"compression": {"vid": "none", "track_id": "zstd", "bucket": "zstd", "embedding": "none"},
                   "use_dictionary": ["bucket"], "write_statistics": ["vid", "bucket"]}
DEEP_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": ["vid"]}
"""Deep lists and `_reverse.parquet`: hashes and scores only."""
PIECE_OPTIONS = {"compression": {"track_id": "zstd", "neighbour_id": "zstd", "rank": "zstd", "score": "none"}, "use_dictionary": ["track_id", "rank"],
                 "write_statistics": ["track_id", "rank"]}
"""The published pieces: 20 rows per track_id (dictionary), distinct neighbour ids (zstd, no dictionary), raw scores;
statistics on what a reader filters by."""
LOOKUP_OPTIONS = {"compression": {"vid": "none", "track_id": "zstd", "uri": "zstd", "genre": "zstd"}, "use_dictionary": ["genre"]}


class UnknownTrack(GenreBatchError):
    """A track named on the command line is neither in the published catalog nor a readable audio file."""


@dataclass(frozen=True)
class Update:
    """How a snapshot's index follows the previous one: the tracks (track_id) to add and to remove."""

    previous: str
    """The previous snapshot's `similar` folder, relative to the catalog."""
    added: list[str]
    removed: list[str]
    buckets: int
    deep: bool = False
    """Whether the previous snapshot has deep lists (else its published top K lists are read)."""
    added_vids: np.ndarray = field(default=None, compare=False)  # type: ignore[assignment]
    """The vids of `added`, sorted (hashed once, not by every task); None: hashed from `added`."""
    removed_vids: np.ndarray = field(default=None, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        """Hash the added and removed tracks' vids unless given."""
        for name, tracks in (("added_vids", self.added), ("removed_vids", self.removed)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.sort(vector_ids(tracks)))


ADDED_FILE = "_added.parquet"
"""An incremental update's added tracks (VECTORS_SCHEMA), read from the catalog once for the index, reverse scan and
vectors tasks; deleted with `_reverse.parquet` when the lists are written."""


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


def read_embeddings(store: Store, files: list[str], only: list[str] | None = None) -> tuple[pa.Array, np.ndarray]:
    """track_ids and embeddings of snapshot files (relative to the catalog), optionally of some tracks only, filled
    file by file into one matrix (the vectors are held once, plus one file's)."""
    import pyarrow.compute as pc
    paths = [f"{store.catalog}/{f}" for f in files]
    matrix = np.empty((sum(store.parquet_rows(p) for p in paths) if only is None else len(only), VECTOR_DIM), np.float32)
    ids, filled = [], 0
    for path in paths:
        track_ids, vectors = file_embeddings(store, path)
        if only is not None:
            keep = pc.is_in(track_ids, value_set=pa.array(only, pa.string()))
            track_ids, vectors = track_ids.filter(keep), vectors[keep.to_numpy(zero_copy_only=False)]
        matrix[filled : filled + len(track_ids)] = vectors
        ids.append(track_ids)
        filled += len(track_ids)
    return pa.concat_arrays(ids) if ids else pa.array([], pa.string()), matrix[:filled]


def file_embeddings(store: Store, path: str) -> tuple[pa.Array, np.ndarray]:
    """track_ids and embeddings (a read-only view of the column) of one snapshot file."""
    table = store.read_table(path, ["track_id", "embedding"])
    return table["track_id"].combine_chunks(), as_matrix(table["embedding"])


def local_file(store: Store, relative: str) -> str:
    """A local path of a catalog file for faiss to memory-map (a file of an object store is copied once to a cache)."""
    path = f"{store.catalog}/{relative}"
    if store.local:
        return path
    cache = os.path.join(tempfile.gettempdir(), "genre-batch-similar", hashlib.sha1(store.fs.unstrip_protocol(path).encode()).hexdigest() + ".faiss")
    if not os.path.exists(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        store.fs.get_file(path, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return cache


def open_index(store: Store, relative: str, mapped: bool = True) -> faiss.Index:
    """A snapshot's index, memory-mapped (read-only) unless `mapped` is False, searching NPROBE lists."""
    import faiss  # imported here, like pyarrow.compute: `similar` answering from the stored lists needs neither (0.15 s CPU)
    index = faiss.read_index(local_file(store, relative), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
    index.nprobe = NPROBE
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


@contextmanager
def vectors_writer(store: Store, relative: str) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer of a vectors file (VECTORS_OPTIONS) into an (unpublished) snapshot folder."""
    with local_target(store, relative) as local, pq.ParquetWriter(local, VECTORS_SCHEMA, **VECTORS_OPTIONS) as writer:
        yield writer


def write_parquet(store: Store, relative: str, table: pa.Table, row_group: int, options: dict) -> None:
    """Write a table as one catalog file (relative to the catalog), atomically, with its Parquet writer options."""
    store.write_table(f"{store.catalog}/{relative}", table, row_group, options)


def put_vectors(store: Store, relative: str, table: pa.Table, rows: np.ndarray) -> None:
    """Write the `rows` of a vectors table in (bucket, vid) order, ROW_GROUP rows at a time: the sorted table is never
    held whole."""
    vids, bucket = buffer_view(table["vid"], np.int64)[rows], buffer_view(table["bucket"], np.int32)[rows]
    order = rows[np.lexsort((vids, bucket))]
    with vectors_writer(store, relative) as writer:
        for start in range(0, len(order), ROW_GROUP):
            writer.write_table(table.take(pa.array(order[start : start + ROW_GROUP])), row_group_size=ROW_GROUP)


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


def vectors_table(track_ids: pa.Array, vids: np.ndarray, matrix: np.ndarray, buckets: int) -> pa.Table:
    """The index's vectors with their ids and buckets, in the matrix's order (the embedding column is a view of it)."""
    return pa.table(
        {"vid": vids, "track_id": track_ids, "bucket": buckets_of(vids, buckets),
         "embedding": embedding_column(matrix)},
        schema=VECTORS_SCHEMA,
    )


def tracks_table(store: Store, files: list[str], known: pa.Table | None = None) -> pa.Table:
    """(vid, track_id, uri, genre) of every track of snapshot files (relative to the catalog); vids from `known`
    (a lookup table's vid and track_id) where it lists the track."""
    table = catalog.read_files(store, files, ["track_id", "uri", "genre"])
    vids = vector_ids(table["track_id"].to_pylist()) if known is None else vids_from(table["track_id"].combine_chunks(), known)
    return pa.table({"vid": vids, **{c: table[c] for c in ("track_id", "uri", "genre")}}, schema=LOOKUP_SCHEMA)


def vids_from(track_ids: pa.Array, known: pa.Table) -> np.ndarray:
    """vids of track_ids: taken from `known` (vid, track_id) by an Arrow hash lookup (a third of the CPU of hashing a
    million track_ids in Python), hashed for the tracks it does not list."""
    import pyarrow.compute as pc
    at = buffer_view(pc.fill_null(pc.index_in(track_ids, value_set=known["track_id"].combine_chunks()), -1), np.int32)
    vids = buffer_view(known["vid"], np.int64)[np.maximum(at, 0)].copy() if len(at) else np.zeros(0, np.int64)
    missing = np.flatnonzero(at == -1)
    vids[missing] = vector_ids(track_ids.take(pa.array(missing)).to_pylist())
    return vids


def write_lookups(store: Store, out: str, files: list[str], update: Update | None) -> dict[str, str]:
    """Write a snapshot's lookup files (every track in vid order, and in uri order); returns column -> file. An update
    takes the vids of the tracks the previous snapshot's vid lookup file lists from there."""
    drop_cached()
    previous = f"{update.previous}/{LOOKUP_FILES['vid']}" if update else None
    known = store.read_table(f"{store.catalog}/{previous}", ["vid", "track_id"]) if previous and store.exists(f"{store.catalog}/{previous}") else None
    table = tracks_table(store, files, known)
    del known
    written = {"vid": f"{out}/{LOOKUP_FILES['vid']}", "uri": f"{out}/{LOOKUP_FILES['uri']}"}
    by_vid = table.take(pa.array(np.argsort(buffer_view(table["vid"], np.int64), kind="stable")))
    write_parquet(store, written["vid"], by_vid, LOOKUP_ROW_GROUP, {**LOOKUP_OPTIONS, "write_statistics": ["vid"]})  # row groups are found by it
    write_parquet(store, written["uri"], table.sort_by("uri"), LOOKUP_ROW_GROUP, {**LOOKUP_OPTIONS, "write_statistics": ["uri"]})
    return written


def write_added(store: Store, out: str, files: list[str], update: Update, buckets: int) -> int:
    """Write ADDED_FILE: the added tracks of an update with their vids and embeddings (one read of the catalog's
    embedding column); returns its rows."""
    drop_cached()
    ids, matrix = read_embeddings(store, files, update.added)
    write_parquet(store, f"{out}/{ADDED_FILE}", vectors_table(ids, vector_ids(ids.to_pylist()), matrix, buckets), ROW_GROUP, VECTORS_OPTIONS)
    return len(ids)


def read_added(store: Store, out: str) -> Added:
    """An update's added tracks from its ADDED_FILE."""
    table = store.read_table(f"{store.catalog}/{out}/{ADDED_FILE}")
    return Added(table["track_id"].combine_chunks(), buffer_view(table["vid"], np.int64), as_matrix(table["embedding"]))


def write_index(store: Store, snapshot: str, files: list[str], update: Update | None) -> int:
    """Write a snapshot's index (runs on one worker): trained on a sample (`training_rows`) and filled file by file
    (peak: the vectors once, in the index, and the sample), or the previous index with the update's tracks removed and
    its ADDED_FILE added; returns its nlist."""
    drop_cached()
    if update is None:
        paths = [f"{store.catalog}/{f}" for f in files]
        sizes = [store.parquet_rows(p) for p in paths]
        if sum(sizes) == 0:
            return 0
        nlist = nlist_for(sum(sizes))
        sample = np.concatenate([file_embeddings(store, p)[1][rows] for p, rows in zip(paths, training_rows(sizes, nlist))])
        index = new_index(sample, nlist)
        del sample
        for path in paths:  # filled file by file: the vectors are held once, in the index
            ids, matrix = file_embeddings(store, path)
            index.add_with_ids(matrix, vector_ids(ids.to_pylist()))
        save_index(store, index, f"{folder(snapshot)}/index.faiss")
        return index.nlist
    index = open_index(store, f"{update.previous}/index.faiss", mapped=False)
    index.remove_ids(update.removed_vids)
    added = read_added(store, folder(snapshot))
    index.add_with_ids(added.matrix, added.vids)
    save_index(store, index, f"{folder(snapshot)}/index.faiss")
    return index.nlist


def reverse_scan(store: Store, snapshot: str, update: Update, buckets: int) -> None:
    """The added tracks' reverse scan (write_reverse) over the previous index, memory-mapped, while another task
    updates it: the centroids and the kept tracks' lists are the same in both, an added track's own vid has an
    infinite floor and a removed track's rows match no list of the new snapshot."""
    drop_cached()
    added = read_added(store, folder(snapshot))
    write_reverse(store, folder(snapshot), open_index(store, f"{update.previous}/index.faiss"), added.vids, added.matrix, previous_floors(store, update), buckets)


def write_reverse(store: Store, out: str, index: faiss.Index, vids: np.ndarray, matrix: np.ndarray, floors: tuple[np.ndarray, np.ndarray],
                  buckets: int) -> None:
    """Write `_reverse.parquet`: every (existing track x, added track a) with score(a, x) >= floor(x) (`floors`: sorted
    vids and their floors; a track without one has -inf) among the inverted lists a's own search scans, list by list."""
    import faiss
    probes = index.quantizer.search(np.ascontiguousarray(matrix), min(index.nprobe, index.nlist))[1] if len(vids) else np.zeros((0, 1), np.int64)
    cell, who = probes.reshape(-1), np.repeat(np.arange(len(vids)), probes.shape[1])
    order = np.argsort(cell, kind="stable")
    cell, who = cell[order], who[order]
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]]) if len(cell) else np.zeros(0, np.int64)
    invlists = faiss.downcast_InvertedLists(index.invlists)
    lists = [list_ids(invlists, int(c)) for c in cell[starts]]
    bounds = np.cumsum([0] + [len(ids) for ids in lists])
    floor = floor_at(floors, np.concatenate(lists) if lists else np.zeros(0, np.int64), np.sort(vids))  # one lookup for all lists
    hits, by, scores = [], [], []
    for j, (start, stop) in enumerate(zip(starts, np.r_[starts[1:], len(cell)].astype(np.int64))):
        ids = lists[j]
        if len(ids) == 0:
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(int(cell[start])), len(ids) * VECTOR_DIM * 4).view(np.float32).reshape(len(ids), VECTOR_DIM)
        exact = matrix[who[start:stop]] @ codes.T
        row, column = np.nonzero(exact >= floor[bounds[j] : bounds[j + 1]][None, :])
        hits.append(ids[column])
        by.append(vids[who[start:stop]][row])
        scores.append(exact[row, column])
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


def reverse_table(hits: list[np.ndarray], by: list[np.ndarray], scores: list[np.ndarray], buckets: int) -> pa.Table:
    """Rows (bucket, vid, added, score) of the reverse scan, in (bucket, vid, added) order."""
    hit, added, score = (np.concatenate(x) if x else np.zeros(0, t) for x, t in ((hits, np.int64), (by, np.int64), (scores, np.float32)))
    bucket = buckets_of(hit, buckets)
    order = np.lexsort((added, hit, bucket))
    return pa.table({"bucket": bucket[order], "vid": hit[order], "added": added[order], "score": score[order].astype(np.float32)}, schema=REVERSE_SCHEMA)


def last_entries(store: Store, relative: str) -> pa.Table:
    """(track_id, score) of the K-th entries of a published similar piece: one piece at a time, so an upgrade night
    never holds every list (20M rows at 1M tracks)."""
    import pyarrow.compute as pc
    table = store.read_table(f"{store.catalog}/{relative}", ["track_id", "rank", "score"])
    return table.filter(pc.equal(table["rank"], SIMILAR_K)).select(["track_id", "score"])


def previous_floors(store: Store, update: Update) -> tuple[np.ndarray, np.ndarray]:
    """The floors of the previous snapshot's lists as (sorted vids, floors): from its deep lists, or, for a snapshot
    written before them, the K-th score of its published lists (a shorter list has none: -inf)."""
    if update.deep:
        table = pa.concat_tables([store.read_table(f"{store.catalog}/{deep_piece(update.previous, b)}", ["vid", "floor"]) for b in range(update.buckets)])
        vids, floors = buffer_view(table["vid"], np.int64), buffer_view(table["floor"], np.float32)
    else:
        table = pa.concat_tables([last_entries(store, piece(update.previous, b)) for b in range(update.buckets)])
        vids, floors = vector_ids(table["track_id"].to_pylist()), buffer_view(table["score"], np.float32)
    order = np.argsort(vids)
    return vids[order], floors[order]


def write_vectors(store: Store, snapshot: str, files: list[str], update: Update | None, buckets: int) -> int:
    """Write a snapshot's vectors file (runs on one worker); returns its rows. An update streams the previous file
    bucket by bucket (it holds one bucket of vectors, not all of them), without the removed tracks, with its ADDED_FILE."""
    drop_cached()
    out = folder(snapshot)
    if update is None:
        ids, matrix = read_embeddings(store, files)
        pa.default_memory_pool().release_unused()
        table = vectors_table(ids, vector_ids(ids.to_pylist()), matrix, buckets)
        put_vectors(store, f"{out}/vectors.parquet", table, np.arange(table.num_rows))
        return table.num_rows
    added = read_added(store, out)
    new = vectors_table(added.track_ids, added.vids, added.matrix, buckets)
    new_bucket, removed, rows = buffer_view(new["bucket"], np.int32), update.removed_vids, 0
    with store.open(f"{store.catalog}/{update.previous}/vectors.parquet") as f, vectors_writer(store, f"{out}/vectors.parquet") as writer:
        previous = pq.ParquetFile(f)
        for bucket in range(buckets):
            old = as_version_2(previous.read_row_groups(row_groups_holding(previous, "bucket", [bucket])))
            old_vids = buffer_view(old["vid"], np.int64)
            kept = np.flatnonzero((buffer_view(old["bucket"], np.int32) == bucket) & ~member(old_vids, removed))
            mine = np.flatnonzero(new_bucket == bucket)
            both = pa.concat_tables([old, new])  # rows: the kept old ones (in vid order) merged with the bucket's added ones
            rows_in_order = np.concatenate([kept, old.num_rows + mine])[np.argsort(np.concatenate([old_vids[kept], added.vids[mine]]), kind="stable")]
            writer.write_table(slices(both, rows_in_order), row_group_size=ROW_GROUP)
            rows += len(rows_in_order)
    return rows


def as_version_2(table: pa.Table) -> pa.Table:
    """Rows of a vectors file with VECTORS_SCHEMA (those of a version 1 file, whose embeddings are lists, converted)."""
    if table.schema.field("embedding").type != VECTORS_SCHEMA.field("embedding").type:
        table = table.set_column(3, "embedding", embedding_column(as_matrix(table["embedding"])))
    return table.cast(VECTORS_SCHEMA)


def slices(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """table.take(rows) as zero-copy slices of its runs of consecutive rows (most rows of a night's bucket are one
    run: no copy of their vectors)."""
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, stops = np.r_[0, cuts], np.r_[cuts, len(rows)]
    return pa.concat_tables([table.slice(int(rows[a]), int(b - a)) for a, b in zip(starts, stops)]) if len(rows) else table.slice(0, 0)


def row_groups_holding(parquet: pq.ParquetFile, column: str, values: list) -> list[int]:
    """Row groups of a Parquet file whose min/max statistics of `column` may hold one of `values` (every group
    without statistics)."""
    index = parquet.schema_arrow.get_field_index(column)
    groups = []
    for g in range(parquet.num_row_groups):
        stats = parquet.metadata.row_group(g).column(index).statistics
        if stats is None or not stats.has_min_max or any(stats.min <= v <= stats.max for v in values):
            groups.append(g)
    return groups


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


def read_bucket(store: Store, relative: str, bucket: int) -> pa.Table:
    """The rows of one bucket of a vectors file, in vid order (its row groups are in bucket order: the others are skipped)."""
    return rows_where(store, relative, "bucket", [bucket])


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


def previous_lists(store: Store, update: Update, bucket: int, vids: np.ndarray, track_ids: pa.Array,
                   ids: tuple[np.ndarray, pa.Array]) -> tuple[Lists, np.ndarray]:
    """The previous snapshot's lists of a bucket's tracks (`vids`, sorted) and which tracks had one: its deep lists,
    or, for a snapshot written before them, its published top K lists."""
    if not update.deep:
        return published_lists(store, update, bucket, track_ids, ids)
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


def published_lists(store: Store, update: Update, bucket: int, track_ids: pa.Array, ids: tuple[np.ndarray, pa.Array]) -> tuple[Lists, np.ndarray]:
    """The previous snapshot's published top K lists of a bucket's tracks (floor: the K-th score, -inf for a shorter
    list) and which tracks had one. Neighbours are matched to the new snapshot's tracks (`ids`) by Arrow hash
    lookups, no Python string per row; one that left has no vid (-1: it leaves the list anyway)."""
    import pyarrow.compute as pc
    table = store.read_table(f"{store.catalog}/{piece(update.previous, bucket)}")
    found = pc.index_in(table["track_id"], value_set=track_ids)
    listed = pc.is_valid(found).to_numpy(zero_copy_only=False)
    row = pc.fill_null(found, 0).to_numpy().astype(np.int64)[listed]
    rank = table["rank"].to_numpy().astype(np.int64)[listed] - 1
    position = pc.index_in(table["neighbour_id"], value_set=ids[1])
    present = pc.is_valid(position).to_numpy(zero_copy_only=False)[listed]
    neighbours, scores = np.full((len(track_ids), SIMILAR_K), -1, np.int64), np.zeros((len(track_ids), SIMILAR_K), np.float32)
    neighbours[row, rank] = np.where(present, ids[0][pc.fill_null(position, 0).to_numpy().astype(np.int64)[listed]], -1)
    scores[row, rank] = table["score"].to_numpy()[listed]
    full = np.bincount(row, minlength=len(track_ids)) == SIMILAR_K
    known = np.zeros(len(track_ids), bool)
    known[row] = True
    return (neighbours, scores, np.where(full, scores[:, -1], -np.inf).astype(np.float32)), known


_ID_MAP: dict[tuple, tuple[np.ndarray, pa.Array]] = {}
"""The last vid lookup file's id map in this (worker) process, keyed by its path and version: one read per process,
not one per bucket task."""


_INDEX: dict[tuple, faiss.Index] = {}
"""The last memory-mapped index in this (worker) process: its pages stay mapped from one bucket task to the next."""


def drop_cached() -> None:
    """Forget this process's mapped index and id map (of an earlier snapshot's list tasks): a task writing the next
    snapshot (index, vectors, lookup files, added tracks, reverse scan) does not read them, and their pages (~620 MB
    at 1M) would add to its peak."""
    _INDEX.clear()
    _ID_MAP.clear()


def cached_index(store: Store, relative: str) -> faiss.Index:
    """open_index of a snapshot's index, once per process while the file is unchanged (path, size and mtime or ETag)."""
    path = f"{store.catalog}/{relative}"
    info = store.fs.info(path)
    key = (store.fs.unstrip_protocol(path), info.get("size"), info.get("ETag") or info.get("mtime"))
    if key not in _INDEX:
        _INDEX.clear()
        _INDEX[key] = open_index(store, relative)
    return _INDEX[key]


def cached_id_map(store: Store, relative: str) -> tuple[np.ndarray, pa.Array]:
    """(sorted vids, their track_ids) of a vid lookup file (in vid order), for mapping search results back to tracks
    (Arrow strings: no Python object per track); read once per process while the file is unchanged (path, size and
    mtime or ETag)."""
    path = f"{store.catalog}/{relative}"
    info = store.fs.info(path)
    key = (store.fs.unstrip_protocol(path), info.get("size"), info.get("ETag") or info.get("mtime"))
    if key not in _ID_MAP:
        _ID_MAP.clear()
        table = store.read_table(path, ["vid", "track_id"])
        _ID_MAP[key] = buffer_view(table["vid"], np.int64), table["track_id"].combine_chunks()
    return _ID_MAP[key]


def query_bucket(store: Store, snapshot: str, bucket: int, update: Update | None, k: int = SIMILAR_K) -> int:
    """Write the similar piece and the deep lists of one bucket (runs on a worker, the index memory-mapped); returns
    the piece's rows."""
    out, depth = folder(snapshot), k + SPARE
    ids = cached_id_map(store, f"{out}/{LOOKUP_FILES['vid']}")
    mine = read_bucket(store, f"{out}/vectors.parquet", bucket)
    track_ids = mine["track_id"].combine_chunks()
    vids, queries = buffer_view(mine["vid"], np.int64), as_matrix(mine["embedding"])
    found, scores, floors = np.full((len(vids), depth), -1, np.int64), np.zeros((len(vids), depth), np.float32), np.full(len(vids), -np.inf, np.float32)
    if len(vids):
        redo = np.ones(len(vids), bool)
        if update is not None:
            redo = refresh(store, update, out, bucket, k, vids, track_ids, queries, (found, scores, floors), ids)
        if redo.any():
            found[redo], scores[redo] = search(cached_index(store, f"{out}/index.faiss"), queries[redo], vids[redo], depth)
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


def refresh(store: Store, update: Update, out: str, bucket: int, k: int, vids: np.ndarray, track_ids: pa.Array, queries: np.ndarray,
            lists: Lists, ids: tuple[np.ndarray, pa.Array]) -> np.ndarray:
    """Fill the deep lists of a bucket's existing tracks (in place) from their previous lists without the removed
    tracks and with the added tracks that reach their floor; returns which tracks need a full query: new ones, and
    those whose list fell short of K above its floor."""
    (old_ids, old_scores, old_floors), known = previous_lists(store, update, bucket, vids, track_ids, ids)
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


def plan_update(store: Store, previous: dict | None, space_name: str, after: pa.Table) -> Update | None:
    """How the new snapshot's index follows the previous one (`after`: the new snapshot's KEYS); None: rebuild it (no
    previous index, another vector space or K, or more than INCREMENTAL_MAX_SHARE of the tracks changed)."""
    similar = (previous or {}).get("similar")
    if not similar or not similar.get("index") or (previous.get("vector_space") or {}).get("name") != space_name or similar.get("k") != SIMILAR_K:
        return None
    before = catalog.read_files(store, previous["files"], KEYS)
    added = after.join(before, keys=KEYS, join_type="left anti")["track_id"].to_pylist()
    removed = before.join(after, keys=KEYS, join_type="left anti")["track_id"].to_pylist()
    if len(added) + len(removed) > INCREMENTAL_MAX_SHARE * max(1, after.num_rows):
        return None
    return Update(similar["folder"], sorted(added), sorted(removed), similar["buckets"], similar.get("deep") == DEEP_VERSION)


Runner = Callable[[list[tuple]], list]


def build(store: Store, snapshot: str, files: list[str], update: Update | None, run: Runner) -> dict:
    """Index and similar table of a written snapshot, the work run by `run` (Dask tasks, or in process); returns what
    the pointer records under `similar`."""
    out = folder(snapshot)
    tracks = sum(store.parquet_rows(f"{store.catalog}/{f}") for f in files)
    buckets = update.buckets if update else max(1, math.ceil(tracks / BUCKET_TRACKS))
    if update is None:  # three tasks, on different workers when there are: their peaks do not add up in one process
        nlist, vectors, lookup = run([(write_index, store, snapshot, files, update), (write_vectors, store, snapshot, files, update, buckets),
                                      (write_lookups, store, out, files, update)])
    else:  # the added tracks read once (next to the lookup files) into ADDED_FILE, then read by the index, reverse scan and vectors tasks
        _, lookup = run([(write_added, store, out, files, update, buckets), (write_lookups, store, out, files, update)])
        _, vectors, nlist = run([(reverse_scan, store, snapshot, update, buckets), (write_vectors, store, snapshot, files, update, buckets),
                                 (write_index, store, snapshot, files, update)])  # the longest first: the third goes to the first worker free
    rows = run([(query_bucket, store, snapshot, b, update) for b in range(buckets)]) if tracks else []
    store.delete([f"{store.catalog}/{out}/_reverse.parquet", f"{store.catalog}/{out}/{ADDED_FILE}"])
    return {
        "folder": out, "k": SIMILAR_K, "deep": DEEP_VERSION, "depth": SIMILAR_K + SPARE, "index": f"{out}/index.faiss" if tracks else None, "lookup": lookup,
        "vectors": f"{out}/vectors.parquet", "files": [piece(out, b) for b in range(buckets) if tracks],
        "rows": sum(rows), "tracks": vectors, "buckets": buckets, "nlist": nlist, "nprobe": NPROBE,
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


def lookup(store: Store, pointer: dict, column: str, values: list) -> pa.Table:
    """(vid, track_id, uri, genre) of the published catalog's tracks whose `column` (vid or uri) is one of `values`:
    from the snapshot's lookup file in that order (a few row groups), or by a scan of the catalog for snapshots
    published before lookup files existed."""
    if not values:
        return LOOKUP_SCHEMA.empty_table()
    files = pointer["similar"].get("lookup") or {}
    if column in files:
        return rows_where(store, files[column], column, values)
    import pyarrow.compute as pc

    table = tracks_table(store, pointer["files"])
    return table.filter(pc.is_in(table[column], value_set=pa.array(values, LOOKUP_SCHEMA.field(column).type)))


def stored_list(store: Store, pointer: dict, track_id: str, top: int) -> list[tuple[int, float]]:
    """The first `top` entries of a track's stored list: (neighbour vid, score)."""
    info = pointer["similar"]
    bucket = int(buckets_of(vector_ids([track_id]), info["buckets"])[0])
    table = rows_where(store, piece(info["folder"], bucket), "track_id", [track_id]).slice(0, top)  # in rank order
    return list(zip(vector_ids(table["neighbour_id"].to_pylist()).tolist(), table["score"].to_pylist()))


def stored_vector(store: Store, pointer: dict, track_id: str) -> np.ndarray:
    """A catalog track's embedding, from the row group of the vectors file whose bucket and vid statistics hold it."""
    info = pointer["similar"]
    vid = vector_ids([track_id])
    bucket = int(buckets_of(vid, info["buckets"])[0])
    with store.open(f"{store.catalog}/{info['vectors']}") as f:
        parquet = pq.ParquetFile(f)
        groups = sorted(set(row_groups_holding(parquet, "bucket", [bucket])) & set(row_groups_holding(parquet, "vid", [int(vid[0])])))
        rows = parquet.read_row_groups(groups, ["vid", "embedding"])
    return as_matrix(rows["embedding"])[int(np.flatnonzero(buffer_view(rows["vid"], np.int64) == vid[0])[0])]


def nearest(store: Store, pointer: dict, vector: np.ndarray, own: int, top: int, allowed: np.ndarray | None) -> list[tuple[dict, float]]:
    """The `top` nearest tracks (lookup row, score) to a vector in the memory-mapped index, `own` id left out; with
    `allowed` (vids), only those tracks, searching ever deeper (x4) until `top` are found or the index is exhausted."""
    index = open_index(store, pointer["similar"]["index"])
    k = top if allowed is None else 4 * top
    while True:
        found, scores = search(index, vector[None, :], np.array([own], np.int64), min(k, index.ntotal))
        keep = (found[0] != -1) & (True if allowed is None else np.isin(found[0], allowed))
        if keep.sum() >= top or k >= index.ntotal:
            return described(store, pointer, list(zip(found[0][keep][:top].tolist(), scores[0][keep][:top].tolist())))
        k *= 4


def genre_vids(store: Store, pointer: dict, genre: str) -> np.ndarray:
    """The vids of one genre's tracks of the published catalog: from the vid lookup file's genre column read
    dictionary-encoded (compared as codes: neither a Python string per track nor pyarrow.compute, which imports pandas),
    or, for a snapshot without lookup files, by hashing the track_ids of the genre's catalog file."""
    files = [f for f, g in pointer["genres"].items() if g == genre]
    if not files:
        raise GenreBatchError(f"--genre {genre}: no such genre in the published catalog; it has {', '.join(sorted(set(pointer['genres'].values())))}")
    by_vid = (pointer["similar"].get("lookup") or {}).get("vid")
    if by_vid is None:
        return vector_ids(catalog.read_files(store, files, ["track_id"])["track_id"].to_pylist())
    with store.open(f"{store.catalog}/{by_vid}") as f:
        table = pq.ParquetFile(f, read_dictionary=["genre"]).read(["vid", "genre"])
    vids, start, found = buffer_view(table["vid"], np.int64), 0, []
    for codes in table["genre"].chunks:
        names = codes.dictionary.to_pylist()
        if genre in names:
            found.append(vids[start:start + len(codes)][buffer_view(codes.indices, np.int32) == names.index(genre)])
        start += len(codes)
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def described(store: Store, pointer: dict, hits: list[tuple[int, float]]) -> list[tuple[dict, float]]:
    """Hits (vid, score) with their lookup rows (track_id, uri, genre)."""
    rows = {r["vid"]: r for r in lookup(store, pointer, "vid", [v for v, _ in hits]).to_pylist()}
    return [(rows[v], s) for v, s in hits]


def entries(hits: list[tuple[dict, float]]) -> list[dict]:
    """Neighbour entries {rank, track_id, uri, genre, score}, nearest first."""
    return [{"rank": i + 1, "track_id": r["track_id"], "uri": r["uri"], "genre": r["genre"], "score": round(float(s), 6)}
            for i, (r, s) in enumerate(hits)]


def answer(store: Store, names: list[tuple[str, str]], top: int, genre: str | None) -> list[Answer]:
    """Neighbours of tracks named (as given, as an absolute URI): catalog tracks by track_id or uri from the stored
    lists (top <= SIMILAR_K, no genre) or the index; audio files outside the catalog extracted now (nothing stored).
    Raises UnknownTrack for a name that is neither."""
    pointer = catalog.pointer(store)
    if pointer is None:
        raise GenreBatchError(f"no published catalog in {store.url}: run 'genre-batch tag' or 'run' first")
    if not (pointer.get("similar") or {}).get("index"):
        raise GenreBatchError(f"the published catalog of {store.url} has no similar tracks (catalog version {pointer.get('catalog_version')}): "
                              "run 'genre-batch tag' to publish one that has")
    allowed = genre_vids(store, pointer, genre) if genre is not None else None
    known = pa.concat_tables([lookup(store, pointer, "vid", vector_ids([n for n, _ in names]).tolist()),
                              lookup(store, pointer, "uri", [u for _, u in names])])
    by_name = {**{r["uri"]: r for r in known.to_pylist()}, **{r["track_id"]: r for r in known.to_pylist()}}
    answers = []
    for name, uri in names:
        row = by_name.get(name) or by_name.get(uri)
        if row is not None and genre is None and top <= pointer["similar"]["k"]:
            hits, source = described(store, pointer, stored_list(store, pointer, row["track_id"], top)), "table"
        elif row is not None:
            hits, source = nearest(store, pointer, stored_vector(store, pointer, row["track_id"]), row["vid"], top, allowed), "index"
        else:
            # the feature code (librosa, onnxruntime): only for files outside the catalog
            from genre_batch.analysis import audio
            from genre_batch.publishing import vectors

            try:
                vector, _ = vectors.file_vector(vectors.load(store, pointer["vector_space"]), uri)
            except audio.AudioError as e:
                raise UnknownTrack(f"{name}: not a track_id or uri of the published catalog, nor a readable audio file: {e}") from None
            except vectors.MissingSpace as e:
                raise UnknownTrack(f"{name}: not a track_id or uri of the published catalog, and files outside it cannot be embedded: {e}") from None
            hits, source = nearest(store, pointer, vector, -1, top, allowed), "file"
        answers.append(Answer(name, source, row and row["track_id"], row["uri"] if row else uri, row and row["genre"], entries(hits)))
    return answers
