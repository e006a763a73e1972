"""Cluster: a Dask client on a given scheduler, or on a local cluster sized to the machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import dask
from distributed import Client, Future, LocalCluster

from genre_batch import GenreBatchError, default_numba_cache_dir

WORKER_WAIT_S = 60

WORKER_ENVIRON = {"MALLOC_TRIM_THRESHOLD_": 268435456, "MALLOC_MMAP_THRESHOLD_": 67108864}
"""Set by the nanny in each worker process, replacing Dask's MALLOC_TRIM_THRESHOLD_=65536: with that value glibc
maps and unmaps every array above 128 KiB again and again (worker CPU 1.6x the extractor's); 256 MiB / 64 MiB keep
the arrays of a file's feature extraction in the heap at the same peak RSS (README, Performance; docker/dask.yaml)."""


def trim_memory() -> int:
    """Give a worker's freed memory back to the OS: Arrow's pool, then glibc's heap, which WORKER_ENVIRON's thresholds
    keep (Dask's documented remedy, "Manually trim memory"); 1 when glibc released some, 0 elsewhere (no glibc)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return 0


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
    """A client on `scheduler` (else Dask's DASK_SCHEDULER_ADDRESS) or, without either, on a local cluster.

    On failure or interruption the client's futures are cancelled; then a local cluster's nannies stop their workers,
    waiting at most 4 s for a running shard (Dask's nanny close timeout, 0.8 x 5 s) before killing them.
    """
    scheduler = scheduler or dask.config.get("scheduler-address", None)
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
            warm_up_workers(client)
            with cancelling(client):
                yield client
        return
    with local_cluster(n_workers) as cluster, Client(cluster) as client:
        warm_up_workers(client)
        with cancelling(client):
            yield client


class Session:
    """A Dask client started on first use (a run with nothing to compute starts no cluster) and closed with the session."""

    def __init__(self, scheduler: str | None = None, n_workers: int | None = None) -> None:
        self.scheduler, self.n_workers = scheduler, n_workers
        self.stack = ExitStack()
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The client, starting the cluster (or connecting to the scheduler) the first time."""
        if self._client is None:
            self._client = self.stack.enter_context(dask_client(self.scheduler, self.n_workers))
        return self._client

    @property
    def started(self) -> bool:
        """Whether a cluster was started or connected to."""
        return self._client is not None

    def run(self, calls: list[tuple]) -> list:
        """Results of function calls `(function, *args)` run as Dask tasks, in order; no cluster starts for no calls.
        Then every worker trims its memory: a step's freed tables do not stay in the next step's peak."""
        if not calls:
            return []
        client = self.client
        results = client.gather([client.submit(*call, pure=False) for call in calls])
        client.run(trim_memory)
        return results



@contextmanager
def session(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Session]:
    """A lazily started Dask session for the block; closed with it (a failure or an interruption of the block reaches
    the client first, which cancels its futures)."""
    s = Session(scheduler, n_workers)
    with s.stack:
        yield s
