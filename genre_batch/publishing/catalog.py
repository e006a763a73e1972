"""Catalog: immutable Parquet snapshots, one file per genre, published by one atomic pointer switch; the last N kept."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from genre_batch.publishing.pointer import CatalogPointer, published, required
from genre_batch.storage.store import POINTER, Store

CATALOG_VERSION = 3
VECTOR_DIM = 128
"""Dimension of the `embedding` of every vector space (genre_batch.publishing.vectors): one fixed-size list type for all."""
KEEP_SNAPSHOTS = 5

FILE_ORDER = [("confidence", "descending"), ("uri", "ascending")]
ROW_GROUP_ROWS = 100_000
"""A snapshot holds one file per genre, its rows sorted by FILE_ORDER in row groups of ROW_GROUP_ROWS: a query on one
genre reads that genre's file only (the others are skipped by their statistics) and finds its most confident tracks
first."""

PLAIN_COLUMNS = ("embedding",)
"""Catalog columns written plain: uncompressed, without a dictionary or statistics. An embedding's float32 values are
near random: zstd saved 20 % of their bytes for ~30 % of a genre file's write CPU and ~40 % of its read CPU, a
dictionary never fits them (pyarrow tried one, then fell back) and min/max of a vector's components filter nothing.
A physical encoding: the column's type and values are the same (README, Catalog)."""

CATALOG_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("uri", pa.string()),
        ("fingerprint", pa.string()),
        ("genre", pa.string()),
        ("confidence", pa.float64()),
        ("probabilities", pa.map_(pa.string(), pa.float64())),
        ("embedded_genre", pa.string()),
        ("disagrees_with_tag", pa.bool_()),
        ("duration_s", pa.float32()),
        ("model_version", pa.string()),
        ("feature_version", pa.int32()),
        ("run_id", pa.string()),
        ("tagged_at", pa.timestamp("ms", tz="UTC")),
        ("embedding", pa.list_(pa.float32(), VECTOR_DIM)),
        ("tags", pa.list_(pa.string())),
    ]
).with_metadata({"genre_batch.catalog_version": str(CATALOG_VERSION)})
"""Catalog schema, version CATALOG_VERSION (documented in the README). Version 2 added `fingerprint`, version 3
`embedding` (the snapshot's vector space, CURRENT.json `vector_space`) and `tags` (top musicnn MSD tags, or null)."""


CHANGES_SCHEMA = pa.schema(
    [
        ("change", pa.string()),
        ("track_id", pa.string()),
        ("uri", pa.string()),
        ("old_uri", pa.string()),
        ("old_genre", pa.string()),
        ("new_genre", pa.string()),
        ("old_confidence", pa.float64()),
        ("new_confidence", pa.float64()),
    ]
).with_metadata({"genre_batch.catalog_version": str(CATALOG_VERSION)})
"""The change feed of a snapshot against the one published before it: one row per track `added`, `removed`,
`genre_changed` or `moved` (same genre, new URI; a track whose genre changed and that moved is `genre_changed`
with its `old_uri`)."""
DIFF_COLUMNS = ["track_id", "uri", "genre", "confidence"]

SIMILAR_K = 20
"""Neighbours stored per track (rank 1..SIMILAR_K); `genre-batch similar --top` past it searches the index."""
SIMILAR_SCHEMA = pa.schema(
    [("track_id", pa.string()), ("neighbour_id", pa.string()), ("rank", pa.int16()), ("score", pa.float32())]
).with_metadata({"genre_batch.similar_k": str(SIMILAR_K)})
"""The `similar` table of a snapshot (genre_batch.publishing.similar): per track its SIMILAR_K nearest other catalog tracks by
cosine of their embeddings (`score`), rank 1 the nearest."""


def diff(before: pa.Table, after: pa.Table) -> pa.Table:
    """The change feed from one catalog to the next (tables with DIFF_COLUMNS), in track_id order."""
    import pyarrow.compute as pc  # imported here: 0.05-0.1 s CPU of every CLI start that reads the pointer (query, similar)

    old = before.select(DIFF_COLUMNS).rename_columns(["track_id", "old_uri", "old_genre", "old_confidence"])
    new = after.select(DIFF_COLUMNS).rename_columns(["track_id", "uri", "new_genre", "new_confidence"])
    both = old.join(new, keys="track_id", join_type="full outer")
    added, removed = pc.is_null(both["old_genre"]), pc.is_null(both["new_genre"])
    regenred = pc.fill_null(pc.not_equal(both["old_genre"], both["new_genre"]), False)
    moved = pc.fill_null(pc.not_equal(both["old_uri"], both["uri"]), False)
    change = pc.case_when(pc.make_struct(added, removed, regenred, moved), "added", "removed", "genre_changed", "moved")
    table = both.append_column("change", change).filter(pc.is_valid(change))
    table = table.set_column(table.schema.get_field_index("uri"), "uri", pc.coalesce(table["uri"], table["old_uri"]))
    table = table.set_column(table.schema.get_field_index("old_uri"), "old_uri",
                             pc.if_else(pc.equal(table["change"], "removed"), pa.scalar(None, pa.string()), table["old_uri"]))
    return table.select(CHANGES_SCHEMA.names).cast(CHANGES_SCHEMA).sort_by("track_id")


def changes_folder(store: Store, snapshot: str) -> str:
    """Where the per-genre diff tasks leave their pieces of a snapshot's change feed before they are gathered."""
    return f"{store.catalog}/snapshots/{snapshot}/_changes"


def write_change_piece(store: Store, snapshot: str, number: int, changes: pa.Table) -> int:
    """Leave one genre's changes as a piece of the snapshot's change feed (for `gather_changes`); returns its rows."""
    store.write_table(f"{changes_folder(store, snapshot)}/{number:03d}.parquet", changes)
    return changes.num_rows


def diff_genre(store: Store, snapshot: str, number: int, before: list[str], after: list[str]) -> int:
    """Diff one genre's files of the previous snapshot against the new one (runs on a worker) and leave the changes as
    a piece; a track that changed genre is `removed` in one piece and `added` in another until `gather_changes`
    pairs them. Returns the piece's rows."""
    return write_change_piece(store, snapshot, number, diff(read_files(store, before, DIFF_COLUMNS), read_files(store, after, DIFF_COLUMNS)))


def merge_diff(previous: pa.Table, kept: np.ndarray, new: pa.Table) -> pa.Table:
    """What `diff` gives between a genre's previous file (`previous`, DIFF_COLUMNS) and the file merged from its rows
    `kept` (a mask) plus `new` rows, from the rows left out and the new ones alone: a kept row is in both files
    unchanged. When a left-out or new row shares its track_id with a kept row, the whole files are diffed."""
    import pyarrow.compute as pc  # imported here, as in diff

    gone = previous.filter(pa.array(~kept))
    stays = previous["track_id"].filter(pa.array(kept))
    shared = pc.any(pc.is_in(pa.concat_arrays([gone["track_id"].combine_chunks(), new["track_id"].combine_chunks()]), value_set=stays.combine_chunks()))
    if shared.as_py():
        return diff(previous, pa.concat_tables([previous.filter(pa.array(kept)), new]))
    return diff(gone, new)


def pair_pieces(pieces: pa.Table) -> pa.Table:
    """The change feed from per-genre pieces: each track `removed` from one piece and `added` to another becomes one
    `genre_changed` row (diffing the two sides again), as `diff` of the whole catalogs gives it; in track_id order."""
    import pyarrow.compute as pc  # imported here, as in diff

    kinds = pieces["change"]
    removed = pieces.filter(pc.equal(kinds, "removed"))
    added = pieces.filter(pc.equal(kinds, "added"))
    old = pa.table({"track_id": removed["track_id"], "uri": removed["uri"], "genre": removed["old_genre"], "confidence": removed["old_confidence"]})
    new = pa.table({"track_id": added["track_id"], "uri": added["uri"], "genre": added["new_genre"], "confidence": added["new_confidence"]})
    kept = pieces.filter(pc.invert(pc.is_in(kinds, value_set=pa.array(["removed", "added"]))))
    return pa.concat_tables([kept.cast(CHANGES_SCHEMA), diff(old, new)]).sort_by("track_id")


def gather_changes(store: Store, snapshot: str) -> dict[str, int]:
    """Pair a snapshot's change pieces into its change feed file and delete the pieces (runs on a worker); returns the
    rows per kind of change."""
    folder = changes_folder(store, snapshot)
    paths = store.list(folder, ".parquet")
    pieces = pa.concat_tables([store.read_table(p).cast(CHANGES_SCHEMA) for p in paths]) if paths else CHANGES_SCHEMA.empty_table()
    changes = pair_pieces(pieces)
    write_changes(store, snapshot, changes)
    if paths:
        store.fs.rm(folder, recursive=True)
    counts = changes["change"].value_counts().to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def changes_file(snapshot: str) -> str:
    """A snapshot's change feed, relative to the catalog folder."""
    return f"snapshots/{snapshot}/changes.parquet"


def write_changes(store: Store, snapshot: str, changes: pa.Table) -> str:
    """Write a snapshot's change feed; returns its path relative to the catalog."""
    store.write_table(f"{store.catalog}/{changes_file(snapshot)}", changes)
    return changes_file(snapshot)


def read_files(store: Store, files: list[str], columns: list[str]) -> pa.Table:
    """Columns of snapshot files (relative to the catalog) as one table."""
    tables = [store.read_table(f"{store.catalog}/{f}", columns) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if tables else CATALOG_SCHEMA.empty_table().select(columns)


def rows_by_file(store: Store, files: list[str], columns: list[str]) -> pa.Table:
    """Columns of snapshot files (relative to the catalog) as one table, with each row's file (`_file`: its place in
    `files`) and its row number in that file (`_line`): snapshot files are immutable, so those name the row."""
    tables = []
    for number, name in enumerate(files):
        table = store.read_table(f"{store.catalog}/{name}", columns)
        tables.append(table.append_column("_file", pa.array(np.full(table.num_rows, number, np.int32)))
                      .append_column("_line", pa.array(np.arange(table.num_rows, dtype=np.int64))))
    empty = CATALOG_SCHEMA.empty_table().select(columns).append_column("_file", pa.array([], pa.int32())).append_column("_line", pa.array([], pa.int64()))
    return pa.concat_tables(tables, promote_options="permissive") if tables else empty


def snapshot_id(run_id: str) -> str:
    """A sortable, unique snapshot name."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{run_id.rsplit('-', 1)[-1]}"


def genre_file(snapshot: str, number: int) -> str:
    """A snapshot's file of one genre, relative to the catalog folder."""
    return f"snapshots/{snapshot}/genre-{number:03d}.parquet"


def pieces_folder(store: Store, snapshot: str) -> str:
    """Where tagging tasks leave their per-genre pieces before they are merged into the snapshot's files."""
    return f"{store.catalog}/snapshots/{snapshot}/_pieces"


def leaf_paths(name: str, kind: pa.DataType) -> list[str]:
    """The Parquet column paths of a field's leaves (what per-column writer options name): `m.key_value.key` and
    `m.key_value.value` for a map, `l.list.element` for a list, the name for a flat type."""
    if pa.types.is_map(kind):
        return [*leaf_paths(f"{name}.key_value.key", kind.key_type), *leaf_paths(f"{name}.key_value.value", kind.item_type)]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return leaf_paths(f"{name}.list.element", kind.value_type)
    if pa.types.is_struct(kind):
        return [p for child in kind for p in leaf_paths(f"{name}.{child.name}", child.type)]
    return [name]


def write_options(schema: pa.Schema) -> dict:
    """Parquet writer options of catalog files: zstd with dictionaries and statistics, but PLAIN_COLUMNS plain."""
    paths = {field.name: leaf_paths(field.name, field.type) for field in schema}
    plain = {p for name in PLAIN_COLUMNS if name in paths for p in paths[name]}
    others = [p for leaves in paths.values() for p in leaves if p not in plain]
    return {"compression": {**{p: "zstd" for p in others}, **{p: "none" for p in plain}},
            "use_dictionary": others, "write_statistics": others}


def write_rows(store: Store, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """Write catalog rows (a snapshot file or a tagging task's piece) with the catalog's write_options."""
    store.write_table(path, table, row_group_size, write_options(table.schema))


def in_file_order(table: pa.Table, kept: np.ndarray | None = None) -> pa.Table:
    """Catalog rows in FILE_ORDER as CATALOG_SCHEMA, only those whose `kept` is True when given: one take, no
    filtered copy first."""
    import pyarrow.compute as pc  # imported here, as in diff

    order = pc.sort_indices(table, sort_keys=FILE_ORDER)
    if kept is not None:
        order = order.filter(pa.array(kept[order.to_numpy()]))
    return table.take(order).cast(CATALOG_SCHEMA)


def write_genre(store: Store, relative: str, table: pa.Table, kept: np.ndarray | None = None) -> int:
    """Write one genre's rows (those `kept`, when given) as a snapshot file in FILE_ORDER (invisible to readers until
    promoted); returns its rows."""
    rows = in_file_order(table, kept)
    write_rows(store, f"{store.catalog}/{relative}", rows, ROW_GROUP_ROWS)
    return rows.num_rows


def promote(store: Store, pointer: dict, expected: str | None) -> None:
    """Switch readers to a snapshot with one atomic write of the pointer, if nobody else switched it meanwhile."""
    store.swap(f"{store.catalog}/{POINTER}", json.dumps(pointer, indent=2, sort_keys=True).encode(), expected)


def snapshot_names(store: Store) -> list[str]:
    """Names of the snapshot folders, oldest first (published or not)."""
    folder = f"{store.catalog}/snapshots"
    store.fs.invalidate_cache(folder)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []


def published_history(store: Store, current: CatalogPointer | None, keep: int) -> list[str]:
    """The newest `keep` snapshots that were published, oldest first (pointers before version 2 kept no history:
    then the folders up to the current one count)."""
    if current is None:
        return []
    if current.history is not None:
        return current.history[-keep:]
    return [n for n in snapshot_names(store) if n <= current.snapshot][-keep:]


def earlier(store: Store, previous: CatalogPointer | None, snapshot: str, keep: int) -> list[str]:
    """The `keep` newest snapshots published before `snapshot`; without a pointer (a first publish, or a pointer lost)
    the newest folders before it that hold a change feed (written before a switch: a publish that crashed earlier left
    none), so that a lost pointer costs no snapshot."""
    if previous is None:
        return [n for n in snapshot_names(store) if n < snapshot and store.exists(f"{store.catalog}/{changes_file(n)}")][-keep:]
    return published_history(store, previous, keep)


def prune(store: Store, keep: int = KEEP_SNAPSHOTS) -> list[str]:
    """Delete every snapshot but the `keep` newest published ones (a snapshot never published, left by a crash, goes
    at once); returns those deleted."""
    kept = set(published_history(store, published(store), max(1, keep)))
    old = [n for n in snapshot_names(store) if n not in kept]
    for name in old:
        store.fs.rm(f"{store.catalog}/snapshots/{name}", recursive=True)
    return old


def switch(store: Store, snapshot: str, files: dict[str, str], rows: int, model_version: str, run_id: str,
           keep: int = KEEP_SNAPSHOTS, **extra: object) -> CatalogPointer:
    """Publish a written snapshot (`files`: relative path -> genre): switch the pointer, then prune; returns the pointer."""
    path = f"{store.catalog}/{POINTER}"
    expected = store.version_token(path)
    previous = published(store)
    new = {
        "snapshot": snapshot,
        "files": sorted(files),
        "genres": files,
        "rows": rows,
        "catalog_version": CATALOG_VERSION,
        "model_version": model_version,
        "run_id": run_id,
        "published_at": datetime.now(timezone.utc).isoformat(),
        "history": (earlier(store, previous, snapshot, keep - 1) if keep > 1 else []) + [snapshot],
        **extra,
    }
    promote(store, new, expected)
    prune(store, keep)
    return CatalogPointer.parse(new)


def split_by_genre(table: pa.Table) -> dict[str, pa.Table]:
    """A catalog table's rows per genre, genres in sorted order."""
    import pyarrow.compute as pc  # imported here, as in diff

    return {g: table.filter(pc.equal(table["genre"], g)) for g in sorted(pc.unique(table["genre"]).to_pylist())}


def publish(store: Store, table: pa.Table, run_id: str, model_version: str, vector_space: dict, keep: int = KEEP_SNAPSHOTS) -> CatalogPointer:
    """Write a catalog table held in this process (embeddings in the space `vector_space` describes) as a new
    snapshot with its similar table, and publish it; returns the pointer."""
    from genre_batch.publishing import similar

    snapshot = snapshot_id(run_id)
    files = {}
    for number, (genre, rows) in enumerate(split_by_genre(table).items()):
        files[genre_file(snapshot, number)] = genre
        write_genre(store, genre_file(snapshot, number), rows)
    previous = published(store)
    changes = write_changes(store, snapshot, diff(read_files(store, previous.files if previous else [], DIFF_COLUMNS), table))
    update = similar.plan_update(store, previous, vector_space["name"], table.select(similar.KEYS))
    neighbours = similar.build(store, snapshot, sorted(files), update, similar.in_process)
    return switch(store, snapshot, files, table.num_rows, model_version, run_id, keep, changes=changes,
                  vector_space=vector_space, similar=neighbours)


def files(store: Store) -> list[str]:
    """Full paths of the published snapshot's files."""
    return [f"{store.catalog}/{name}" for name in required(store).files]


def read(store: Store, columns: list[str] | None = None) -> pa.Table:
    """The published catalog as one Arrow table (for small catalogs and tests: readers of large ones use DuckDB)."""
    paths = files(store)
    if not paths:
        return CATALOG_SCHEMA.empty_table() if columns is None else CATALOG_SCHEMA.empty_table().select(columns)
    return pa.concat_tables([store.read_table(p, columns) for p in paths], promote_options="permissive")
