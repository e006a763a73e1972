"""Catalog: immutable Parquet snapshots published by one atomic pointer switch; the last N kept."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa

from genre_batch import GenreBatchError
from genre_batch.store import Store, read_json, read_table, swap_bytes, version_token, write_table

CATALOG_VERSION = 1
KEEP_SNAPSHOTS = 5
POINTER = "CURRENT.json"

SNAPSHOT_ORDER = [("genre", "ascending"), ("confidence", "descending")]
ROW_GROUP_ROWS = 100_000
"""Snapshot rows are sorted by SNAPSHOT_ORDER into row groups of ROW_GROUP_ROWS: a query on one genre skips the
other genres' row groups by their statistics and finds its most confident tracks first."""

CATALOG_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("uri", pa.string()),
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
    ]
).with_metadata({"genre_batch.catalog_version": str(CATALOG_VERSION)})
"""Catalog schema, version CATALOG_VERSION (documented in the README)."""


def snapshot_id(run_id: str) -> str:
    """A sortable, unique snapshot name."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{run_id.rsplit('-', 1)[-1]}"


def write_snapshot(store: Store, table: pa.Table, snapshot: str) -> list[str]:
    """Write a snapshot's files, rows in SNAPSHOT_ORDER (invisible to readers until promoted); paths relative to the catalog."""
    relative = f"snapshots/{snapshot}/catalog.parquet"
    write_table(store.fs, f"{store.catalog}/{relative}", table.sort_by(SNAPSHOT_ORDER), ROW_GROUP_ROWS)
    return [relative]


def promote(store: Store, pointer: dict, expected: str | None) -> None:
    """Switch readers to a snapshot with one atomic write of the pointer, if nobody else switched it meanwhile."""
    swap_bytes(store.fs, f"{store.catalog}/{POINTER}", json.dumps(pointer, indent=2, sort_keys=True).encode(), expected)


def pointer(store: Store) -> dict | None:
    """The published snapshot's pointer, or None before the first publish."""
    path = f"{store.catalog}/{POINTER}"
    return read_json(store.fs, path) if store.fs.exists(path) else None


def prune(store: Store, keep: int = KEEP_SNAPSHOTS) -> list[str]:
    """Delete snapshots older than the newest `keep` (never the published one); returns those deleted."""
    folder = f"{store.catalog}/snapshots"
    store.fs.invalidate_cache(folder)
    if not store.fs.exists(folder):
        return []
    current = (pointer(store) or {}).get("snapshot")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(folder, detail=False))
    old = [n for n in names[:-keep] if n != current] if keep > 0 else []
    for name in old:
        store.fs.rm(f"{folder}/{name}", recursive=True)
    return old


def publish(store: Store, table: pa.Table, run_id: str, model_version: str, keep: int = KEEP_SNAPSHOTS) -> dict:
    """Write a new snapshot, switch the pointer to it, then prune old snapshots; returns the pointer."""
    snapshot = snapshot_id(run_id)
    expected = version_token(store.fs, f"{store.catalog}/{POINTER}")
    new = {
        "snapshot": snapshot,
        "files": write_snapshot(store, table, snapshot),
        "rows": table.num_rows,
        "catalog_version": CATALOG_VERSION,
        "model_version": model_version,
        "run_id": run_id,
        "published_at": datetime.now(timezone.utc).isoformat(),
    }
    promote(store, new, expected)
    prune(store, keep)
    return new


def files(store: Store) -> list[str]:
    """Full paths of the published snapshot's files."""
    current = pointer(store)
    if current is None:
        raise GenreBatchError(f"no published catalog in {store.url}: run 'genre-batch tag' or 'run' first")
    return [f"{store.catalog}/{name}" for name in current["files"]]


def read(store: Store) -> pa.Table:
    """The published catalog as one Arrow table."""
    return pa.concat_tables([read_table(store.fs, path) for path in files(store)])
