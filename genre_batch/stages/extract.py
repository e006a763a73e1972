"""The extract stage: list the library, plan against the track index, extract new and changed files on Dask."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from genre_batch import GenreBatchError, PublishRefused
from genre_batch.cluster import Session
from genre_batch.library.discovery import discover, unlisted, unlisted_text
from genre_batch.storage.feature_store import (
    BACKFILL_CAP,
    CHOICE_COLUMNS,
    FAMILIES,
    KEYS,
    LIBROSA,
    MUSICNN,
    Family,
    needs_rows,
    plan_run,
    read_index,
    read_inventory,
    repair,
    write_inventory,
)
from genre_batch.storage.store import Store

if TYPE_CHECKING:
    from genre_batch.analysis.extraction import Progress

LISTING_SHRINK_LIMIT = 0.3
"""A listing with more than this share fewer files than the previous one, or without more than this share of the
previous one's files (neither listed again nor moved), is refused unless forced (an empty or unmounted library, a wrong
prefix, another library): nothing is written, and the catalog keeps the files."""


def check_listing(previous: int, listed: int, library: str, force: bool) -> None:
    """Refuse a listing that shrank past LISTING_SHRINK_LIMIT, unless `force`."""
    if force or previous == 0 or (previous - listed) / previous <= LISTING_SHRINK_LIMIT:
        return
    raise PublishRefused(
        f"the listing of {library} has {listed} audio files, the previous one {previous}: {1 - listed / previous:.0%} fewer, "
        f"over the {LISTING_SHRINK_LIMIT:.0%} limit (an empty or unmounted library, or a wrong prefix?); nothing was changed: "
        "pass --force if the files are really gone"
    )


def no_progress(done: int, total: int, errors: int) -> None:
    """A progress callback that ignores progress."""


@dataclass
class ExtractSummary:
    """What an extraction did."""

    library: str
    discovered: int = 0
    extracted: int = 0
    failed: int = 0
    unchanged: int = 0
    moved: int = 0
    backfilled: int = 0
    """Of the files extracted, those extracted only for a family they lacked (their librosa rows untouched)."""
    backfill_left: int = 0
    """Files still lacking a family of the run after it (over --backfill-cap): later runs continue."""
    removed: int = 0
    unlisted: list[str] = field(default_factory=list)
    """Folders the listing could not read and names that are not UTF-8, "path: reason": what the previous listing had
    there was kept as it was."""
    shards: int = 0
    repaired_parts: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


DEFAULT_FEATURES = (LIBROSA.name, MUSICNN.name)
"""Families extracted when a run names none: librosa and musicnn, what the default model (librosa+musicnn / linear, #14
item 3) is trained on. musicnn costs ~105 ms more CPU per file at 3 patches, 2.75x the decode+STFT floor with librosa,
within #14's 3.0x budget; `--features librosa` opts out."""


def families_of(names: tuple[str, ...] | list[str]) -> list[Family]:
    """The families a run extracts, librosa always first (the track index and the catalog rest on it)."""
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise GenreBatchError(f"unknown feature family {', '.join(unknown)}: choose from {', '.join(FAMILIES)}")
    return [f for f in FAMILIES.values() if f == LIBROSA or f.name in names]


def extract(
    library: str, store: Store, run_id: str, session: Session, force: bool = False, on_progress: Progress = no_progress,
    allow_shrink: bool = False, features: tuple[str, ...] = DEFAULT_FEATURES, backfill_cap: int = BACKFILL_CAP,
) -> ExtractSummary:
    """Discover the library, extract new and changed files on Dask (every family of `features`), backfill at most
    `backfill_cap` files lacking a family, record moved files, then the library listing.

    `force` re-extracts every file; it, or `allow_shrink`, also accepts a listing that shrank past the limit."""
    families = families_of(features)
    repaired = repair(store)
    previous = read_inventory(store)
    listed = discover(library)
    inventory = with_unlisted(listed, previous)
    kept = inventory.num_rows - listed.num_rows
    check_listing(previous.num_rows, inventory.num_rows, library, force or allow_shrink)
    index = read_index(store, CHOICE_COLUMNS)
    todo = plan_run(listed, index, families, force, backfill_cap)
    if needs_rows(todo, index):  # files moved (rare): plan again on whole rows, which the moves file carries
        del index
        todo = plan_run(listed, read_index(store), families, force, backfill_cap)
    summary = ExtractSummary(
        library=inventory.schema.metadata[b"library"].decode(), discovered=inventory.num_rows,
        unchanged=todo.unchanged + kept, moved=todo.moved_files, repaired_parts=len(repaired),
        backfilled=todo.backfill, backfill_left=todo.backfill_left, unlisted=unlisted_text(inventory),
    )
    removed = removed_count(previous, inventory)
    check_gone(previous.num_rows, removed - todo.moved_files, library, force or allow_shrink)
    if todo.moved.num_rows:
        store.write_table(f"{store.index}/{run_id}-moves.parquet", todo.moved)
    if todo.todo.num_rows:
        from genre_batch.analysis.extraction import run_shards  # audio decoding and numba: not for a run with nothing to extract

        result = run_shards(session, store, todo.todo, run_id, on_progress)
        if result.shard_failures:
            raise GenreBatchError("extraction failed on the cluster: " + "; ".join(result.shard_failures))
        summary.extracted, summary.failed, summary.shards = result.extracted, result.failed, result.shards
        summary.wall_s, summary.cpu_s = round(result.wall_s, 3), round(result.cpu_s, 3)
    summary.removed = removed
    write_inventory(store, inventory)
    return summary


@dataclass
class DryRun:
    """What an extraction would do, found without the lease and without writing anything."""

    library: str
    discovered: int
    new: int
    changed: int
    retried: int
    forced: int
    """Files re-extracted only because of `force` (moved or unchanged without it)."""
    backfill: int
    """Files extracted only for feature families they lack (at most the backfill cap per family)."""
    backfill_left: int
    """Files that would still lack a family after the run (over the cap)."""
    moved: int
    removed: int
    unchanged: int
    refused: str | None
    """Why the listing guard would refuse the run (None: it would go on)."""
    unlisted: list[str]
    """What the listing skipped, as ExtractSummary has it."""


def dry_run(library: str, store: Store, force: bool = False, allow_shrink: bool = False,
            features: tuple[str, ...] = DEFAULT_FEATURES, backfill_cap: int = BACKFILL_CAP) -> DryRun:
    """The plan of an extraction of some feature families: new, changed, retried (failed before), forced, backfilled,
    moved, removed and unchanged files (`force`, `allow_shrink`, `features` and `backfill_cap` as extract takes them)."""
    previous = read_inventory(store)
    listed = discover(library)
    inventory = with_unlisted(listed, previous)
    kept = inventory.num_rows - listed.num_rows
    index = read_index(store, CHOICE_COLUMNS)
    run = plan_run(listed, index, families_of(features), False, backfill_cap)
    needed = run.todo.filter(pc.equal(pc.list_element(run.todo["families"], 0), LIBROSA.name)).select(KEYS)  # new, changed, retried: every family
    known = int(pc.sum(pc.is_in(needed["uri"], value_set=previous["uri"])).as_py() or 0)
    same = needed.join(previous.select(["uri", "fingerprint"]), keys=["uri", "fingerprint"], join_type="left semi").num_rows
    removed = removed_count(previous, inventory)
    try:
        check_listing(previous.num_rows, inventory.num_rows, library, force or allow_shrink)
        check_gone(previous.num_rows, removed - run.moved_files, library, force or allow_shrink)
        refused = None
    except PublishRefused as e:
        refused = str(e)
    rest = listed.num_rows - needed.num_rows  # what `force` re-extracts too (not the files kept under unread folders)
    return DryRun(
        library=inventory.schema.metadata[b"library"].decode(), discovered=inventory.num_rows,
        new=needed.num_rows - known, changed=known - same, retried=same, forced=rest if force else 0,
        backfill=0 if force else run.backfill, backfill_left=0 if force else run.backfill_left,
        moved=0 if force else run.moved_files, removed=removed, unchanged=kept + (0 if force else run.unchanged),
        refused=refused, unlisted=unlisted_text(inventory),
    )


def with_unlisted(listed: pa.Table, previous: pa.Table) -> pa.Table:
    """The listing with the previous listing's files under the folders it could not read, kept as they were: neither
    removed nor extracted (the plan is made on `listed` alone)."""
    folders = [u.path.rstrip("/") + "/" for u in unlisted(listed) if u.unreadable]
    if not folders or previous.num_rows == 0:
        return listed
    uris = previous["uri"].to_pylist()  # sorted: every listing is written in URI order
    rows = [i for folder in folders
            for i in range(bisect_left(uris, folder), bisect_left(uris, folder[:-1] + chr(ord("/") + 1)))]
    kept = previous.take(pa.array(rows, pa.int64())).select(listed.column_names).cast(listed.schema)
    return pa.concat_tables([listed, kept]).sort_by("uri").replace_schema_metadata(listed.schema.metadata)


def check_gone(previous: int, gone: int, library: str, force: bool) -> None:
    """Refuse a listing without more than LISTING_SHRINK_LIMIT of the previous listing's files (`gone`: neither listed
    again nor moved), unless `force`: another library, or a wrong folder, of about as many files."""
    if force or previous == 0 or gone / previous <= LISTING_SHRINK_LIMIT:
        return
    raise PublishRefused(
        f"{gone} of the {previous} files of the previous listing ({gone / previous:.0%}) are not in the listing of {library} "
        f"(nor moved in it), over the {LISTING_SHRINK_LIMIT:.0%} limit (another library, or a wrong folder?); nothing was "
        "changed: pass --force if the files are really gone"
    )


def removed_count(previous: pa.Table, listed: pa.Table) -> int:
    """How many files of the previous listing are not in the new one."""
    return int(pc.sum(pc.invert(pc.is_in(previous["uri"], value_set=listed["uri"]))).as_py() or 0)


def library_of(store: Store) -> str:
    """The library the store's inventory was listed from."""
    meta = read_inventory(store).schema.metadata or {}
    if b"library" not in meta:
        raise GenreBatchError(f"the store {store.url} has no extracted library yet: run 'genre-batch extract' first")
    return meta[b"library"].decode()
