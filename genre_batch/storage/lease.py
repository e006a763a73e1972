"""Run lease: at most one store-writing run at a time, named by a small JSON object that its holder keeps renewing.

`runs/LEASE.json` names the holder (run id, host, pid) and when its lease expires. A run acquires it before it
writes to the store and releases it when it ends, completed or failed; a heartbeat thread renews it meanwhile.
Another run is refused while the lease is live. It takes the lease over once it has expired (the holder stopped
renewing: it died or hung), or at once when the holder was a process of this host that no longer exists.

Acquiring is a conditional write (`Store.swap`), so two runs starting at the same instant cannot both win: on local
disk a compare-and-rename under an exclusive `flock` of `runs/LEASE.json.lock`; on S3 one PUT with
`If-None-Match: *` (no lease yet) or `If-Match: <ETag read>` (takeover). Backends without conditional writes are
refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from genre_batch import GenreBatchError
from genre_batch.storage.store import ConflictError, Store

LEASE = "LEASE.json"
TTL_S = 600.0
HEARTBEAT_S = 60.0

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """The current time in UTC."""
    return datetime.now(timezone.utc)


def pid_namespace() -> str:
    """This process's PID namespace ('' where there is none to read): pids compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def new_lease(run_id: str, now: datetime, ttl_s: float) -> dict:
    """A lease for `run_id` held by this process, valid for `ttl_s` seconds from `now`."""
    return {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": pid_namespace(),
        "acquired_at": now.isoformat(),
        "expires_at": (now + timedelta(seconds=ttl_s)).isoformat(),
    }


def renewed(lease: dict, now: datetime, ttl_s: float) -> dict:
    """The same lease, valid for `ttl_s` seconds from `now`."""
    return {**lease, "expires_at": (now + timedelta(seconds=ttl_s)).isoformat()}


def expired(lease: dict, now: datetime) -> bool:
    """True when the holder has not renewed the lease in time."""
    return datetime.fromisoformat(lease["expires_at"]) <= now


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (in this PID namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_dead(lease: dict) -> bool:
    """True when the holder was a process of this host and PID namespace that no longer exists."""
    here = lease.get("host") == socket.gethostname() and lease.get("pid_namespace") == pid_namespace()
    return here and not pid_alive(int(lease["pid"]))


def stale(lease: dict, now: datetime) -> str | None:
    """Why another run may take the lease over ("holder dead", or "expired": its holder stopped renewing it), None while
    it is live."""
    if holder_dead(lease):
        return "holder dead"
    return "expired" if expired(lease, now) else None


def refusal(store: Store, lease: dict) -> str:
    """The one-line reason a run cannot start while `lease` is held."""
    return (
        f"the store {store.url} is in use by run {lease['run_id']} (pid {lease['pid']} on {lease['host']}); "
        f"its lease expires at {lease['expires_at']} unless that run renews it: try again when it has ended"
    )


def lease_path(store: Store) -> str:
    """Where the lease lives in the store."""
    return f"{store.runs}/{LEASE}"


def read(store: Store) -> tuple[dict | None, str | None]:
    """The lease and the version a conditional write compares (S3 ETag, read before the content); (None, None) if free."""
    path = lease_path(store)
    store.fs.invalidate_cache(path)
    try:
        token = store.version_token(path)
        data = store.fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    try:
        lease = json.loads(data)
    except ValueError:
        lease = None
    if not is_lease(lease):
        raise GenreBatchError(f"unreadable run lease {store.uri(path)}: delete it if no run is active")
    return lease, token


def is_lease(lease: object) -> bool:
    """True for a lease's fields: run_id, host, a pid and an ISO expiry time."""
    try:
        datetime.fromisoformat(lease["expires_at"]), int(lease["pid"]), lease["run_id"], lease["host"]  # type: ignore[index]
    except (ValueError, TypeError, KeyError):
        return False
    return True


def put(store: Store, lease: dict, expected: str | None) -> None:
    """Write the lease if it is still the version `expected` (None: only if there is none); else ConflictError."""
    store.swap(lease_path(store), json.dumps(lease, indent=2).encode(), expected)


def acquire(store: Store, run_id: str, ttl_s: float = TTL_S) -> dict:
    """Take the store's lease for `run_id`, or raise GenreBatchError naming the live holder."""
    current, token = read(store)
    now = utcnow()
    why = None if current is None else stale(current, now)
    if current is not None and why is None:
        raise GenreBatchError(refusal(store, current))
    lease = new_lease(run_id, now, ttl_s)
    try:
        put(store, lease, token)
    except ConflictError:
        winner, _ = read(store)
        raise GenreBatchError(refusal(store, winner) if winner else "another run changed the store lease at the same moment: try again") from None
    if current is not None:
        log.warning("took over the store lease of run %s (%s)", current["run_id"], why)
    return lease


def renew(store: Store, run_id: str, ttl_s: float = TTL_S) -> bool:
    """Extend `run_id`'s lease by `ttl_s` from now; False when the lease is no longer its own."""
    current, token = read(store)
    if current is None or current["run_id"] != run_id:
        return False
    try:
        put(store, renewed(current, utcnow(), ttl_s), token)
    except ConflictError:
        return False
    return True


def release(store: Store, run_id: str) -> None:
    """Give the lease up if `run_id` still holds it (checked by a read just before an unconditional delete: nobody
    else takes over a live, unexpired lease)."""
    current, _ = read(store)
    if current is not None and current["run_id"] == run_id:
        store.delete([lease_path(store)])


class Heartbeat(threading.Thread):
    """Renews a lease every `every_s` seconds until stopped, or until the lease turns out to be lost."""

    def __init__(self, store: Store, run_id: str, ttl_s: float, every_s: float) -> None:
        super().__init__(name=f"lease-heartbeat-{run_id}", daemon=True)
        self.store, self.run_id, self.ttl_s, self.every_s = store, run_id, ttl_s, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        """Renew until stopped; a failed renewal is retried at the next beat."""
        while not self.stopped.wait(self.every_s):
            try:
                if not renew(self.store, self.run_id, self.ttl_s):
                    log.error("run %s lost the store lease (it expired and another run took it over)", self.run_id)
                    return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the lease is still valid until it expires
                log.warning("could not renew the store lease of run %s: %s", self.run_id, e)

    def stop(self) -> None:
        """Stop renewing and wait for the thread to end."""
        self.stopped.set()
        self.join()


@contextmanager
def held(store: Store, run_id: str, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S) -> Iterator[dict]:
    """Hold the store's lease for `run_id` while the block runs, renewed by a heartbeat; released at the end."""
    lease = acquire(store, run_id, ttl_s)
    beat = Heartbeat(store, run_id, ttl_s, heartbeat_s)
    beat.start()
    try:
        yield lease
    finally:
        beat.stop()
        try:
            release(store, run_id)
        except OSError as e:  # the store failed: the lease expires by itself, and the run's own outcome stands
            log.warning("could not release the store lease of run %s: %s", run_id, e)
