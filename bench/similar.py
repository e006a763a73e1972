"""Similar-track lists at scale (issue #15): index build + list queries on a 2-worker Dask cluster, recall@10 against
exact search, a 1 % nightly update, and `genre-batch similar` latency.

    python -m bench.similar [--tracks 100000 1000000] [--workers 2] [--work DIR] [--out bench/results/similar.json]

Vectors: bench.ann.generate (genre > style > artist > track hierarchy, 1 % near-duplicates, distinct, L2-normalised,
128-dim centred like the PCA reduction of genre_batch.vectors), written as a catalog snapshot (one file per genre) by
catalog.write_genre; then genre_batch.similar.build as the tag stage runs it (session.run on the cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.ann import K, exact_top, generate, recall_at_k
from genre_batch import catalog, similar
from genre_batch.store import Store

DEFAULT_WORK = Path(tempfile.gettempdir()) / "genre-batch-bench" / "similar"
DEFAULT_OUT = Path(__file__).parent / "results" / "similar.json"
SAMPLE = 2_000
"""Tracks whose lists are checked against exact search."""
NIGHTLY_SHARE = 0.01
LATENCY_QUERIES = 200


def catalog_table(vectors: np.ndarray, first: int, genres: int = 10) -> pa.Table:
    """Catalog rows of tracks first.. with these embeddings (genre = a hash of the index, for the per-genre files)."""
    n = len(vectors)
    ids = [f"{first + i:016x}" for i in range(n)]
    genre = [f"g{(first + i) * 7 % genres}" for i in range(n)]
    now = datetime.now(timezone.utc)
    columns = {
        "track_id": pa.array(ids), "uri": pa.array([f"/music/{i}.mp3" for i in ids]), "fingerprint": pa.array(ids),
        "genre": pa.array(genre), "confidence": pa.array(np.full(n, 0.9)),
        "probabilities": pa.array([[(g, 0.9)] for g in genre], catalog.CATALOG_SCHEMA.field("probabilities").type),
        "embedded_genre": pa.nulls(n, pa.string()), "disagrees_with_tag": pa.nulls(n, pa.bool_()),
        "duration_s": pa.array(np.full(n, 200.0, np.float32)), "model_version": pa.array(["bench"] * n),
        "feature_version": pa.array(np.full(n, 3, np.int32)), "run_id": pa.array(["bench"] * n),
        "tagged_at": pa.array([now] * n, catalog.CATALOG_SCHEMA.field("tagged_at").type),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), catalog.VECTOR_DIM),
        "tags": pa.nulls(n, pa.list_(pa.string())),
    }
    return pa.table(columns, schema=catalog.CATALOG_SCHEMA)


def write_snapshot(store: Store, name: str, table: pa.Table) -> list[str]:
    """Write a table as a snapshot's genre files (unpublished); returns their paths relative to the catalog."""
    files = []
    for number, (_, rows) in enumerate(catalog.split_by_genre(table).items()):
        files.append(catalog.genre_file(name, number))
        catalog.write_genre(store, files[-1], rows)
    return files


def with_peak(function: object, *args: object) -> tuple[object, float, float]:
    """(result, task seconds, peak RSS MB of this worker process so far)."""
    started = time.perf_counter()
    result = function(*args)  # type: ignore[operator]
    return result, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Measured:
    """A runner for similar.build that records each task's time and its worker's peak RSS."""

    def __init__(self, session: object) -> None:
        self.session, self.tasks = session, []

    def __call__(self, calls: list[tuple]) -> list:
        """Run the calls as Dask tasks through with_peak."""
        out = self.session.run([(with_peak, *call) for call in calls])  # type: ignore[attr-defined]
        self.tasks.append([(t, m) for _, t, m in out])
        return [r for r, _, _ in out]


def stored_neighbours(store: Store, info: dict, track_ids: list[str], position: dict[str, int]) -> np.ndarray:
    """Row positions of the stored top-K neighbours of some tracks (-1 padded)."""
    wanted = pa.array(track_ids)
    found = np.full((len(track_ids), K), -1, np.int64)
    row = {t: i for i, t in enumerate(track_ids)}
    for f in info["files"]:
        table = store.read_table(f"{store.catalog}/{f}")
        table = table.filter(pc.and_(pc.is_in(table["track_id"], value_set=wanted), pc.less_equal(table["rank"], K)))
        for t, n, r in zip(table["track_id"].to_pylist(), table["neighbour_id"].to_pylist(), table["rank"].to_pylist()):
            found[row[t], r - 1] = position[n]
    return found


def recall(store: Store, info: dict, vectors: np.ndarray, ids: list[str], seed: int) -> float:
    """Tie-aware recall@10 of the stored lists of SAMPLE random tracks against exact search."""
    sample = np.random.default_rng(seed).choice(len(vectors), min(SAMPLE, len(vectors)), replace=False)
    kth = exact_top(vectors, sample, K)[0][:, -1]
    position = {t: i for i, t in enumerate(ids)}
    found = stored_neighbours(store, info, [ids[i] for i in sample], position)
    return recall_at_k(vectors, sample, found, kth)


def cli_seconds(store: Path, *args: str) -> float:
    """Wall time of one `genre-batch similar` process."""
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "genre-batch"), "similar", "--store", str(store), *args],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"genre-batch similar failed: {done.stderr}")
    return time.perf_counter() - started


def percentiles(seconds: list[float]) -> dict:
    """p50 and p99 in ms."""
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 1), "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 1)}


def measure(n: int, work: Path, workers: int, seed: int) -> dict:
    """Everything for a store of n tracks."""
    from genre_batch.cluster import session

    root = work / f"similar-{n}"
    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    extra = max(1, int(n * NIGHTLY_SHARE))
    started = time.perf_counter()
    everything = generate(n + extra, catalog.VECTOR_DIM, "reduction", seed)
    generated = time.perf_counter() - started
    base, fresh = everything[:n], everything[n:]
    ids = [f"{i:016x}" for i in range(n + extra)]
    files = write_snapshot(store, "s1", catalog_table(base, 0))
    report: dict = {"tracks": n, "workers": workers, "generate_s": round(generated, 1), "load_1min": os.getloadavg()[0]}
    with session(None, workers) as cluster:
        cluster.client  # noqa: B018  start the cluster before the clock
        runner = Measured(cluster)
        started = time.perf_counter()
        info = similar.build(store, "s1", files, None, runner)
        report["full"] = {"wall_s": round(time.perf_counter() - started, 1), "index_task_s": round(runner.tasks[0][0][0], 1),
                          "query_tasks_s": round(sum(t for t, _ in runner.tasks[1]), 1), "buckets": info["buckets"], "nlist": info["nlist"],
                          "peak_rss_mb": round(max(m for tasks in runner.tasks for _, m in tasks)), "rows": info["rows"],
                          "index_mb": round(os.path.getsize(f"{store.catalog}/{info['index']}") / 1e6, 1)}
        report["full"]["recall_at_10"] = round(recall(store, info, base, ids[:n], seed), 4)
        print(json.dumps({"n": n, "full": report["full"]}), flush=True)

        # a nightly: 1 % departed, 1 % new
        departed = np.random.default_rng(seed + 1).choice(n, extra, replace=False)
        keep = np.setdiff1d(np.arange(n), departed)
        night_vectors = np.vstack([base[keep], fresh])
        night_ids = [ids[i] for i in keep] + ids[n:]
        table = pa.concat_tables([catalog_table(base, 0).take(pa.array(keep)), catalog_table(fresh, n)])
        files2 = write_snapshot(store, "s2", table)
        previous = {"vector_space": {"name": "bench"}, "files": files, "similar": info}
        update = similar.plan_update(store, previous, "bench", table.select(similar.KEYS))
        runner = Measured(cluster)
        started = time.perf_counter()
        info2 = similar.build(store, "s2", files2, update, runner)
        report["nightly"] = {"wall_s": round(time.perf_counter() - started, 1), "mode": info2["mode"], "added": info2["added"],
                             "removed": info2["removed"], "index_task_s": round(runner.tasks[0][0][0], 1),
                             "query_tasks_s": round(sum(t for t, _ in runner.tasks[1]), 1),
                             "peak_rss_mb": round(max(m for tasks in runner.tasks for _, m in tasks))}
        report["nightly"]["recall_at_10"] = round(recall(store, info2, night_vectors, night_ids, seed + 2), 4)
        print(json.dumps({"n": n, "nightly": report["nightly"]}), flush=True)

    # publish s2 so that `genre-batch similar` reads it, then latency in process and through the CLI
    genres = {f: g for f, g in zip(files2, sorted(set(table["genre"].to_pylist())))}
    catalog.switch(store, "s2", genres, table.num_rows, "bench", "bench", keep=5, vector_space={"name": "bench"}, similar=info2)
    rng = np.random.default_rng(seed + 3)
    names = [night_ids[i] for i in rng.choice(len(night_ids), LATENCY_QUERIES, replace=False)]
    for label, top, genre in (("table", 10, None), ("index_genre", 10, "g3")):
        seconds = []
        for name in names:
            started = time.perf_counter()
            similar.answer(store, [(name, name)], top, genre)
            seconds.append(time.perf_counter() - started)
        report[f"in_process_{label}"] = percentiles(seconds)
    report["cli_s"] = {"table": round(cli_seconds(root, names[0], "--top", "10"), 2),
                       "index_genre": round(cli_seconds(root, names[1], "--top", "10", "--genre", "g3"), 2)}
    print(json.dumps({"n": n, "latency": {k: v for k, v in report.items() if k.startswith(("in_process", "cli"))}}), flush=True)
    return report


def main() -> None:
    """Measure each size, print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, nargs="+", default=[100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    report = {"sizes": []}
    for n in args.tracks:
        report["sizes"].append(measure(n, args.work, args.workers, args.seed))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
