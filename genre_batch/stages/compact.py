"""The compact stage: rewrite the current window rows into large parts on Dask, then delete what they replace.

Every family's current rows are carried (its own parts, `features/<family folder>/compact-<id>-NNNNN.parquet`, one
index file for all). Steps, each safe to die at: (1) finish or undo an earlier compaction (`repair`); (2) workers copy the current rows
into new parts `compact-<id>-NNNNN.parquet` (a crash here leaves orphan parts that the next repair deletes);
(3) one index file `index/compact-<id>.parquet` is written, naming the index files and parts it replaces: from then
on readers use the new parts; (4) the replaced index files are deleted, then the replaced parts (a crash here is
finished by the next repair). Readers see every current row exactly once at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from genre_batch.cluster import Session
from genre_batch.feature_store import (
    COMPACT_PREFIX, COMPACT_TARGET_WINDOWS, FAMILIES, INDEX_SCHEMA, KEYS, LIBROSA, Family, batches, commit_compaction, compact_group,
    compaction_id, failed, finish_compactions, needs_compaction, read_inventory, repair, resolved, resolved_keys, stored_index, succeeded,
)
from genre_batch.store import Store

KEEP_COLUMNS = ["uri", "fingerprint", "family", "feature_version", "error_type", "extracted_at"]
"""Index columns that decide which rows are current."""


@dataclass
class CompactSummary:
    """What a compaction did."""

    parts_before: int
    parts_after: int
    index_rows_before: int
    index_rows_after: int
    tracks: int


@dataclass
class Selection:
    """What a compaction replaces and carries: the current rows of every family, read from the listed index files."""

    current: dict[Family, pa.Table]
    replaced_parts: list[str]
    index_rows: int


def select(store: Store, files: list[str]) -> Selection:
    """The current rows of the library as last listed, from the given index files (the whole index is dropped once
    they are taken)."""
    index = stored_index(store, files=files)  # a shard finishing late writes its part, then its index: both stay
    replaced_parts = sorted(set(pc.unique(index["part"].drop_null()).to_pylist()) | {p.rsplit("/", 1)[-1] for p in files})
    inventory = read_inventory(store, KEYS)
    return Selection({f: resolved(index, inventory, f) for f in FAMILIES.values()}, replaced_parts, index.num_rows)


def compact(store: Store, session: Session, target_windows: int = COMPACT_TARGET_WINDOWS) -> CompactSummary:
    """Rewrite the current rows of the library as last listed into parts of about `target_windows` windows."""
    repair(store)
    files = store.list(store.index, ".parquet")
    chosen = select(store, files)
    cid = compaction_id()
    work = [(f, batch) for f, rows in chosen.current.items() for batch in batches(succeeded(rows), target_windows)]
    tracks = succeeded(chosen.current[LIBROSA]).num_rows
    errors = [failed(rows) for rows in chosen.current.values()]
    chosen.current.clear()  # the workers' batches carry the rows from here on
    new_rows = session.run([(compact_group, store, batch, f"{COMPACT_PREFIX}{cid}-{i:05d}.parquet", f) for i, (f, batch) in enumerate(work)])
    new_index = pa.concat_tables([*new_rows, *errors]).cast(INDEX_SCHEMA)
    commit_compaction(store, cid, new_index, [p.rsplit("/", 1)[-1] for p in files], chosen.replaced_parts)
    finish_compactions(store)
    parts_after = sum(1 for f, _ in work if f == LIBROSA)
    return CompactSummary(len(chosen.replaced_parts), parts_after, chosen.index_rows, new_index.num_rows, tracks)


def current_rows(index: pa.Table, inventory: pa.Table) -> int:
    """Index rows standing for a current file, over every family."""
    return sum(resolved_keys(index, inventory, f).num_rows for f in FAMILIES.values())


def needed(store: Store) -> bool:
    """Whether the store is past the automatic compaction threshold (feature_store.AUTO_COMPACT_*)."""
    index = stored_index(store, KEEP_COLUMNS)
    return needs_compaction(store, index.num_rows, current_rows(index, read_inventory(store, KEYS)))
