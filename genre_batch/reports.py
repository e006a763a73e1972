"""Reports of a run for Prefect: keyed artifact names and their tables, and the check of deployment parameters."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from genre_batch import GenreBatchError

if TYPE_CHECKING:
    from genre_batch.modelling.registry import ModelCard

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
        "moved": extract.get("moved"),
        "removed": extract.get("removed"),
        "model": train.get("version") or tag.get("model_version"),
        "promoted": train.get("promoted"),
        "catalog_rows": tag.get("rows"),
        "tagging": tag.get("mode"),
    }


def errors_rows(kinds: dict[str, int]) -> list[dict]:
    """The errors artifact's rows: files failing per kind (one row saying none when nothing fails)."""
    return [{"error_type": kind, "files": n} for kind, n in kinds.items()] or [{"error_type": "none", "files": 0}]


def confusion_markdown(card: ModelCard) -> str:
    """A model's held-out confusion matrix as a Markdown table (rows: true genre, columns: predicted)."""
    return markdown_table(["true \\ predicted", *card.genres], [[g, *row] for g, row in zip(card.genres, card.confusion)])
