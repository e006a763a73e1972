"""The compact stage: rewrite the current window rows into large parts on Dask, then delete what they replace.

Every family's current rows are carried (its own parts, `features/<family folder>/compact-<id>-NNNNN.parquet`). The
flow process reads only the index's key columns (SOURCE_COLUMNS) to choose the current rows and deal them into groups;
each group's worker reads the whole rows, writes its part and then its piece of the new index (`index/compact-<id>-NNNNN.parquet`,
the part's name; failures get pieces without a part). Steps, each safe to die at: (1) finish or undo an earlier compaction
(`repair`); (2) workers write parts and index pieces, which readers ignore while the compaction has no commit file (a
crash here leaves orphans that the next repair deletes); (3) the commit file `index/compact-<id>.parquet` (no rows) is
written, naming the index files and parts it replaces: from then on readers use the pieces (a row both in a piece and
in a replaced file is the same extraction, chosen once); (4) the replaced index files are deleted, then the replaced
parts (a crash here is finished by the next repair). Readers see every current row exactly once at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genre_batch.cluster import Session
from genre_batch.storage.feature_store import (
    AUTO_COMPACT_PARTS,
    CHOICE_COLUMNS,
    COMPACT_PREFIX,
    COMPACT_TARGET_WINDOWS,
    ERROR_PIECE_ROWS,
    FAMILIES,
    KEYS,
    LIBROSA,
    SOURCE_COLUMNS,
    Family,
    commit_compaction,
    compact_group,
    compaction_id,
    finish_compactions,
    index_files,
    index_sources,
    needs_compaction,
    part_batches,
    read_inventory,
    repair,
    resolved_keys,
    sources_of,
    stored_index,
)
from genre_batch.storage.store import Store


@dataclass
class CompactSummary:
    """What a compaction did."""

    parts_before: int
    parts_after: int
    index_rows_before: int
    index_rows_after: int
    tracks: int


@dataclass
class Group:
    """One task of a compaction: the index rows (as files and row numbers) a worker copies into one part and its piece."""

    name: str
    family: Family | None
    """None: failure rows, an index piece without a part."""
    sources: list[tuple[str, np.ndarray]]


def groups(keys: pa.Table, inventory: pa.Table, files: list[str], cid: str, target_windows: int) -> list[Group]:
    """The compaction's tasks: per family, its current successful rows dealt into parts of about `target_windows`
    windows (a part never split), then every family's current failures in pieces of ERROR_PIECE_ROWS."""
    out: list[Group] = []
    failures = []
    for family in FAMILIES.values():
        picked = resolved_keys(keys, inventory, family)
        failures.append(keys.select(["_file", "_line"]).take(picked["_row"].filter(picked["_failed"])))
        rows = keys.select(["part", "row_count", "_file", "_line"]).take(picked["_row"].filter(pc.invert(picked["_failed"])))
        if rows.num_rows == 0:
            continue
        batch = part_batches(rows["part"], rows["row_count"], target_windows)
        order = np.argsort(batch, kind="stable")
        starts = np.flatnonzero(np.r_[True, batch[order][1:] != batch[order][:-1]])
        for chunk in np.split(order, starts[1:]):
            out.append(Group(f"{COMPACT_PREFIX}{cid}-{len(out):05d}.parquet", family, sources_of(rows.take(pa.array(chunk)), files)))
    failed = pa.concat_tables(failures)
    for start in range(0, failed.num_rows, ERROR_PIECE_ROWS):
        out.append(Group(f"{COMPACT_PREFIX}{cid}-{len(out):05d}.parquet", None, sources_of(failed.slice(start, ERROR_PIECE_ROWS), files)))
    return out


def compact(store: Store, session: Session, target_windows: int = COMPACT_TARGET_WINDOWS) -> CompactSummary:
    """Rewrite the current rows of the library as last listed into parts of about `target_windows` windows."""
    repair(store)
    files = index_files(store)
    keys = index_sources(store, files, SOURCE_COLUMNS)  # a shard finishing late writes its part, then its index: both stay
    replaced_parts = sorted(set(pc.unique(keys["part"].drop_null()).to_pylist()) | {p.rsplit("/", 1)[-1] for p in files})
    index_rows = keys.num_rows
    cid = compaction_id()
    work = groups(keys, read_inventory(store, KEYS), files, cid, target_windows)
    del keys  # the groups name the rows from here on
    written = session.run([(compact_group, store, g.name, g.family, g.sources) for g in work])
    commit_compaction(store, cid, [p.rsplit("/", 1)[-1] for p in files], replaced_parts)
    finish_compactions(store)
    tracks = sum(n for g, n in zip(work, written) if g.family == LIBROSA)
    return CompactSummary(len(replaced_parts), sum(1 for g in work if g.family == LIBROSA), index_rows, sum(written), tracks)


def current_rows(index: pa.Table, inventory: pa.Table) -> int:
    """Index rows standing for a current file, over every family."""
    return sum(resolved_keys(index, inventory, f).num_rows for f in FAMILIES.values())


def part_count(store: Store) -> int:
    """Parts of every family in the store."""
    return sum(len(store.list(f"{store.features}/{f.folder}", ".parquet")) for f in FAMILIES.values())


def needed(store: Store) -> bool:
    """Whether the store is past the automatic compaction threshold (feature_store.AUTO_COMPACT_*); the index is read
    only when the part count alone does not decide."""
    parts = part_count(store)
    if parts <= 1 or parts > AUTO_COMPACT_PARTS:
        return parts > 1
    index = stored_index(store, CHOICE_COLUMNS)
    return needs_compaction(parts, index.num_rows, current_rows(index, read_inventory(store, KEYS)))
