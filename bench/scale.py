"""Scale checks without real audio.

Issue #12 (default): synthetic feature stores of 100k, 300k and 1M tracks with the real schema (bench/synthetic_store.py)
on a 2-worker local cluster: full tag + publish, no-op plan, nightly incremental tag with 1% changed, compaction, capped
training, peak RSS of every process; listing of large prefixes on a local S3 server; learning curves of the training cap;
a 10M projection. Issue #5 (`--checks issue5`): a no-op run over 10,000 unchanged tiny files, a 1,000,000-row catalog
publish and query.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import soundfile as sf

from bench import learning_curve, s3_listing, synthetic_store
from bench.accuracy import DEFAULT_DATA
from genre_batch.library.discovery import track_id
from genre_batch.modelling import registry
from genre_batch.modelling.model import KINDS, default_kind
from genre_batch.publishing import catalog, query
from genre_batch.publishing.pointer import published
from genre_batch.storage.store import Store

DEFAULT_WORK = Path(tempfile.gettempdir()) / "genre-batch-bench"
POLL_S = 0.2
TINY_FILES = 10_000
TINY_SECONDS = 0.6
TINY_PER_FOLDER = 100
CATALOG_ROWS = 1_000_000
GENRES: tuple[str, ...] = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
QUERY = "SELECT uri, confidence, probabilities['rock'] AS p_rock FROM catalog WHERE genre = 'rock' ORDER BY confidence DESC LIMIT 100"
QUERY_REPEATS = 3
MANIFEST = ".manifest.json"  # hidden: discovery ignores it


@dataclass
class CliRun:
    """What one `genre-batch` command cost: wall, CPU of its whole process tree, peak RSS per process."""

    args: list[str]
    wall_s: float
    cpu_s: float
    cpu_by_role: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[int, tuple[str, float]] = field(default_factory=dict)
    stdout: str = ""
    aborted: str | None = None

    def peak_worker_rss_mb(self) -> list[float]:
        """Peak RSS of each Dask worker process of the run, in MB."""
        return sorted((mb for role, mb in self.peak_rss_mb.values() if role == "dask workers"), reverse=True)

    def summary(self) -> dict:
        """The JSON-ready numbers of the run."""
        return {
            "command": " ".join(self.args), "wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2),
            "cpu_s_by_role": {k: round(v, 2) for k, v in sorted(self.cpu_by_role.items())},
            "peak_rss_mb_by_process": [{"role": r, "mb": round(mb)} for r, mb in sorted(self.peak_rss_mb.values())],
            **({"aborted": self.aborted} if self.aborted else {}),
        }


def cli_command(*args: str) -> list[str]:
    """The genre-batch command line run with this interpreter."""
    return [sys.executable, "-m", "genre_batch.cli", *args]


def cli_env(work: Path) -> dict[str, str]:
    """Environment of CLI runs: this process's (single-threaded BLAS, shared numba cache) plus a Prefect home in `work`
    and a patient start of Prefect's ephemeral server (at a load average of 20 it missed the CLI's 120 s)."""
    return {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}


def role(process: psutil.Process, root: int) -> str:
    """What a process of a CLI run is: the flow process, the Prefect server, a Dask worker, or other."""
    if process.pid == root:
        return "flow process"
    cmdline = " ".join(process.cmdline())
    if "uvicorn" in cmdline:
        return "prefect server"
    if "spawn_main" in cmdline:
        return "dask workers"
    return "other"


def peak_rss(process: psutil.Process) -> int:
    """High-water RSS of a process in bytes (VmHWM on Linux), else its current RSS."""
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


def run_cli(args: list[str], env: dict[str, str], rss_abort_mb: float | None = None) -> CliRun:
    """Run a command to completion, polling its process tree; total CPU from getrusage of reaped children.

    With `rss_abort_mb`, a process of the tree past that RSS gets the whole tree killed (the machine is shared) and the
    run is returned with `aborted` saying which process it was, instead of an error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    aborted = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        root = psutil.Popen(args, stdout=out, stderr=err, env=env)
        seen: dict[int, tuple[str, float, int]] = {}
        while root.poll() is None:
            sample_tree(root, seen)
            if rss_abort_mb and aborted is None:
                aborted = over_limit(root, seen, rss_abort_mb)
            time.sleep(POLL_S)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if root.returncode != 0 and aborted is None:
        raise SystemExit(f"{' '.join(args)} exited with {root.returncode}:\n{stdout}{stderr[-3000:]}")
    cpu_by_role: dict[str, float] = {}
    for name, cpu, _ in seen.values():
        cpu_by_role[name] = cpu_by_role.get(name, 0.0) + cpu
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    peaks = {pid: (name, rss / 1e6) for pid, (name, _, rss) in seen.items()}
    return CliRun(args, wall, cpu, cpu_by_role, peaks, stdout, aborted)


def over_limit(root: psutil.Popen, seen: dict[int, tuple[str, float, int]], limit_mb: float) -> str | None:
    """If a process of the tree passed `limit_mb`, kill the tree (this run's processes only) and say which one."""
    worst = max(seen.items(), key=lambda kv: kv[1][2])
    if worst[1][2] / 1e6 <= limit_mb:
        return None
    try:
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    return f"killed by the bench: {worst[1][0]} (pid {worst[0]}) passed {limit_mb:g} MB RSS"


def sample_tree(root: psutil.Popen, seen: dict[int, tuple[str, float, int]]) -> None:
    """Record role, CPU seconds so far and peak RSS of every live process of the tree."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in processes:
        try:
            with p.oneshot():
                times = p.cpu_times()
                name = seen[p.pid][0] if p.pid in seen else role(p, root.pid)
                seen[p.pid] = (name, times.user + times.system, max(peak_rss(p), seen.get(p.pid, ("", 0.0, 0))[2]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def latest_record(store: Path) -> dict:
    """The newest run record of a store (run ids start with their UTC start time; LEASE.json is not a record)."""
    return json.loads(max((store / "runs").glob("[0-9]*.json")).read_text())


def write_tiny_library(root: Path, n_files: int) -> None:
    """Write `n_files` distinct 0.6 s mono 16-bit WAVs (a tone plus noise) in folders of 100, unless already there."""
    manifest = root / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == {"files": n_files, "seconds": TINY_SECONDS}:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    sr = 22050
    t = np.arange(round(TINY_SECONDS * sr)) / sr
    for i in range(n_files):
        folder = root / f"d{i // TINY_PER_FOLDER:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        y = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(folder / f"t{i:06d}.wav", y.astype(np.float32), sr, subtype="PCM_16")
    manifest.write_text(json.dumps({"files": n_files, "seconds": TINY_SECONDS}))


def noop_run(work: Path, n_files: int = TINY_FILES) -> dict:
    """Time `genre-batch extract` on an unchanged library of `n_files` tiny files (extracting it first if needed)."""
    library = work / "scale" / f"tiny-{n_files}"
    store = work / "scale" / f"tiny-{n_files}-store"
    started = time.perf_counter()
    write_tiny_library(library, n_files)
    result: dict = {"files": n_files, "library_build_s": round(time.perf_counter() - started, 1)}
    env = cli_env(work)
    first = run_cli(cli_command("extract", str(library), "--store", str(store)), env)
    record = latest_record(store)["extract"]
    if record["extracted"] + record["failed"]:
        result["first_extract"] = {**first.summary(), "extracted": record["extracted"], "failed": record["failed"]}
    else:
        result["first_extract"] = "cached: the store already held this library"
    noop = run_cli(cli_command("extract", str(library), "--store", str(store)), env)
    record = latest_record(store)["extract"]
    if record["unchanged"] != n_files:
        raise SystemExit(f"the no-op run was not a no-op: {record}")
    result["noop_extract"] = {**noop.summary(), "unchanged": record["unchanged"]}
    return result


RANDOM_SPACE = {"name": "bench-random", "family": "random", "family_version": 1, "dim": catalog.VECTOR_DIM, "pooling": "none (random unit vectors)",
                "scaler": "none (random unit vectors)", "sample_tracks": 0, "file": "spaces/bench-random.npz"}
"""The vector space of catalog_table's embeddings, as CURRENT.json records it."""


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random L2-normalised float32 vectors of the catalog's dimension."""
    v = rng.standard_normal((n, catalog.VECTOR_DIM), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def catalog_table(rows: int, seed: int = 0) -> pa.Table:
    """A random catalog of CATALOG_SCHEMA: probabilities over GENRES, top genre and confidence, some embedded tags,
    random unit embeddings (in the space RANDOM_SPACE) and no descriptive tags."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.full(len(GENRES), 0.3), size=rows)
    top = probabilities.argmax(axis=1)
    names = pa.array(GENRES)
    uris = [f"/music/library/{i // 1000:04d}/{i:07d}.mp3" for i in range(rows)]
    tagged = rng.random(rows) < 0.3
    embedded = np.where(rng.random(rows) < 0.7, top, rng.integers(0, len(GENRES), rows))
    embedded_genre = pa.array(np.array(GENRES, dtype=object)[embedded], pa.string(), mask=~tagged)
    n = len(GENRES)
    columns = {
        "track_id": pa.array([track_id(u) for u in uris]),
        "uri": pa.array(uris),
        "fingerprint": pa.array([f"{i:016x}" for i in rng.integers(0, 2**63, rows)]),
        "genre": names.take(pa.array(top)),
        "confidence": pa.array(probabilities.max(axis=1)),
        "probabilities": pa.MapArray.from_arrays(
            pa.array(np.arange(0, rows * n + 1, n, dtype=np.int32)), names.take(pa.array(np.tile(np.arange(n), rows))), pa.array(probabilities.ravel())
        ),
        "embedded_genre": embedded_genre,
        "disagrees_with_tag": pa.array(embedded != top, mask=~tagged),
        "duration_s": pa.array(rng.uniform(30, 600, rows).astype(np.float32)),
        "model_version": pa.array(["bench-model"] * rows),
        "feature_version": pa.array(np.full(rows, 3, np.int32)),
        "run_id": pa.array(["bench-run"] * rows),
        "tagged_at": pa.array(np.full(rows, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "ms"))),
        "embedding": pa.FixedSizeListArray.from_arrays(unit_vectors(rng, rows).ravel(), catalog.VECTOR_DIM),
        "tags": pa.nulls(rows, pa.list_(pa.string())),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in catalog.CATALOG_SCHEMA], schema=catalog.CATALOG_SCHEMA)


def catalog_run(work: Path, rows: int = CATALOG_ROWS) -> dict:
    """Time publishing a `rows`-row catalog to a fresh store, then the rock top-100 query in-process and through the CLI."""
    store_dir = work / "scale" / f"catalog-{rows}"
    shutil.rmtree(store_dir, ignore_errors=True)
    started = time.perf_counter()
    table = catalog_table(rows)
    built = time.perf_counter() - started
    store = Store(str(store_dir))
    started = time.perf_counter()
    pointer = catalog.publish(store, table, "bench-run", "bench-model", RANDOM_SPACE)  # with its similar table
    publish_s = time.perf_counter() - started
    size_mb = sum(p.stat().st_size for p in store_dir.rglob("*.parquet")) / 1e6
    return {"rows": pointer.rows, "table_build_s": round(built, 1), "publish_s": round(publish_s, 2), "parquet_mb": round(size_mb, 1),
            **query_times(work, store_dir)}


def query_times(work: Path, store_dir: Path) -> dict:
    """The rock top-100 query on a store's published catalog: in process and through `genre-batch query` (QUERY_REPEATS
    times each: first and median)."""
    store = Store(str(store_dir))
    in_process = []
    for _ in range(QUERY_REPEATS):
        started = time.perf_counter()
        result = query.run(store, QUERY)
        in_process.append(time.perf_counter() - started)
    if result.num_rows != 100:
        raise SystemExit(f"the catalog query returned {result.num_rows} rows, expected 100")
    env = cli_env(work)
    before = load()
    cli = [run_cli(cli_command("query", "--store", str(store_dir), QUERY, "--format", "json"), env) for _ in range(QUERY_REPEATS)]
    return {
        "query": QUERY, "load_1m": [before, load()],
        "query_in_process_s": {"first": round(in_process[0], 3), "median": round(statistics.median(in_process), 3)},
        "query_cli_s": {"first": round(cli[0].wall_s, 3), "median": round(statistics.median(c.wall_s for c in cli), 3),
                        "cpu_s_median": round(statistics.median(c.cpu_s for c in cli), 3), "cpu_s_min": round(min(c.cpu_s for c in cli), 3)},
    }


def query_check(work: Path, rows: int = CATALOG_ROWS) -> dict:
    """The top-100 query timings alone, on the `rows`-row catalog of the issue5 check (built first if missing)."""
    store_dir = work / "scale" / f"catalog-{rows}"
    if not (store_dir / "catalog" / catalog.POINTER).exists():
        return catalog_run(work, rows)
    return {"rows": published(Store(str(store_dir))).rows, **query_times(work, store_dir)}


def print_query(q: dict) -> None:
    """Print the query check's numbers."""
    cli = q["query_cli_s"]
    print(f"top-100 query on a {q['rows']}-row catalog: in process {q['query_in_process_s']['median']:.3f} s; genre-batch query "
          f"{cli['median']:.3f} s wall, {cli['cpu_s_median']:.2f} s CPU (min {cli['cpu_s_min']:.2f} s), median of "
          f"{QUERY_REPEATS}, load {q['load_1m']}")


def run(work: Path, tiny_files: int = TINY_FILES, catalog_rows: int = CATALOG_ROWS) -> dict:
    """Both scale checks."""
    return {"noop_run": noop_run(work, tiny_files), "catalog": catalog_run(work, catalog_rows)}


def targets(scale: dict) -> list[dict]:
    """The scale targets of issue #5 with their measured values."""
    noop, cat = scale["noop_run"], scale["catalog"]
    return [
        target(f"no-op run over {noop['files']} unchanged files (CLI wall)", noop["noop_extract"]["wall_s"], 30.0, "s"),
        target(f"{cat['rows']}-row catalog publish", cat["publish_s"], 60.0, "s"),
        target("catalog query, in process (median)", cat["query_in_process_s"]["median"], 0.5, "s"),
        target("catalog query, genre-batch query CLI (median wall)", cat["query_cli_s"]["median"], 0.5, "s"),
    ]


def target(name: str, value: float, limit: float, unit: str, at_least: bool = False) -> dict:
    """One target: its measured value, its limit and whether it is met."""
    met = value >= limit if at_least else value <= limit
    return {"target": name, "value": round(value, 3), "limit": f"{'>=' if at_least else '<='} {limit:g} {unit}", "met": met}


def print_targets(rows: list[dict]) -> None:
    """Print targets as a table."""
    print(f"{'target':<62} {'value':>10} {'limit':>12}  met")
    for t in rows:
        print(f"{t['target']:<62} {t['value']:>10.3f} {t['limit']:>12}  {'yes' if t['met'] else 'NO'}")


def print_scale(scale: dict) -> None:
    """Print the scale checks' numbers."""
    noop, cat = scale["noop_run"], scale["catalog"]
    first = noop["first_extract"]
    if isinstance(first, dict):
        print(f"first extract of {noop['files']} tiny files: {first['wall_s']:.1f} s wall, {first['cpu_s']:.1f} s CPU "
              f"({1000 * first['cpu_s'] / noop['files']:.1f} ms CPU/file)")
    else:
        print(f"first extract of {noop['files']} tiny files: {first}")
    n = noop["noop_extract"]
    print(f"no-op extract of {noop['files']} unchanged files: {n['wall_s']:.1f} s wall, {n['cpu_s']:.1f} s CPU {n['cpu_s_by_role']}")
    print(f"catalog of {cat['rows']} rows ({cat['parquet_mb']} MB Parquet): publish {cat['publish_s']:.2f} s; query in process "
          f"{cat['query_in_process_s']['median']:.3f} s (first {cat['query_in_process_s']['first']:.3f} s), "
          f"CLI {cat['query_cli_s']['median']:.3f} s wall, {cat['query_cli_s']['cpu_s_median']:.2f} s CPU")


STORE_SIZES = (100_000, 300_000, 1_000_000)
LISTING_SIZES = (100_000, 300_000)
QUICK = {"tracks": (20_000,), "listing": (10_000,), "real_caps": (10, 30, 50), "synthetic_factors": (0.02, 0.05)}
CHANGED_SHARE = 0.01
DISK_PER_TRACK = 20_000
"""Bytes on disk per track of a synthetic store (measured: ~4.7 MB per part of 250 tracks), for the free-space check."""
DISK_COPIES = 2.3
"""A store's features at most twice on disk (compaction writes the new parts before deleting the old), plus catalogs."""
RSS_LIMIT_MB = 2000
RSS_ABORT_MB = 8000
"""A measured process past this RSS has its run killed: the machine is shared and a 24 GB node has no swap."""
NIGHTLY_LIMIT_S = 60.0
QUERY_PROCESS_LIMIT_S = 0.5
QUERY_CLI_LIMIT_S = 1.0
PLAN_LIMIT_S = 10.0
PROJECTION_TRACKS = 10_000_000
MACHINE_RAM_MB = 24_000
CLUSTER_NODE_RAM_MB = 64_000
PROBES = (("train_sample", "capped sample (no fit)"),)
"""Probe runs (bench.probe, no Prefect): the training sample read without the fit."""
STEPS = (("tag_full", "full tag + publish"), ("tag_nightly", "nightly tag (1% changed)"), ("compact", "compaction"), ("train", "capped training"))
CHECKS = ("stores", "listing", "curve", "issue5", "compact", "query", "train")
TRAIN_MODES = ("sample", "cli", "both")


def load() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def measured(args: list[str], env: dict[str, str]) -> tuple[CliRun, dict]:
    """Run a command with its process tree sampled (killed past RSS_ABORT_MB); its numbers with the load average
    before and after."""
    before = load()
    result = run_cli(args, env, RSS_ABORT_MB)
    return result, {**result.summary(), "load_1m": [before, load()], "peak_rss_mb": peak_by_role(result)}


def peak_by_role(result: CliRun) -> dict[str, float]:
    """Highest peak RSS per role (flow process, dask worker, prefect server), in MB."""
    peaks: dict[str, float] = {}
    for name, mb in result.peak_rss_mb.values():
        peaks[name] = round(max(mb, peaks.get(name, 0.0)))
    return peaks


def probe(kind: str, target: str, env: dict[str, str]) -> dict:
    """Run a bench.probe measurement in its own process: its JSON plus the process's wall, CPU and peak RSS."""
    result, numbers = measured([sys.executable, "-m", "bench.probe", kind, target], env)
    return {"process": numbers} if result.aborted else {**json.loads(result.stdout), "process": numbers}


def stage_record(store: Path, stage: str) -> dict:
    """What the newest run of the store recorded for a stage."""
    return latest_record(store)[stage]


def catalog_bytes(store: Path) -> int:
    """Bytes of the published snapshot's files."""
    return sum(Path(p).stat().st_size for p in catalog.files(Store.at(str(store))))


def disk_check(work: Path, n: int, built: bool) -> str | None:
    """Why a store of n tracks does not fit the free disk, or None when it does."""
    free = shutil.disk_usage(work).free
    need = n * DISK_PER_TRACK * (DISK_COPIES - (1 if built else 0))
    if free < need:
        return f"needs ~{need / 1e9:.0f} GB free under {work}, has {free / 1e9:.0f} GB"
    return None


def families_arg(text: str) -> tuple[str, ...]:
    """--families: comma-separated families, librosa first and always."""
    families = tuple(f.strip() for f in text.split(",") if f.strip())
    if families not in (("librosa",), synthetic_store.FAMILIES):
        raise argparse.ArgumentTypeError(f"choose librosa or {','.join(synthetic_store.FAMILIES)}, not {text!r}")
    return families


def store_checks(work: Path, n: int, train: str | None, processes: int, save: Callable[[dict], None],
                 families: tuple[str, ...] = synthetic_store.FAMILIES) -> dict:
    """Build (or reuse) a store of n tracks with the feature `families` and measure tag, the catalog query, plan, nightly, compaction and training
    (`train`: "cli" for `genre-batch train`, "sample" for its capped sample read without the fit, "both", or None) on a
    copy; `save` gets the numbers so far after every step."""
    root = work / f"scale-{n}"
    base = root / "base"
    reason = disk_check(work, n, (base / synthetic_store.MARK).exists())
    if reason:
        return {"tracks": n, "skipped": reason}
    result: dict = {"tracks": n, "families": list(families), "build": {**synthetic_store.build(base, n, processes=processes, families=families), "load_1m": load()}}
    save(result)
    run_dir = root / "run"
    synthetic_store.linked_copy(base, run_dir)
    store = run_dir / "store"
    url, env = str(store), cli_env(work)

    def step(key: str, stage: str, *args: str) -> bool:
        """Run a CLI step on the store into result[key] with its run record; False when the bench killed it."""
        run, result[key] = measured(cli_command(*args, "--store", url), env)
        if run.aborted:
            (store / "runs" / "LEASE.json").unlink(missing_ok=True)  # its holder is dead: free the store for the next step
            save(result)
            return False
        result[key]["record"] = stage_record(store, stage)
        save(result)
        return True

    print(f"[{n}] store ready ({result['build']['store_bytes'] / 1e9:.1f} GB); full tag", flush=True)
    if not step("tag_full", "tag", "tag", "--full"):
        print(f"[{n}] full tag killed", flush=True)
    if published(Store.at(url)):
        result["catalog_bytes"] = catalog_bytes(store)
        print(f"[{n}] catalog query", flush=True)
        result["query"] = query_times(work, store)
        save(result)
    print(f"[{n}] no-op plan", flush=True)
    result["plan"] = probe("plan", url, env)
    save(result)
    started, before = time.perf_counter(), load()
    changed = synthetic_store.simulate_changes(Store.at(url), n, CHANGED_SHARE, processes=processes, families=families)
    result["changes"] = {"tracks": changed, "write_s": round(time.perf_counter() - started, 1), "load_1m": [before, load()]}
    save(result)
    if "catalog_bytes" in result:
        print(f"[{n}] nightly tag of {changed} changed tracks", flush=True)
        step("tag_nightly", "tag", "tag")
    result["plan_after_changes"] = probe("plan", url, env)
    save(result)
    print(f"[{n}] compaction", flush=True)
    if not step("compact", "compact", "compact"):
        print(f"[{n}] compaction killed", flush=True)
    if "record" in result["compact"]:
        result["store_bytes_after_compaction"] = synthetic_store.disk_usage(store)
    if train in ("sample", "both"):
        print(f"[{n}] capped training sample", flush=True)
        result["train_sample"] = probe("sample", url, env)
        save(result)
    if train in ("cli", "both"):
        print(f"[{n}] training", flush=True)
        if step("train", "train", "train", "--labels", "tags", "--features", ",".join(families)):  # the store's families, not the current model's
            result["train"].update(model_card(store, result["train"]["record"]["version"]))
            save(result)
    shutil.rmtree(run_dir)
    return result


def compaction_checks(work: Path, n: int) -> dict:
    """On a hard-linked copy of an already built store of n tracks (never built here): the no-op plan on its shard
    index files, `genre-batch compact` (Prefect and Dask included; peak RSS per process), then the no-op plan on the
    compacted index; the copy is deleted after."""
    base = work / f"scale-{n}" / "base"
    if not (base / synthetic_store.MARK).exists():
        return {"tracks": n, "skipped": f"no built store at {base} (build it with --checks stores)"}
    run_dir = work / f"scale-{n}" / "compact-run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    synthetic_store.linked_copy(base, run_dir)
    url, env = str(run_dir / "store"), cli_env(work)
    result: dict = {"tracks": n}
    try:
        print(f"[{n}] no-op plan on the shard index files", flush=True)
        result["plan_before"] = probe("plan", url, env)
        print(f"[{n}] compaction", flush=True)
        run, result["compact"] = measured(cli_command("compact", "--store", url), env)
        if not run.aborted:
            result["compact"]["record"] = stage_record(run_dir / "store", "compact")
            print(f"[{n}] no-op plan on the compacted index", flush=True)
            result["plan_after"] = probe("plan", url, env)
    finally:
        shutil.rmtree(run_dir)
    return result


def model_card(store: Path, version: str) -> dict:
    """What a trained model's card says of its sample: the cap, the windows, the matrix, the fit and each CV fold's fit
    (rows, rounds or C, CPU seconds) and the fingerprint."""
    card = registry.card(Store(str(store)), version)
    meta = card.document
    return {"cap_per_genre": meta["sample"]["cap_per_genre"], "rows_per_genre": meta["sample"].get("rows_per_genre"), "sampled_tracks": meta["tracks"],
            "sampled_windows": meta["windows"], "matrix_mb": round(meta["sample"]["matrix_bytes"] / 1e6, 1),
            "cv_accuracy": card.cv_accuracy, "classifier": card.classifier, "fit": meta["fit"], "cv_fits": meta["cross_validation"].get("fits", []),
            "training_fingerprint": card.training_fingerprint}


def train_checks(work: Path, n: int, copies: Path, classifier: str | None = None) -> dict:
    """On a hard-linked copy (in `copies`) of an already built store of n tracks (never built here): the whole
    `genre-batch train --labels tags` (Prefect and Dask included: 5-fold CV and the fit on the capped sample; with
    `--classifier` when given, else the kind train picks), wall, CPU and peak RSS per process, with a Prefect home of its
    own in `copies`; the copy is deleted after."""
    base = work / f"scale-{n}" / "base"
    if not (base / synthetic_store.MARK).exists():
        return {"tracks": n, "skipped": f"no built store at {base} (build it with --checks stores)"}
    run_dir = copies / f"train-{n}"
    copies.mkdir(parents=True, exist_ok=True)
    synthetic_store.linked_copy(base, run_dir)
    store = run_dir / "store"
    try:
        chosen = ["--classifier", classifier] if classifier else []
        print(f"[{n}] genre-batch train --labels tags {' '.join(chosen)}", flush=True)
        run, result = measured(cli_command("train", "--labels", "tags", "--store", str(store), *chosen), cli_env(copies))
        if not run.aborted:
            result["record"] = stage_record(store, "train")
            result.update(model_card(store, result["record"]["version"]))
    finally:
        shutil.rmtree(run_dir)
    return {"tracks": n, "train": result}


def print_training(results: list[dict]) -> None:
    """The training checks as lines."""
    for r in results:
        if "skipped" in r:
            print(f"training {r['tracks']}: skipped ({r['skipped']})")
            continue
        t = r["train"]
        p = t["peak_rss_mb"]
        print(f"training {r['tracks']} tracks (genre-batch train --labels tags): {t['wall_s']} s wall, {t['cpu_s']} s CPU {t['cpu_s_by_role']}, "
              f"peak RSS flow process {p.get('flow process', 0):.0f} MB, workers {p.get('dask workers', 0):.0f} MB, load {t['load_1m']}"
              + (f" ABORTED: {t['aborted']}" if "aborted" in t else ""))
        if "record" in t:
            rec = t["record"]
            print(f"  cap {t['cap_per_genre']} tracks/genre: {rec['sampled_tracks']} tracks / {t['sampled_windows']} windows ({t['matrix_mb']} MB) of "
                  f"{rec['tracks']} labelled; {t['classifier']} fit {t['fit']}; CV accuracy {rec['cv_accuracy']}, held-out {rec['holdout_accuracy']}; "
                  f"fingerprint {t['training_fingerprint']}")
            for name, fit in [*((f"CV fold {k + 1}", f) for k, f in enumerate(t.get("cv_fits", []))), ("final fit", t["fit"])]:
                if "cpu_s" in fit:
                    chosen = f"{fit['num_boost_round']} rounds" if "num_boost_round" in fit else f"C {fit.get('C')}"
                    print(f"  {name}: {fit['tracks']} tracks / {fit['windows']} windows, {chosen}, {fit['cpu_s']} s CPU")


def print_compaction(results: list[dict]) -> None:
    """The compaction checks as lines."""
    for r in results:
        if "skipped" in r:
            print(f"compaction {r['tracks']}: skipped ({r['skipped']})")
            continue
        c = r["compact"]
        print(f"compaction {r['tracks']} tracks: {c['wall_s']} s wall, {c['cpu_s']} s CPU, peak RSS {c['peak_rss_mb']} MB, load {c['load_1m']}"
              + (f", {c['record']['parts_before']} parts -> {c['record']['parts_after']}" if "record" in c else f" ({c.get('aborted')})"))
        for key in ("plan_before", "plan_after"):
            if key in r and "plan_total_s" in r[key]:
                p = r[key]
                print(f"  no-op plan ({key}): {p['plan_total_s']} s (index {p['read_index_s']} s, plan {p['plan_s']} s), process "
                      f"{p['process']['wall_s']} s wall, {p['process']['cpu_s']} s CPU, {p['process']['peak_rss_mb']} MB, load {p['process']['load_1m']}")


def listing_checks(work: Path, sizes: tuple[int, ...]) -> dict:
    """PUT (once) and list prefixes of the given object counts on a local S3 server; 1M extrapolated if not measured."""
    env = {**cli_env(work)}
    points = []
    with s3_listing.weed_server(work / "s3") as endpoint:
        env.update(s3_listing.client_env(endpoint))
        for n in sizes:
            print(f"[listing] {n} objects", flush=True)
            put = s3_listing.populate(endpoint, f"lib-{n}", n)
            listed = probe("discover", f"s3://{s3_listing.BUCKET}/lib-{n}", env)
            if listed["files"] != n:
                raise SystemExit(f"listing of lib-{n} found {listed['files']} files, not {n}")
            points.append({**put, **listed})
    result: dict = {"points": points}
    if points and max(sizes) < 1_000_000:
        per_object = points[-1]["discover_s"] / points[-1]["objects"]
        result["extrapolated_1m_s"] = round(per_object * 1_000_000, 1)
    return result


def slope(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (per track, intercept) of values against track counts: fixed costs land in the intercept. From one
    size: (value / tracks, 0), the fixed costs counted per track (an upper bound of the slope)."""
    if len(points) == 1:
        return points[0][1] / points[0][0], 0.0
    n, v = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    a, b = np.polyfit(n, v, 1)
    return float(a), float(b)


def projection(stores: list[dict], work: Path, tracks: int = PROJECTION_TRACKS) -> dict:
    """Per-track costs from the measured stores, projected to `tracks`, and where each resource runs out."""
    done = [s for s in stores if "skipped" not in s and "compact" in s and "tag_nightly" in s]
    if not done:
        return {"note": "needs a measured store size with its nightly tag and compaction"}
    largest = max(done, key=lambda s: s["tracks"])
    n = largest["tracks"]

    def fit(get: Callable[[dict], float]) -> tuple[float, float]:
        """Per-track slope and intercept of a measured value."""
        return slope([(s["tracks"], get(s)) for s in done])

    flow_tag = fit(lambda s: s["tag_nightly"]["peak_rss_mb"]["flow process"])  # the same CLI path at every size
    flow_plan = fit(lambda s: s["plan"]["process"]["peak_rss_mb"]["flow process"])
    worker_peak = max(max(s[k]["peak_rss_mb"].get("dask workers", 0) for k in ("tag_full", "compact")) for s in done)
    with_catalog = max((s for s in done if "catalog_bytes" in s), key=lambda s: s["tracks"])
    per_track = {
        "features_disk_bytes": largest["build"]["store_bytes"] / n,
        "index_disk_bytes": largest["build"]["index_bytes"] / n,
        "index_arrow_bytes": largest["plan"]["index_arrow_mb"] * 1e6 / n,
        "catalog_bytes": with_catalog["catalog_bytes"] / with_catalog["tracks"],
        "flow_rss_nightly_tag_bytes": flow_tag[0] * 1e6,
        "flow_rss_plan_bytes": flow_plan[0] * 1e6,
        "cpu_tag_ms": 1000 * largest["tag_full"]["cpu_s"] / n,  # start-up included: an upper bound
        "cpu_compact_ms": 1000 * largest["compact"]["cpu_s"] / n,
        "cpu_plan_ms": 1000 * fit(lambda s: s["plan"]["process"]["cpu_s"])[0],
        "plan_s_per_million": fit(lambda s: s["plan"]["plan_total_s"])[0] * 1e6,
    }

    def at(fitted: tuple[float, float]) -> float:
        """A fitted value at the projected size."""
        return fitted[0] * tracks + fitted[1]

    disk_free = shutil.disk_usage(work).free + sum(s["build"]["store_bytes"] for s in done)  # the bench's stores can go
    projected = {
        "features_disk_gb": per_track["features_disk_bytes"] * tracks / 1e9,
        "index_disk_mb": per_track["index_disk_bytes"] * tracks / 1e6,
        "catalog_gb": per_track["catalog_bytes"] * tracks / 1e9,
        "flow_rss_nightly_tag_mb": at(flow_tag), "flow_rss_plan_mb": at(flow_plan),
        "worker_rss_mb": worker_peak,
        "tag_full_hours_2_cores": per_track["cpu_tag_ms"] * tracks / 1000 / 3600 / 2,
        "compact_hours_2_cores": per_track["cpu_compact_ms"] * tracks / 1000 / 3600 / 2,
        "plan_s": per_track["plan_s_per_million"] * tracks / 1e6,
    }

    def runs_out(budget: float, fitted: tuple[float, float]) -> float:
        """Tracks at which a fitted value reaches a budget."""
        return (budget - fitted[1]) / fitted[0] if fitted[0] > 0 else float("inf")

    limits_here = {
        "disk (features + compaction copy)": disk_free / (per_track["features_disk_bytes"] * DISK_COPIES),
        f"flow process RSS of nightly tag reaches {RSS_LIMIT_MB} MB target": runs_out(RSS_LIMIT_MB, flow_tag),
        f"flow process RSS of nightly tag reaches {MACHINE_RAM_MB} MB RAM": runs_out(MACHINE_RAM_MB, flow_tag),
        f"no-op plan reaches {PLAN_LIMIT_S:g} s": PLAN_LIMIT_S / per_track["plan_s_per_million"] * 1e6,
    }
    limits_cluster = {
        f"flow process RSS of nightly tag reaches {RSS_LIMIT_MB} MB target": runs_out(RSS_LIMIT_MB, flow_tag),
        f"flow process RSS reaches one {CLUSTER_NODE_RAM_MB // 1000} GB node": runs_out(CLUSTER_NODE_RAM_MB, flow_tag),
        f"no-op plan (one process) reaches {PLAN_LIMIT_S:g} s": PLAN_LIMIT_S / per_track["plan_s_per_million"] * 1e6,
    }
    killed = sorted({f"{k} at {s['tracks']}" for s in done for k in ("tag_full", "compact") if "aborted" in s[k]})
    return {
        "caveat": f"CLI runs killed past {RSS_ABORT_MB} MB (their numbers are those at the kill): {', '.join(killed)}" if killed else "",
        "from_tracks": [s["tracks"] for s in done],
        "method": "slopes between sizes" if len(done) > 1 else "one size: every cost divided by its tracks (fixed costs included: an upper bound)", "per_track": {k: round(v, 4) for k, v in per_track.items()},
        "at_tracks": tracks, "projected": {k: round(v, 2) for k, v in projected.items()},
        "runs_out_here": {k: round(v) if v < float("inf") else None for k, v in sorted(limits_here.items(), key=lambda kv: kv[1])},
        "runs_out_cluster": {k: round(v) if v < float("inf") else None for k, v in sorted(limits_cluster.items(), key=lambda kv: kv[1])},
    }


def store_targets(stores: list[dict]) -> list[dict]:
    """The scale targets of issue #12 with their measured values (load average at the measurement in the name)."""
    rows = []
    for s in stores:
        if "skipped" in s or "plan" not in s:
            continue
        n = f"{s['tracks'] // 1000}k"
        for key, what in (STEPS[0], STEPS[2], STEPS[3]):
            if key in s:
                rows.append(rss_target(f"{n}: {what}", s[key]))
        for key, name in PROBES:
            if key in s:
                rows.append(rss_target(f"{n}: {name}", s[key]["process"]))
        if "record" in s.get("tag_nightly", {}):
            after = s["plan_after_changes"]
            nightly = s["tag_nightly"]["wall_s"] + after["plan_total_s"] + after["compaction_check_s"]
            rows.append(target(f"{n}: nightly 1% changed, plan + tag CLI (load {s['tag_nightly']['load_1m'][0]:g})", nightly, NIGHTLY_LIMIT_S, "s"))
        rows.append(target(f"{n}: no-op plan in process (load {s['plan']['process']['load_1m'][0]:g})", s["plan"]["plan_total_s"], PLAN_LIMIT_S, "s"))
        if "query" in s:
            q = s["query"]
            rows.append(target(f"{n}: top-100 query in process (median, load {q['load_1m'][0]:g})", q["query_in_process_s"]["median"], QUERY_PROCESS_LIMIT_S, "s"))
            rows.append(target(f"{n}: top-100 query, genre-batch query CLI (median wall)", q["query_cli_s"]["median"], QUERY_CLI_LIMIT_S, "s"))
    return rows


def training_targets(results: list[dict]) -> list[dict]:
    """The <= RSS_LIMIT_MB target of each measured whole training."""
    return [rss_target(f"{r['tracks'] // 1000}k: genre-batch train (CV + fit)", r["train"]) for r in results if "train" in r]


def rss_target(name: str, run: dict) -> dict:
    """The <= RSS_LIMIT_MB target of a run's flow process and workers (an aborted run: its peak when killed)."""
    peak = max(v for k, v in run["peak_rss_mb"].items() if k in ("flow process", "dask workers"))
    return target(f"{name}, peak RSS of any process{' (KILLED)' if 'aborted' in run else ''} (load {run['load_1m'][0]:g})", peak, RSS_LIMIT_MB, "MB")


def print_stores(stores: list[dict]) -> None:
    """Print every measured number of the store checks."""
    for s in stores:
        if "skipped" in s:
            print(f"{s['tracks']} tracks: skipped: {s['skipped']}")
            continue
        if "compact" not in s:
            print(f"{s['tracks']} tracks: not finished (steps measured: {', '.join(k for k in s if k not in ('tracks', 'build'))}): see the JSON report")
            continue
        b, n = s["build"], s["tracks"]
        print(f"\n== {n} tracks: {b['parts']} parts, {b['store_bytes'] / 1e9:.2f} GB on disk ({b['store_bytes'] / n / 1e3:.1f} KB/track), "
              f"index {b['index_bytes'] / 1e6:.1f} MB ({b['index_bytes'] / n:.0f} B/track), build {'cached' if b['cached'] else str(b['build_s']) + ' s'}")
        rows = [(name, s[key]) for key, name in STEPS if key in s]
        rows += [(name, s[key]["process"]) for key, name in PROBES if key in s]
        rows += [("no-op plan process", s["plan"]["process"])]
        print(f"{'step':<26} {'wall s':>8} {'CPU s':>8} {'CPU ms/track':>13} {'flow MB':>8} {'worker MB':>10} {'prefect MB':>11}  load")
        for name, r in rows:
            p = r["peak_rss_mb"]
            print(f"{name:<26} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {1000 * r['cpu_s'] / n:>13.3f} {p.get('flow process', 0):>8.0f} "
                  f"{p.get('dask workers', 0):>10.0f} {p.get('prefect server', 0):>11.0f}  {r['load_1m'][0]:g}->{r['load_1m'][1]:g}"
                  + (f"  ABORTED: {r['aborted']}" if "aborted" in r else ""))
        pl = s["plan"]
        print(f"no-op plan: read_inventory {pl['read_inventory_s']} s + read_index {pl['read_index_s']} s + plan {pl['plan_s']} s "
              f"= {pl['plan_total_s']} s ({pl['index_rows']} index rows, {pl['index_arrow_mb']} MB in Arrow); "
              f"compaction check {pl['compaction_check_s']} s (needed: {pl['compaction_needed']})")
        print(f"nightly: {s['changes']['tracks']} changed tracks written in {s['changes']['write_s']} s (simulated extraction, not counted)"
              + (f"; tag {r['mode']}: {r['predicted']} predicted, {r['carried']} carried, {r['dropped']} dropped"
                 if (r := s.get("tag_nightly", {}).get("record")) else "; no incremental tag (no full snapshot)"))
        if "store_bytes_after_compaction" in s:
            c = s["compact"]["record"]
            print(f"compact: {c['parts_before']} parts -> {c['parts_after']}, index rows {c['index_rows_before']} -> {c['index_rows_after']}; "
                  f"store {s['store_bytes_after_compaction'] / 1e9:.2f} GB after")
        if "catalog_bytes" in s:
            print(f"catalog snapshot: {s['catalog_bytes'] / 1e6:.1f} MB ({s['catalog_bytes'] / n:.0f} B/track)")
        if "query" in s:
            q = s["query"]
            print(f"top-100 query of a genre: in process {q['query_in_process_s']['median']:.3f} s (first {q['query_in_process_s']['first']:.3f} s), "
                  f"CLI {q['query_cli_s']['median']:.3f} s wall (first {q['query_cli_s']['first']:.3f} s)")
        if "record" in s.get("train", {}):
            t = s["train"]
            print(f"train: cap {t['cap_per_genre']} tracks/genre, {t['record']['sampled_tracks']} tracks / {t['sampled_windows']} windows sampled "
                  f"of {t['record']['tracks']} labelled; CV accuracy {t['record']['cv_accuracy']}")
        if "cap_per_genre" in s.get("train_sample", {}):
            t = s["train_sample"]
            print(f"training sample: cap {t['cap_per_genre']} tracks/genre, {t['sampled_tracks']} tracks / {t['sampled_windows']} windows "
                  f"of {t['labelled_tracks']} labelled, matrix {t['matrix_mb']} MB, read in {t['sample_s']} s (the fit is not run)")


def print_listing(listing: dict) -> None:
    """Print the S3 listing times."""
    for p in listing["points"]:
        put = "PUTs cached" if p.get("put") == "cached" else f"PUT {p['put_s']} s ({p['puts_per_s']}/s)"
        print(f"S3 listing of {p['objects']} objects: discover {p['discover_s']} s, process wall {p['process']['wall_s']} s, "
              f"peak RSS {p['process']['peak_rss_mb']['flow process']} MB (load {p['process']['load_1m'][0]}); {put}")
    if "extrapolated_1m_s" in listing:
        print(f"S3 listing of 1,000,000 objects: {listing['extrapolated_1m_s']} s (EXTRAPOLATED linearly from the largest prefix measured)")


def setting(point: dict) -> str:
    """What a curve point's fit chose: its boosting rounds, or its C."""
    return f"{point['rounds']} rounds" if point.get("rounds") is not None else f"C {point.get('C')}"


def print_curves(curves: dict) -> None:
    """Print the learning curves."""
    real = curves.get("real")
    if real:
        print(f"learning curve, {real['task']} ({real['tracks']} tracks, {real['artists']} artists, {real['folds']}-fold CV by artist): "
              + ", ".join(f"cap {p['cap_per_genre']}: {p['accuracy_mean']:.3f}±{p['accuracy_std']:.3f}" for p in real["points"])
              + (f"; train's cap for it {real['default_cap']} per genre ({'binds' if real['cap_binds'] else 'never binds'}: "
                 f"largest genre {real['largest_genre']})" if "default_cap" in real else ""))
    synthetic = curves.get("synthetic")
    if synthetic:
        print(f"learning curve, synthetic, {synthetic.get('classifier', 'xgboost')} ({synthetic['test_tracks']} test tracks of unseen artists): "
              + ", ".join(f"cap {p['cap_per_genre']}" + (f" x {p['train_windows'] / p['train_tracks']:.1f} windows" if p.get("train_tracks") else "")
                          + f": {p['accuracy']:.3f}" + (f" ({setting(p)}, {p['cpu_s']} s CPU)" if "cpu_s" in p else "")
                          for p in synthetic["points"]))
        for s in synthetic.get("skipped", []):
            print(f"  cap {s['cap_per_genre']}: SKIPPED, projected {s['projected_cpu_s']} s CPU > {s['budget_left_s']} s left of the "
                  f"{synthetic['budget_s']:.0f} s budget")
        cost = synthetic.get("cap_cost")
        if cost:
            gain = (f"{cost['gain_points']:+.2f} ± {cost['se_points']:.2f} points (paired, same test tracks)" if cost["gain_points"] is not None
                    else "not measured (no point above the cap within the budget)")
            print(f"  the cap ({cost['cap_per_genre']} tracks, {cost.get('rows_per_genre', '?')} windows per genre) against cap "
                  f"{cost['largest_cap']} ({cost.get('largest_rows', '?')} windows): accuracy {gain}; goal <= 1 point")


def print_projection(p: dict) -> None:
    """Print the projection."""
    if "note" in p:
        print(f"\nprojection: {p['note']}")
        return
    print(f"\nprojection to {p['at_tracks']:,} tracks from {p['from_tracks']} ({p.get('method', 'slopes between sizes')}): per track {p['per_track']}")
    print(f"projected: {p['projected']}" + (f" ({p['caveat']})" if p.get("caveat") else ""))
    for where, key in (("this machine", "runs_out_here"), ("a cluster", "runs_out_cluster")):
        print(f"runs out first on {where} (tracks): " + "; ".join(f"{k}: {'no growth measured' if v is None else f'{v:,}'}" for k, v in p[key].items()))


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.scale [--tracks N ...] [--quick] [--checks ...] [--work DIR] [--out FILE]."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, nargs="+", default=list(STORE_SIZES), help="store sizes, smallest first (default 100000 300000 1000000)")
    parser.add_argument("--train-tracks", type=int, nargs="*", help="store sizes that also measure training (default: the largest)")
    parser.add_argument("--train", choices=TRAIN_MODES, default="sample",
                        help="sample: the capped sample read by the workers, no fit (default); cli: the whole genre-batch train "
                             "(5-fold CV + fit on the capped sample); both: the sample, then the whole train")
    parser.add_argument("--listing", type=int, nargs="+", default=list(LISTING_SIZES), help="S3 prefix sizes to list (default 100000 300000; 1M extrapolated unless listed)")
    parser.add_argument("--checks", nargs="*", choices=CHECKS, default=list(CHECKS[:3]),
                        help="what to run (default: stores listing curve; issue5 = the #5 checks; compact = plan and compaction on built stores only; "
                             "query = the top-100 query of issue5 alone, on its catalog (built if missing); "
                             "train = the whole genre-batch train on built stores only; none: print the saved report)")
    parser.add_argument("--quick", action="store_true", help="a quick look: 20,000 tracks, 10,000 objects, short learning curves")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real music for the learning curve (its emotify/ task)")
    parser.add_argument("--families", type=families_arg, default=synthetic_store.FAMILIES,
                        help="stores: the feature families of the built stores (default librosa,musicnn, as extraction's default; librosa: the layout before #14)")
    parser.add_argument("--processes", type=int, default=2, help="store builder processes (default 2: never with the cluster running)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"folder for stores, S3 data, caches (default {DEFAULT_WORK}); reused between runs")
    parser.add_argument("--tiny-files", type=int, default=TINY_FILES, help=f"issue5: files of the no-op library (default {TINY_FILES})")
    parser.add_argument("--catalog-rows", type=int, default=CATALOG_ROWS, help=f"issue5: rows of the generated catalog (default {CATALOG_ROWS})")
    parser.add_argument("--curve-budget", type=float, default=learning_curve.CURVE_BUDGET_S,
                        help=f"curve: CPU seconds the synthetic curve may spend on fits; points projected past it are skipped (default {learning_curve.CURVE_BUDGET_S:.0f})")
    parser.add_argument("--curve-classifier", choices=sorted(KINDS), default=default_kind(["librosa"]),
                        help="curve: the classifier fitted at each point (default: %(default)s, what train picks for librosa features alone)")
    parser.add_argument("--train-classifier", choices=sorted(KINDS),
                        help="train: the classifier of the whole genre-batch train (default: what train picks: linear for a store with musicnn on every track, xgboost for a librosa-only one)")
    parser.add_argument("--copies", type=Path, help="train: folder for the hard-linked store copies and their Prefect home (default: the work folder)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"), help="JSON report (default bench/results/scale.json)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = list(QUICK["tracks"]) if args.quick else args.tracks
    train_sizes = set(args.train_tracks if args.train_tracks is not None else [max(sizes)])
    report: dict = json.loads(args.out.read_text()) if args.out.exists() else {}  # checks not run now keep their last numbers
    report.update(machine={"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
                           "disk_free_gb": round(shutil.disk_usage(work).free / 1e9, 1)},
                  started_at=datetime.now(timezone.utc).isoformat(), targets=[])

    def save() -> None:
        """Write the report so far."""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    if "stores" in args.checks:
        by_size = {s["tracks"]: s for s in report.get("stores", [])}  # other sizes keep their last numbers
        def save_size(numbers: dict) -> None:
            """Keep one size's numbers so far in the report and write it."""
            by_size[numbers["tracks"]] = numbers
            report["stores"] = [by_size[k] for k in sorted(by_size)]
            save()

        for n in sizes:
            save_size(store_checks(work, n, args.train if n in train_sizes else None, args.processes, save_size, args.families))
    if report.get("stores"):
        report["projection"] = projection(report["stores"], work)
    if "listing" in args.checks:
        report["listing"] = listing_checks(work, tuple(QUICK["listing"]) if args.quick else tuple(args.listing))
        save()
    if "curve" in args.checks:
        real_caps = QUICK["real_caps"] if args.quick else learning_curve.REAL_CAPS
        report["curves"] = {"synthetic": learning_curve.synthetic_curve(QUICK["synthetic_factors"] if args.quick else learning_curve.CAP_FACTORS, budget_s=args.curve_budget,
                                                                        kind=args.curve_classifier)}
        save()  # the synthetic curve's hour is kept if the real one fails
        if (args.data / "emotify").is_dir():
            report["curves"]["real"] = learning_curve.real_curve(args.data / "emotify", work / "emotify-features.npz", real_caps, kind=args.curve_classifier)
        save()
    if "compact" in args.checks:
        done = {r["tracks"]: r for r in report.get("compaction", [])}
        for n in sizes:
            done[n] = compaction_checks(work, n)
            report["compaction"] = [done[k] for k in sorted(done)]
            save()
    if "train" in args.checks:
        done = {r["tracks"]: r for r in report.get("training", [])}
        for n in sizes:
            done[n] = train_checks(work, n, (args.copies or work).resolve(), args.train_classifier)
            report["training"] = [done[k] for k in sorted(done)]
            save()
    if "issue5" in args.checks:
        report["issue5"] = run(work, args.tiny_files, args.catalog_rows)
    if "query" in args.checks:
        report["query"] = query_check(work, args.catalog_rows)
    if "issue5" in report:
        report["targets"] += targets(report["issue5"])
    report["targets"] = store_targets(report.get("stores", [])) + training_targets(report.get("training", [])) + report["targets"]
    save()
    print_stores(report.get("stores", []))
    if "listing" in report:
        print_listing(report["listing"])
    if "curves" in report:
        print_curves(report["curves"])
    if "compaction" in report:
        print_compaction(report["compaction"])
    if "training" in report:
        print_training(report["training"])
    if "projection" in report:
        print_projection(report["projection"])
    if "issue5" in report:
        print_scale(report["issue5"])
    if "query" in report:
        print_query(report["query"])
    print()
    print_targets(report["targets"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
