"""Shared fixtures: generated audio libraries, a real multi-process Dask cluster, one real Prefect server for the session
(a `prefect server start` process: its API for in-process flows and CLI runs, its scheduler service for `serve`)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

if "NUMBA_CACHE_DIR" not in os.environ:  # the session's own numba cache, removed when the session ends
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="genre-batch-numba-")
    atexit.register(shutil.rmtree, os.environ["NUMBA_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # as the CLI

from genre_batch.analysis.audio import SAMPLE_RATE  # noqa: E402
from genre_batch.library.synth import STYLES, render, write_audio  # noqa: E402
from genre_batch.storage.store import Store  # noqa: E402

CLIP_SECONDS = 3.0
FORMATS_CYCLE = ("wav", "flac", "ogg", "mp3")
FIRST_CARD = {
    "version": "m-1", "created_at": "2026-11-25T00:20:23+00:00", "run_id": "r-1", "genres": ["a", "b", "c"], "label_source": "folders",
    "feature_version": 1, "training_fingerprint": "0123456789abcdef", "tracks": 30, "tracks_per_genre": {"a": 10, "b": 10, "c": 10},
    "dropped_genres": [], "params": {"max_depth": 4}, "cross_validation": {"accuracy": 0.9, "macro_f1": 0.9, "folds": 5},
    "holdout": {"accuracy": 0.8, "macro_f1": 0.8, "confusion": [[3, 0, 0], [0, 2, 1], [0, 1, 3]], "fraction": 0.2},
    "majority_baseline": 0.33, "gate": {"passed": True, "reason": "cross-validated accuracy 0.900 vs majority baseline 0.333", "min_accuracy": None},
    "xgboost_version": "2.1.0", "python": "3.11.2",
}
"""The card the first genre-batch wrote (genre_batch/training.py of 299d140): no classifier, families, calibration or labelled set."""


def make_library(root: Path, per_style: int, seed: int = 0, styles: tuple[str, ...] = STYLES) -> list[Path]:
    """Write `per_style` short clips of each style under root/<style>/, cycling through formats."""
    paths = []
    for s, style in enumerate(styles):
        for i in range(per_style):
            path = root / style / f"{style}-{seed}-{i:02d}.{FORMATS_CYCLE[i % len(FORMATS_CYCLE)]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_audio(path, render(style, CLIP_SECONDS, seed * 1000 + s * 100 + i), SAMPLE_RATE, {"genre": style})
            paths.append(path)
    return paths


def keep_pristine(folders: tuple[Path, ...]) -> tuple[Path, ...]:
    """Copy each folder to `pristine-<name>` beside it (for `restored` to bring back); returns the folders."""
    for folder in folders:
        shutil.copytree(folder, folder.parent / f"pristine-{folder.name}", symlinks=True)
    return folders


def restored(folders: tuple[Path, ...]) -> Iterator[tuple[Path, ...]]:
    """Yield the folders, then put back their pristine copies (a fixture's body: tests may change them)."""
    yield folders
    for folder in folders:
        shutil.rmtree(folder)
        shutil.copytree(folder.parent / f"pristine-{folder.name}", folder, symlinks=True)


def cli(*args: str) -> tuple[int, str, str]:
    """Run the genre-batch CLI in-process: (exit code, stdout, stderr); an uncaught exception is added to stderr
    as the traceback the CLI would print, so that checks of a clean one-line error see it."""
    from typer.testing import CliRunner

    from genre_batch.cli import app

    result = CliRunner().invoke(app, list(args))
    uncaught = result.exception if not isinstance(result.exception, SystemExit | None) else None
    return result.exit_code, result.stdout, result.stderr + (f"Traceback: {uncaught!r}" if uncaught else "")


def current_features(store: Store) -> "pa.Table":
    """Every window row of the library's current tracks, in URI and window order (for small test stores)."""
    import pyarrow as pa

    from genre_batch.storage.feature_store import by_part, current_tracks, read_windows

    groups = by_part(current_tracks(store))
    if not groups:
        return pa.table({"uri": pa.array([], pa.string())})
    return pa.concat_tables([read_windows(store, g) for g in groups]).sort_by([("uri", "ascending"), ("window", "ascending")])


@pytest.fixture
def library_factory(tmp_path: Path) -> Callable[..., Path]:
    """Build a labelled library (folders and tags agree) in a fresh folder."""

    def build(per_style: int = 2, name: str = "library", seed: int = 0, styles: tuple[str, ...] = STYLES) -> Path:
        root = tmp_path / name
        make_library(root, per_style, seed, styles)
        return root

    return build


@pytest.fixture(scope="session")
def dask_scheduler(request: pytest.FixtureRequest) -> Iterator[str]:
    """Address of a real local cluster: 2 worker processes, one thread each; closed after the session.

    While its workers warm up (a cold numba compile, the session's longest start), the Prefect server starts, if a
    collected test needs it: the two start-ups overlap instead of adding up."""
    from concurrent.futures import ThreadPoolExecutor

    from distributed import Client

    from genre_batch.cluster import local_cluster, warm_up_workers

    with local_cluster(n_workers=2) as cluster:
        with Client(cluster) as client, ThreadPoolExecutor(1) as pool:
            warming = pool.submit(warm_up_workers, client)
            if any("prefect_server" in item.fixturenames for item in request.session.items):
                request.getfixturevalue("prefect_server")
            warming.result()
        yield cluster.scheduler_address


def aws_environ() -> dict[str, str]:
    """This process's AWS_* variables (credentials, region, endpoints, retries)."""
    return {name: value for name, value in os.environ.items() if name.startswith("AWS_")}


@pytest.fixture
def session_workers(dask_scheduler: str) -> Iterator[Callable[[], None]]:
    """Give every worker of the session's cluster this process's AWS_* variables, no more and no less (as an operator
    gives external workers the AWS variables; the workers may have inherited others when they were spawned); each
    worker's earlier AWS_* variables come back after the test."""
    from distributed import Client

    def use_aws_environ(environ: dict[str, str]) -> dict[str, str]:
        """On a worker (sent by value): make `environ` its AWS_* variables and drop the cached S3 filesystems, so that
        the next S3 client reads them; returns the AWS_* variables it had."""
        import s3fs

        before = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
        for name in before:
            os.environ.pop(name)
        os.environ.update(environ)
        s3fs.S3FileSystem.clear_instance_cache()
        return before

    replaced: list[dict[str, dict[str, str]]] = []

    def configure() -> None:
        with Client(dask_scheduler, timeout="20s") as client:
            replaced.append(client.run(use_aws_environ, aws_environ()))

    try:
        yield configure
    finally:
        with Client(dask_scheduler, timeout="20s") as client:
            for per_worker in reversed(replaced):
                for worker, environ in per_worker.items():
                    client.run(use_aws_environ, environ, workers=[worker])


@pytest.fixture
def warm_numba(dask_scheduler: str) -> None:
    """The session's numba cache filled (the session cluster warmed it): the workers of CLI runs and of external
    clusters load librosa's compiled code instead of compiling it. Speed only: the CLI warms its workers anyway
    (one per host first, numba#10128)."""


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """A moto S3 server in this process on 127.0.0.1 (any key is accepted; it honours If-None-Match and If-Match);
    stopped after the module, also on failure."""
    from moto.server import ThreadedMotoServer

    access_log = logging.getLogger("werkzeug")
    level = access_log.level
    access_log.setLevel(logging.WARNING)  # one log line per request would drown a failure
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        access_log.setLevel(level)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, prefect_server_process: "PrefectServer") -> Iterator[None]:
    """This process's Prefect API for the session: the session's `prefect server start` (one server start for the
    session, not two; tests read only their own runs), with a temporary PREFECT_HOME. Set as the test harness sets its
    server: in the settings context, and as the global one for contexts copied before."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = prefect_server_process.api_url(300)  # 120 s ran out on a machine loaded 15x
    with temporary_settings({PREFECT_API_URL: url}), _temporary_global_settings_context(get_settings_context()):
        yield


class PrefectServer:
    """A running `prefect server start`; `api_url()` waits until its API answers."""

    def __init__(self, proc: subprocess.Popen, log: Path, url: str) -> None:
        self.proc, self.log, self.url, self.healthy = proc, log, url, False

    def api_url(self, timeout: float = 120) -> str:
        """The API's URL, once its health check answers."""
        import urllib.request

        from test_servers import wait_until

        if not self.healthy:
            health = f"{self.url}/health"
            check = lambda: urllib.request.urlopen(health, timeout=5).status == 200  # noqa: E731
            wait_until(check, timeout, "the Prefect server's /api/health", [(self.proc, self.log)])
            self.healthy = True
        return self.url


@pytest.fixture(scope="session")
def prefect_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME) for the session; stopped at its end.

    One for the session (also `prefect_server`'s: each test reads only its own runs and deployments), as a start costs
    15-20 s. Not waited for here: tests call `api_url()` when they need the API, so the server's start
    overlaps with other start-ups. Its scheduler service loops every 2 s instead of 60 s, so the runs of a new cron
    schedule appear within seconds.
    """
    from test_servers import HOST, PREFECT, base_env, free_port, server

    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = base_env(PREFECT_HOME=str(home), PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    log = home / "server.log"
    cmd = [PREFECT, "server", "start", "--host", HOST, "--port", str(port), "--no-ui", "--analytics-off"]
    with server(cmd, env, log, home) as proc:
        yield PrefectServer(proc, log, f"http://{HOST}:{port}/api")


@pytest.fixture(scope="session", autouse=True)
def early_prefect_server_process(request: pytest.FixtureRequest) -> None:
    """When some collected test needs `prefect_server_process`, start it with the session's first test, so that its
    start (15-20 s) overlaps with the tests before."""
    if any("prefect_server_process" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("prefect_server_process")
