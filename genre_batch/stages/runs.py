"""Run records: what each run did, written to the store's runs/ under the store's run lease."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from datetime import datetime, timezone

from genre_batch.signals import signal_name, signal_number
from genre_batch.storage import lease
from genre_batch.storage.store import Store


def new_run_id() -> str:
    """A sortable, unique run id."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@contextmanager
def run_record(store: Store, flow: str) -> Iterator[dict]:
    """A run record to fill in, under the store's run lease; written to the store's runs/ when the block ends, failed or not.

    A run refused because another run holds the lease writes nothing.
    """
    record: dict = {"run_id": new_run_id(), "flow": flow, "started_at": datetime.now(timezone.utc).isoformat()}
    with lease.held(store, record["run_id"]):
        try:
            yield record
        except BaseException as e:
            record.update(status="failed", error=failure(e))
            with suppress(OSError):  # the store may be what failed: the run's own error is the one to report
                write_record(store, record)
            raise
        record["status"] = "completed"
        write_record(store, record)


def failure(e: BaseException) -> str:
    """What a run record says of the exception that ended the run: the signal that interrupted it, or the error."""
    signum = signal_number(e)
    return f"interrupted by {signal_name(signum)}" if signum is not None else f"{type(e).__name__}: {e}"


def write_record(store: Store, record: dict) -> None:
    """Stamp a run record's end and write it to the store's runs/."""
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    store.write_json(f"{store.runs}/{record['run_id']}.json", record)


def as_record(summary: object) -> dict:
    """A stage summary as a plain dict."""
    return asdict(summary)
