"""Prefect flows: extract, train, tag and the nightly run. Thin: all logic is in genre_batch."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from genre_batch import GenreBatchError, pipeline, progress

NIGHTLY_CRON = "0 2 * * *"
"""Default schedule of the nightly deployment: every day at 02:00 (UTC unless a timezone is given)."""

ONE_RUN_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
"""The deployment's concurrency: a run due while another runs is cancelled ("Deployment concurrency limit reached.")."""

PARAMETER_VARIABLES = {"library": "GENRE_BATCH_LIBRARY", "store": "GENRE_BATCH_STORE", "labels": "GENRE_BATCH_LABELS"}
"""The environment variables prefect.yaml reads each deployment parameter from."""


def unset_parameter(name: str, value: str | None) -> bool:
    """True for a parameter that was never set: a literal prefect.yaml placeholder, or an empty library or store."""
    if value is None:
        return name != "labels"
    return "{{" in value or (name != "labels" and not value.strip())


def check_parameters(**parameters: str | None) -> None:
    """Refuse a run whose deployment parameters were left unset, naming the variable to set."""
    for name, value in parameters.items():
        if unset_parameter(name, value):
            raise GenreBatchError(
                f"deployment parameter {name} is unset ({value!r}): export {PARAMETER_VARIABLES[name]} before 'prefect deploy', "
                f"or run it with --param {name}=..."
            )


def artifact_key(kind: str, store: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one kind of report of one store: one history each."""
    name = re.sub(r"[^a-z0-9]+", "-", store.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:32] or "store"
    return f"genre-batch-{kind}-{name}-{hashlib.sha256(store.encode()).hexdigest()[:6]}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]) + "\n"


def summary_row(record: dict) -> dict:
    """One row of the run-summary history: what each stage did."""
    extract, train, tag = record.get("extract") or {}, record.get("train") or {}, record.get("tag") or {}
    return {
        "run_id": record["run_id"],
        "flow": record["flow"],
        "status": record.get("status", "completed"),
        "extracted": extract.get("extracted"),
        "failed": extract.get("failed"),
        "unchanged": extract.get("unchanged"),
        "removed": extract.get("removed"),
        "model": train.get("version") or tag.get("model_version"),
        "promoted": train.get("promoted"),
        "catalog_rows": tag.get("rows"),
    }


def confusion_markdown(metadata: dict) -> str:
    """A model's held-out confusion matrix as a Markdown table (rows: true genre, columns: predicted)."""
    genres, confusion = metadata["genres"], metadata["holdout"]["confusion"]
    return markdown_table(["true \\ predicted", *genres], [[g, *row] for g, row in zip(genres, confusion)])


@task(name="report")
def report_task(store: str, record: dict) -> None:
    """Keyed artifacts of a finished run: summary, errors by kind, and the confusion matrix of a trained model."""
    from genre_batch.feature_store import current_errors
    from genre_batch.store import Store

    create_table_artifact([summary_row(record)], key=artifact_key("summary", store), description=f"run {record['run_id']} on {store}")
    kinds = Counter(current_errors(Store(store))["error_type"].to_pylist())
    create_table_artifact(
        [{"error_type": kind, "files": n} for kind, n in kinds.most_common()] or [{"error_type": "none", "files": 0}],
        key=artifact_key("errors", store),
        description=f"files of the library that currently fail, by kind (run {record['run_id']})",
    )
    if "train" in record:
        from genre_batch import registry

        version = record["train"]["version"]
        create_markdown_artifact(
            confusion_markdown(registry.metadata(Store(store), version)),
            key=artifact_key("confusion-matrix", store),
            description=f"held-out confusion matrix of model {version} ({'promoted' if record['train']['promoted'] else 'not promoted'})",
        )


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
        markdown_table(["genre", "tracks"], [[g, n] for g, n in summary["genres"].items()]),
        key=artifact_key("catalog", store),
        description=f"catalog snapshot {summary['snapshot']} ({summary['rows']} tracks)",
    )
    return summary


@flow(name="genre-batch-extract")
def extract_flow(library: str, store: str, scheduler: str | None = None, force: bool = False) -> dict:
    """Extract features of a library's new and changed files into the store."""
    with pipeline.run_record(store, "extract") as record:
        record["extract"] = extract_task(library, store, record["run_id"], scheduler, force)
    report_task(store, record)
    return record


@flow(name="genre-batch-train")
def train_flow(store: str, labels: str, min_accuracy: float = 0.0, abstain_below: float = 0.0, group_by: str = "auto") -> dict:
    """Train a model on the store's labelled tracks."""
    with pipeline.run_record(store, "train") as record:
        record["train"] = train_task(store, labels, record["run_id"], min_accuracy, abstain_below, group_by)
    report_task(store, record)
    return record


@flow(name="genre-batch-tag")
def tag_flow(store: str) -> dict:
    """Tag the store's tracks with the current model and publish the catalog."""
    with pipeline.run_record(store, "tag") as record:
        record["tag"] = tag_task(store, record["run_id"])
    report_task(store, record)
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
    check_parameters(library=library, store=store, labels=labels)
    with pipeline.run_record(store, "nightly") as record:
        record["extract"] = extract_task(library, store, record["run_id"], scheduler, False)
        if labels:
            retrain, record["train_decision"] = decide_training_task(store, labels)
            if retrain:
                record["train"] = train_task(store, labels, record["run_id"], min_accuracy, abstain_below, group_by)
        record["tag"] = tag_task(store, record["run_id"])
    report_task(store, record)
    return record


def deployment(name: str, cron: str, parameters: dict) -> RunnerDeployment:
    """The nightly deployment that `genre-batch serve` serves: its cron, one run at a time, loaded by module path from any directory."""
    return nightly.to_deployment(
        name=name,
        cron=cron,
        parameters=parameters,
        concurrency_limit=ONE_RUN_AT_A_TIME,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
