"""Cluster: a Dask client on a given scheduler, or on a local cluster sized to the machine."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import dask
from distributed import Client, Future, LocalCluster, WorkerPlugin, as_completed

from genre_batch import GenreBatchError, default_numba_cache_dir

WORKER_WAIT_S = 60
IN_FLIGHT_PER_WORKER = 2
"""Tasks of one `Session.completed` (and `run`) on the cluster at a time per worker: one running and one waiting keeps
a worker busy, and the arguments waiting in the scheduler stay few (a full tag at 1M sends ~7 MB of index rows with each of its 50
tasks; 50 tasks carrying 106 MB of tables, submitted at once, added 107 MB to the flow process, 11 MB with the window)."""

WORKER_ENVIRON = {"MALLOC_TRIM_THRESHOLD_": 268435456, "MALLOC_MMAP_THRESHOLD_": 67108864}
"""Set by the nanny in each worker process, replacing Dask's MALLOC_TRIM_THRESHOLD_=65536: with that value glibc
maps and unmaps every array above 128 KiB again and again (worker CPU 1.6x the extractor's); 256 MiB / 64 MiB keep
the arrays of a file's feature extraction in the heap at the same peak RSS (README, Performance; docker/dask.yaml)."""


def trim_memory() -> int:
    """Give this process's freed memory back to the OS (a worker's, or the flow process's after it read the store):
    Arrow's pool, then glibc's heap, which WORKER_ENVIRON's thresholds keep (Dask's documented remedy, "Manually trim
    memory"); 1 when glibc released some, 0 elsewhere (no glibc)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return 0


def tell(topic: str, message: dict) -> None:
    """Send an event to the clients subscribed to a topic (`Client.subscribe_topic`), from a task on a Dask worker;
    nothing elsewhere (a task run in the client's own process)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return
    worker.log_event(topic, message)


def numba_cache_dir() -> str:
    """Where workers keep numba's compiled code between runs (NUMBA_CACHE_DIR, else the user cache)."""
    return os.environ.get("NUMBA_CACHE_DIR") or default_numba_cache_dir()


def local_cluster(n_workers: int | None = None) -> LocalCluster:
    """A local multi-process cluster: one single-threaded worker per core (Dask's nanny already sets OMP/BLAS threads to 1)."""
    environ = {**WORKER_ENVIRON, "NUMBA_CACHE_DIR": numba_cache_dir()}
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in environ.items()}):
        return LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # a free port: never collides with another cluster
            silence_logs=logging.ERROR,
        )


def warm_up_workers(client: Client) -> None:
    """Warm librosa's numba code on one worker per host, then on the others.

    Workers compiling at once into one numba cache can mix its files and segfault later (numba#10128);
    after the first worker of a host has filled the cache, the others only load it.
    """
    from genre_batch.analysis.features import warm_up  # numba and scipy.fft: the flow process itself needs neither

    by_host: dict[str, list[str]] = {}
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        by_host.setdefault(info["host"], []).append(address)
    for wave in ([addrs[0] for addrs in by_host.values()], [a for addrs in by_host.values() for a in addrs[1:]]):
        client.gather([client.submit(warm_up, workers=[a], allow_other_workers=False, pure=False) for a in wave])


def cancel_all(client: Client) -> None:
    """Cancel every future of the client: queued shards never start, running ones finish unseen (or die with a local cluster)."""
    futures = [Future(key, client) for key in list(client.futures)]
    if futures:
        client.cancel(futures, force=True)


@contextmanager
def cancelling(client: Client) -> Iterator[Client]:
    """The client; when the block fails or is interrupted (SIGTERM, SIGINT), its futures are cancelled on the cluster first."""
    try:
        yield client
    except BaseException:
        cancel_all(client)
        raise


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """A client on `scheduler` (else Dask's DASK_SCHEDULER_ADDRESS) or, without either, on a local cluster (its workers
    not warmed: Session.warm_client does that for the stages that run librosa's code).

    On failure or interruption the client's futures are cancelled; then a local cluster's nannies stop their workers,
    waiting at most 4 s for a running shard (Dask's nanny close timeout, 0.8 x 5 s) before killing them.
    """
    scheduler = scheduler_address(scheduler)
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise GenreBatchError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                raise GenreBatchError(f"no Dask worker joined {scheduler} within {WORKER_WAIT_S} s") from None
            with cancelling(client):
                yield client
        return
    with local_cluster(n_workers) as cluster, cluster_client(cluster) as client:
        yield client


def user_errors(cls: type[Exception] = GenreBatchError) -> set[str]:
    """Names of the errors a user can act on: GenreBatchError and its subclasses (those imported so far)."""
    return {cls.__name__} | {name for sub in cls.__subclasses__() for name in user_errors(sub)}


STORAGE_ERRORS = ("PermissionError",)
"""Task errors the CLI also prints as one line (`store.storage_error`: "access denied: ..."): a store or file the run
may not write or read."""


def not_a_user_error(record: logging.LogRecord) -> bool:
    """False for a worker's "Compute Failed" record of a task that raised a user error (its 4th argument is the
    exception's repr), which the CLI prints as one line: logged as well, it added a traceback to a local run's stderr."""
    if not str(record.msg).startswith("Compute Failed") or not isinstance(record.args, tuple) or len(record.args) < 4:
        return True
    return not str(record.args[3]).startswith(tuple(f"{name}(" for name in (*user_errors(), *STORAGE_ERRORS)))


class QuietUserErrors(WorkerPlugin):
    """Filters user errors out of the workers' "Compute Failed" log (`not_a_user_error`): a local cluster's workers
    write to the CLI's stderr. Other task failures are still logged."""

    name = "genre-batch-quiet-user-errors"

    def setup(self, worker: object) -> None:
        """Add the filter to the worker process's `distributed.worker` logger."""
        logging.getLogger("distributed.worker").addFilter(not_a_user_error)


@contextmanager
def cluster_client(cluster: LocalCluster) -> Iterator[Client]:
    """A client on a local cluster (its workers' logs without the user errors the CLI prints), its futures cancelled on
    failure or interruption (as dask_client's)."""
    with Client(cluster) as client, cancelling(client):
        client.register_plugin(QuietUserErrors())
        yield client


def scheduler_address(scheduler: str | None) -> str | None:
    """The scheduler a session connects to: `scheduler`, else Dask's DASK_SCHEDULER_ADDRESS; None for a local cluster."""
    return scheduler or dask.config.get("scheduler-address", None)


class Session:
    """A Dask client started on first use (a run with nothing to compute starts no cluster), or in the background from
    `start_soon`, and closed with the session."""

    def __init__(self, scheduler: str | None = None, n_workers: int | None = None) -> None:
        self.scheduler, self.n_workers = scheduler, n_workers
        self.stack = ExitStack()
        self._client: Client | None = None
        self._cluster: LocalCluster | None = None
        self._starting: threading.Thread | None = None
        self._failure: Exception | None = None
        self._warm = False

    def start_soon(self) -> None:
        """Start the local cluster's scheduler and worker processes in a background thread while the caller goes on
        reading; `client` waits for them (and raises their failure). A session on a scheduler connects when used."""
        if self._client is None and self._starting is None and scheduler_address(self.scheduler) is None:
            self._starting = threading.Thread(target=self._start, name="dask-start", daemon=True)
            self._starting.start()

    def _start(self) -> None:
        """Enter a local cluster into the session (a failure is kept for `client` to raise). Only the cluster: a
        Client's context belongs to the thread that uses it."""
        try:
            self._cluster = self.stack.enter_context(local_cluster(self.n_workers))
        except Exception as e:
            self._failure = e

    def settle(self) -> None:
        """Wait for a background start (its failure, if any, raised by `client` only)."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None

    @property
    def client(self) -> Client:
        """The client, starting the cluster (or connecting to the scheduler) the first time, or waiting for `start_soon`."""
        self.settle()
        if self._failure is not None:
            raise self._failure
        if self._client is None:
            started = cluster_client(self._cluster) if self._cluster is not None else dask_client(self.scheduler, self.n_workers)
            self._client = self.stack.enter_context(started)
        return self._client

    @property
    def warm_client(self) -> Client:
        """The client, its workers warmed first for librosa's numba code (extraction; tagging and compaction run none)."""
        client = self.client
        if not self._warm:
            warm_up_workers(client)
            self._warm = True
        return client

    def completed(self, calls: Iterable[tuple], name: str | None = None) -> Iterator[tuple[int, Future]]:
        """Function calls `(function, *args)` run as Dask tasks (keyed `<name>-<number>` when `name` is given), each
        yielded as (its number in `calls`, its finished future) in the order they end; no cluster starts for no calls.
        At most IN_FLIGHT_PER_WORKER tasks per worker are on the cluster at a time, the next call taken from `calls`
        (and only then built, when lazy) as one ends: the scheduler holds each task's arguments (index rows, Arrow
        tables) serialized until it ends, in this process on a local cluster. Then every worker trims its memory: a
        step's freed tables do not stay in the next step's peak."""
        numbered = enumerate(calls)
        first = next(numbered, None)
        if first is None:
            return
        client = self.client
        window = IN_FLIGHT_PER_WORKER * max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
        place: dict[str, int] = {}
        running = as_completed()

        def submit(number: int, call: tuple) -> None:
            """Put call `number` on the cluster."""
            future = client.submit(*call, pure=False, **({"key": f"{name}-{number}"} if name else {}))
            place[future.key] = number
            running.add(future)

        for number, call in itertools.chain([first], itertools.islice(numbered, window - 1)):
            submit(number, call)
        for future in running:
            yield place.pop(future.key), future
            for number, call in itertools.islice(numbered, 1):
                submit(number, call)
        client.run(trim_memory)

    def run(self, calls: Iterable[tuple]) -> list:
        """Results of function calls `(function, *args)` run as Dask tasks (`completed`), in call order; a task's error
        is raised when it arrives."""
        results = {number: future.result() for number, future in self.completed(calls)}
        return [results[number] for number in range(len(results))]


@contextmanager
def session(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Session]:
    """A lazily started Dask session for the block; closed with it (a failure or an interruption of the block reaches
    the client first, which cancels its futures)."""
    s = Session(scheduler, n_workers)
    with s.stack:
        try:
            yield s
        finally:
            s.settle()  # a cluster still starting in the background joins the stack before it closes
