"""Feature store: immutable Parquet parts per shard, resolved against the library inventory."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from genre_batch.discovery import INVENTORY_SCHEMA
from genre_batch.features import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.store import Store, list_files, read_table, write_table

TIMESTAMP = pa.timestamp("ms", tz="UTC")

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
"""Schema of an error part: one row per file that could not be processed."""

KEYS = ["uri", "fingerprint"]


def read_parts(store: Store, folder: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Concatenate the Parquet parts of a folder (an empty table if there are none)."""
    files = list_files(store.fs, folder, ".parquet")
    if not files:
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables([read_table(store.fs, f, columns) for f in files])


def read_inventory(store: Store) -> pa.Table:
    """The library listing of the last completed extraction (empty if none)."""
    if not store.fs.exists(store.inventory):
        return INVENTORY_SCHEMA.empty_table()
    return read_table(store.fs, store.inventory)


def write_inventory(store: Store, inventory: pa.Table) -> bool:
    """Record the library listing; returns False (and writes nothing) when it is unchanged."""
    previous = read_inventory(store)
    if previous.select(KEYS).equals(inventory.select(KEYS)) and previous.schema.metadata == inventory.schema.metadata:
        return False
    write_table(store.fs, store.inventory, inventory)
    return True


RETRIED_ERRORS = ("io_error",)
"""Error kinds retried by the next run even if the file is unchanged: the file may read fine once storage recovers."""


def processed(store: Store) -> pa.Table:
    """(uri, fingerprint) of every file already extracted, or failed for good, with the current feature version."""
    cols = KEYS + ["feature_version"]
    errors = read_parts(store, store.error_parts, ERROR_SCHEMA, cols + ["error_type"])
    final = errors.filter(pc.invert(pc.is_in(errors["error_type"], value_set=pa.array(RETRIED_ERRORS)))).select(cols)
    done = pa.concat_tables([read_parts(store, store.feature_parts, FEATURE_SCHEMA, cols), final])
    return done.filter(pc.equal(done["feature_version"], FEATURE_VERSION)).select(KEYS)


def plan(inventory: pa.Table, store: Store, force: bool = False) -> pa.Table:
    """The inventory rows that need extraction: new, changed, or every row when `force`."""
    if force:
        return inventory
    done = processed(store)
    if done.num_rows == 0:
        return inventory
    return inventory.join(done.group_by(KEYS).aggregate([]), keys=KEYS, join_type="left anti").sort_by("uri")


def newest_per_uri(table: pa.Table, time_column: str) -> pa.Table:
    """Keep each URI's rows of its newest extraction (all of that extraction's windows)."""
    if table.num_rows == 0:
        return table
    newest = table.group_by("uri").aggregate([(time_column, "max")]).select(["uri", f"{time_column}_max"])
    joined = table.join(newest.rename_columns(["uri", "_newest"]), keys="uri")
    keep = joined.filter(pc.equal(joined[time_column], joined["_newest"])).drop_columns("_newest")
    order = [("uri", "ascending")] + ([("window", "ascending")] if "window" in keep.column_names else [])
    return keep.sort_by(order)


def live(table: pa.Table, inventory: pa.Table) -> pa.Table:
    """Rows of the current feature version whose (uri, fingerprint) is in the inventory."""
    current = table.filter(pc.equal(table["feature_version"], FEATURE_VERSION))
    keep = pc.is_in(
        pc.binary_join_element_wise(current["uri"], current["fingerprint"], "\x00"),
        value_set=pc.binary_join_element_wise(inventory["uri"], inventory["fingerprint"], "\x00"),
    )
    return current.filter(keep)


PROVENANCE_COLUMNS = [f.name for f in PROVENANCE_SCHEMA]


def current_features(store: Store, columns: list[str] | None = None) -> pa.Table:
    """The window rows of every file of the library as last listed, from its newest extraction of its current content.

    `columns` reads only those columns (they must include uri, fingerprint, feature_version, extracted_at).
    """
    table = live(read_parts(store, store.feature_parts, FEATURE_SCHEMA, columns), read_inventory(store))
    return newest_per_uri(table, "extracted_at")


def tracks(windows: pa.Table) -> pa.Table:
    """One row per track (its first window) of a feature table."""
    return windows.filter(pc.equal(windows["window"], 0))


def current_errors(store: Store) -> pa.Table:
    """One row per file of the library that failed on its current content and has no features."""
    inventory = read_inventory(store)
    errors = newest_per_uri(live(read_parts(store, store.error_parts, ERROR_SCHEMA), inventory), "occurred_at")
    ok = current_features(store, KEYS + ["feature_version", "extracted_at"])
    return errors.filter(pc.invert(pc.is_in(errors["uri"], value_set=ok["uri"])))
