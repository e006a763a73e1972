"""Prefect flows: extract, train, tag, compact and the nightly run. Thin: all logic is in genre_batch."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from genre_batch import progress
from genre_batch.cluster import Session, session
from genre_batch.stages import compact, extract, runs, tag, train
from genre_batch.store import Store

NIGHTLY_CRON = "0 2 * * *"
"""Default schedule of the nightly deployment: every day at 02:00 (UTC unless a timezone is given)."""


@task(name="extract", cache_policy=NO_CACHE)
def extract_task(library: str, store: Store, run_id: str, cluster: Session, force: bool) -> dict:
    """Extract features of new and changed files on Dask, with progress in Prefect and the CLI."""
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"extraction of {library}")

    def on_progress(done: int, total: int, errors: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / total if total else 100.0)
        logger.info("extracted %d/%d files, %d errors", done, total, errors)
        progress.report(done, total, errors)

    summary = runs.as_record(extract.extract(library, store, run_id, cluster, force, on_progress))
    logger.info("extraction: %s", summary)
    return summary


@task(name="compact", cache_policy=NO_CACHE)
def compact_task(store: Store, cluster: Session, when_needed: bool) -> dict | None:
    """Compact the feature store (when `when_needed`: only past the automatic threshold)."""
    if when_needed and not compact.needed(store):
        return None
    summary = runs.as_record(compact.compact(store, cluster))
    get_run_logger().info("compaction: %s", summary)
    return summary


@task(name="decide-training", cache_policy=NO_CACHE)
def decide_training_task(store: Store, labels: str, policy: str) -> tuple[bool, str]:
    """Whether the retrain policy asks for a new model."""
    return train.retrain_decision(store, labels, policy)


@task(name="train", cache_policy=NO_CACHE)
def train_task(store: Store, labels: str, run_id: str, cluster: Session, min_accuracy: float, abstain_below: float, group_by: str) -> dict:
    """Train, evaluate and register a model; promote it if it passes the gate."""
    summary = runs.as_record(train.train(store, labels, run_id, cluster, min_accuracy, abstain_below, group_by))
    get_run_logger().info("training: %s", summary)
    return summary


@task(name="tag-and-publish", cache_policy=NO_CACHE)
def tag_task(store: Store, run_id: str, cluster: Session, full: bool) -> dict:
    """Tag new and changed tracks (every track for a new model) on Dask and publish a catalog snapshot."""
    summary = runs.as_record(tag.tag(store, run_id, cluster, full=full))
    create_markdown_artifact(
        "| genre | tracks |\n|---|---|\n" + "".join(f"| {g} | {n} |\n" for g, n in summary["genres"].items()),
        description=f"catalog snapshot {summary['snapshot']} ({summary['rows']} tracks, {summary['mode']})",
    )
    return summary


@flow(name="genre-batch-extract")
def extract_flow(library: str, store: str, scheduler: str | None = None, force: bool = False) -> dict:
    """Extract features of a library's new and changed files into the store."""
    s = Store.at(store)
    with runs.run_record(s, "extract") as record, session(scheduler) as cluster:
        record["extract"] = extract_task(library, s, record["run_id"], cluster, force)
        record["compact"] = compact_task(s, cluster, True)
    return record


@flow(name="genre-batch-compact")
def compact_flow(store: str, scheduler: str | None = None) -> dict:
    """Rewrite the feature store's current rows into large parts, dropping superseded ones."""
    s = Store.at(store)
    with runs.run_record(s, "compact") as record, session(scheduler) as cluster:
        record["compact"] = compact_task(s, cluster, False)
    return record


@flow(name="genre-batch-train")
def train_flow(store: str, labels: str, scheduler: str | None = None, min_accuracy: float = 0.0, abstain_below: float = 0.0, group_by: str = "auto") -> dict:
    """Train a model on the store's labelled tracks."""
    s = Store.at(store)
    with runs.run_record(s, "train") as record, session(scheduler) as cluster:
        record["train"] = train_task(s, labels, record["run_id"], cluster, min_accuracy, abstain_below, group_by)
    return record


@flow(name="genre-batch-tag")
def tag_flow(store: str, scheduler: str | None = None, full: bool = False) -> dict:
    """Tag the store's tracks with the current model and publish the catalog."""
    s = Store.at(store)
    with runs.run_record(s, "tag") as record, session(scheduler) as cluster:
        record["tag"] = tag_task(s, record["run_id"], cluster, full)
    return record


@flow(name="genre-batch-nightly")
def nightly(
    library: str,
    store: str,
    labels: str | None = None,
    scheduler: str | None = None,
    min_accuracy: float = 0.0,
    abstain_below: float = 0.0,
    group_by: str = "auto",
    retrain: str = "auto",
) -> dict:
    """The nightly job: extract what changed, retrain as the policy says, tag what changed, publish."""
    s = Store.at(store)
    with runs.run_record(s, "nightly") as record, session(scheduler) as cluster:
        record["extract"] = extract_task(library, s, record["run_id"], cluster, False)
        record["compact"] = compact_task(s, cluster, True)
        if labels:
            retrained, record["train_decision"] = decide_training_task(s, labels, retrain)
            if retrained:
                record["train"] = train_task(s, labels, record["run_id"], cluster, min_accuracy, abstain_below, group_by)
        record["tag"] = tag_task(s, record["run_id"], cluster, False)
    return record
