"""Prefect flows: extract, train, tag and the nightly run. Thin: all logic is in genre_batch."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from genre_batch import pipeline, progress

NIGHTLY_CRON = "0 2 * * *"
"""Default schedule of the nightly deployment: every day at 02:00 (UTC unless a timezone is given)."""


@task(name="extract")
def extract_task(library: str, store: str, run_id: str, scheduler: str | None, force: bool) -> dict:
    """Extract features of new and changed files on Dask, with progress in Prefect and the CLI."""
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"extraction of {library}")

    def on_progress(done: int, total: int, errors: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / total if total else 100.0)
        logger.info("extracted %d/%d files, %d errors", done, total, errors)
        progress.report(done, total, errors)

    summary = pipeline.as_record(pipeline.extract(library, store, run_id, scheduler, force, on_progress))
    logger.info("extraction: %s", summary)
    return summary


@task(name="decide-training")
def decide_training_task(store: str, labels: str) -> tuple[bool, str]:
    """Whether labels or features changed since the current model was trained."""
    return pipeline.needs_training(store, labels)


@task(name="train")
def train_task(store: str, labels: str, run_id: str, min_accuracy: float, abstain_below: float, group_by: str) -> dict:
    """Train, evaluate and register a model; promote it if it passes the gate."""
    summary = pipeline.as_record(pipeline.train(store, labels, run_id, min_accuracy, abstain_below, group_by))
    get_run_logger().info("training: %s", summary)
    return summary


@task(name="tag-and-publish")
def tag_task(store: str, run_id: str) -> dict:
    """Tag every track with the current model and publish a catalog snapshot."""
    summary = pipeline.as_record(pipeline.tag(store, run_id))
    create_markdown_artifact(
        "| genre | tracks |\n|---|---|\n" + "".join(f"| {g} | {n} |\n" for g, n in summary["genres"].items()),
        description=f"catalog snapshot {summary['snapshot']} ({summary['rows']} tracks)",
    )
    return summary


@flow(name="genre-batch-extract")
def extract_flow(library: str, store: str, scheduler: str | None = None, force: bool = False) -> dict:
    """Extract features of a library's new and changed files into the store."""
    with pipeline.run_record(store, "extract") as record:
        record["extract"] = extract_task(library, store, record["run_id"], scheduler, force)
    return record


@flow(name="genre-batch-train")
def train_flow(store: str, labels: str, min_accuracy: float = 0.0, abstain_below: float = 0.0, group_by: str = "auto") -> dict:
    """Train a model on the store's labelled tracks."""
    with pipeline.run_record(store, "train") as record:
        record["train"] = train_task(store, labels, record["run_id"], min_accuracy, abstain_below, group_by)
    return record


@flow(name="genre-batch-tag")
def tag_flow(store: str) -> dict:
    """Tag the store's tracks with the current model and publish the catalog."""
    with pipeline.run_record(store, "tag") as record:
        record["tag"] = tag_task(store, record["run_id"])
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
) -> dict:
    """The nightly job: extract what changed, retrain when labelled data changed, tag, publish."""
    with pipeline.run_record(store, "nightly") as record:
        record["extract"] = extract_task(library, store, record["run_id"], scheduler, False)
        if labels:
            retrain, record["train_decision"] = decide_training_task(store, labels)
            if retrain:
                record["train"] = train_task(store, labels, record["run_id"], min_accuracy, abstain_below, group_by)
        record["tag"] = tag_task(store, record["run_id"])
    return record
