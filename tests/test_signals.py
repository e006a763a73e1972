"""Stopping cleanly: SIGTERM to a real `genre-batch extract` (local Dask cluster) mid-extraction ends it promptly with
status 143, stops its workers, releases the store's lease and leaves the store as a crash would; the next run (on the
session's Dask cluster: no second local cluster to start) completes."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from test_resilience import (  # noqa: F401 - uneven_library, cli_env: fixtures
    GENRE_BATCH,
    UNEVEN_FILES,
    assert_every_file_once,
    cli_env,
    lease_file,
    part_files,
    run_command,
    run_records,
    server,
    tail,
    uneven_library,
    wait_until,
)

from genre_batch import signals

STOP_BOUND_S = 60
"""How long the interrupted CLI may take to unwind: Prefect's crash report, the cancel, Dask's 4 s nanny wait, the lease."""


def test_exit_status_is_the_shells() -> None:
    assert (signals.exit_status(signal.SIGINT), signals.exit_status(signal.SIGTERM)) == (130, 143)
    assert signals.signal_number(signals.Interrupted(signal.SIGTERM)) == signal.SIGTERM
    assert signals.signal_number(KeyboardInterrupt()) == signal.SIGINT and signals.signal_number(ValueError()) is None


def test_sigterm_mid_extraction_stops_workers_releases_the_lease_and_the_next_run_completes(
    uneven_library: tuple[Path, set[str]], tmp_path: Path, warm_numba: None, cli_env: dict[str, str], dask_scheduler: str
) -> None:
    """SIGTERM after the first part: the uneven library's later shards hold 30 s clips, so the run is still extracting
    (with 3 s clips everywhere an idle CI machine finished all shards before the signal)."""
    root, uris = uneven_library
    store = tmp_path / "store"
    cmd = [GENRE_BATCH, "extract", str(root), "--store", str(store), "--features", "librosa"]  # a local cluster: the CLI's own worker processes
    log = tmp_path / "interrupted.log"
    with server(cmd, cli_env, log, tmp_path) as run:
        wait_until(lambda: part_files(store), 240, "a first shard part", [(run, log)])
        workers = psutil.Process(run.pid).children(recursive=True)
        assert len(workers) >= 2  # nannies and their worker processes
        run.send_signal(signal.SIGTERM)  # to the CLI alone, as `docker stop` (via tini) or systemd would
        try:
            status = run.wait(STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the CLI did not stop within {STOP_BOUND_S} s of SIGTERM:\n{tail(log)}")
        _, alive = psutil.wait_procs(workers, timeout=10)
    assert status == 143, tail(log)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    assert log.read_text().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert not lease_file(store).exists()
    [record] = run_records(store)
    assert (record["status"], record["error"]) == ("failed", "interrupted by SIGTERM")  # Prefect's SIGTERM exception, named
    assert not (store / "features" / "inventory.parquet").exists()  # as a crash leaves it: the listing is written last
    finished = part_files(store)
    assert 1 <= len(finished)

    code, out, err = run_command([*cmd, "--scheduler", dask_scheduler, "--format", "json"], cli_env, tmp_path, timeout=300)
    assert code == 0, out + err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["extract"]["discovered"] == UNEVEN_FILES
    assert summary["extract"]["extracted"] + summary["extract"]["unchanged"] == UNEVEN_FILES
    assert {name: part_files(store)[name] for name in finished} == finished  # parts of finished shards kept as they were
    assert_every_file_once(store, uris)
    assert not lease_file(store).exists()
