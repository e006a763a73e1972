"""The tag stage: predict on the workers, part by part, and publish a snapshot of one file per genre.

With the model of the published snapshot unchanged, only new and changed tracks are predicted: the rows of unchanged
tracks are carried over from the previous snapshot, those of removed and changed tracks dropped. The result equals a
full re-tag (same tracks, genres and probabilities); a new model re-tags everything.

Each row carries its embedding in the snapshot's vector space and its musicnn tags (genre_batch.publishing.vectors); a new vector
space re-tags everything too. Before the switch the snapshot gets its faiss index and `similar` table
(genre_batch.publishing.similar): updated from the previous snapshot's when the space is the same, else built afresh.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genre_batch import GenreBatchError, PublishRefused, progress
from genre_batch.analysis.columns import FEATURE_VERSION
from genre_batch.cluster import Session, trim_memory
from genre_batch.library.labels import without_written
from genre_batch.library.writeback import written
from genre_batch.modelling import registry, training
from genre_batch.modelling.registry import ModelCard
from genre_batch.publishing import catalog, similar, vectors
from genre_batch.publishing.pointer import CatalogPointer, published
from genre_batch.publishing.tagging import batch_windows, genres_of, merge_genre, tag_batch
from genre_batch.publishing.vectors import VectorSpace
from genre_batch.storage.feature_store import (
    FAMILIES,
    KEYS,
    LIBROSA,
    MUSICNN,
    TRACK_COLUMNS,
    batches,
    current_positions,
    index_rows,
    lacking,
    listing_positions,
    read_inventory,
)
from genre_batch.storage.store import Store


PUBLISH_STEPS = ("merge tasks", "change feed", "similar plan", "similar build", "switch")
"""The tag stage's steps after its tag tasks, reported as progress of stage `publish` (the similar build is the longest)."""


def peak_rss_mb() -> float:
    """High-water RSS of this process so far, in MB: Linux's VmHWM, not ru_maxrss, which starts at the high-water mark
    of the process that spawned this one (a Dask worker's at its nanny's, the nanny's at the flow process's); ru_maxrss
    (KB) where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1e3 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


@dataclass
class Steps:
    """Per step of a stage, in this (the flow) process: wall and CPU seconds, and the peak RSS so far in MB; with
    `others`, also the CPU seconds other processes (the Dask workers) spent meanwhile, as `others()` counts them."""

    others: Callable[[], float] | None = None
    taken: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Measure the block as step `name` (a repeated name adds up)."""
        wall, cpu, other = time.perf_counter(), time.process_time(), self.others() if self.others else 0.0
        yield
        row = self.taken.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        row["wall_s"] = round(row["wall_s"] + time.perf_counter() - wall, 3)
        row["cpu_s"] = round(row["cpu_s"] + time.process_time() - cpu, 3)
        row["peak_rss_mb"] = round(peak_rss_mb())
        if self.others:
            row["others_cpu_s"] = round(row.get("others_cpu_s", 0.0) + self.others() - other, 3)

    @contextmanager
    def publishing(self, name: str) -> Iterator[None]:
        """Measure one of PUBLISH_STEPS, reporting progress of stage `publish` as it starts (and when the last ends)."""
        number = PUBLISH_STEPS.index(name)
        progress.report(progress.Report("publish", number, len(PUBLISH_STEPS), note=name))
        with self.step(name):
            yield
        if number == len(PUBLISH_STEPS) - 1:
            progress.report(progress.Report("publish", len(PUBLISH_STEPS), len(PUBLISH_STEPS), note="published"))


@dataclass
class TagSummary:
    """What a tagging published."""

    snapshot: str
    rows: int
    model_version: str
    genres: dict[str, int]
    disagreements: int
    mode: str
    """`full` (every track predicted), `incremental` (new and changed tracks predicted) or `unchanged` (nothing to do)."""
    predicted: int = 0
    carried: int = 0
    dropped: int = 0
    """Rows of the previous snapshot left out: removed files, and the old rows of changed ones."""
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    """Wall, CPU and peak RSS of the flow process per step (Steps)."""


GENRE_FLIP_LIMIT = 0.3
"""A new model that changes the genre of more than this share of the tracks the published catalog holds is not
published unless forced: the previous catalog stays."""


def check_families(store: Store, card: ModelCard, current: dict[str, np.ndarray]) -> None:
    """Refuse a model trained on a family (or family version) that this genre-batch does not extract, or that some
    current track of the store lacks, naming it: the model is fed exactly the families it was trained on."""
    version, families = card.version, card.families
    for name, family_version in families.items():
        family = FAMILIES.get(name)
        if family is None or family.version != family_version:
            have = f"version {family.version}" if family else "no such family"
            raise GenreBatchError(
                f"current model {version} was trained on feature family {name} version {family_version}, this genre-batch "
                f"extracts {have}: retrain with 'genre-batch train' or promote another model ('genre-batch models rollback')"
            )
    missing = lacking(current, list(families))
    if missing:
        name, count = next(iter(missing.items()))
        raise GenreBatchError(
            f"current model {version} needs feature family {name} (version {families[name]}), which {count} of the "
            f"{current[LIBROSA.name].size} tracks of {store.url} lack: backfill it with 'genre-batch extract LIBRARY --features "
            f"librosa,{name}' (--backfill-cap files per run) until none is left, or promote a model trained without it"
        )


def can_carry(previous: CatalogPointer | None, version: str, space: VectorSpace | None) -> bool:
    """Whether the previous snapshot's rows can be carried over: same model, catalog version and vector space (else
    everything is predicted: a version 2 snapshot's rows lack embeddings and tags)."""
    return (previous is not None and space is not None and previous.model_version == version
            and previous.catalog_version == catalog.CATALOG_VERSION and previous.space_name == space.name)


CARRY_COLUMNS = [*KEYS, "track_id"]
"""What the flow process reads of the previous snapshot: the keys that say which rows carry over, and the track_id
that the similar index's update needs of them."""


@dataclass(frozen=True)
class Carried:
    """How the previous snapshot's rows carry over into the next one."""

    todo: np.ndarray
    """Listing rows of the current tracks to predict: new content, or not in the previous snapshot."""
    dropped: dict[str, np.ndarray]
    """Per file of the previous snapshot, the numbers of its rows left out (removed files, old content of changed ones)."""
    kept: pa.Table
    """similar.KEYS of the rows carried over."""

    @property
    def dropped_rows(self) -> int:
        """Rows of the previous snapshot left out."""
        return sum(len(d) for d in self.dropped.values())


def carried_over(store: Store, previous: CatalogPointer, inventory: pa.Table, tracks: np.ndarray) -> Carried:
    """Which rows of the previous snapshot carry over, given the listing rows of the current tracks (`tracks`): a row
    carries over when its (uri, fingerprint) is a current track's, matched on listing positions, not string joins."""
    rows = catalog.rows_by_file(store, previous.files, CARRY_COLUMNS)
    at = listing_positions(rows, inventory)
    current = np.zeros(inventory.num_rows, bool)
    current[tracks] = True
    kept = at >= 0
    kept[kept] = current[at[kept]]
    listed = np.zeros(inventory.num_rows, bool)
    listed[at[kept]] = True
    files, lines = rows["_file"].to_numpy(), rows["_line"].to_numpy()
    dropped = {previous.files[f]: lines[~kept & (files == f)] for f in np.unique(files[~kept]).tolist()}
    return Carried(tracks[~listed[tracks]], dropped, rows.filter(pa.array(kept)).select(similar.KEYS))


def flipped_share(changes: dict[str, int], previous_rows: int) -> float:
    """Share of the tracks of the published snapshot that a change feed (rows per kind) gives another genre (removed
    ones aside)."""
    kept = previous_rows - changes.get("removed", 0)
    return changes.get("genre_changed", 0) / kept if kept else 0.0


def check_flips(store: Store, snapshot: str, changes: dict[str, int], previous_rows: int, version: str, previous_version: str) -> None:
    """Refuse (and delete) a written snapshot whose new model flips more than GENRE_FLIP_LIMIT of the genres."""
    share = flipped_share(changes, previous_rows)
    if share > GENRE_FLIP_LIMIT:
        store.fs.rm(f"{store.catalog}/snapshots/{snapshot}", recursive=True)
        raise PublishRefused(
            f"model {version} gives {share:.0%} of the catalog's tracks another genre than model {previous_version} "
            f"(over the {GENRE_FLIP_LIMIT:.0%} limit): the previous catalog stays; check it ('genre-batch models show {version}'), "
            "then publish with --force or go back with 'genre-batch models rollback'"
        )


def change_groups(previous: CatalogPointer | None, files: dict[str, str]) -> list[tuple[list[str], list[str]]]:
    """The previous and the new snapshot's files of each genre, to diff genre by genre (a previous pointer that does not
    name its genres is one group)."""
    old: dict[str, list[str]] = {}
    if previous:
        for name, genre in (previous.genres or {f: "" for f in previous.files}).items():
            old.setdefault(genre, []).append(name)
    new: dict[str, list[str]] = {}
    for name, genre in files.items():
        new.setdefault(genre, []).append(name)
    return [(sorted(old.get(g, [])), sorted(new.get(g, []))) for g in sorted(set(old) | set(new))]


def change_feed(store: Store, session: Session, snapshot: str, previous: CatalogPointer | None, files: dict[str, str], diffed: bool) -> dict[str, int]:
    """Write the snapshot's change feed on the workers (one diff per genre unless the merge tasks `diffed` each genre
    already, then one task pairs the pieces); returns its rows per kind of change."""
    if not diffed:
        session.run([(catalog.diff_genre, store, snapshot, n, before, after) for n, (before, after) in enumerate(change_groups(previous, files))])
    return session.run([(catalog.gather_changes, store, snapshot)])[0]


def workers_wanted(store: Store, previous: CatalogPointer | None, version: str) -> bool:
    """Whether the tag tasks will likely run: no snapshot yet, another model, or a library listing written after the
    snapshot was published. A hint for starting the cluster early (a wrong guess costs a cluster start, or the wait)."""
    if previous is None or previous.model_version != version:
        return True
    return store.exists(store.inventory) and store.fs.modified(store.inventory) > previous.published_at


def tag(store: Store, run_id: str, session: Session, keep: int = catalog.KEEP_SNAPSHOTS, full: bool = False, force: bool = False,
        steps: Steps | None = None) -> TagSummary:
    """Tag the library's current tracks with the current model on the workers and publish a snapshot; a new model
    that flips more than GENRE_FLIP_LIMIT of the genres is not published unless `force`; `steps` measures each step.

    The flow process reads the index's choice columns once for every family (which listing rows are current, and where
    their index rows are) and the previous snapshot's keys; whole index rows it reads only of the tracks to predict,
    from the index files that hold them (all of them for a full re-tag)."""
    steps = Steps() if steps is None else steps
    with steps.step("model, inventory"):
        card = registry.current(store)
        version = card.version
        previous = published(store)
        if full or workers_wanted(store, previous, version):
            session.start_soon()  # the workers start while this process reads the store (~7 s at 1M tracks)
        inventory = read_inventory(store, KEYS)
    with steps.step("current tracks (choice columns)"):
        current = current_positions(store, inventory)
        positions = current.positions()
        trim_memory()  # the choice columns of every index file, read and freed: ~500 MB at 1M kept by the allocators
    with steps.step("families, vector space"):
        check_families(store, card, positions)
        family = vectors.space_family(positions[LIBROSA.name].size, lacking(positions, [MUSICNN.name]).get(MUSICNN.name, 0))
        space = vectors.reusable(store, previous, family, positions[family.name].size)
    carried = None
    if not full and can_carry(previous, version, space):
        with steps.step("carried rows"):
            carried = carried_over(store, previous, inventory, positions[LIBROSA.name])
        if carried.todo.size == 0 and carried.dropped_rows == 0:
            return TagSummary(previous.snapshot, previous.rows, version, previous.genre_rows, previous.disagreements, "unchanged", 0,
                              previous.rows, 0, steps.taken)
    with steps.step("index rows to predict"):
        # from the index files that hold them, a group of files at a time: every current track's, or the ones to predict
        indexed = {name: index_rows(store, current, f, positions[name] if carried is None else carried.todo, TRACK_COLUMNS)
                   for name, f in FAMILIES.items()}
        todo = without_written(indexed[LIBROSA.name], written(store))  # tags genre-batch wrote: no disagreement
        todo = training.located(store, todo, inventory, list(card.families), indexed)
        musicnn = indexed[MUSICNN.name] = indexed[MUSICNN.name].select([*KEYS, *training.LOCATION])  # what tag tasks and the space read of it
        trim_memory()
    if space is None:
        with steps.step("vector space fit"):
            space = vectors.fitted(store, family, indexed[family.name], session.run)
    del indexed  # the tag tasks need `todo` and `musicnn` of it
    with steps.step("batches"):
        snapshot, tagged_at = catalog.snapshot_id(run_id), datetime.now(timezone.utc)
        genres = genres_of(card)
        work = batches(todo, batch_windows(int(pc.sum(todo["row_count"]).as_py() or 0)))
        calls = ((tag_batch, store, version, groups, run_id, tagged_at, snapshot, i, space, vectors.musicnn_rows(musicnn, groups))
                 for i, groups in enumerate(work))  # a batch's musicnn rows are joined when its task is submitted
        trim_memory()
    with steps.step("tag tasks"):
        predicted: Counter[str] = Counter()
        for _, task in session.completed(calls):  # progress of stage `tag`: tracks predicted
            predicted.update(task.result())
            progress.report(progress.Report("tag", predicted.total(), todo.num_rows))
    with steps.publishing("merge tasks"):
        carried_files = {g: f for f, g in previous.genres.items()} if carried is not None else {}
        numbers = [n for n, g in enumerate(genres) if predicted[g] or g in carried_files]
        dropped = carried.dropped if carried is not None else {}
        merged = session.run([(merge_genre, store, snapshot, n, carried_files.get(genres[n]), dropped.get(carried_files.get(genres[n])), carried is not None)
                              for n in numbers])
        if work:
            store.fs.rm(catalog.pieces_folder(store, snapshot), recursive=True)
    files = {catalog.genre_file(snapshot, n): genres[n] for n, (rows, _) in zip(numbers, merged) if rows}
    counts = {genres[n]: rows for n, (rows, _) in zip(numbers, merged) if rows}
    total = sum(counts.values())
    disagreements = sum(d for _, d in merged)
    with steps.publishing("change feed"):
        changes = change_feed(store, session, snapshot, previous, files, diffed=carried is not None)
    if previous is not None and previous.model_version != version and not force:
        check_flips(store, snapshot, changes, previous.rows, version, previous.model_version)
    with steps.publishing("similar plan"):
        after = todo.select(similar.KEYS) if carried is None else pa.concat_tables([carried.kept, todo.select(similar.KEYS)], promote_options="permissive")
        update = similar.plan_update(store, previous, space.name, after)
    with steps.publishing("similar build"):
        neighbours = similar.build(store, snapshot, sorted(files), update, session.run)
    with steps.publishing("switch"):
        catalog.switch(store, snapshot, files, total, version, run_id, keep, genre_rows=counts, disagreements=disagreements,
                       feature_version=FEATURE_VERSION, changes=catalog.changes_file(snapshot), vector_space=space.describe(),
                       similar=neighbours)
    return TagSummary(
        snapshot=snapshot, rows=total, model_version=version,
        genres=dict(sorted(counts.items(), key=lambda kv: -kv[1])), disagreements=disagreements,
        mode="full" if carried is None else "incremental", predicted=todo.num_rows,
        carried=total - todo.num_rows, dropped=0 if carried is None else carried.dropped_rows, steps=steps.taken,
    )
