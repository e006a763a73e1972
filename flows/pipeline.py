"""Prefect flows: extract, compact, train, tag and the nightly run. Thin: all logic is in genre_batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from genre_batch import progress
from genre_batch.cluster import Session, session
from genre_batch.reports import artifact_key, check_parameters, confusion_markdown, errors_rows, markdown_table, summary_row
from genre_batch.stages import compact, extract, retrain, runs, tag
from genre_batch.storage.feature_store import BACKFILL_CAP
from genre_batch.storage.store import Store

if TYPE_CHECKING:  # Prefect's deployment modules: only `serve` needs them
    from prefect.deployments.runner import RunnerDeployment


@task(name="report", cache_policy=NO_CACHE)
def report_task(store: Store, record: dict) -> None:
    """Keyed artifacts of a finished run: summary, errors by kind, and the confusion matrix of a trained model."""
    from genre_batch.status import errors_by_kind

    create_table_artifact([summary_row(record)], key=artifact_key("summary", store.url), description=f"run {record['run_id']} on {store.url}")
    create_table_artifact(
        errors_rows(errors_by_kind(store)),
        key=artifact_key("errors", store.url),
        description=f"files of the library that currently fail, by kind (run {record['run_id']})",
    )
    if "train" in record:
        from genre_batch.modelling import registry

        version = record["train"]["version"]
        create_markdown_artifact(
            confusion_markdown(registry.card(store, version)),
            key=artifact_key("confusion-matrix", store.url),
            description=f"held-out confusion matrix of model {version} ({'promoted' if record['train']['promoted'] else 'not promoted'})",
        )


@task(name="extract", cache_policy=NO_CACHE)
def extract_task(
    library: str, store: Store, run_id: str, cluster: Session, force: bool, allow_shrink: bool = False,
    features: tuple[str, ...] = extract.DEFAULT_FEATURES, backfill_cap: int = BACKFILL_CAP,
) -> dict:
    """Extract features of new and changed files on Dask, with progress in Prefect and the CLI."""
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"extraction of {library}")

    def on_progress(done: int, total: int, errors: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / total if total else 100.0)
        logger.info("extracted %d/%d files, %d errors", done, total, errors)
        progress.report(progress.Report("extract", done, total, errors))

    summary = runs.as_record(extract.extract(library, store, run_id, cluster, force, on_progress, allow_shrink, features, backfill_cap))
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
    return retrain.retrain_decision(store, labels, policy)


@task(name="train", cache_policy=NO_CACHE)
def train_task(store: Store, labels: str, run_id: str, cluster: Session, min_accuracy: float, abstain_below: float, group_by: str,
               all_tracks: bool = False, families: list[str] | None = None, classifier: str | None = None) -> dict:
    """Train, evaluate and register a model; promote it if it passes the gate; its fits' progress in the log and the CLI."""
    from genre_batch.stages import train

    logger = get_run_logger()

    def on_progress(news: progress.Report) -> None:
        logger.info("training: %s %d/%d; %s", news.stage, news.done, news.total, news.note)
        progress.report(news)

    summary = runs.as_record(train.train(store, labels, run_id, cluster, min_accuracy, abstain_below, group_by, all_tracks, families, classifier, on_progress))
    logger.info("training: %s", summary)
    return summary


@task(name="tag-and-publish", cache_policy=NO_CACHE)
def tag_task(store: Store, run_id: str, cluster: Session, full: bool, force: bool) -> dict:
    """Tag new and changed tracks (every track for a new model) on Dask and publish a catalog snapshot."""
    summary = runs.as_record(tag.tag(store, run_id, cluster, full=full, force=force))
    create_markdown_artifact(
        markdown_table(["genre", "tracks"], [[g, n] for g, n in summary["genres"].items()]),
        key=artifact_key("catalog", store.url),
        description=f"catalog snapshot {summary['snapshot']} ({summary['rows']} tracks, {summary['mode']})",
    )
    return summary


@flow(name="genre-batch-extract")
def extract_flow(
    library: str, store: str, scheduler: str | None = None, force: bool = False,
    features: tuple[str, ...] = extract.DEFAULT_FEATURES, backfill_cap: int = BACKFILL_CAP,
) -> dict:
    """Extract features of a library's new and changed files into the store (and backfill families they lack)."""
    s = Store.at(store)
    with runs.run_record(s, "extract") as record, session(scheduler) as cluster:
        record["extract"] = extract_task(library, s, record["run_id"], cluster, force, False, features, backfill_cap)
        record["compact"] = compact_task(s, cluster, True)
    report_task(s, record)
    return record


@flow(name="genre-batch-compact")
def compact_flow(store: str, scheduler: str | None = None) -> dict:
    """Rewrite the feature store's current rows into large parts, dropping superseded ones."""
    s = Store.at(store)
    with runs.run_record(s, "compact") as record, session(scheduler) as cluster:
        record["compact"] = compact_task(s, cluster, False)
    return record


@flow(name="genre-batch-train")
def train_flow(store: str, labels: str, scheduler: str | None = None, min_accuracy: float = 0.0, abstain_below: float = 0.0,
               group_by: str = "auto", all_tracks: bool = False, families: list[str] | None = None, classifier: str | None = None) -> dict:
    """Train a model on the store's labelled tracks."""
    s = Store.at(store)
    with runs.run_record(s, "train") as record, session(scheduler) as cluster:
        record["train"] = train_task(s, labels, record["run_id"], cluster, min_accuracy, abstain_below, group_by, all_tracks, families, classifier)
    report_task(s, record)
    return record


@flow(name="genre-batch-tag")
def tag_flow(store: str, scheduler: str | None = None, full: bool = False, force: bool = False) -> dict:
    """Tag the store's tracks with the current model and publish the catalog."""
    s = Store.at(store)
    with runs.run_record(s, "tag") as record, session(scheduler) as cluster:
        record["tag"] = tag_task(s, record["run_id"], cluster, full, force)
    report_task(s, record)
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
    force: bool = False,
    features: tuple[str, ...] = extract.DEFAULT_FEATURES,
    backfill_cap: int = BACKFILL_CAP,
) -> dict:
    """The nightly job: extract what changed, retrain as the policy says, tag what changed, publish (`force`: past the guards)."""
    check_parameters(library=library, store=store, labels=labels)
    s = Store.at(store)
    with runs.run_record(s, "nightly") as record, session(scheduler) as cluster:
        record["extract"] = extract_task(library, s, record["run_id"], cluster, False, force, features, backfill_cap)
        record["compact"] = compact_task(s, cluster, True)
        if labels:
            retrained, record["train_decision"] = decide_training_task(s, labels, retrain)
            if retrained:
                record["train"] = train_task(s, labels, record["run_id"], cluster, min_accuracy, abstain_below, group_by)
        record["tag"] = tag_task(s, record["run_id"], cluster, False, force)
    report_task(s, record)
    return record


def deployment(name: str, cron: str, parameters: dict) -> RunnerDeployment:
    """The nightly deployment that `genre-batch serve` serves: its cron, one run at a time (a run due while another
    runs is cancelled: "Deployment concurrency limit reached."), loaded by module path from any directory."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    return nightly.to_deployment(
        name=name,
        cron=cron,
        parameters=parameters,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
