"""Feature store: immutable Parquet parts of window rows, and the track index that says which rows are current.

Every shard writes one part per feature family it computed (librosa: `features/parts/<name>.parquet`, one row per
analysis window; musicnn: `features/musicnn/<name>.parquet`, one row per track) and then one index file
(`features/index/<name>.parquet`, one row per file and family of the shard: where its rows are, or why it failed). Readers
resolve the index, never the window rows: per URI of the library listing, its newest successful extraction of the
current content and feature version (else its newest failure). A part without an index file (a shard killed
between the two writes, or a store written before the index existed) is indexed from its own rows by `repair`.
Compaction's workers rewrite the current rows into large parts, each with its index piece (read once the compaction's
commit file exists), then the replaced index files and parts are deleted.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from genre_batch.analysis.columns import EMBEDDING_DIM, EMBEDDING_VERSION, FEATURE_NAMES, FEATURE_VERSION, TAG_NAMES
from genre_batch.library.discovery import INVENTORY_SCHEMA
from genre_batch.storage.store import TEMP_MARK, Store

TIMESTAMP = pa.timestamp("ms", tz="UTC")


@dataclass(frozen=True)
class Family:
    """A feature family: its own version and its own parts, tracked in the one track index."""

    name: str
    version: int
    folder: str
    """Folder of its parts under `features/`."""


LIBROSA = Family("librosa", FEATURE_VERSION, "parts")
"""The librosa family: 603 pooled series per 10 s window (columns.FEATURE_NAMES)."""
MUSICNN = Family("musicnn", EMBEDDING_VERSION, "musicnn")
"""The musicnn family: one row per track, the MSD model's mean embedding and 50 tag scores (MUSICNN_SCHEMA)."""
FAMILIES: dict[str, Family] = {f.name: f for f in (LIBROSA, MUSICNN)}
"""Every feature family, by name; librosa first."""

PROVENANCE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("track_id", pa.string()),
        ("fingerprint", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("duration_s", pa.float32()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int16()),
        ("offset_s", pa.float32()),
        ("analysed_s", pa.float32()),
        ("window", pa.int16()),
        ("window_offset_s", pa.float32()),
        ("tag_genre", pa.string()),
        ("tag_artist", pa.string()),
        ("tag_album", pa.string()),
        ("feature_version", pa.int32()),
        ("run_id", pa.string()),
        ("extracted_at", TIMESTAMP),
    ]
)
"""Per-window provenance stored in front of the feature columns: one row per analysis window of a file."""

FEATURE_SCHEMA = pa.schema(list(PROVENANCE_SCHEMA) + [(name, pa.float32()) for name in FEATURE_NAMES]).with_metadata(
    {"genre_batch.feature_version": str(FEATURE_VERSION)}
)
"""Schema of a feature part: provenance columns, then one float32 column per feature."""


def tag_slug(tag: str) -> str:
    """Column name of an MSD tag score: `tag_` + the tag lower-cased, runs of non-alphanumerics as `_` (80s -> tag_80s)."""
    return "tag_" + re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")


EMBEDDING_COLUMNS = [f"emb_{i:03d}" for i in range(EMBEDDING_DIM)]
TAG_COLUMNS = [tag_slug(t) for t in TAG_NAMES]
MUSICNN_COLUMNS = EMBEDDING_COLUMNS + TAG_COLUMNS
"""The musicnn family's value columns: embedding, then tag scores in columns.TAG_NAMES order."""
MUSICNN_SCHEMA = pa.schema(
    [(f.name, f.type) for f in PROVENANCE_SCHEMA if f.name in ("uri", "track_id", "fingerprint", "feature_version", "run_id", "extracted_at")]
    + [(name, pa.float32()) for name in MUSICNN_COLUMNS]
    + [("patches", pa.int16())]
).with_metadata({"genre_batch.feature_version": str(EMBEDDING_VERSION), "genre_batch.family": MUSICNN.name})
"""Schema of a musicnn part: one row per track, its provenance, 200 embedding and 50 tag columns, the patches averaged."""

ERROR_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("track_id", pa.string()),
        ("fingerprint", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("feature_version", pa.int32()),
        ("run_id", pa.string()),
        ("occurred_at", TIMESTAMP),
    ]
)
"""Schema of the `errors` table: one row per file that currently fails (and of error parts of stores before the index)."""

INDEX_VERSION = 1
INDEX_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("track_id", pa.string()),
        ("fingerprint", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("family", pa.string()),
        ("feature_version", pa.int32()),
        ("part", pa.string()),
        ("row_start", pa.int64()),
        ("row_count", pa.int32()),
        ("duration_s", pa.float32()),
        ("tag_genre", pa.string()),
        ("tag_artist", pa.string()),
        ("tag_album", pa.string()),
        ("error_type", pa.string()),
        ("error_stage", pa.string()),
        ("error_message", pa.string()),
        ("run_id", pa.string()),
        ("extracted_at", TIMESTAMP),
    ]
).with_metadata({"genre_batch.index_version": str(INDEX_VERSION)})
"""Track index, one row per (file, extraction): where its windows are (`part`, `row_start`, `row_count`), or why it
failed (`error_*`, no part). `extracted_at` is when it was extracted or failed."""

KEYS = ["uri", "fingerprint"]
RETRIED_ERRORS = ("io_error",)
"""Error kinds retried by the next run even if the file is unchanged: the file may read fine once storage recovers."""

COMPACT_PREFIX = "compact-"
COMPACT_TARGET_WINDOWS = 60_000
"""Window rows per part written by compaction (about 10,000 tracks, ~150 MB in memory while written)."""
AUTO_COMPACT_PARTS = 200
AUTO_COMPACT_SUPERSEDED = 0.25
"""A run compacts by itself when the store holds more than AUTO_COMPACT_PARTS parts (of every family), or when more
than this share of the index's rows are superseded (changed or removed files, older versions, duplicates)."""


def feature_table(rows: list[dict], matrices: list[np.ndarray]) -> pa.Table:
    """Assemble per-window provenance rows and the files' feature matrices into a table of FEATURE_SCHEMA."""
    matrix = np.vstack(matrices) if matrices else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    columns = [pa.array([r[f.name] for r in rows], f.type) for f in PROVENANCE_SCHEMA]
    columns += [pa.array(matrix[:, i]) for i in range(matrix.shape[1])]
    return pa.Table.from_arrays(columns, schema=FEATURE_SCHEMA)


def musicnn_table(rows: list[dict], vectors: list[np.ndarray], patches: list[int]) -> pa.Table:
    """Assemble per-track provenance rows, their embedding+tag vectors [250] and patch counts into MUSICNN_SCHEMA."""
    matrix = np.vstack(vectors) if vectors else np.zeros((0, len(MUSICNN_COLUMNS)), np.float32)
    provenance = [f for f in MUSICNN_SCHEMA if f.name not in MUSICNN_COLUMNS and f.name != "patches"]
    columns = [pa.array([r[f.name] for r in rows], f.type) for f in provenance]
    columns += [pa.array(matrix[:, i].astype(np.float32)) for i in range(matrix.shape[1])]
    columns.append(pa.array(patches, pa.int16()))
    return pa.Table.from_arrays(columns, schema=MUSICNN_SCHEMA)


def index_table(rows: list[dict]) -> pa.Table:
    """Index rows (dicts with any subset of INDEX_SCHEMA's fields) as a table of INDEX_SCHEMA."""
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def part_path(store: Store, name: str, family: Family = LIBROSA) -> str:
    """Where a part of a family lives."""
    return f"{store.features}/{family.folder}/{name}"


def write_shard(store: Store, name: str, windows: pa.Table, index: pa.Table, family: Family = LIBROSA) -> None:
    """Write a shard's part (if it has window rows), then its index file: once the index lists it, it is visible."""
    write_parts(store, name, {family: windows}, index)


def write_parts(store: Store, name: str, parts: dict[Family, pa.Table], index: pa.Table) -> None:
    """Write a shard's part of each family (those with rows), then its one index file listing the rows of all of them."""
    for family, rows in parts.items():
        if rows.num_rows:
            store.write_table(part_path(store, name, family), rows)
    store.write_table(f"{store.index}/{name}", index)


def spans(uris: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Start row and row count of each run of equal consecutive URIs."""
    n = len(uris)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    changes = pc.not_equal(uris.slice(1), uris.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(changes) + 1])
    return starts, np.diff(np.append(starts, n))


def index_of_part(windows: pa.Table, name: str, family: Family = LIBROSA) -> pa.Table:
    """Index rows of a part's window rows (one per consecutive run of a URI)."""
    starts, counts = spans(windows["uri"].combine_chunks())
    first = windows.take(pa.array(starts))
    n = first.num_rows
    given = {
        "family": pa.array([family.name] * n, pa.string()),
        "part": pa.array([name] * n, pa.string()),
        "row_start": pa.array(starts, pa.int64()),
        "row_count": pa.array(counts, pa.int32()),
    }
    if "feature_version" not in first.column_names:
        given["feature_version"] = pa.array([1] * n, pa.int32())  # version 1 parts did not say
    columns = [
        given[f.name] if f.name in given else first[f.name].cast(f.type) if f.name in first.column_names else pa.nulls(n, f.type)
        for f in INDEX_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=INDEX_SCHEMA)


def index_of_errors(errors: pa.Table, family: Family = LIBROSA) -> pa.Table:
    """Index rows of an error part written before the index existed."""
    n = errors.num_rows
    return index_table(
        [
            {**{k: r[k] for k in ("uri", "track_id", "fingerprint", "feature_version", "run_id", "error_type")},
             "family": family.name, "error_stage": r["stage"], "error_message": r["message"], "extracted_at": r["occurred_at"],
             "row_start": 0, "row_count": 0}
            for r in errors.to_pylist()
        ]
    ) if n else INDEX_SCHEMA.empty_table()


PROVENANCE_COLUMNS = [f.name for f in PROVENANCE_SCHEMA]


def compaction_of(name: str) -> tuple[str, bool]:
    """The compaction (`compact-<id>`) a compaction file name belongs to, and whether it is that compaction's commit file
    (`compact-<id>.parquet`; its parts and index pieces are `compact-<id>-NNNNN.parquet`)."""
    stem = name.removesuffix(".parquet")
    piece = re.fullmatch(r"(.+)-\d{5}", stem)
    return (piece.group(1), False) if piece else (stem, True)


def visible(names: list[str]) -> list[bool]:
    """Which index file names readers use: all but the pieces of a compaction whose commit file is not among them."""
    commits = {compaction_of(n)[0] for n in names if n.startswith(COMPACT_PREFIX) and compaction_of(n)[1]}
    return [not n.startswith(COMPACT_PREFIX) or compaction_of(n)[1] or compaction_of(n)[0] in commits for n in names]


def index_files(store: Store) -> list[str]:
    """Paths of the index files readers use: the index folder but the pieces of an uncommitted compaction."""
    paths = store.list(store.index, ".parquet")
    return [p for p, shown in zip(paths, visible([p.rsplit("/", 1)[-1] for p in paths])) if shown]


def unindexed(store: Store, index: pa.Table | None = None, files: list[str] | None = None) -> list[str]:
    """Names of parts (of any family) and old error parts that no index file lists (compaction leftovers excluded).
    A shard's index file has its part's name: the `part` column (of `index`, else read) is looked at only for the
    few names left."""
    files = index_files(store) if files is None else files
    indexed = {p.rsplit("/", 1)[-1] for p in files}
    names = {p.rsplit("/", 1)[-1] for f in FAMILIES.values() for p in store.list(f"{store.features}/{f.folder}", ".parquet")}
    names |= {p.rsplit("/", 1)[-1] for p in store.list(store.error_parts, ".parquet")}
    left = {n for n in names - indexed if not n.startswith(COMPACT_PREFIX)}
    if left:
        index = stored_index(store, ["part"], files, pc.field("part").isin(sorted(left))) if index is None else index
        left -= set(pc.unique(index["part"].drop_null()).to_pylist()) if index.num_rows else set()
    return sorted(left)


def index_of_shard(store: Store, name: str) -> pa.Table:
    """The index rows of one shard, read from its part of each family and its old error part."""
    tables = []
    for family in FAMILIES.values():
        if store.exists(part_path(store, name, family)):
            present = [c for c in PROVENANCE_COLUMNS if c in store.parquet_schema(part_path(store, name, family)).names]
            tables.append(index_of_part(store.read_table(part_path(store, name, family), present), name, family))
    if store.exists(f"{store.error_parts}/{name}"):
        tables.append(index_of_errors(store.read_table(f"{store.error_parts}/{name}")))
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def stored_index(store: Store, columns: list[str] | None = None, files: list[str] | None = None,
                 where: ds.Expression | None = None) -> pa.Table:
    """The rows of the given index files (default: every index file readers use), only those `where` holds if given."""
    files = index_files(store) if files is None else files
    if not files:
        return INDEX_SCHEMA.empty_table() if columns is None else INDEX_SCHEMA.empty_table().select(columns)
    with store.naming_damage(files):
        return ds.dataset(files, filesystem=store.fs, format="parquet", schema=INDEX_SCHEMA).to_table(columns=columns, filter=where)


def read_index(store: Store, columns: list[str] | None = None, where: ds.Expression | None = None) -> pa.Table:
    """The whole track index (only `columns` and the rows `where` holds, read as such): its files, plus (computed, not
    written) the rows of parts no index file lists yet."""
    files = index_files(store)
    table = stored_index(store, columns, files, where)
    listed = table if where is None and (columns is None or "part" in columns) else None
    missing = [index_of_shard(store, name) for name in unindexed(store, listed, files)]
    missing = [m if where is None else m.filter(where) for m in missing]
    if columns is not None:
        missing = [m.select(columns) for m in missing]
    return pa.concat_tables([table, *missing]) if missing else table


def repair(store: Store) -> list[str]:
    """Finish or undo an interrupted compaction, remove temporary files, and index the parts no index file lists;
    returns the names indexed. Only a run holding the store's lease may call it."""
    finish_compactions(store)
    remove_temporary_files(store)
    names = unindexed(store)
    for name in names:
        store.write_table(f"{store.index}/{name}", index_of_shard(store, name))
    return names


def read_inventory(store: Store, columns: list[str] | None = None) -> pa.Table:
    """The library listing of the last completed extraction (empty if none); only `columns` if given."""
    if not store.exists(store.inventory):
        return INVENTORY_SCHEMA.empty_table() if columns is None else INVENTORY_SCHEMA.empty_table().select(columns)
    return store.read_table(store.inventory, columns)


def write_inventory(store: Store, inventory: pa.Table) -> bool:
    """Record the library listing; returns False (and writes nothing) when it is unchanged."""
    previous = read_inventory(store)
    if previous.select(KEYS).equals(inventory.select(KEYS)) and previous.schema.metadata == inventory.schema.metadata:
        return False
    store.write_table(store.inventory, inventory)
    return True


def keys_of(table: pa.Table) -> pa.ChunkedArray:
    """One string per row naming its (uri, fingerprint), for membership tests on tables that joins cannot carry."""
    return pc.binary_join_element_wise(table["uri"], table["fingerprint"], "\x00")


def of_family(index: pa.Table, family: Family = LIBROSA) -> pa.ChunkedArray:
    """Which index rows are of a family's current version (a mask)."""
    return pc.and_(pc.equal(index["family"], family.name), pc.equal(index["feature_version"], family.version))


NEWEST_ORDER = [("uri", "ascending"), ("_failed", "ascending"), ("extracted_at", "descending"), ("_row", "ascending")]
"""Order of index rows in which each URI's first row stands for it: success before failure, newest first."""


def choice_keys(index: pa.Table) -> pa.Table:
    """The columns that choose between a URI's index rows, and each row's number (`_row`)."""
    return pa.table({
        "uri": index["uri"], "fingerprint": index["fingerprint"], "_failed": pc.is_valid(index["error_type"]),
        "extracted_at": index["extracted_at"], "_row": pa.array(np.arange(index.num_rows)),
    })


def chosen(keys: pa.Table) -> pa.Table:
    """Per URI of choice keys, in URI order, the row number (`_row`) and outcome (`_failed`) of its newest successful
    extraction, else its newest failure."""
    if keys.num_rows == 0:
        return pa.table({"_row": pa.array([], pa.int64()), "_failed": pa.array([], pa.bool_())})
    order = pc.sort_indices(keys, sort_keys=NEWEST_ORDER)
    starts, _ = spans(keys["uri"].take(order).combine_chunks())
    picked = order.take(pa.array(starts))
    return pa.table({"_row": keys["_row"].take(picked), "_failed": keys["_failed"].take(picked)})


def newest(index: pa.Table) -> pa.Table:
    """One row per URI: its newest successful extraction, else its newest failure."""
    return index.take(chosen(choice_keys(index))["_row"]) if index.num_rows else index


def listing_positions(index: pa.Table, inventory: pa.Table) -> np.ndarray:
    """Per index row, the listing row with its URI and fingerprint, else -1 (a listing's URIs are unique: one hash
    lookup of the URI, then a comparison of fingerprints; no join)."""
    if index.num_rows == 0 or inventory.num_rows == 0:
        return np.full(index.num_rows, -1, np.int64)
    at = pc.fill_null(pc.index_in(index["uri"], value_set=inventory["uri"].combine_chunks()), -1).to_numpy().astype(np.int64)
    listed = inventory["fingerprint"].take(pa.array(np.maximum(at, 0))).combine_chunks()
    same = pc.fill_null(pc.equal(index["fingerprint"].combine_chunks(), listed), False).to_numpy(zero_copy_only=False)
    return np.where(same, at, -1)


def uri_ranks(inventory: pa.Table) -> np.ndarray:
    """Each listing row's place in URI order (a listing as discovery writes it is in URI order already: checked in one
    pass, no sort)."""
    uris = inventory["uri"].combine_chunks()
    if len(uris) < 2 or pc.all(pc.less(uris.slice(0, len(uris) - 1), uris.slice(1))).as_py():
        return np.arange(len(uris), dtype=np.int64)
    order = pc.sort_indices(uris).to_numpy()
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def resolved_keys(index: pa.Table, inventory: pa.Table, family: Family = LIBROSA, at: np.ndarray | None = None) -> pa.Table:
    """Per file of the listing that has index rows of a family for its content, in URI order: the row number (`_row`)
    and outcome (`_failed`) of its newest successful extraction, else its newest failure, and its listing row (`_at`).
    Chosen by numeric sorts of positions and times, not by string joins (a 1M-track index in about a second); `at`:
    the index rows' listing_positions, when already known."""
    at = listing_positions(index, inventory) if at is None else at
    mine = pc.fill_null(of_family(index, family), False).to_numpy(zero_copy_only=False) if index.num_rows else np.zeros(0, bool)
    rows = np.flatnonzero((at >= 0) & mine)
    failed = pc.is_valid(index["error_type"]).to_numpy(zero_copy_only=False)[rows] if index.num_rows else np.zeros(0, bool)
    when = pc.fill_null(index["extracted_at"].cast(pa.int64()), 0).to_numpy()[rows] if index.num_rows else np.zeros(0, np.int64)
    order = np.lexsort((rows, -when, failed, uri_ranks(inventory)[at[rows]])) if len(rows) else np.zeros(0, np.int64)
    listed = at[rows][order]
    first = np.ones(len(listed), bool)
    first[1:] = listed[1:] != listed[:-1]
    return pa.table({"_row": pa.array(rows[order][first], pa.int64()), "_failed": pa.array(failed[order][first], pa.bool_()),
                     "_at": pa.array(listed[first], pa.int64())})


def resolved(index: pa.Table, inventory: pa.Table, family: Family = LIBROSA) -> pa.Table:
    """Per file of the listing, the index row that stands for its current content (success, else failure)."""
    return index.take(resolved_keys(index, inventory, family)["_row"])


def resolved_outcome(index: pa.Table, inventory: pa.Table, family: Family, failures: bool) -> pa.Table:
    """The rows of `resolved` that failed (`failures`) or succeeded, taken alone."""
    picked = resolved_keys(index, inventory, family)
    return index.take(picked["_row"].filter(picked["_failed"] if failures else pc.invert(picked["_failed"])))


def failed(rows: pa.Table) -> pa.Table:
    """The rows of failed extractions."""
    return rows.filter(pc.is_valid(rows["error_type"]))


TRACK_COLUMNS = ["uri", "track_id", "fingerprint", "family", "feature_version", "part", "row_start", "row_count",
                 "duration_s", "tag_genre", "error_type", "extracted_at"]
"""Index columns that choose a track's current rows, say where they are and what its catalog row carries: what
tagging reads of the index (the rest stays on disk)."""


def current_tracks(store: Store, inventory: pa.Table | None = None, family: Family = LIBROSA, columns: list[str] | None = None) -> pa.Table:
    """Index rows (only `columns`, default all) of every file of the library with features of its current content,
    sorted by URI."""
    inventory = read_inventory(store, KEYS) if inventory is None else inventory
    return resolved_outcome(read_index(store, columns), inventory, family, failures=False)


@dataclass(frozen=True)
class Current:
    """The library's current tracks per family, from one read of the index's CHOICE_COLUMNS: each one's listing row
    and where its index row is, to read its whole row again alone."""

    files: list[str]
    """The index files read."""
    unlisted: pa.Table
    """Index rows computed from parts no index file lists yet (after a crash; usually none)."""
    rows: dict[str, pa.Table]
    """Per family: `_at` (listing row, in URI order), `_file` (its index file's place in `files`, -1: a row of
    `unlisted`) and `_line` (its row number in that file, or in `unlisted`)."""

    def positions(self) -> dict[str, np.ndarray]:
        """Per family, the listing rows of the current tracks."""
        return {name: rows["_at"].to_numpy() for name, rows in self.rows.items()}


def current_positions(store: Store, inventory: pa.Table) -> Current:
    """The current tracks of every family, from one read of the index's CHOICE_COLUMNS (no other column, no string
    join): which listing rows (positions in `inventory`) have features of their current content, and where."""
    files = index_files(store)
    index = index_sources(store, files, CHOICE_COLUMNS)
    missing = [index_of_shard(store, name) for name in unindexed(store, None, files)]
    unlisted = pa.concat_tables(missing) if missing else INDEX_SCHEMA.empty_table()
    if unlisted.num_rows:
        lines = pa.array(np.arange(unlisted.num_rows, dtype=np.int64))
        extra = unlisted.select(CHOICE_COLUMNS).append_column("_file", pa.array(np.full(unlisted.num_rows, -1, np.int32))).append_column("_line", lines)
        index = pa.concat_tables([index, extra])
    at = listing_positions(index, inventory)
    rows = {}
    for name, family in FAMILIES.items():
        picked = resolved_keys(index, inventory, family, at)
        picked = picked.filter(pc.invert(picked["_failed"]))
        where = index.select(["_file", "_line"]).take(picked["_row"])
        rows[name] = pa.table({"_at": picked["_at"], "_file": where["_file"], "_line": where["_line"]})
    return Current(files, unlisted, rows)


def lacking(current: dict[str, np.ndarray], families: list[str] | tuple[str, ...]) -> dict[str, int]:
    """How many of the current (librosa) tracks lack each other family of `families`, in FAMILIES order (families none
    lacks left out); `current`: listing rows per family (Current.positions)."""
    tracks = current[LIBROSA.name]
    counts = {name: int(np.count_nonzero(~np.isin(tracks, current[name]))) for name in FAMILIES if name in families and name != LIBROSA.name}
    return {name: n for name, n in counts.items() if n}


def index_rows(store: Store, current: Current, family: Family, listed: np.ndarray, columns: list[str]) -> pa.Table:
    """The whole index rows (`columns`) of a family's current tracks at the given listing rows, sorted by URI: read
    from the index files holding them, not from the whole index."""
    rows = current.rows[family.name]
    rows = rows.filter(pa.array(np.isin(rows["_at"].to_numpy(), listed)))
    filed = rows.filter(pc.greater_equal(rows["_file"], 0))
    tables = [source_rows(store, sources_of(filed, current.files), columns)] if filed.num_rows else []
    if filed.num_rows < rows.num_rows:
        tables.append(current.unlisted.take(rows.filter(pc.less(rows["_file"], 0))["_line"]).cast(INDEX_SCHEMA).select(columns))
    return pa.concat_tables(tables).sort_by("uri") if tables else INDEX_SCHEMA.empty_table().select(columns)


ERROR_COLUMNS = ["uri", "track_id", "fingerprint", "family", "feature_version", "error_type", "error_stage", "error_message",
                 "run_id", "extracted_at"]
"""Index columns that the errors table is made of (and that choose a file's current row)."""


def error_candidates(store: Store) -> pa.Table:
    """The index rows (ERROR_COLUMNS) of every failure and of the successes of files that have a failure: all that
    decides the errors table, without reading every file's row when few failed."""
    failures = read_index(store, ERROR_COLUMNS, pc.field("error_type").is_valid())
    if failures.num_rows == 0:
        return failures
    uris = pc.unique(failures["uri"].combine_chunks())
    return pa.concat_tables([failures, read_index(store, ERROR_COLUMNS, pc.field("error_type").is_null() & pc.field("uri").isin(uris))])


def current_errors(store: Store, family: Family = LIBROSA) -> pa.Table:
    """One row per file of the library that failed on its current content and has no features (the errors table)."""
    rows = resolved_outcome(error_candidates(store), read_inventory(store, KEYS), family, failures=True)
    return pa.table(
        {
            "uri": rows["uri"], "track_id": rows["track_id"], "fingerprint": rows["fingerprint"],
            "stage": rows["error_stage"], "error_type": rows["error_type"], "message": rows["error_message"],
            "feature_version": rows["feature_version"], "run_id": rows["run_id"], "occurred_at": rows["extracted_at"],
        },
        schema=ERROR_SCHEMA,
    )


@dataclass(frozen=True)
class Plan:
    """What an extraction must do, from the library listing and the track index."""

    todo: pa.Table
    """Listing rows to extract: new or changed files, failures to retry."""
    moved: pa.Table
    """Index rows of files that moved (same size and version under a new URI): they keep features and track_id."""
    unchanged: int


CHOICE_COLUMNS = ["uri", "fingerprint", "family", "feature_version", "error_type", "extracted_at"]
"""Index columns that choose each file's current row: what a plan, training and compaction read to choose. A plan that
finds moved files is made again on the whole index (`needs_rows`): a move is written as whole index rows."""


def plan(inventory: pa.Table, index: pa.Table, force: bool = False, family: Family = LIBROSA) -> Plan:
    """The files of the listing to extract, and the files that only moved (index: CHOICE_COLUMNS or more)."""
    if force:
        return Plan(inventory, index.schema.empty_table(), 0)
    picked = resolved_keys(index, inventory, family)
    kinds = pc.fill_null(index["error_type"].take(picked["_row"]), "")
    done = picked["_at"].filter(pc.invert(pc.is_in(kinds, value_set=pa.array(RETRIED_ERRORS)))).to_numpy()
    wanted = np.ones(inventory.num_rows, bool)
    wanted[done] = False
    todo = inventory.filter(pa.array(wanted)).sort_by("uri")
    moved = moves(todo, index, inventory, family)
    if moved.num_rows:
        todo = todo.filter(pc.invert(pc.is_in(todo["uri"], value_set=moved["uri"])))
    return Plan(todo, moved, inventory.num_rows - todo.num_rows - moved.num_rows)


BACKFILL_CAP = 50_000
"""Files per run (per added family) extracted only to backfill a family they lack: ~2.3 CPU hours (166 ms each)."""


@dataclass(frozen=True)
class RunPlan:
    """What an extraction of several families must do: files with the families each needs, and moved rows."""

    todo: pa.Table
    """Listing rows to extract, sorted by URI, with a `families` column: the names of the families to compute (librosa first)."""
    moved: pa.Table
    """Index rows (of every family) re-pointed to files that moved."""
    unchanged: int
    """Files with nothing to extract and that did not move."""
    backfill: int
    """Files of `todo` extracted only for families they lack (new and changed files get every family)."""
    backfill_left: int
    """Files still lacking a family after this run (over the cap)."""

    @property
    def moved_files(self) -> int:
        """How many files moved (`moved` has a row per family of each)."""
        return pc.count_distinct(self.moved["uri"]).as_py() if self.moved.num_rows else 0


def plan_run(inventory: pa.Table, index: pa.Table, families: list[Family], force: bool = False, backfill_cap: int = BACKFILL_CAP) -> RunPlan:
    """Plan per family: a file needs a family when it has no current row of that family's version. Files librosa
    needs (new, changed, retried) get every family; files lacking only another family are backfilled, at most
    `backfill_cap` per family, in URI order."""
    base = plan(inventory, index, force, LIBROSA)
    names = [f.name for f in families]
    needs: dict[str, list[str]] = {uri: list(names) for uri in base.todo["uri"].to_pylist()}
    moved, backfill, left = [base.moved], set(), 0
    for family in families:
        if family == LIBROSA:
            continue
        own = plan(inventory, index, force, family)
        moved.append(own.moved.filter(pc.invert(pc.is_in(own.moved["uri"], value_set=base.todo["uri"]))))
        extra = [u for u in own.todo["uri"].to_pylist() if u not in needs or family.name not in needs[u]]
        left += max(0, len(extra) - backfill_cap)
        for uri in extra[:backfill_cap]:
            needs.setdefault(uri, []).append(family.name)
            backfill.add(uri)
    todo = inventory.filter(pc.is_in(inventory["uri"], value_set=pa.array(list(needs), pa.string()))).sort_by("uri")
    todo = todo.append_column("families", pa.array([needs[u] for u in todo["uri"].to_pylist()], pa.list_(pa.string())))
    moved_rows = pa.concat_tables(moved)
    moved_uris = set(moved_rows["uri"].to_pylist())
    return RunPlan(todo, moved_rows, inventory.num_rows - len(set(needs) | moved_uris), len(backfill), left)


def moves(todo: pa.Table, index: pa.Table, inventory: pa.Table, family: Family = LIBROSA) -> pa.Table:
    """Index rows re-pointed to new URIs: a file to extract whose fingerprint (size, version) is that of a file gone
    from the listing keeps that file's features and track_id. Pairs are made in URI order, each departed file once.
    Rows keep the columns `index` has (size and version are the new file's where present)."""
    if todo.num_rows == 0 or index.num_rows == 0:
        return index.schema.empty_table()
    index = index.filter(pc.is_in(index["fingerprint"], value_set=todo["fingerprint"].combine_chunks()))  # few rows from here
    departed = pc.invert(pc.is_in(index["uri"], value_set=inventory["uri"].combine_chunks()))
    gone = newest(index.filter(pc.and_(pc.and_(of_family(index, family), pc.is_null(index["error_type"])), departed)))
    if gone.num_rows == 0:
        return index.schema.empty_table()
    by_fingerprint: dict[str, list[dict]] = {}
    for row in gone.to_pylist():
        by_fingerprint.setdefault(row["fingerprint"], []).append(row)
    rows = []
    for new in todo.filter(pc.is_in(todo["fingerprint"], value_set=gone["fingerprint"])).to_pylist():
        candidates = by_fingerprint.get(new["fingerprint"])
        if candidates:
            rows.append({**candidates.pop(0), **{k: new[k] for k in ("uri", "size", "version") if k in gone.column_names}})
    return pa.Table.from_pylist(rows, schema=index.schema) if rows else index.schema.empty_table()


def needs_rows(plan: RunPlan, index: pa.Table) -> bool:
    """Whether a plan made on some index columns found moved files, whose whole index rows are written."""
    return plan.moved.num_rows > 0 and index.schema.names != INDEX_SCHEMA.names


def rekeyed(rows: pa.Table, files: pa.Table) -> pa.Table:
    """Index rows of files whose tags alone changed (genre-batch wrote them), re-keyed like moves are re-pointed: `files`
    has uri, old_fingerprint, fingerprint, size, version and tag_genre; each file's rows of its old fingerprint (every
    family) get the new fingerprint, size, version and tag. Their features stand for the new content: no re-extraction."""
    old = files.select(["uri", "old_fingerprint"]).rename_columns(["uri", "fingerprint"])
    rows = rows.join(old, keys=KEYS, join_type="left semi").sort_by("uri")
    new = {r["uri"]: r for r in files.to_pylist()}
    uris = rows["uri"].to_pylist()
    for name in ("fingerprint", "size", "version", "tag_genre"):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array([new[u][name] for u in uris], INDEX_SCHEMA.field(name).type))
    return rows.cast(INDEX_SCHEMA)


def run_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row numbers of consecutive runs: counts[k] rows from starts[k], run after run."""
    counts = np.asarray(counts, np.int64)
    if len(counts) == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(np.asarray(starts, np.int64) - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(counts.sum()) + offsets


def window_indices(tracks: pa.Table) -> np.ndarray:
    """Row numbers in a part of the windows of the given index rows."""
    return run_rows(tracks["row_start"].to_numpy(), tracks["row_count"].to_numpy())


def read_windows(store: Store, tracks: pa.Table, columns: list[str] | None = None, family: Family = LIBROSA) -> pa.Table:
    """The window rows of the given index rows (all in one part: rows of several raise ValueError, group them with
    `by_part`), with `uri` and `track_id` as the index says (a moved file's rows still carry its old URI)."""
    parts = pc.count_distinct(tracks["part"]).as_py()
    if parts > 1:
        raise ValueError(f"read_windows reads the rows of one part, got index rows of {parts} parts: group them with by_part")
    part = tracks["part"][0].as_py()
    table = store.read_table(part_path(store, part, family), columns).take(pa.array(window_indices(tracks)))
    counts = tracks["row_count"].to_numpy().astype(np.int64)
    for name in ("uri", "track_id"):
        if name in table.column_names:
            value = pa.array(np.repeat(np.array(tracks[name].to_pylist(), dtype=object), counts), pa.string())
            table = table.set_column(table.schema.get_field_index(name), name, value)
    return table


def copy_rows(table: pa.Table, start: int, length: int) -> pa.Table:
    """Rows of a table as a table of their own: a slice would keep (and, sent to a Dask worker, pickle) the buffers
    of the whole table (measured: tagging 100k tracks passed 8 GB with slices)."""
    return table.take(pa.array(np.arange(start, start + length)))


def by_part(tracks: pa.Table) -> list[pa.Table]:
    """Index rows grouped by the part holding them, each group in row order."""
    if tracks.num_rows == 0:
        return []
    order = pc.sort_indices(tracks, sort_keys=[("part", "ascending"), ("row_start", "ascending")])
    starts, counts = spans(tracks["part"].take(order).combine_chunks())
    return [tracks.take(order.slice(int(s), int(c))) for s, c in zip(starts, counts)]


def batches(tracks: pa.Table, max_windows: int) -> list[list[pa.Table]]:
    """Index rows grouped by part, the groups dealt into batches of about `max_windows` windows (a part never split)."""
    out: list[list[pa.Table]] = []
    size = max_windows
    for group in by_part(tracks):
        windows = int(pc.sum(group["row_count"]).as_py() or 0)
        if size + windows > max_windows and (not out or out[-1]):
            out.append([])
            size = 0
        out[-1].append(group)
        size += windows
    return [b for b in out if b]


# Compaction ------------------------------------------------------------------------------------------------------


def compaction_id() -> str:
    """A sortable, unique compaction name."""
    from datetime import datetime, timezone

    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}"


def superseded_share(index_rows: int, current_rows: int) -> float:
    """Share of index rows that no longer stand for a current file."""
    return 1.0 - current_rows / index_rows if index_rows else 0.0


def needs_compaction(parts: int, index_rows: int, current_rows: int) -> bool:
    """Whether a run should compact by itself (AUTO_COMPACT_PARTS, AUTO_COMPACT_SUPERSEDED), given the parts of every family."""
    return parts > AUTO_COMPACT_PARTS or (parts > 1 and superseded_share(index_rows, current_rows) > AUTO_COMPACT_SUPERSEDED)


SOURCE_COLUMNS = [*CHOICE_COLUMNS, "part", "row_count"]
"""Index columns the compaction's flow process reads: which rows are current, and how many windows each part holds."""
ERROR_PIECE_ROWS = 100_000
"""Failure rows per index piece written by compaction."""


def index_sources(store: Store, files: list[str], columns: list[str]) -> pa.Table:
    """`columns` of the given index files' rows, with each row's file (`_file`: its place in `files`) and row number in
    that file (`_line`): enough for a worker to read the whole row again."""
    if not files:
        return INDEX_SCHEMA.empty_table().select(columns).append_column("_file", pa.array([], pa.int32())).append_column("_line", pa.array([], pa.int64()))
    with store.naming_damage(files):
        dataset = ds.dataset(files, filesystem=store.fs, format="parquet", schema=INDEX_SCHEMA)
        table = dataset.to_table(columns=[*columns, "__fragment_index"])  # a number per row, not its file's path
    found = pc.index_in(pa.array(dataset.files, pa.string()), value_set=pa.array(files, pa.string()))
    if found.null_count:
        raise RuntimeError("pyarrow named an index file by another path than the one it was given")
    source = found.to_numpy()[table["__fragment_index"].to_numpy()]
    table = table.drop_columns(["__fragment_index"])
    starts, counts = spans(pa.array(source))
    if len(set(source[starts].tolist())) != len(starts):
        raise RuntimeError("an index file's rows came back in more than one run")  # pyarrow's to_table keeps file order
    line = np.arange(len(source)) - np.repeat(starts, counts)
    return table.append_column("_file", pa.array(source, pa.int32())).append_column("_line", pa.array(line, pa.int64()))


def part_batches(parts: pa.Array, windows: pa.Array, max_windows: int) -> np.ndarray:
    """The batch of each row of the given parts and window counts: parts in name order dealt into batches of about
    `max_windows` windows, a part never split (as `batches` does)."""
    codes = pc.dictionary_encode(parts).combine_chunks() if isinstance(parts, pa.ChunkedArray) else pc.dictionary_encode(parts)
    per_part = np.bincount(codes.indices.to_numpy(), weights=windows.to_numpy(), minlength=len(codes.dictionary))
    batch_of, batch, size = np.zeros(len(codes.dictionary), np.int64), -1, max_windows
    for code in np.argsort(np.array(codes.dictionary.to_pylist(), dtype=object), kind="stable"):
        if size + per_part[code] > max_windows and (batch < 0 or size > 0):
            batch, size = batch + 1, 0
        batch_of[code] = batch
        size += per_part[code]
    return batch_of[codes.indices.to_numpy()]


def sources_of(rows: pa.Table, files: list[str]) -> list[tuple[str, np.ndarray]]:
    """Index rows (with `_file` and `_line`) as (file, row numbers in it) pairs: what a worker reads them from."""
    order = np.lexsort((rows["_line"].to_numpy(), rows["_file"].to_numpy()))
    source, line = rows["_file"].to_numpy()[order], rows["_line"].to_numpy()[order]
    starts, counts = spans(pa.array(source))
    return [(files[source[s]], line[s:s + c].copy()) for s, c in zip(starts, counts)]


SOURCE_FILES_PER_READ = 256
"""Index files `source_rows` reads at a time: one dataset read per group, not per file (4,000 files one by one took
3.6x the time of one read), and one group's rows held besides the rows taken, not the whole index's."""


def source_rows(store: Store, sources: list[tuple[str, np.ndarray]], columns: list[str] | None = None) -> pa.Table:
    """The index rows (all columns, or `columns`) of (file, row numbers) pairs, in that order (on a worker for
    compaction; in the flow process for tagging)."""
    names = INDEX_SCHEMA.names if columns is None else columns
    taken = []
    for start in range(0, len(sources), SOURCE_FILES_PER_READ):
        group = sources[start : start + SOURCE_FILES_PER_READ]
        table = index_sources(store, [f for f, _ in group], names)
        starts, _ = spans(table["_file"].combine_chunks())  # each file's rows are one run (index_sources checks it)
        first = np.zeros(len(group), np.int64)
        first[table["_file"].to_numpy()[starts]] = starts
        rows = np.concatenate([first[i] + lines for i, (_, lines) in enumerate(group)])
        taken.append(table.select(names).take(pa.array(rows)))
        del table
    schema = pa.schema([INDEX_SCHEMA.field(n) for n in names])
    return pa.concat_tables(taken).cast(schema) if taken else schema.empty_table()


def piece_path(store: Store, name: str) -> str:
    """The index piece of a compaction's part (or of its failures): it has the part's name."""
    return f"{store.index}/{name}"


def compact_group(store: Store, name: str, family: Family | None, sources: list[tuple[str, np.ndarray]]) -> int:
    """Copy the windows of the given index rows of a family into one new part, then write the part's index piece
    (runs on a worker; `family` None: failure rows, an index piece alone). The piece stays unread until the compaction
    commits. Returns its rows."""
    rows = source_rows(store, sources)
    if family is not None:
        rows = rows.sort_by([("part", "ascending"), ("row_start", "ascending")])
        windows = pa.concat_tables([read_windows(store, g, family=family) for g in by_part(rows)])
        metadata = (FEATURE_SCHEMA if family == LIBROSA else MUSICNN_SCHEMA).metadata
        store.write_table(part_path(store, name, family), windows.replace_schema_metadata(metadata))
        del windows
        counts = rows["row_count"].to_numpy().astype(np.int64)
        rows = rows.set_column(rows.schema.get_field_index("part"), "part", pa.array([name] * rows.num_rows, pa.string()))
        rows = rows.set_column(rows.schema.get_field_index("row_start"), "row_start", pa.array(np.concatenate([[0], np.cumsum(counts)[:-1]]), pa.int64()))
    store.write_table(piece_path(store, name), rows.replace_schema_metadata(INDEX_SCHEMA.metadata))
    return rows.num_rows


def compacted_index_path(store: Store, cid: str) -> str:
    """The commit file of a compaction."""
    return f"{store.index}/{COMPACT_PREFIX}{cid}.parquet"


def commit_compaction(store: Store, cid: str, replaced_index: list[str], replaced_parts: list[str]) -> None:
    """Write the compaction's commit file (no rows), naming what it replaces: from then on readers use its pieces."""
    meta = {
        **(INDEX_SCHEMA.metadata or {}),
        b"genre_batch.replaces_index": json.dumps(replaced_index).encode(),
        b"genre_batch.replaces_parts": json.dumps(replaced_parts).encode(),
    }
    store.write_table(compacted_index_path(store, cid), INDEX_SCHEMA.empty_table().replace_schema_metadata(meta))


def finish_compactions(store: Store) -> None:
    """Delete what committed compactions replaced (index files first, then parts), and the parts and index pieces of
    uncommitted ones. A commit file written before index pieces existed holds its rows itself."""
    committed = set()
    for path in store.list(store.index, ".parquet"):
        name = path.rsplit("/", 1)[-1]
        if not name.startswith(COMPACT_PREFIX) or not compaction_of(name)[1]:
            continue
        committed.add(compaction_of(name)[0])
        meta = store.parquet_schema(path).metadata or {}
        store.delete([f"{store.index}/{n}" for n in json.loads(meta.get(b"genre_batch.replaces_index", b"[]"))])
        for n in json.loads(meta.get(b"genre_batch.replaces_parts", b"[]")):
            store.delete([*(part_path(store, n, f) for f in FAMILIES.values()), f"{store.error_parts}/{n}"])
    folders = [f"{store.features}/{f.folder}" for f in FAMILIES.values()]
    orphans = [
        p for folder in (*folders, store.index) for p in store.list(folder, ".parquet")
        if p.rsplit("/", 1)[-1].startswith(COMPACT_PREFIX) and compaction_of(p.rsplit("/", 1)[-1])[0] not in committed
    ]
    store.delete(sorted(orphans, key=lambda p: p.startswith(f"{store.index}/"), reverse=True))  # pieces before parts


def remove_temporary_files(store: Store) -> None:
    """Delete temporary files that killed writes left in the feature store."""
    family_folders = [f"{store.features}/{f.folder}" for f in FAMILIES.values()]
    for folder in (*family_folders, store.error_parts, store.index, store.features):
        store.fs.invalidate_cache(folder)
        try:
            names = store.fs.ls(folder, detail=False)
        except FileNotFoundError:
            continue
        store.delete([p for p in names if TEMP_MARK in p.rsplit("/", 1)[-1]])
