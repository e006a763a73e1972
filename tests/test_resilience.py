"""Resilience: a Dask worker or the flow process killed mid-extraction, concurrent runs (the run lease), a read-only query.

Real processes on 127.0.0.1 (`genre-batch` CLI runs, `dask scheduler`/`dask worker`), each in its own session and
stopped with its process group in a `finally` (helpers of test_servers.py). CLI runs report to the session's
temporary Prefect server (conftest's `prefect_server`); conftest's `dask_scheduler` has filled the numba cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import cli, current_features, make_library
from distributed import Client
from test_catalog import SPACE, rows
from test_servers import (  # noqa: F401 - dask_cluster: fixture
    DASK,
    GENRE_BATCH,
    HOST,
    base_env,
    dask_cluster,
    descendants,
    free_port,
    run_command,
    server,
    tail,
    wait_until,
)

from genre_batch import GenreBatchError
from genre_batch.analysis.audio import SAMPLE_RATE
from genre_batch.analysis.extraction import shard_size
from genre_batch.library.discovery import INVENTORY_SCHEMA
from genre_batch.library.synth import STYLES, render, write_audio
from genre_batch.publishing import catalog
from genre_batch.storage import lease
from genre_batch.storage.store import ConflictError, Store

PER_STYLE = 24
FILES = 4 * PER_STYLE  # 3 s clips: one window each
SHARDS = 8  # on 2 workers: 2 x extraction.SHARDS_PER_WORKER shards of 12 files
UNEVEN_FILES = 32
UNEVEN_SHARD = shard_size(UNEVEN_FILES, os.cpu_count() or 1)  # files per shard on the CLI's local cluster (a worker per core)


# ----------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """A library of FILES short clips, shared by the tests of this module (they only read it), and its URIs."""
    root = (tmp_path_factory.mktemp("resilience") / "library").resolve()
    return root, {str(p) for p in make_library(root, PER_STYLE)}


@pytest.fixture(scope="module")
def uneven_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """UNEVEN_FILES clips: the first two local shards 3 s clips, every later shard 30 s clips, so that a run is slow
    to finish its third shard after writing its first two parts (the kill test's window), and its URIs."""
    root = (tmp_path_factory.mktemp("uneven") / "library").resolve()
    paths = []
    for i in range(UNEVEN_FILES):
        seconds, folder = (3.0, "a-quick") if i < 2 * UNEVEN_SHARD else (30.0, "b-slow")
        path = root / folder / f"clip-{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_audio(path, render(STYLES[i % len(STYLES)], seconds, i), SAMPLE_RATE))
    return root, {str(p) for p in paths}


@pytest.fixture
def cli_env(tmp_path: Path, prefect_server: None) -> dict[str, str]:
    """Environment of a CLI subprocess: the session's Prefect server, its own Prefect home, the session's numba cache."""
    from prefect.settings import PREFECT_API_URL

    return base_env(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "prefect-home"))


def part_files(store: Path) -> dict[str, tuple[str, int]]:
    """Finished feature parts: name -> (sha256 of the bytes, mtime in ns)."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted((store / "features" / "parts").glob("*.parquet"))
    }


def raw_rows(store: Path) -> pa.Table:
    """(uri, window, run_id) of every row of every feature part, superseded or not."""
    files = sorted((store / "features" / "parts").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["uri", "window", "run_id"]) for f in files])


def unique_keys(table: pa.Table) -> int:
    """How many distinct (uri, window) pairs a table holds."""
    return table.group_by(["uri", "window"]).aggregate([]).num_rows


def run_records(store: Path) -> list[dict]:
    """The run records of the store (not the lease)."""
    return [json.loads(p.read_text()) for p in sorted((store / "runs").glob("*.json")) if p.name != lease.LEASE]


def lease_file(store: Path) -> Path:
    """Where the run lease lives."""
    return store / "runs" / lease.LEASE


def store_tree(store: Path) -> dict[str, bytes]:
    """Every file of a store with its bytes."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def assert_every_file_once(store: Path, uris: set[str]) -> None:
    """Current features: every window of every library file exactly once, with its features."""
    current = current_features(Store(str(store)))
    assert current.num_rows == unique_keys(current)
    assert set(current["uri"].to_pylist()) == uris
    assert current["mfcc_01_mean"].null_count == 0


# ----------------------------------------------------------------------------------------------------------------
# 2. A Dask worker SIGKILLed mid-extraction
# ----------------------------------------------------------------------------------------------------------------


def nanny_of(name: str) -> psutil.Process:
    """The `dask worker ... --name NAME` process of the dask_cluster fixture: the nanny."""
    [nanny] = [p for p in psutil.Process().children() if p.cmdline()[2:3] == ["worker"] and name in p.cmdline()]
    return nanny


def worker_of(nanny: psutil.Process) -> psutil.Process:
    """The worker process a nanny runs (its multiprocessing child, not the resource tracker)."""
    [worker] = [c for c in nanny.children() if "spawn_main" in " ".join(c.cmdline())]
    return worker


def shards_on(client: Client, pid: int, timeout: float) -> list[str]:
    """Keys of extraction shards the scheduler has assigned to the worker process `pid`, polled every 20 ms until there
    are some (a worker holds none between two shards; a shard of this library lasts about a second), [] after
    `timeout`."""
    [address] = [a for a, p in client.run(os.getpid).items() if p == pid]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = [k for k in client.processing(workers=[address])[address] if str(k).startswith("extract-")]
        if keys:
            return keys
        time.sleep(0.02)
    return []


def test_worker_killed_mid_extraction_every_file_once(
    library: tuple[Path, set[str]], tmp_path: Path, warm_numba: None, cli_env: dict[str, str], dask_cluster: str  # noqa: F811
) -> None:
    """SIGKILL of a worker (not its nanny) while it extracts a shard: the run completes, each file is stored once."""
    root, uris = library
    store = tmp_path / "store"
    nanny = nanny_of("test-worker-0")
    cmd = [GENRE_BATCH, "extract", str(root), "--store", str(store), "--features", "librosa", "--scheduler", dask_cluster]
    log = tmp_path / "extract.log"
    with Client(dask_cluster, timeout="10s") as client, server(cmd, cli_env, log, tmp_path) as run:
        victim = worker_of(nanny)
        assigned = shards_on(client, victim.pid, 180)  # polled from the run's start: its first shard, whatever the pace
        victim.kill()
        parts_at_kill = len(part_files(store))
        code = run.wait(240)
    assert code == 0, tail(log)
    assert assigned and all(k.startswith("extract-") for k in assigned), assigned  # it was working on shards
    assert parts_at_kill < SHARDS  # mid-extraction
    wait_until(lambda: worker_of(nanny).pid != victim.pid, 60, "the nanny to restart its worker", [])

    [record] = run_records(store)
    assert record["status"] == "completed", record
    assert (record["extract"]["extracted"], record["extract"]["failed"], record["extract"]["shards"]) == (FILES, 0, SHARDS)
    assert f"{FILES} audio files in {root}; {FILES} extracted, 0 failed, 0 unchanged, 0 moved, 0 removed" in log.read_text()
    run_id = record["run_id"]
    assert sorted(part_files(store)) == [f"{run_id}-{i:05d}.parquet" for i in range(SHARDS)]
    assert not (store / "features" / "errors").exists()
    # Duplicates were not written: the rescheduled shard rewrote the part of the same name (one row per file in all parts).
    raw = raw_rows(store)
    assert raw.num_rows == unique_keys(raw) == FILES and set(raw["run_id"].to_pylist()) == {run_id}
    assert_every_file_once(store, uris)
    assert not lease_file(store).exists()


# ----------------------------------------------------------------------------------------------------------------
# 3. The flow process SIGKILLed mid-extraction, with its process group (its local Dask cluster)
# ----------------------------------------------------------------------------------------------------------------


def test_killed_extraction_resumes_without_redoing_finished_shards(
    uneven_library: tuple[Path, set[str]], tmp_path: Path, warm_numba: None, cli_env: dict[str, str], dask_scheduler: str
) -> None:
    """The next run (on the session's cluster) extracts only the files of unfinished shards; finished parts stay as
    they were; no duplicates."""
    root, uris = uneven_library
    store, files = tmp_path / "store", len(uris)
    cmd = [GENRE_BATCH, "extract", str(root), "--store", str(store), "--features", "librosa"]  # local cluster: its workers are in the CLI's group
    log = tmp_path / "killed.log"
    parts = store / "features" / "parts"
    with server(cmd, cli_env, log, tmp_path) as run:
        wait_until(lambda: parts.is_dir(), 240, "the feature store", [(run, log)])
        deadline = time.monotonic() + 240
        while len(list(parts.glob("*.parquet"))) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the quick shards' parts: kill before a slow shard can finish
        tree = descendants(run.pid)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(30)
        gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive and len(gone) >= 2, alive  # the CLI's Dask workers died with it

    before = part_files(store)
    done = set(raw_rows(store)["uri"].to_pylist())
    assert 2 <= len(before) and len(done) == UNEVEN_SHARD * len(before) < files, (before, len(done), tail(log))
    assert run_records(store) == [] and not (store / "features" / "inventory.parquet").exists()  # killed before both
    assert json.loads(lease_file(store).read_text())["pid"] == run.pid  # its lease is left behind, its holder dead

    code, out, err = run_command([*cmd, "--scheduler", dask_scheduler], cli_env, tmp_path, timeout=300)
    assert code == 0, out + err
    remaining = files - len(done)
    assert f"{files} audio files in {root}; {remaining} extracted, 0 failed, {len(done)} unchanged, 0 moved, 0 removed" in out, out
    [record] = run_records(store)
    assert record["status"] == "completed" and record["extract"]["extracted"] == remaining

    after = part_files(store)
    assert {name: after[name] for name in before} == before  # finished shards were not redone or rewritten
    assert all(name.startswith(record["run_id"]) for name in set(after) - set(before))
    raw = raw_rows(store)
    resumed = raw.filter(pc.equal(raw["run_id"], record["run_id"]))
    assert set(resumed["uri"].to_pylist()) == uris - done
    assert raw.num_rows == unique_keys(raw)  # no duplicate rows, even superseded ones
    assert_every_file_once(store, uris)
    assert not lease_file(store).exists()  # the dead holder's lease was taken over, then released


# ----------------------------------------------------------------------------------------------------------------
# 5. The run lease
# ----------------------------------------------------------------------------------------------------------------


def test_second_run_is_refused_while_the_first_holds_the_lease(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Two CLI runs on one store: the second exits 1 with one line naming the holder; the first completes.

    The first run is held deterministically: its scheduler has no worker until the second run has been refused
    (so a library of one clip per style is enough: its single worker has 4 files, not 96, to extract).
    """
    root = tmp_path / "library"
    files = len(make_library(root, per_style=1))
    store = tmp_path / "store"
    address = f"tcp://{HOST}:{free_port()}"
    cmd = [GENRE_BATCH, "extract", str(root), "--store", str(store), "--features", "librosa", "--scheduler", address]
    scheduler_cmd = [DASK, "scheduler", "--host", HOST, "--port", address.rsplit(":", 1)[1], "--no-dashboard"]
    worker_cmd = [DASK, "worker", address, "--nthreads", "1", "--host", HOST, "--no-dashboard"]
    logs = {name: tmp_path / f"{name}.log" for name in ("scheduler", "first", "worker")}
    with server(scheduler_cmd, base_env(), logs["scheduler"], tmp_path), server(cmd, cli_env, logs["first"], tmp_path) as first:
        holder = wait_until(lambda: json.loads(lease_file(store).read_text()), 120, "the first run's lease", [(first, logs["first"])])
        code, out, err = run_command(cmd, cli_env, tmp_path, timeout=120)
        first_still_running = first.poll() is None  # it waits for a worker, holding the lease
        with server(worker_cmd, base_env(), logs["worker"], tmp_path):
            first_code = first.wait(240)
    assert code == 1, out + err
    assert err.strip().splitlines() == [
        (
            f"error: the store {store} is in use by run {holder['run_id']} (pid {first.pid} on {socket.gethostname()}); "
            f"its lease expires at {holder['expires_at']} unless that run renews it: try again when it has ended"
        )
    ]
    assert first_still_running and first_code == 0, tail(logs["first"])
    [record] = run_records(store)  # the refused run wrote nothing, not even a run record
    assert record["run_id"] == holder["run_id"] and record["status"] == "completed"
    assert record["extract"]["extracted"] == files and raw_rows(store).num_rows == files
    assert not lease_file(store).exists()  # released after success


@pytest.mark.parametrize("verb", ["extract", "train", "tag", "run"])
def test_every_writing_verb_is_refused_while_the_lease_is_held(verb: str, tmp_path: Path, prefect_server: None) -> None:
    store = tmp_path / "store"
    args = {"extract": [verb, str(tmp_path)], "run": [verb, str(tmp_path), "--labels", "folders"]}.get(verb, [verb])
    (store / "features").mkdir(parents=True)  # what train's and tag's checks look for before they start: a listing, a model
    pq.write_table(INVENTORY_SCHEMA.empty_table(), store / "features" / "inventory.parquet")
    Store(str(store)).write_json(f"{store}/models/CURRENT.json", {"version": "m-1"})
    before = store_tree(store)
    with lease.held(Store(str(store)), "run-holder") as held:
        code, _, err = cli(*args, "--store", str(store))
        assert (code, err) == (1, f"error: {lease.refusal(Store(str(store)), held)}\n")
        assert json.loads(lease_file(store).read_text()) == held
    assert store_tree(store) == {**before, "runs/LEASE.json.lock": b""}  # nothing written by the refused run; lease released


def test_lease_is_released_after_success_and_after_failure(tmp_path: Path, prefect_server: None) -> None:
    store, empty = tmp_path / "store", tmp_path / "empty-library"
    empty.mkdir()
    assert cli("extract", str(empty), "--store", str(store))[0] == 0
    assert not lease_file(store).exists()
    code, _, err = cli("train", "--store", str(store), "--labels", "folders")
    assert code == 1 and "training needs at least 2 genres" in err
    assert not lease_file(store).exists()
    assert sorted((r["flow"], r["status"]) for r in run_records(store)) == [("extract", "completed"), ("train", "failed")]


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def held_by(host: str, pid: int, expires_in_s: float) -> dict:
    """A lease of run-other held by process `pid` on `host`, expiring `expires_in_s` seconds from now."""
    return {**lease.new_lease("run-other", lease.utcnow(), expires_in_s), "host": host, "pid": pid}


@pytest.mark.parametrize(
    "case, stale",
    [
        ("expired, holder on another host", "expired"),
        ("live, holder on another host", None),
        ("live, holder on this host dead", "holder dead"),
        ("live, holder on this host alive", None),
    ],
)
def test_takeover_only_of_an_expired_lease_or_a_dead_holder(tmp_path: Path, case: str, stale: str | None) -> None:
    """`status` says a lease is stale exactly when the next run would take it over (a run killed with kill -9 leaves
    its lease behind, held by a dead pid)."""
    s = Store(str(tmp_path))
    here = socket.gethostname()
    other = {
        "expired, holder on another host": held_by("elsewhere", 4242, -1),
        "live, holder on another host": held_by("elsewhere", 4242, 600),
        "live, holder on this host dead": held_by(here, dead_pid(), 600),
        "live, holder on this host alive": held_by(here, os.getppid(), 600),
    }[case]
    lease_file(tmp_path).parent.mkdir()
    lease_file(tmp_path).write_text(json.dumps(other))
    code, out, _ = cli("status", "--store", str(tmp_path), "--format", "json")
    assert (code, json.loads(out)["lease"]) == (0, {**other, "stale": stale})
    code, out, _ = cli("status", "--store", str(tmp_path))
    holder = f"run run-other (pid {other['pid']} on {other['host']})"
    assert code == 0 and out.splitlines()[-1] == (
        f"lease: stale ({stale}): left by {holder}, valid until {other['expires_at']}; the next run takes it over" if stale
        else f"lease: held by {holder} until {other['expires_at']}"
    )
    if stale:
        mine = lease.acquire(s, "run-mine")
        assert json.loads(lease_file(tmp_path).read_text()) == mine and mine["pid"] == os.getpid()
    else:
        with pytest.raises(GenreBatchError) as refused:
            lease.acquire(s, "run-mine")
        assert str(refused.value) == lease.refusal(s, other) and "run run-other" in str(refused.value)
        assert json.loads(lease_file(tmp_path).read_text()) == other


RACER = """
import os, sys, time
from genre_batch import GenreBatchError
from genre_batch.storage import lease
from genre_batch.storage.store import Store
store, run_id, go = sys.argv[1:]
open(f"{go}.{run_id}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    lease.acquire(Store(store), run_id)
    print("won", flush=True)
except GenreBatchError as e:
    print(f"refused: {e}", flush=True)
while not os.path.exists(f"{go}.end"):  # alive until every racer has tried: a winner that exits is a dead holder
    time.sleep(0.01)
"""


@pytest.mark.parametrize("previous", ["none", "expired"])
def test_runs_starting_at_the_same_instant_cannot_both_win(tmp_path: Path, previous: str) -> None:
    store, go = tmp_path / "store", tmp_path / "go"
    if previous == "expired":
        lease_file(store).parent.mkdir(parents=True)
        lease_file(store).write_text(json.dumps(held_by("elsewhere", 4242, -1)))
    racers = [f"run-{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(store), r, str(go)], stdout=subprocess.PIPE, text=True) for r in racers]
    try:
        wait_until(lambda: all(Path(f"{go}.{r}").exists() for r in racers), 120, "the racers to start", [])
        go.touch()  # all of them acquire now
        outcomes = {r: p.stdout.readline().strip() for r, p in zip(racers, procs)}
        Path(f"{go}.end").touch()
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    winners = [r for r, o in outcomes.items() if o == "won"]
    assert len(winners) == 1, outcomes
    assert json.loads(lease_file(store).read_text())["run_id"] == winners[0]
    assert all(o.startswith(f"refused: the store {store} is in use by run {winners[0]} ") for r, o in outcomes.items() if r not in winners), outcomes


def test_heartbeat_renews_the_lease_while_the_run_lasts(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    with lease.held(s, "run-long", ttl_s=1.0, heartbeat_s=0.1) as first:
        time.sleep(1.5)  # longer than the TTL
        current, _ = lease.read(s)
        assert current["run_id"] == "run-long" and not lease.expired(current, lease.utcnow())
        assert current["expires_at"] > first["expires_at"]
    assert lease.read(s) == (None, None)


def test_lease_taken_over_from_a_hung_holder_is_left_alone(tmp_path: Path) -> None:
    """A holder that stopped renewing loses the lease; its heartbeat and its release leave the new holder's lease."""
    s = Store(str(tmp_path))
    with lease.held(s, "run-hung", ttl_s=0.5, heartbeat_s=0.2):
        # as if the holder had hung past its TTL and another run had taken over
        lease.put(s, lease.new_lease("run-new", lease.utcnow(), 600), lease.read(s)[1])
        taken = lease.read(s)[0]
        time.sleep(0.7)  # several beats
        assert lease.read(s)[0] == taken
    assert lease.read(s)[0] == taken


def test_lease_is_released_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), lease.held(Store(str(tmp_path)), "run-failing"):
        raise RuntimeError("stage failed")
    assert lease.read(Store(str(tmp_path))) == (None, None)


@pytest.fixture
def s3_store(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A store on conftest's moto S3 server (it honours If-None-Match and If-Match)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_url}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir("leases")
        yield Store("s3://leases/store")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_s3_lease_conditional_writes(s3_store: Store) -> None:
    """On S3 the write that acquires is conditional: a run whose read is stale cannot overwrite the winner's lease."""
    seen, token = lease.read(s3_store)  # a run reads: no lease
    winner = lease.acquire(s3_store, "run-a")  # another run acquires meanwhile
    with pytest.raises(ConflictError):
        lease.put(s3_store, lease.new_lease("run-b", lease.utcnow(), 60), token)  # If-None-Match fails
    with pytest.raises(GenreBatchError, match="in use by run run-a"):
        lease.acquire(s3_store, "run-b")
    assert seen is None and lease.read(s3_store)[0] == winner

    expired = lease.renewed(winner, lease.utcnow(), -1)  # run-a hangs past its TTL ...
    lease.put(s3_store, expired, lease.read(s3_store)[1])
    stale = lease.read(s3_store)[1]
    taker = lease.acquire(s3_store, "run-c")  # ... run-c takes over (If-Match on the expired version) ...
    with pytest.raises(ConflictError):
        lease.put(s3_store, lease.new_lease("run-d", lease.utcnow(), 60), stale)  # ... and run-d, too late, cannot
    assert not lease.renew(s3_store, "run-a") and lease.read(s3_store)[0] == taker
    lease.release(s3_store, "run-c")
    assert lease.read(s3_store) == (None, None)


# ----------------------------------------------------------------------------------------------------------------
# 7. `genre-batch query` cannot write
# ----------------------------------------------------------------------------------------------------------------

REFUSED = "error: query refused: genre-batch query is read-only and runs only SELECT statements, not {}"
NO_FILES = 'error: query failed: Permission Error: Cannot access file "{}" - file system operations are disabled by configuration'


@pytest.mark.parametrize(
    "sql, message",
    [
        ("COPY catalog TO '{store}/catalog/snapshots/evil.parquet'", REFUSED.format("COPY")),
        ("CREATE TABLE stolen AS SELECT * FROM catalog", REFUSED.format("CREATE")),
        ("ATTACH '{store}/catalog/evil.duckdb' AS evil", REFUSED.format("ATTACH")),
        ("SELECT 1; COPY (SELECT 1) TO '{store}/catalog/CURRENT.json'", REFUSED.format("COPY")),
        ("SET enable_external_access = true", REFUSED.format("SET")),
        ("INSTALL httpfs", REFUSED.format("INSTALL or LOAD")),
        ("SELECT * FROM read_text('{store}/catalog/CURRENT.json')", NO_FILES.format("{store}/catalog/CURRENT.json")),
        ("SELECT 1; SELECT 2", "error: query refused: give one statement, not 2 (run each with its own genre-batch query)"),
    ],
    ids=["copy-into-store", "create-table", "attach-file", "copy-after-select", "set-option", "install", "read-store-file", "two-selects"],
)
def test_query_cannot_write_or_open_store_files(tmp_path: Path, sql: str, message: str) -> None:
    store = tmp_path / "store"
    catalog.publish(Store(str(store)), rows(3, "rock", "run-a"), "run-a", "m-1", SPACE)
    before = store_tree(store)
    code, out, err = cli("query", "--store", str(store), sql.format(store=store))
    assert (code, out, err) == (1, "", message.format(store=store) + "\n")
    assert store_tree(store) == before
    code, out, _ = cli("query", "--store", str(store), "--format", "json", "SELECT genre, count(*) AS n FROM catalog GROUP BY genre")
    assert (code, json.loads(out)) == (0, [{"genre": "rock", "n": 3}])
    code, out, _ = cli("query", "--store", str(store), "--format", "json", "SELECT 'nan'::DOUBLE AS a, ln(0.0) AS b, 0.5::DOUBLE AS c")
    assert (code, json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))) == (0, [{"a": None, "b": None, "c": 0.5}])


@pytest.mark.parametrize(
    "path, content, argv, line",
    [
        ("catalog/CURRENT.json", '{"snapshot": "s-1", "fi', ["status"], "error: damaged JSON file in the store: {store}/catalog/CURRENT.json (Unterminated string starting at: line 1 column 21 (char 20))"),
        ("catalog/CURRENT.json", '{"snapshot": "s-1", "fi', ["query", "SELECT count(*) FROM catalog"], "error: damaged JSON file in the store: {store}/catalog/CURRENT.json (Unterminated string starting at: line 1 column 21 (char 20))"),
        ("runs/LEASE.json", "{}", ["status"], "error: unreadable run lease {store}/runs/LEASE.json: delete it if no run is active"),
        ("runs/20260101T000000Z-0000aaaa.json", "{}", ["status"], "error: damaged JSON file in the store: {store}/runs/20260101T000000Z-0000aaaa.json (no field 'run_id')"),
        ("catalog/CURRENT.json", '{"snapshot": "s-1"}', ["status"], "error: damaged JSON file in the store: {store}/catalog/CURRENT.json (no field 'files')"),
        ("models/CURRENT.json", '{"pinned": false}', ["status"], "error: damaged JSON file in the store: {store}/models/CURRENT.json (no field 'version')"),
        ("runs/LEASE.json", '{"run_id": "r", "pid": 1, "host": "h", "expires_at": "soon"}', ["status"], "error: unreadable run lease {store}/runs/LEASE.json: delete it if no run is active"),
        ("models/CURRENT.json", '{"version": "m-1", "pinned": false, "history": []}', ["classify", "song.mp3"],
         "error: model m-1 has no card ({store}/models/m-1/metadata.json is missing): 'genre-batch models promote' another version, or train again"),
    ],
)
def test_a_damaged_store_file_is_one_line_naming_it(path: str, content: str, argv: list[str], line: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / path).parent.mkdir(parents=True)
    (store / path).write_text(content)
    code, out, err = cli(argv[0], "--store", str(store), *argv[1:])
    assert (code, out, err) == (1, "", line.format(store=store) + "\n")


def test_errors_stay_queryable_beside_a_damaged_pointer(tmp_path: Path) -> None:
    """`query` reads only what the SQL names, word for word (a column alias holding 'catalog' names no table)."""
    store = tmp_path / "store"
    (store / "catalog").mkdir(parents=True)
    (store / "catalog" / "CURRENT.json").write_text('{"snapshot": "s-1", "fi')
    assert cli("query", "--store", str(store), "--format", "json", "SELECT count(*) AS not_in_catalog FROM errors") == (0, '[{"not_in_catalog": 0}]\n', "")
