"""Scheduling against a real Prefect server: `genre-batch serve` registers a cron deployment whose runs fire and
complete, one at a time; prefect.yaml loads from any directory; unset deployment parameters are refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import PrefectServer
from test_servers import free_port

from flows.pipeline import artifact_key, check_parameters, nightly
from genre_batch import GenreBatchError

BIN = Path(sys.executable).parent
SERVER_START_S = 120
RUN_WAIT_S = 150
DEPLOYMENT = "nightly-every-minute"


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and its children: SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(condition: Callable[[], object], seconds: float, what: str) -> object:
    """Poll `condition` every second until it returns something truthy; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {seconds} s")


@pytest.fixture
def prefect_api(prefect_server_process: PrefectServer, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The session's `prefect server start` (conftest: its scheduler service loops every 2 s) and the environment of
    a `serve` process using it: its own PREFECT_HOME, the runner polling every 2 s, Prefect's console logging as a
    user's shell leaves it."""
    url = prefect_server_process.api_url(SERVER_START_S)
    env = {
        **{k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"},  # conftest quiets it; the CLI decides
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_API_URL": url,
    }
    return url, env


def flow_runs(url: str, deployment: str) -> list[dict]:
    """Every flow run of a deployment (by name) the server knows."""
    return httpx.post(f"{url}/flow_runs/filter", json={"deployments": {"name": {"any_": [deployment]}}}, timeout=10).json()


def run_logs(url: str, run_id: str) -> str:
    """The log lines of a flow run, oldest first."""
    logs = httpx.post(f"{url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}, timeout=10).json()
    return "\n".join(entry["message"] for entry in logs)


def test_serve_cron_fires_a_run_that_completes_and_a_colliding_run_is_cancelled(
    prefect_api: tuple[str, dict[str, str]], library_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """The scheduled run's scheduler has no worker until the colliding run has been cancelled: the scheduled run waits
    for one (cluster.WORKER_WAIT_S), so it still holds the deployment's slot when the second run asks for it (with
    workers from the start, a quick run ended first on CI and the second run completed)."""
    from distributed import LocalCluster

    url, env = prefect_api
    library, store = library_factory(per_style=3), tmp_path / "store"  # as test_flows: a model that passes the gate
    log = (tmp_path / "serve.log").open("w")
    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0")
    served = subprocess.Popen(
        [str(BIN / "genre-batch"), "serve", str(library), "--store", str(store), "--labels", "folders",
         "--scheduler", cluster.scheduler_address, "--cron", "* * * * *", "--name", DEPLOYMENT],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        first = wait_for(lambda: next((r for r in flow_runs(url, DEPLOYMENT) if r["state_type"] == "RUNNING"), None), RUN_WAIT_S, "a scheduled run starting")
        assert first["auto_scheduled"] is True  # created by the server's scheduler from the cron, not by hand
        deployment = httpx.get(f"{url}/deployments/{first['deployment_id']}", timeout=10).json()
        assert deployment["global_concurrency_limit"]["limit"] == 1, deployment
        assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
        answers = []  # the server can refuse a request while busy (SQLite on a loaded CI box): ask again, keep its answers
        for _ in range(30):
            answer = httpx.post(f"{url}/deployments/{first['deployment_id']}/create_flow_run", json={}, timeout=10)
            if answer.is_success:
                break
            answers.append(f"{answer.status_code} {answer.text[:300]}")
            time.sleep(1)
        else:
            pytest.fail(f"the server refused a manual run of the deployment 30 times: {answers}")
        second = answer.json()

        def final(run_id: str) -> dict | None:
            run = httpx.get(f"{url}/flow_runs/{run_id}", timeout=10).json()
            return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        cancelled = wait_for(lambda: final(second["id"]), RUN_WAIT_S, "the colliding run ending")
        assert cancelled["state_type"] == "CANCELLED" and cancelled["state"]["message"] == "Deployment concurrency limit reached."
        said = wait_for(lambda: [line for line in (tmp_path / "serve.log").read_text().splitlines() if second["id"] in line], 30, "serve logging the cancelled run")
        assert "CANCELLED" in " ".join(said), said  # serve's log says what happened to the second run
        assert final(first["id"]) is None, run_logs(url, first["id"])  # still waiting for a worker
        cluster.scale(1)
        done = wait_for(lambda: final(first["id"]), RUN_WAIT_S, "the scheduled run ending")
        assert done["state_type"] == "COMPLETED", run_logs(url, first["id"])
        assert (store / "catalog" / "CURRENT.json").exists()
        keys = {a["key"] for a in httpx.post(f"{url}/artifacts/filter", json={}, timeout=10).json() if a["key"]}
        assert {artifact_key(kind, str(store)) for kind in ("summary", "errors", "confusion-matrix", "catalog")} <= keys
    finally:
        stop(served)
        log.close()
        cluster.close()


def test_serve_refuses_a_server_that_does_not_answer(tmp_path: Path) -> None:
    library = tmp_path / "library"
    library.mkdir()
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [str(BIN / "genre-batch"), "serve", str(library), "--store", str(tmp_path / "store"), "--labels", "folders"], env=env, capture_output=True,
        text=True, timeout=120,
    )
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"error: no Prefect server answers at PREFECT_API_URL={url}")
    assert "prefect server start --host 127.0.0.1 --port 4200" in done.stderr


def test_prefect_yaml_entrypoint_loads_from_any_directory(tmp_path: Path) -> None:
    code = "from prefect.flows import load_flow_from_entrypoint as load; print(load('flows.pipeline.nightly').name)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == nightly.name, done.stderr


def test_unset_deployment_parameters_are_refused_by_name() -> None:
    with pytest.raises(GenreBatchError, match=r"deployment parameter library is unset .*export GENRE_BATCH_LIBRARY"):
        check_parameters(library="{{ $GENRE_BATCH_LIBRARY }}", store="/s", labels=None)
    with pytest.raises(GenreBatchError, match=r"deployment parameter store is unset \(''\)"):
        check_parameters(library="/l", store="", labels="folders")
    with pytest.raises(GenreBatchError, match=r"export GENRE_BATCH_LABELS"):
        check_parameters(library="/l", store="/s", labels="{{ $GENRE_BATCH_LABELS }}")
    check_parameters(library="/l", store="s3://b/s", labels=None)


def test_the_nightly_flow_refuses_a_placeholder_before_touching_the_store(tmp_path: Path, prefect_server: None) -> None:
    store = tmp_path / "store"
    with pytest.raises(GenreBatchError, match="GENRE_BATCH_LIBRARY"):
        nightly("{{ $GENRE_BATCH_LIBRARY }}", str(store))
    assert not store.exists()


def test_artifact_keys_are_prefect_keys_one_per_store() -> None:
    keys = {artifact_key(kind, store) for kind in ("summary", "errors", "confusion-matrix", "catalog") for store in ("/data/Genre Store/", "s3://music/genre-batch", "/")}
    assert len(keys) == 12 and all(re.fullmatch(r"[a-z0-9-]+", k) for k in keys)
    assert artifact_key("summary", "/a/store") != artifact_key("summary", "/b/store")
