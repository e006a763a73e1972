"""Similar-track lists (issue #15). At scale: index build + list queries on a 2-worker Dask cluster, recall@10 against
exact search, a 1 % nightly update, and `genre-batch similar` latency. Quality (`--quality`): genre precision@K of the
catalog's vector spaces on the real music of ../shared/data (features from bench.accuracy's cache).

    python -m bench.similar [--tracks 100000 1000000] [--workers 2] [--work DIR] [--out bench/results/similar.json] [--no-latency]
    python -m bench.similar --quality [--data DIR] [--cache DIR] [--out bench/results/similar_quality.json]
    python -m bench.similar --cli STORE [--runs 5]     (wall and CPU of genre-batch --help / query / similar on a store)

Vectors: bench.ann.generate (genre > style > artist > track hierarchy, 1 % near-duplicates, distinct, L2-normalised,
128-dim centred like the PCA reduction of genre_batch.publishing.vectors), written as a catalog snapshot (one file per genre) by
catalog.write_genre; then genre_batch.publishing.similar.build as the tag stage runs it (session.run on the cluster).
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

from bench import accuracy
from bench.ann import K, exact_top, generate, recall_at_k, reset_peak_rss
from bench.scale import RANDOM_SPACE
from genre_batch.analysis import audio, extraction
from genre_batch.publishing import catalog, similar, vectors
from genre_batch.publishing.pointer import CatalogPointer, SimilarRecord, published
from genre_batch.stages.tag import peak_rss_mb
from genre_batch.storage.feature_store import EMBEDDING_COLUMNS, LIBROSA, MUSICNN
from genre_batch.storage.store import Store

DEFAULT_WORK = Path(tempfile.gettempdir()) / "genre-batch-bench" / "similar"
DEFAULT_OUT = Path(__file__).parent / "results" / "similar.json"
SAMPLE = 2_000
"""Tracks whose lists are checked against exact search."""
NIGHTLY_SHARE = 0.01
LATENCY_QUERIES = 200
CLI_RUNS = 5
"""genre-batch processes timed per command (median and max printed)."""
QUALITY_K = {"emotify": 10, "gtzan-mini": 4}
"""K of genre precision@K per task of ../shared/data (issue #15)."""
QUALITY_DEFAULT_K = 10
DEFAULT_QUALITY_OUT = Path(__file__).parent / "results" / "similar_quality.json"
SPACES = ("librosa zpca128", "musicnn zpca128", "librosa z-scored means (raw)", "musicnn 200-dim (raw)")
"""The spaces measured: the catalog's two (genre_batch.publishing.vectors.fit/project) and the unreduced references."""


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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (a worker runs one task at a time: single-threaded workers)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def with_peak(function: object, *args: object) -> tuple[object, float, float, float]:
    """(result, task seconds, task CPU seconds, peak RSS MB of this worker process during the task: Linux's VmHWM,
    reset to the current RSS first by writing 5 to /proc/self/clear_refs)."""
    reset_peak_rss()
    started, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args)  # type: ignore[operator]
    return result, time.perf_counter() - started, cpu_seconds() - cpu, peak_rss_mb()


class Measured:
    """A runner for similar.build that records each task's time, CPU and its worker's peak RSS, step by step."""

    def __init__(self, session: object) -> None:
        self.session, self.tasks = session, []

    def __call__(self, calls: list[tuple]) -> list:
        """Run the calls as Dask tasks through with_peak."""
        out = self.session.run([(with_peak, *call) for call in calls])  # type: ignore[attr-defined]
        self.tasks.append([(call[0].__name__, t, c, m) for call, (_, t, c, m) in zip(calls, out)])
        return [r for r, _, _, _ in out]

    def report(self) -> dict:
        """Per task function: seconds and CPU seconds of its task (of several, e.g. one per bucket: summed, with their
        max), the peak RSS of its worker so far (when the step ended: the first step to show a peak raised it), and the
        peak over all."""
        out: dict = {}
        for step in self.tasks:
            for name in dict.fromkeys(n for n, *_ in step):
                mine = [(t, c, m) for n, t, c, m in step if n == name]
                if len(mine) > 1:
                    out[f"{name}_tasks"] = {"n": len(mine), "wall_s_sum": round(sum(t for t, _, _ in mine), 1), "cpu_s_sum": round(sum(c for _, c, _ in mine), 1),
                                            "wall_s_max": round(max(t for t, _, _ in mine), 1), "cpu_s_per_task": round(sum(c for _, c, _ in mine) / len(mine), 2),
                                            "worker_peak_rss_mb": round(max(m for *_, m in mine))}
                else:
                    [(t, c, m)] = mine
                    out[f"{name}_task"] = {"wall_s": round(t, 1), "cpu_s": round(c, 1), "worker_peak_rss_mb": round(m)}
        out["task_cpu_s"] = round(sum(c for step in self.tasks for _, _, c, _ in step), 1)
        out["peak_rss_mb"] = round(max(m for step in self.tasks for *_, m in step))
        return out


def index_share_read(store: Store, info: SimilarRecord) -> dict:
    """The share of the index's vectors in the cells one list task's searches visit (the nprobe cells of each of its
    bucket's tracks): mean and max over the buckets."""
    index = similar.open_index(store, info)
    sizes = np.array([index.invlists.list_size(c) for c in range(index.nlist)])
    shares = []
    for bucket in range(info.buckets):
        queries = similar.as_matrix(store.read_table(f"{store.catalog}/{similar.vectors_part(info.folder, bucket)}", ["embedding"])["embedding"])
        probed = np.unique(index.quantizer.search(np.ascontiguousarray(queries), similar.NPROBE)[1])
        shares.append(sizes[probed].sum() / sizes.sum())
    return {"mean": round(float(np.mean(shares)), 3), "max": round(float(np.max(shares)), 3)}


def stored_neighbours(store: Store, info: SimilarRecord, track_ids: list[str], position: dict[str, int]) -> np.ndarray:
    """Row positions of the stored top-K neighbours of some tracks (-1 padded)."""
    wanted = pa.array(track_ids)
    found = np.full((len(track_ids), K), -1, np.int64)
    row = {t: i for i, t in enumerate(track_ids)}
    for f in info.files:
        table = store.read_table(f"{store.catalog}/{f}")
        table = table.filter(pc.and_(pc.is_in(table["track_id"], value_set=wanted), pc.less_equal(table["rank"], K)))
        for t, n, r in zip(table["track_id"].to_pylist(), table["neighbour_id"].to_pylist(), table["rank"].to_pylist()):
            found[row[t], r - 1] = position[n]
    return found


def recall(store: Store, info: SimilarRecord, vectors: np.ndarray, ids: list[str], seed: int) -> float:
    """Tie-aware recall@10 of the stored lists of SAMPLE random tracks against exact search."""
    sample = np.random.default_rng(seed).choice(len(vectors), min(SAMPLE, len(vectors)), replace=False)
    kth = exact_top(vectors, sample, K)[0][:, -1]
    position = {t: i for i, t in enumerate(ids)}
    found = stored_neighbours(store, info, [ids[i] for i in sample], position)
    return recall_at_k(vectors, sample, found, kth)


def cli_sample(*args: str) -> tuple[float, float]:
    """(wall s, CPU s) of one genre-batch process (its CPU from the children's rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "genre-batch"), *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"genre-batch {' '.join(args)} failed: {done.stderr}")
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def cli_latency(args: list[str], runs: int) -> dict:
    """Wall and CPU seconds of `runs` genre-batch processes (median, max), with the 1-minute load before them."""
    load = os.getloadavg()[0]
    walls, cpus = zip(*(cli_sample(*args) for _ in range(runs)))
    return {"wall_s_median": round(float(np.median(walls)), 2), "wall_s_max": round(max(walls), 2),
            "cpu_s_median": round(float(np.median(cpus)), 2), "cpu_s_max": round(max(cpus), 2), "load_1min": round(load, 1), "runs": runs}


def cli_report(root: Path, runs: int) -> dict:
    """End-to-end latency of the read verbs on an existing store: `--help`, the top 100 of one genre through
    `genre-batch query` (the query of bench/scale), and, when the snapshot has similar tracks, `genre-batch similar`
    for one catalog track from the stored lists (by track_id and by uri) and from the index (--genre)."""
    store = Store(str(root))
    pointer = published(store)
    if pointer is None:
        raise SystemExit(f"no published catalog in {root}")
    genres = sorted(set(pointer.genres.values()))
    sql = f"SELECT uri, confidence, probabilities['{genres[-1]}'] AS p FROM catalog WHERE genre = '{genres[-1]}' ORDER BY confidence DESC LIMIT 100"
    report = {"store": str(root), "rows": pointer.rows, "help": cli_latency(["--help"], runs),
              "query_top100": cli_latency(["query", "--store", str(root), sql, "--format", "json"], runs)}
    if pointer.similar and pointer.similar.has_index:
        first = catalog.read_files(store, pointer.files[:1], ["track_id", "uri"]).slice(0, 1).to_pylist()[0]
        report["similar_table_by_track_id"] = cli_latency(["similar", "--store", str(root), first["track_id"], "--top", "10"], runs)
        report["similar_table_by_uri"] = cli_latency(["similar", "--store", str(root), first["uri"], "--top", "10"], runs)
        report["similar_index_genre"] = cli_latency(["similar", "--store", str(root), first["track_id"], "--top", "10", "--genre", genres[0]], runs)
    return report


def percentiles(seconds: list[float]) -> dict:
    """p50 and p99 in ms."""
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 1), "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 1)}


def measure(n: int, work: Path, workers: int, seed: int, latency: bool = True) -> dict:
    """Everything for a store of n tracks (without `latency`: the full build and the nightly only)."""
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
        built = similar.build(store, "s1", files, None, runner)
        info = SimilarRecord.parse(built)
        report["full"] = {"wall_s": round(time.perf_counter() - started, 1), **runner.report(), "buckets": info.buckets,
                          "nlist": info.nlist, "rows": info.rows, "index_mb": round(sum(os.path.getsize(f"{store.catalog}/{f}") for f in info.index_parts) / 1e6, 1)}
        report["full"]["recall_at_10"] = round(recall(store, info, base, ids[:n], seed), 4)
        report["full"]["index_share_read_per_list_task"] = index_share_read(store, info)
        print(json.dumps({"n": n, "full": report["full"]}), flush=True)

        # a nightly: 1 % departed, 1 % new
        departed = np.random.default_rng(seed + 1).choice(n, extra, replace=False)
        keep = np.setdiff1d(np.arange(n), departed)
        night_vectors = np.vstack([base[keep], fresh])
        night_ids = [ids[i] for i in keep] + ids[n:]
        table = pa.concat_tables([catalog_table(base, 0).take(pa.array(keep)), catalog_table(fresh, n)])
        files2 = write_snapshot(store, "s2", table)
        previous = CatalogPointer.parse({"snapshot": "s1", "files": files, "rows": n, "catalog_version": catalog.CATALOG_VERSION, "model_version": "bench",
                                         "run_id": "bench", "published_at": "2026-01-01T00:00:00+00:00", "vector_space": RANDOM_SPACE, "similar": built})
        update = similar.plan_update(store, previous, RANDOM_SPACE["name"], table.select(similar.KEYS))
        runner = Measured(cluster)
        started = time.perf_counter()
        built2 = similar.build(store, "s2", files2, update, runner)
        info2 = SimilarRecord.parse(built2)
        report["nightly"] = {"wall_s": round(time.perf_counter() - started, 1), "mode": info2.mode, "added": info2.added,
                             "removed": info2.removed, **runner.report()}
        report["nightly"]["recall_at_10"] = round(recall(store, info2, night_vectors, night_ids, seed + 2), 4)
        print(json.dumps({"n": n, "nightly": report["nightly"]}), flush=True)
    if not latency:
        return report

    # publish s2 so that `genre-batch similar` reads it, then latency in process and through the CLI
    genres = {f: g for f, g in zip(files2, sorted(set(table["genre"].to_pylist())))}
    catalog.switch(store, "s2", genres, table.num_rows, "bench", "bench", keep=5, vector_space=RANDOM_SPACE, similar=built2)
    rng = np.random.default_rng(seed + 3)
    names = [night_ids[i] for i in rng.choice(len(night_ids), LATENCY_QUERIES, replace=False)]
    for label, top, genre in (("table", 10, None), ("index_genre", 10, "g3")):
        seconds = []
        for name in names:
            started = time.perf_counter()
            similar.answer(store, [(name, name)], top, genre)
            seconds.append(time.perf_counter() - started)
        report[f"in_process_{label}"] = percentiles(seconds)
    report["cli"] = cli_report(root, CLI_RUNS)
    report["bench_process_peak_rss_mb"] = round(peak_rss_mb())  # the generated vectors, exact search
    print(json.dumps({"n": n, "latency": {k: v for k, v in report.items() if k.startswith(("in_process", "cli"))}}), flush=True)
    return report


def pooled_inputs(extracted: list[dict]) -> dict[str, np.ndarray]:
    """Per track, what each family's space reads: the mean of the librosa windows (603) and the musicnn embedding (200)."""
    return {LIBROSA.name: np.stack([e["librosa"].mean(axis=0) for e in extracted]).astype(np.float32),
            MUSICNN.name: np.stack([e["musicnn"][: len(EMBEDDING_COLUMNS)] for e in extracted]).astype(np.float32)}


def zscored(fitted_on: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x z-scored with the mean and std of `fitted_on`, then L2-normalised (cosine of z-scored means)."""
    std = fitted_on.std(axis=0)
    z = (x - fitted_on.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def embed(space: str, fitted_on: dict[str, np.ndarray], x: dict[str, np.ndarray]) -> np.ndarray:
    """Unit vectors of tracks `x` in one of SPACES, its scaler/PCA fitted on the tracks `fitted_on`."""
    family = LIBROSA if space.startswith("librosa") else MUSICNN
    if space.endswith("zpca128"):
        return vectors.project(vectors.fit(family, fitted_on[family.name]), x[family.name])
    if space.startswith("librosa"):
        return zscored(fitted_on[LIBROSA.name], x[LIBROSA.name])
    raw = x[MUSICNN.name].astype(np.float64)
    return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)


def precision_at_k(unit: np.ndarray, genre: np.ndarray, k: int, artist: np.ndarray | None = None) -> float:
    """Mean over tracks of the share of its k nearest neighbours (cosine, itself excluded; with `artist`, tracks of its
    own artist excluded too) that have its genre."""
    return float(track_precision(unit, genre, k, artist).mean())


def track_precision(unit: np.ndarray, genre: np.ndarray, k: int, artist: np.ndarray | None = None) -> np.ndarray:
    """Each track's share of its k nearest neighbours with its genre (as precision_at_k)."""
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    if artist is not None:
        similarity[(artist[:, None] == artist[None, :]) & (artist[:, None] != "")] = -np.inf
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return (genre[top] == genre[:, None]).mean(axis=1)


def halves(genre: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A split into two halves stratified by genre (random within each genre)."""
    rng = np.random.default_rng(seed)
    first = np.concatenate([rng.permutation(np.flatnonzero(genre == g))[: (genre == g).sum() // 2] for g in np.unique(genre)])
    mask = np.zeros(len(genre), bool)
    mask[first] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def subset(x: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The given tracks' pooled inputs."""
    return {name: values[rows] for name, values in x.items()}


def task_quality(x: dict[str, np.ndarray], other: dict[str, np.ndarray], genre: np.ndarray, artist: np.ndarray, k: int, seed: int) -> dict:
    """Precision@k of every space and fit: fitted on the set itself (what the catalog does with its own library),
    on the other dataset, and on one stratified half with precision among the other half only (both ways, averaged);
    the same-set space also with neighbours of the track's own artist excluded."""
    first, second = halves(genre, seed)
    out = {}
    for space in SPACES:
        same = embed(space, x, x)
        out[space] = {
            "same set": precision_at_k(same, genre, k),
            "same set, other artists": precision_at_k(same, genre, k, artist),
            "other dataset": precision_at_k(embed(space, other, x), genre, k),
            "held-out half": float(np.mean([precision_at_k(embed(space, subset(x, a), subset(x, b)), genre[b], k) for a, b in ((first, second), (second, first))])),
            "per_genre_same_set": [float(v) for v in np.bincount(genre, track_precision(same, genre, k)) / np.bincount(genre)],
        }
    return out


def chance(genre: np.ndarray) -> float:
    """Expected precision of random neighbours: the mean share of a track's own genre among the other tracks."""
    counts = np.bincount(genre)
    return float(((counts[genre] - 1) / (len(genre) - 1)).mean())


def ceiling(genre: np.ndarray, k: int) -> float:
    """Best possible precision@k: a track with fewer than k others of its genre cannot fill its list with them."""
    counts = np.bincount(genre)
    return float((np.minimum(counts[genre] - 1, k) / k).mean())


def quality(data: Path, cache: Path, seed: int) -> dict:
    """Genre precision@K of each space on each task of `data` (features read from bench.accuracy's cache, or
    extracted in this process into it)."""
    tasks = accuracy.discover(data)
    if len(tasks) < 2:
        raise SystemExit(f"--quality needs two tasks (the other one fits the cross-dataset space) in {data}")
    cache.mkdir(parents=True, exist_ok=True)
    extracted = {(t.name, i): accuracy.extract_one((str(f), str(cache), False, extraction.MUSICNN_PATCHES)) for t in tasks for i, f in enumerate(t.files)}
    kept = {t.name: [i for i in range(len(t.files)) if "error" not in extracted[(t.name, i)]] for t in tasks}
    inputs = {t.name: pooled_inputs([extracted[(t.name, i)] for i in kept[t.name]]) for t in tasks}
    report: dict = {"data": str(data), "seed": seed, "spaces": list(SPACES), "tasks": {}}
    for t in tasks:
        others = [u.name for u in tasks if u.name != t.name]
        other = {name: np.vstack([inputs[o][name] for o in others]) for name in inputs[t.name]}
        genre = t.y[kept[t.name]]
        artist = np.array([audio.read_tags(str(t.files[i])).artist or "" for i in kept[t.name]])
        k = QUALITY_K.get(t.name, QUALITY_DEFAULT_K)
        report["tasks"][t.name] = {"k": k, "tracks": len(genre), "genres": t.genres, "chance": chance(genre),
                                   "chance_half": float(np.mean([chance(genre[h]) for h in halves(genre, seed)])),
                                   "ceiling_half": float(np.mean([ceiling(genre[h], k) for h in halves(genre, seed)])), "other_dataset": others,
                                   "other_dataset_tracks": int(len(other[LIBROSA.name])), "artists_tagged": int((artist != "").sum()),
                                   "errors": len(t.files) - len(genre), "precision": task_quality(inputs[t.name], other, genre, artist, k, seed)}
    return report


def print_quality(report: dict) -> None:
    """The precision@K table, one row per task and space, one column per fit."""
    columns = ("same set", "same set, other artists", "other dataset", "held-out half")
    print(f"{'task':<11} {'K':>2} {'space':<30} " + " ".join(f"{c:>23}" for c in columns))
    for name, t in report["tasks"].items():
        for space, values in t["precision"].items():
            print(f"{name:<11} {t['k']:>2} {space:<30} " + " ".join(f"{values[c]:>23.3f}" for c in columns))
        print(f"{name:<11} {t['k']:>2} {'chance (random neighbours)':<30} {t['chance']:>23.3f} {'':>23} {t['chance']:>23.3f} {t['chance_half']:>23.3f}")
        print(f"{name:<11} {t['k']:>2} {'best possible':<30} {1:>23.3f} {'':>23} {1:>23.3f} {t['ceiling_half']:>23.3f}")
    print("same set: space fitted on the task's own tracks (as the catalog fits its library); other artists: same space, "
          "neighbours by the track's own artist tag excluded; other dataset: space fitted on the other task's tracks; "
          "held-out half: fitted on one genre-stratified half, precision among the other half only (both ways, mean).")
    for name, t in report["tasks"].items():
        for space, values in t["precision"].items():
            print(f"{name} per genre, {space}, same set: " + ", ".join(f"{g} {v:.2f}" for g, v in zip(t["genres"], values["per_genre_same_set"])))
    for name, t in report["tasks"].items():
        print(f"{name}: {t['tracks']} tracks ({t['errors']} errors), artist tags on {t['artists_tagged']}, "
              f"other dataset {'+'.join(t['other_dataset'])} ({t['other_dataset_tracks']} tracks)")


def main() -> None:
    """Measure each size (or, with --quality, precision@K on real music), print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, nargs="+", default=[100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quality", action="store_true", help="genre precision@K on --data instead of the scale run")
    parser.add_argument("--data", type=Path, default=accuracy.DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=accuracy.DEFAULT_CACHE)
    parser.add_argument("--cli", type=Path, default=None, help="time the read verbs through the command line on this store instead")
    parser.add_argument("--runs", type=int, default=CLI_RUNS)
    parser.add_argument("--no-latency", action="store_true", help="the full build and the nightly only: no query latency, no CLI")
    args = parser.parse_args()
    if args.cli is not None:
        print(json.dumps(cli_report(args.cli.resolve(), args.runs), indent=2))
        return
    if args.quality:
        report = quality(args.data.resolve(), args.cache.resolve(), args.seed)
        out = args.out or DEFAULT_QUALITY_OUT
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print_quality(report)
        return
    args.out = args.out or DEFAULT_OUT
    report = {"sizes": []}
    for n in args.tracks:
        report["sizes"].append(measure(n, args.work, args.workers, args.seed, not args.no_latency))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
