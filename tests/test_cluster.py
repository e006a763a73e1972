"""Cluster: the environment of worker processes, on the local cluster and in the image's Dask config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from genre_batch.cluster import WORKER_ENVIRON

ROOT = Path(__file__).resolve().parents[1]


def test_local_cluster_workers_get_the_worker_environ(dask_scheduler: str) -> None:
    """Each worker process of the local cluster runs with WORKER_ENVIRON's malloc thresholds, not Dask's default."""
    from distributed import Client

    with Client(dask_scheduler, timeout="20s") as client:
        seen = client.run(lambda: {name: os.environ.get(name) for name in WORKER_ENVIRON})
    assert len(seen) == 2
    assert all(env == {name: str(value) for name, value in WORKER_ENVIRON.items()} for env in seen.values()), seen


def test_image_dask_config_sets_the_same_worker_environ() -> None:
    """docker/dask.yaml, copied to /etc/dask by the Dockerfile, gives external workers the same environment."""
    config = yaml.safe_load((ROOT / "docker" / "dask.yaml").read_text())
    assert config["distributed"]["nanny"]["pre-spawn-environ"] == WORKER_ENVIRON
    assert "COPY docker/dask.yaml /etc/dask/dask.yaml" in (ROOT / "docker" / "Dockerfile").read_text().splitlines()


def worker_processes() -> set[int]:
    """Pids of this process's Dask worker processes (spawned by a local cluster's nannies)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())}


def test_a_cluster_started_in_the_background_is_used_or_closed_with_the_session() -> None:
    """start_soon starts a local cluster in a thread: the session's tasks run on it; a start nobody used is waited
    for and closed with the session; either way no worker process is left."""
    from genre_batch.cluster import session

    before = worker_processes()
    with session(n_workers=1) as s:
        s.start_soon()
        [pid] = s.run([(os.getpid,)])
        assert pid != os.getpid() and pid in worker_processes() - before
    with session(n_workers=1) as s:
        s.start_soon()
    assert worker_processes() == before


def test_a_local_cluster_s_workers_log_failed_tasks_but_not_user_errors(capfd: pytest.CaptureFixture[str]) -> None:
    """A task's user error (GenreBatchError) reaches the caller and is not logged by the worker: the CLI prints it as
    one line, and a local cluster's workers share its stderr; so is a PermissionError ("access denied"). Other failures
    are still logged, with their traceback."""
    from genre_batch import UsageError
    from genre_batch.checks import summary_format
    from genre_batch.cluster import session

    with session(n_workers=1) as s:
        with pytest.raises(UsageError, match="unknown format 'yaml'"):
            s.run([(summary_format, "yaml")])
        with pytest.raises(ValueError, match="invalid literal"):
            s.run([(int, "x")])
        with pytest.raises(PermissionError):  # the store's folder not writable: "error: access denied" from the CLI
            s.run([(exec, "raise PermissionError(13, 'Permission denied')")])
    err = capfd.readouterr().err
    assert err.count("Compute Failed") == 1 and "ValueError" in err and "Traceback" in err
    assert "UsageError" not in err and "unknown format" not in err and "PermissionError" not in err


def test_the_tag_stage_wants_workers_early_only_when_something_changed(tmp_path: Path) -> None:
    """The hint for starting the cluster early: no snapshot, another model, or a listing written after publishing."""
    from datetime import timedelta

    import pyarrow as pa

    from genre_batch.publishing.pointer import CatalogPointer
    from genre_batch.stages.tag import workers_wanted
    from genre_batch.storage.store import Store

    store = Store.at(str(tmp_path / "store"))
    store.write_table(store.inventory, pa.table({"uri": ["a.wav"]}))
    written = store.fs.modified(store.inventory)
    first = {"snapshot": "s-1", "files": [], "rows": 0, "catalog_version": 3, "model_version": "m-1", "run_id": "r-1"}
    published = CatalogPointer.parse({**first, "published_at": (written + timedelta(seconds=1)).isoformat()})
    assert workers_wanted(store, None, "m-1") and workers_wanted(store, published, "m-2")
    assert not workers_wanted(store, published, "m-1")
    assert workers_wanted(store, CatalogPointer.parse({**first, "published_at": (written - timedelta(seconds=1)).isoformat()}), "m-1")


def tasks_held(prefix: str) -> int:
    """How many tasks whose key starts with `prefix` the scheduler holds unfinished now, this one included (runs on a
    worker, as a task)."""
    from distributed import get_client

    def unfinished(dask_scheduler) -> int:  # noqa: ANN001
        return sum(str(ts.key).startswith(prefix) and ts.state not in ("memory", "erred", "forgotten") for ts in dask_scheduler.tasks.values())

    return get_client().run_on_scheduler(unfinished)


def test_a_run_keeps_a_few_tasks_per_worker_on_the_cluster_and_returns_results_in_order() -> None:
    """Session.run submits IN_FLIGHT_PER_WORKER tasks per worker and the next as one ends (the scheduler holds every
    submitted task's arguments): each task sees at most that many of the run's tasks unfinished; results come back in
    call order, and a task's error reaches the caller. `completed` takes a lazy call list only as tasks end."""
    import pytest

    from genre_batch.cluster import IN_FLIGHT_PER_WORKER, session

    with session(n_workers=1) as s:
        n = 3 * IN_FLIGHT_PER_WORKER + 6  # submitted all at once, the first tasks would see n unfinished
        held = s.run([(tasks_held, "tasks_held")] * n)
        assert len(held) == n and 1 <= max(held) <= IN_FLIGHT_PER_WORKER, held
        assert s.run([(pow, n, 2) for n in range(9)]) == [n * n for n in range(9)]
        with pytest.raises(ZeroDivisionError):
            s.run([(pow, 2, 1), (divmod, 1, 0), (pow, 3, 1)])

        built: list[int] = []  # a lazy call list is built only as tasks end (extraction's shards copy their rows)
        calls = (built.append(k) or (pow, k, 2) for k in range(n))
        ended = [(number, len(built)) for number, _ in s.completed(calls)]
        assert sorted(number for number, _ in ended) == list(range(n))
        assert all(made <= done + IN_FLIGHT_PER_WORKER for done, (_, made) in enumerate(ended, 1)), ended
        assert list(s.completed([])) == []


def test_peak_rss_is_this_process_s_own_not_its_spawner_s() -> None:
    """peak_rss_mb reads VmHWM: a process started by one that peaked at 800 MB reports its own peak, where ru_maxrss
    would report the spawner's (so would a Dask worker, started by its nanny from the flow process)."""
    import subprocess
    import sys

    child = "from genre_batch.stages.tag import peak_rss_mb; import resource; print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)"
    parent = f"import numpy as np, subprocess, sys; a = np.ones(800_000_000 // 8); del a; print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)"
    own, inherited = map(float, subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.split())
    assert inherited >= 800 > 600 > own > 20, (own, inherited)
