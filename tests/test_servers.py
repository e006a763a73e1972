"""Integration tests against real servers started as subprocesses on 127.0.0.1.

- An external Dask cluster (`dask scheduler` + two `dask worker` processes) that `genre-batch run --scheduler`
  (run in this process) extracts on.
- A `prefect server start` instance (conftest's `prefect_server_process`, shared with test_scheduling.py):
  `genre-batch serve` registers the nightly deployment on it, the test checks
  the cron schedule (as stored and as the server's scheduler expands it), triggers a run and sees it complete.

Every process is started in its own session (so its own process group) and stopped in a `finally`: SIGTERM
(SIGINT for `serve`) to the whole group, then SIGKILL; descendants that left the group (Prefect's runner puts
flow-run processes in their own session) are found with psutil beforehand and killed too.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
from conftest import PrefectServer, cli

from genre_batch.publishing import catalog
from genre_batch.publishing.pointer import published
from genre_batch.storage.store import Store

BIN = Path(sys.executable).parent
DASK, PREFECT, GENRE_BATCH = str(BIN / "dask"), str(BIN / "prefect"), str(BIN / "genre-batch")
HOST = "127.0.0.1"
WEED_PORTS = {7333, 8181, 8888, 9101, 9333, 9340, 18888, 19333, 19340, 23646, 33646}  # `weed mini`'s fixed ports (test_s3)
DEPLOYMENT_NAME = "nightly-test"
DEPLOYMENT = f"genre-batch-nightly/{DEPLOYMENT_NAME}"
CRON = "0 2 * * *"
PER_STYLE = 3
TRACKS = 12  # 4 styles x PER_STYLE


# ----------------------------------------------------------------------------------------------------------------
# Process helpers
# ----------------------------------------------------------------------------------------------------------------


def ephemeral_ports() -> range:
    """The kernel's range for port-0 binds and outgoing connections' source ports (Linux's default if unreadable)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(*offsets: int) -> int:
    """A TCP port on 127.0.0.1 that is free now, as are `port + offset` for each of `offsets`.

    Drawn at random outside the kernel's ephemeral range: a port the kernel picked for a port-0 bind could be taken by
    another port-0 bind or an outgoing connection before the server binds it (CI failed once so: the Prefect server's
    port was in use when it started)."""
    ephemeral, shifts = ephemeral_ports(), (0, *offsets)
    usable = [p for p in range(10000, 65536 - max(shifts)) if not any(p + o in ephemeral or p + o in WEED_PORTS for o in shifts)]
    pick = random.SystemRandom()
    for _ in range(100):
        port = pick.choice(usable)
        with ExitStack() as stack:
            try:
                for o in shifts:
                    stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).bind((HOST, port + o))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on {HOST} with offsets {offsets}")


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without PREFECT_* settings (the in-process test harness may have set some),
    with single-threaded BLAS/OpenMP and the session's numba cache (conftest's NUMBA_CACHE_DIR), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NUMBA_CACHE_DIR=os.environ["NUMBA_CACHE_DIR"],
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    env.update(extra)
    return env


def tail(path: Path, lines: int = 60) -> str:
    """The last lines of a log file, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send a signal to a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop(proc: subprocess.Popen, first: signal.Signals = signal.SIGTERM, grace: float = 15.0) -> None:
    """Stop a process started with start_new_session=True and everything it started, and reap it."""
    tree = descendants(proc.pid)
    signal_group(proc.pid, first)  # a session leader's pid is its process group id
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        tree += [p for p in descendants(proc.pid) if p not in tree]
    signal_group(proc.pid, signal.SIGKILL)
    for p in tree:  # also those in other sessions (flow-run processes of Prefect's runner)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(tree, timeout=30)


@contextmanager
def server(cmd: list[str], env: dict[str, str], log: Path, cwd: Path, first: signal.Signals = signal.SIGTERM) -> Iterator[subprocess.Popen]:
    """Run a command in its own session with its output in `log`; always stop it (`first`, then SIGKILL) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc, first)


def run_command(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    """Run a command to completion in its own session: (exit code, stdout, stderr). Stopped with everything it
    started if it overruns `timeout` or the test is interrupted."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd} did not finish within {timeout} s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    finally:
        stop(proc)
    return proc.returncode, stdout, stderr


def wait_until(check: Callable[[], object], timeout: float, what: str, watched: list[tuple[subprocess.Popen, Path]]) -> object:
    """Poll `check` until it returns something truthy; fail early if a watched process exits, or after `timeout`."""
    deadline, last_error = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        for proc, log in watched:
            if proc.poll() is not None:
                pytest.fail(f"{what}: {' '.join(proc.args)} exited with {proc.returncode}:\n{tail(log)}")
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - not there yet
            last_error = e
        time.sleep(0.5)
    logs = "\n".join(f"--- {' '.join(proc.args)}:\n{tail(log)}" for proc, log in watched)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})\n{logs}")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` and two single-threaded `dask worker` processes on 127.0.0.1; yields the scheduler address."""
    from distributed import Client

    logs = tmp_path / "dask-logs"
    logs.mkdir()
    port = free_port()
    address = f"tcp://{HOST}:{port}"
    env = base_env()
    with ExitStack() as stack:  # unwinds in reverse: workers first, then the scheduler
        log = logs / "scheduler.log"
        cmd = [DASK, "scheduler", "--host", HOST, "--port", str(port), "--no-dashboard"]
        watched = [(stack.enter_context(server(cmd, env, log, tmp_path)), log)]
        for i in range(2):
            log = logs / f"worker-{i}.log"
            cmd = [DASK, "worker", address, "--nthreads", "1", "--host", HOST, "--no-dashboard", "--name", f"test-worker-{i}"]
            watched.append((stack.enter_context(server(cmd, env, log, tmp_path)), log))

        def two_workers() -> bool:
            with Client(address, timeout="5s") as client:
                client.wait_for_workers(2, timeout=60)
                return True

        wait_until(two_workers, 90, "two Dask workers", watched)
        yield address


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_run_on_external_dask_cluster(
    library_factory: Callable[..., Path], tmp_path: Path, prefect_server: None, warm_numba: None, dask_cluster: str
) -> None:
    """`genre-batch run --scheduler` extracts on both external workers and publishes a 12-track catalog.

    The CLI runs in this process (on the session's in-process Prefect server): what is tested is the external cluster,
    and a CLI subprocess would only add its start-up (the console script is test_cli_usage.py's)."""
    from distributed import Client

    library, store = library_factory(per_style=PER_STYLE), tmp_path / "store"
    code, stdout, stderr = cli("run", str(library), "--store", str(store), "--labels", "folders", "--features", "librosa", "--scheduler", dask_cluster)
    assert code == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert f"{TRACKS} extracted, 0 failed" in stdout, stdout
    [run_line] = [line for line in stdout.splitlines() if line.startswith("run ")]
    run_id = run_line.split()[1]
    assert run_line == f"run {run_id} completed"
    assert catalog.read(Store(str(store))).num_rows == TRACKS

    # Proof that the shards ran on the external workers: extraction submits one task per shard with the key
    # "extract-<run_id>-<shard>", and every Dask worker keeps a log of its task transitions (kept after the
    # client left and the keys were released). Collect, per worker, this run's shard keys that reached "memory".
    prefix = f"extract-{run_id}-"

    def shards_computed(dask_worker) -> list[str]:  # noqa: ANN001 - called on each worker by client.run
        return sorted({e[0] for e in dask_worker.state.log if isinstance(e[0], str) and e[0].startswith(prefix) and e[2] == "memory"})

    with Client(dask_cluster, timeout="10s") as client:
        per_worker = client.run(shards_computed)
        names = sorted(w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values())
    assert names == ["test-worker-0", "test-worker-1"]  # still the two workers the fixture started
    assert len(per_worker) == 2 and all(per_worker.values()), f"both external workers should have run shards: {per_worker}"
    shards = [k for keys in per_worker.values() for k in keys]
    assert len(shards) == len(set(shards)) >= 2, shards  # each shard computed exactly once


def test_serve_registers_nightly_deployment_and_runs_it(
    library_factory: Callable[..., Path], tmp_path: Path, prefect_server_process: PrefectServer, warm_numba: None
) -> None:
    """`genre-batch serve` registers the cron deployment on a real Prefect server; a triggered run completes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    library, store = library_factory(per_style=PER_STYLE), tmp_path / "store"
    api = prefect_server_process.api_url()
    cmd = [GENRE_BATCH, "serve", str(library), "--store", str(store), "--labels", "folders", "--cron", CRON, "--name", DEPLOYMENT_NAME]
    # The runner polls for due runs every 2 s instead of 10 s.
    env = base_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = tmp_path / "serve.log"
    started = datetime.now(timezone.utc)
    with server(cmd, env, log, tmp_path, first=signal.SIGINT) as serve, temporary_settings({PREFECT_API_URL: api}):
        watched = [(serve, log)]
        with get_client(sync_client=True) as client:
            deployment = wait_until(lambda: client.read_deployment_by_name(DEPLOYMENT), 120, f"deployment {DEPLOYMENT}", watched)
            assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [(CRON, True)]
            assert deployment.parameters == {"library": str(library), "store": str(store), "labels": "folders", "scheduler": None}

            flow_run = client.create_flow_run_from_deployment(deployment.id)

            # The server's scheduler expands the cron schedule into runs: every day at 02:00 UTC, from the next one on.
            def auto_scheduled() -> list[datetime]:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                return sorted(r.expected_start_time.astimezone(timezone.utc) for r in runs if r.auto_scheduled)

            times = wait_until(auto_scheduled, 60, "the server to schedule runs of the cron schedule", watched)
            assert all((t.hour, t.minute, t.second, t.microsecond) == (2, 0, 0, 0) for t in times), times
            assert started < times[0] <= started + timedelta(days=1, minutes=10), (started, times)
            assert all(b - a == timedelta(days=1) for a, b in zip(times, times[1:])), times

            def finished():  # noqa: ANN202
                state = client.read_flow_run(flow_run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_until(finished, 240, f"flow run {flow_run.name} to finish", watched)
            assert state.is_completed(), f"flow run ended {state.type.value}: {state.message}\n--- serve output:\n{tail(log)}"

    pointer = published(Store(str(store)))
    assert pointer is not None and pointer.rows == TRACKS, pointer
    assert catalog.read(Store(str(store))).num_rows == TRACKS
