"""Scale checks without real audio: a no-op run over 10,000 unchanged tiny files, a 1,000,000-row catalog publish and query."""

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import soundfile as sf

from genre_batch import catalog, query
from genre_batch.discovery import track_id
from genre_batch.store import Store

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

    def peak_worker_rss_mb(self) -> list[float]:
        """Peak RSS of each Dask worker process of the run, in MB."""
        return sorted((mb for role, mb in self.peak_rss_mb.values() if role == "dask workers"), reverse=True)

    def summary(self) -> dict:
        """The JSON-ready numbers of the run."""
        return {
            "command": " ".join(self.args), "wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2),
            "cpu_s_by_role": {k: round(v, 2) for k, v in sorted(self.cpu_by_role.items())},
            "peak_rss_mb_by_process": [{"role": r, "mb": round(mb)} for r, mb in sorted(self.peak_rss_mb.values())],
        }


def cli_command(*args: str) -> list[str]:
    """The genre-batch command line run with this interpreter."""
    return [sys.executable, "-m", "genre_batch.cli", *args]


def cli_env(work: Path) -> dict[str, str]:
    """Environment of CLI runs: this process's (single-threaded BLAS, shared numba cache) plus a Prefect home in `work`."""
    return {**os.environ, "PREFECT_HOME": str(work / "prefect-home")}


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


def run_cli(args: list[str], env: dict[str, str]) -> CliRun:
    """Run a command to completion, polling its process tree; total CPU from getrusage of reaped children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        root = psutil.Popen(args, stdout=out, stderr=err, env=env)
        seen: dict[int, tuple[str, float, int]] = {}
        while root.poll() is None:
            sample_tree(root, seen)
            time.sleep(POLL_S)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if root.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited with {root.returncode}:\n{stdout}{stderr[-3000:]}")
    cpu_by_role: dict[str, float] = {}
    for name, cpu, _ in seen.values():
        cpu_by_role[name] = cpu_by_role.get(name, 0.0) + cpu
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return CliRun(args, wall, cpu, cpu_by_role, {pid: (name, rss / 1e6) for pid, (name, _, rss) in seen.items()}, stdout)


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


def catalog_table(rows: int, seed: int = 0) -> pa.Table:
    """A random catalog of CATALOG_SCHEMA: probabilities over GENRES, top genre and confidence, some embedded tags."""
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
    pointer = catalog.publish(store, table, "bench-run", "bench-model")
    publish_s = time.perf_counter() - started
    size_mb = sum(p.stat().st_size for p in store_dir.rglob("*.parquet")) / 1e6
    in_process = []
    for _ in range(QUERY_REPEATS):
        started = time.perf_counter()
        result = query.run(store, QUERY)
        in_process.append(time.perf_counter() - started)
    if result.num_rows != 100:
        raise SystemExit(f"the catalog query returned {result.num_rows} rows, expected 100")
    env = cli_env(work)
    cli = [run_cli(cli_command("query", "--store", str(store_dir), QUERY, "--format", "json"), env) for _ in range(QUERY_REPEATS)]
    return {
        "rows": pointer["rows"], "table_build_s": round(built, 1), "publish_s": round(publish_s, 2), "parquet_mb": round(size_mb, 1),
        "query": QUERY,
        "query_in_process_s": {"first": round(in_process[0], 3), "median": round(statistics.median(in_process), 3)},
        "query_cli_s": {"first": round(cli[0].wall_s, 3), "median": round(statistics.median(c.wall_s for c in cli), 3),
                        "cpu_s_median": round(statistics.median(c.cpu_s for c in cli), 3)},
    }


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


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.scale [--work DIR] [--tiny-files 10000] [--catalog-rows 1000000] [--out FILE]."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"folder for generated libraries and stores (default {DEFAULT_WORK}); reused between runs")
    parser.add_argument("--tiny-files", type=int, default=TINY_FILES, help=f"files of the no-op library (default {TINY_FILES})")
    parser.add_argument("--catalog-rows", type=int, default=CATALOG_ROWS, help=f"rows of the generated catalog (default {CATALOG_ROWS})")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    report = run(work, args.tiny_files, args.catalog_rows)
    report["targets"] = targets(report)
    print_scale(report)
    print()
    print_targets(report["targets"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
