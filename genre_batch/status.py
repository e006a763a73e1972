"""Status: the store at a glance (current model, published catalog, last runs, current errors, lease holder)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from genre_batch.modelling import registry
from genre_batch.publishing.pointer import published
from genre_batch.storage import lease
from genre_batch.storage.feature_store import current_errors, current_tracks
from genre_batch.storage.store import Store

LAST_RUNS = 5


def run_records(store: Store) -> list[str]:
    """Paths of the store's run records, oldest first (run ids sort by start time)."""
    return [p for p in store.list(store.runs, ".json") if not p.endswith(f"/{lease.LEASE}")]


def duration_s(record: dict) -> float | None:
    """How long a run took, if it ended."""
    if "finished_at" not in record:
        return None
    return round((datetime.fromisoformat(record["finished_at"]) - datetime.fromisoformat(record["started_at"])).total_seconds(), 1)


def run_line(record: dict) -> dict:
    """The key facts of a run record."""
    return {
        "run_id": record["run_id"], "flow": record["flow"], "status": record.get("status", "running"),
        "started_at": record["started_at"], "duration_s": duration_s(record),
        "error": record.get("error"),
    }


def model_status(store: Store) -> dict | None:
    """The current model's key facts, or None."""
    current = registry.pointer(store)
    return registry.summary(registry.card(store, current.version), current) if current else None


def catalog_status(store: Store) -> dict | None:
    """The published snapshot's key facts, or None."""
    pointer = published(store)
    if pointer is None:
        return None
    return {"snapshot": pointer.snapshot, "rows": pointer.rows, "model_version": pointer.model_version, "catalog_version": pointer.catalog_version,
            "published_at": pointer.published_at.isoformat(), "run_id": pointer.run_id}


def errors_by_kind(store: Store) -> dict[str, int]:
    """How many files of the library currently fail, per error kind, most frequent first."""
    return dict(Counter(current_errors(store)["error_type"].to_pylist()).most_common())


def lease_status(store: Store) -> dict | None:
    """The run lease's fields and `stale` (why another run may take it over, None while its holder runs), or None when
    the store is free."""
    holder, _ = lease.read(store)
    return None if holder is None else {**holder, "stale": lease.stale(holder, lease.utcnow())}


def status(store: Store, last_runs: int = LAST_RUNS) -> dict:
    """The store at a glance."""
    return {
        "store": store.url,
        "model": model_status(store),
        "catalog": catalog_status(store),
        "tracks": current_tracks(store).num_rows,
        "errors_by_kind": errors_by_kind(store),
        "last_runs": [store.read_parsed(p, run_line) for p in run_records(store)[-last_runs:]][::-1],
        "lease": lease_status(store),
    }


def prune_runs(store: Store, keep: int) -> list[str]:
    """Delete all but the `keep` newest run records; returns those deleted."""
    old = run_records(store)[:-keep] if keep > 0 else run_records(store)
    store.delete(old)
    return [p.rsplit("/", 1)[-1] for p in old]


def prune_evaluations(store: Store, keep: int) -> list[str]:
    """Delete all but the `keep` newest evaluation reports; returns those deleted."""
    if not store.exists(store.evaluations):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.evaluations, detail=False))
    old = names[:-keep] if keep > 0 else names
    for name in old:
        store.fs.rm(f"{store.evaluations}/{name}", recursive=True)
    return old
