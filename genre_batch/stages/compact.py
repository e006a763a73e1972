"""The compact stage: rewrite the current window rows into large parts on Dask, then delete what they replace.

Steps, each safe to die at: (1) finish or undo an earlier compaction (`repair`); (2) workers copy the current rows
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
    COMPACT_PREFIX, COMPACT_TARGET_WINDOWS, INDEX_SCHEMA, batches, commit_compaction, compact_group, compaction_id,
    failed, finish_compactions, needs_compaction, read_inventory, repair, resolved, stored_index, succeeded,
)

KEEP_COLUMNS = ["uri", "fingerprint", "family", "feature_version", "error_type", "extracted_at"]
"""Index columns that decide which rows are current."""
from genre_batch.store import Store


@dataclass
class CompactSummary:
    """What a compaction did."""

    parts_before: int
    parts_after: int
    index_rows_before: int
    index_rows_after: int
    tracks: int


def compact(store: Store, session: Session, target_windows: int = COMPACT_TARGET_WINDOWS) -> CompactSummary:
    """Rewrite the current rows of the library as last listed into parts of about `target_windows` windows."""
    repair(store)
    files = store.list(store.index, ".parquet")
    index = stored_index(store, files=files)  # a shard finishing late writes its part, then its index: both stay
    replaced_index = [p.rsplit("/", 1)[-1] for p in files]
    replaced_parts = sorted(set(pc.unique(index["part"].drop_null()).to_pylist()) | set(replaced_index))
    current = resolved(index, read_inventory(store))
    tracks = succeeded(current)
    cid = compaction_id()
    groups = batches(tracks, target_windows)
    new_rows = session.run([(compact_group, store, batch, f"{COMPACT_PREFIX}{cid}-{i:05d}.parquet") for i, batch in enumerate(groups)])
    new_index = pa.concat_tables([*new_rows, failed(current)]) if new_rows else failed(current).cast(INDEX_SCHEMA)
    commit_compaction(store, cid, new_index, replaced_index, replaced_parts)
    finish_compactions(store)
    return CompactSummary(len(replaced_parts), len(groups), index.num_rows, new_index.num_rows, tracks.num_rows)


def needed(store: Store) -> bool:
    """Whether the store is past the automatic compaction threshold (feature_store.AUTO_COMPACT_*)."""
    index = stored_index(store, KEEP_COLUMNS)
    return needs_compaction(store, index.num_rows, resolved(index, read_inventory(store)).num_rows)
