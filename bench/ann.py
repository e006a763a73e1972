"""Approximate nearest neighbours for similar-track lists (issue #15): usearch, faiss and hnswlib measured on realistic vectors."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_WORK = Path(tempfile.gettempdir()) / "genre-batch-bench" / "ann"
DEFAULT_OUT = Path(__file__).parent / "results" / "ann.json"
K = 10
TIE_EPS = 1e-5  # a returned neighbour scoring within this of the true k-th counts as correct (float32 rounding)
CHUNK_ROWS = 100_000  # vectors generated and added per step: bounded memory
EXACT_ROWS = 20_000  # base vectors scored per step of the exact search (sample x 20k scores)
GENRES = 10
STYLES_PER_GENRE = 8
TRACKS_PER_ARTIST = 15  # mean; artist popularity is log-normal, so some have hundreds
STYLE_SCALE, ARTIST_SCALE, TRACK_SCALE = 0.6, 0.5, 0.45  # spread of each level around its parent (genre spread 1)
NEAR_DUPLICATES = 0.01  # share of tracks that are another track re-released (remaster, compilation)
LATENCY_QUERIES = 500
INCREMENT = 1_000  # tracks added and removed by the nightly-update check
HNSW_EF = (16, 32, 64, 128, 256)
IVF_NPROBE = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Config:
    """One index to measure: library, storage type and graph parameters."""

    name: str
    library: str
    dtype: str = "f32"
    m: int = 16
    ef_construction: int = 128

    def efforts(self) -> tuple[int, ...]:
        """The search-effort settings swept: ef/expansion for graphs, nprobe for IVF."""
        return IVF_NPROBE if self.library == "faiss-ivf" else HNSW_EF


CONFIGS: tuple[Config, ...] = (
    Config("usearch-f32", "usearch", "f32"),
    Config("usearch-f16", "usearch", "f16"),
    Config("usearch-i8", "usearch", "i8"),
    Config("usearch-f16-M8", "usearch", "f16", m=8),
    Config("usearch-f16-M32", "usearch", "f16", m=32),
    Config("usearch-f16-efc64", "usearch", "f16", ef_construction=64),
    Config("faiss-hnsw-flat", "faiss-hnsw", "f32"),
    Config("faiss-hnsw-sq8", "faiss-hnsw", "sq8"),
    Config("faiss-ivf-flat", "faiss-ivf", "f32"),
    Config("hnswlib", "hnswlib", "f32"),
)


def generate(n: int, dim: int, space: str, seed: int) -> np.ndarray:
    """Seeded, distinct, L2-normalised float32 vectors shaped like real music embeddings.

    Hierarchy genre -> style -> artist -> track (+1 % near-duplicate re-releases), unbalanced genres and
    artists, variances decaying as a power law (like PCA spectra); `embedding` mimics time-pooled post-ReLU
    activations (a random rotation, a bias, then ReLU: non-negative, mean cosine well above 0), `reduction`
    mimics PCA-reduced standardised features (centred, axis-aligned decaying variances).
    """
    rng = np.random.default_rng(seed)
    spectrum = (np.arange(1, dim + 1) ** -0.6).astype(np.float32)  # std per latent axis; variance ~ j^-1.2
    genre_p = 1.0 / np.arange(1, GENRES + 1) ** 0.8
    genres = rng.standard_normal((GENRES, dim)).astype(np.float32) * spectrum
    styles = genres.repeat(STYLES_PER_GENRE, 0) + STYLE_SCALE * spectrum * rng.standard_normal((GENRES * STYLES_PER_GENRE, dim)).astype(np.float32)
    n_artists = max(1, n // TRACKS_PER_ARTIST)
    artist_genre = rng.choice(GENRES, n_artists, p=genre_p / genre_p.sum())
    artist_style = artist_genre * STYLES_PER_GENRE + rng.integers(0, STYLES_PER_GENRE, n_artists)
    artists = styles[artist_style] + ARTIST_SCALE * spectrum * rng.standard_normal((n_artists, dim)).astype(np.float32)
    popularity = rng.lognormal(0.0, 1.0, n_artists)
    track_artist = rng.choice(n_artists, n, p=popularity / popularity.sum())
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    spread = 1 + STYLE_SCALE**2 + ARTIST_SCALE**2 + TRACK_SCALE**2
    bias = 0.25 * float(np.sqrt((spectrum**2).sum() * spread / dim))  # a quarter of a coordinate's std: ~60 % stay active
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK_ROWS):
        stop = min(n, start + CHUNK_ROWS)
        chunk_rng = np.random.default_rng([seed, start])
        x = artists[track_artist[start:stop]] + TRACK_SCALE * spectrum * chunk_rng.standard_normal((stop - start, dim)).astype(np.float32)
        if space == "embedding":
            x = np.maximum(x @ rotation + bias, 0.0)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    dup_rng = np.random.default_rng([seed, n])
    copies = dup_rng.choice(n, int(n * NEAR_DUPLICATES), replace=False)
    originals = dup_rng.integers(0, n, len(copies))
    x = out[originals] + 0.01 * dup_rng.standard_normal((len(copies), dim)).astype(np.float32) / np.sqrt(dim)
    x = np.maximum(x, 0.0) if space == "embedding" else x
    out[copies] = x / np.linalg.norm(x, axis=1, keepdims=True)
    if len(np.unique(out.view(f"V{4 * dim}").ravel())) != n:
        raise ValueError("generated vectors contain exact duplicates; change the seed")
    return out


def exact_top(vectors: np.ndarray, queries: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top `keep` by inner product of each query id against all vectors, itself excluded, in blocks."""
    best_s = np.full((len(queries), keep), -np.inf, np.float32)
    best_i = np.zeros((len(queries), keep), np.int64)
    q = vectors[queries]
    for start in range(0, len(vectors), EXACT_ROWS):
        scores = q @ vectors[start : start + EXACT_ROWS].T
        own = (queries >= start) & (queries < start + scores.shape[1])
        scores[own, queries[own] - start] = -np.inf
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + start], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :keep]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_s, best_i


def recall_at_k(vectors: np.ndarray, queries: np.ndarray, found: np.ndarray, kth: np.ndarray) -> float:
    """Tie-aware recall@K: share of the first K returned ids (self removed) scoring at least the true K-th score."""
    hits = 0
    for q, ids, threshold in zip(queries, found, kth):
        ids = ids[(ids != q) & (ids >= 0)][:K]
        hits += int((vectors[ids] @ vectors[q] >= threshold - TIE_EPS).sum())
    return hits / (K * len(queries))


def rss_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def read_chunks(path: Path, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) of an .npy matrix read through one reusable buffer, as a pipeline streams Parquet."""
    matrix = np.load(path, mmap_mode="r")
    n, dim = matrix.shape
    offset = matrix.offset
    del matrix
    buffer = np.empty((rows, dim), np.float32)
    with open(path, "rb") as f:
        for start in range(0, n, rows):
            block = buffer[: min(rows, n - start)]
            f.seek(offset + start * dim * 4)
            f.readinto(memoryview(block).cast("B"))
            yield start, block


class Adapter:
    """One library behind a common build / search / save / update interface."""

    def __init__(self, config: Config, dim: int, n: int, threads: int) -> None:
        self.config, self.dim, self.n, self.threads = config, dim, n, threads

    def add(self, start: int, block: np.ndarray) -> None:
        """Insert a block of vectors whose ids start at `start`."""
        raise NotImplementedError

    def set_effort(self, effort: int) -> None:
        """Set the search effort (ef, expansion or nprobe)."""
        raise NotImplementedError

    def search(self, queries: np.ndarray, count: int, threads: int) -> np.ndarray:
        """Ids of the `count` best matches of each query row (-1 where fewer)."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write the index to `path`."""
        raise NotImplementedError

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids so searches no longer return them."""
        raise NotImplementedError


class UsearchAdapter(Adapter):
    """usearch HNSW; i8 needs the cos metric (its ip on int8 codes is unscaled)."""

    def __init__(self, config: Config, dim: int, n: int, threads: int) -> None:
        from usearch.index import Index

        super().__init__(config, dim, n, threads)
        metric = "cos" if config.dtype == "i8" else "ip"
        self.index = Index(ndim=dim, metric=metric, dtype=config.dtype, connectivity=config.m, expansion_add=config.ef_construction)

    def add(self, start: int, block: np.ndarray) -> None:
        """Insert with keys start..start+len-1."""
        self.index.add(np.arange(start, start + len(block), dtype=np.uint64), block, threads=self.threads)

    def set_effort(self, effort: int) -> None:
        """expansion_search."""
        self.index.expansion_search = effort

    def search(self, queries: np.ndarray, count: int, threads: int) -> np.ndarray:
        """Batch search; keys beyond the found count are -1."""
        return usearch_ids(self.index.search(queries, count, threads=threads), count)

    def save(self, path: Path) -> None:
        """Native file, viewable with Index.restore(view=True)."""
        self.index.save(str(path))

    def remove(self, ids: np.ndarray) -> None:
        """Index.remove."""
        self.index.remove(ids.astype(np.uint64))


def usearch_ids(matches: Any, count: int) -> np.ndarray:
    """Keys of usearch Matches (one query) or BatchMatches as int64 rows of `count`, -1 past each query's found count."""
    keys = np.atleast_2d(matches.keys).astype(np.int64)
    found = np.atleast_1d(getattr(matches, "counts", keys.shape[1]))
    out = np.full((len(keys), count), -1, np.int64)
    out[:, : keys.shape[1]] = keys
    out[np.arange(count)[None, :] >= found[:, None]] = -1
    return out


class FaissAdapter(Adapter):
    """faiss IndexHNSWFlat / IndexHNSWSQ (8-bit) / IndexIVFFlat, inner product."""

    def __init__(self, config: Config, dim: int, n: int, threads: int) -> None:
        import faiss

        super().__init__(config, dim, n, threads)
        faiss.omp_set_num_threads(threads)
        self.faiss = faiss
        ip = faiss.METRIC_INNER_PRODUCT
        if config.library == "faiss-ivf":
            self.nlist = int(4 * np.sqrt(n))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, self.nlist, ip)
        elif config.dtype == "sq8":
            self.index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, config.m, ip)
        else:
            self.index = faiss.IndexHNSWFlat(dim, config.m, ip)
        if config.library == "faiss-hnsw":
            self.index.hnsw.efConstruction = config.ef_construction

    def add(self, start: int, block: np.ndarray) -> None:
        """Train on the first block where needed (IVF centroids, SQ ranges), then add with ids."""
        if not self.index.is_trained:
            self.index.train(block)
        if self.config.library == "faiss-ivf":
            self.index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
        else:
            self.index.add(block)  # HNSW ids are the insertion order

    def set_effort(self, effort: int) -> None:
        """efSearch or nprobe."""
        if self.config.library == "faiss-ivf":
            self.index.nprobe = effort
        else:
            self.index.hnsw.efSearch = effort

    def search(self, queries: np.ndarray, count: int, threads: int) -> np.ndarray:
        """Batch search with `threads` OpenMP threads."""
        self.faiss.omp_set_num_threads(threads)
        return self.index.search(queries, count)[1]

    def save(self, path: Path) -> None:
        """faiss.write_index; read back with IO_FLAG_MMAP_IFC."""
        self.faiss.write_index(self.index, str(path))

    def remove(self, ids: np.ndarray) -> None:
        """remove_ids: IVF only; HNSW raises."""
        self.index.remove_ids(ids.astype(np.int64))


class HnswlibAdapter(Adapter):
    """hnswlib, ip space, deleted slots reusable."""

    def __init__(self, config: Config, dim: int, n: int, threads: int) -> None:
        import hnswlib

        super().__init__(config, dim, n, threads)
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.init_index(max_elements=n + INCREMENT, ef_construction=config.ef_construction, M=config.m, allow_replace_deleted=True)

    def add(self, start: int, block: np.ndarray) -> None:
        """add_items, reusing deleted slots."""
        self.index.add_items(block, np.arange(start, start + len(block)), num_threads=self.threads, replace_deleted=True)

    def set_effort(self, effort: int) -> None:
        """set_ef."""
        self.index.set_ef(effort)

    def search(self, queries: np.ndarray, count: int, threads: int) -> np.ndarray:
        """knn_query."""
        return self.index.knn_query(queries, count, num_threads=threads)[0].astype(np.int64)

    def save(self, path: Path) -> None:
        """save_index (loaded whole: hnswlib has no memory-mapped view)."""
        self.index.save_index(str(path))

    def remove(self, ids: np.ndarray) -> None:
        """mark_deleted per id."""
        for i in ids:
            self.index.mark_deleted(int(i))


ADAPTERS: dict[str, type[Adapter]] = {"usearch": UsearchAdapter, "faiss-hnsw": FaissAdapter, "faiss-ivf": FaissAdapter, "hnswlib": HnswlibAdapter}


def percentile_ms(seconds: list[float], q: float) -> float:
    """The q-th percentile of durations, in ms."""
    return float(np.percentile(seconds, q) * 1000)


def measure_build(config: Config, threads: int, vectors_path: Path, queries: np.ndarray, index_path: Path) -> dict:
    """In a fresh process: build (streamed blocks), save, sweep efforts over the sampled queries, then try a nightly update."""
    base = np.load(vectors_path, mmap_mode="r")
    n, dim = base.shape
    query_vectors = np.array(base[queries])
    extra = np.array(base[queries[:INCREMENT]]) + np.float32(0.01 / np.sqrt(dim))  # nightly additions near existing tracks
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    del base
    adapter = ADAPTERS[config.library](config, dim, n, threads)
    rss_before = rss_mb()
    reset_peak_rss()
    load_before = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for start, block in read_chunks(vectors_path, CHUNK_ROWS):
        adapter.add(start, block)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    result: dict[str, Any] = {
        "build_s": build_s, "build_cpu_s": build_cpu_s, "load_avg_1min": [load_before, os.getloadavg()[0]],
        "rss_before_mb": rss_before, "build_peak_rss_mb": rss_mb("VmHWM"),
        "build_rss_growth_mb": rss_mb("VmHWM") - rss_before,
    }
    adapter.save(index_path)
    result["disk_mb"] = index_path.stat().st_size / 1e6
    sweep = []
    for effort in config.efforts():
        adapter.set_effort(effort)
        t0 = time.perf_counter()
        found = adapter.search(query_vectors, K + 1, threads)
        batch_s = time.perf_counter() - t0
        latencies = []
        for q in query_vectors[:LATENCY_QUERIES]:
            t0 = time.perf_counter()
            adapter.search(q[None, :], K + 1, 1)
            latencies.append(time.perf_counter() - t0)
        sweep.append({
            "effort": effort, "found": found.tolist(), "batch_qps": len(query_vectors) / batch_s,
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
        })
    result["sweep"] = sweep
    result["update"] = measure_update(adapter, n, extra, queries[-INCREMENT:], query_vectors[-INCREMENT:])
    return result


def measure_update(adapter: Adapter, n: int, extra: np.ndarray, departed: np.ndarray, departed_vectors: np.ndarray) -> dict:
    """Add INCREMENT new ids and remove INCREMENT departed ids; searching the departed vectors must not return them."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    adapter.add(n, extra)
    out["add_s"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        adapter.remove(departed)
        out["remove_s"] = time.perf_counter() - t0
        found = adapter.search(departed_vectors, K + 1, adapter.threads)
        out["removed_ids_returned"] = int(np.isin(found, departed).sum())
    except RuntimeError as error:
        out["remove_error"] = str(error).splitlines()[0][:120]
    return out


def measure_view(config: Config, index_path: Path, query: np.ndarray, effort: int) -> dict:
    """In a fresh process with the file evicted from the page cache: import, open (memory-mapped where possible), query one track."""
    fd = os.open(index_path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    t0 = time.perf_counter()
    open_index, search = view_opener(config, len(query), effort)
    import_s = time.perf_counter() - t0
    rss_imported = rss_mb()
    t0 = time.perf_counter()
    index, mapped = open_index(index_path)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    search(index, query)
    first_s = time.perf_counter() - t0
    warm = []
    for _ in range(100):
        t0 = time.perf_counter()
        search(index, query)
        warm.append(time.perf_counter() - t0)
    return {
        "effort": effort, "memory_mapped": mapped, "import_s": import_s, "load_s": load_s, "first_query_ms": first_s * 1000,
        "warm_query_ms": statistics.median(warm) * 1000, "rss_mb": rss_mb(), "anon_growth_mb": rss_mb("RssAnon") - rss_imported,
    }


def view_opener(config: Config, dim: int, effort: int) -> tuple[Callable[[Path], tuple[Any, bool]], Callable[[Any, np.ndarray], Any]]:
    """Import the library; return (open index from disk -> (index, memory-mapped?), search one vector)."""
    if config.library == "usearch":
        from usearch.index import Index

        def open_usearch(path: Path) -> tuple[Any, bool]:
            index = Index.restore(str(path), view=True)
            index.expansion_search = effort
            return index, True

        return open_usearch, lambda index, q: index.search(q, K + 1, threads=1)
    if config.library.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(1)

        def open_faiss(path: Path) -> tuple[Any, bool]:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
            if config.library == "faiss-ivf":
                index.nprobe = effort
            else:
                index.hnsw.efSearch = effort
            return index, True

        return open_faiss, lambda index, q: index.search(q[None, :], K + 1)
    import hnswlib

    def open_hnswlib(path: Path) -> tuple[Any, bool]:
        index = hnswlib.Index(space="ip", dim=dim)
        index.load_index(str(path))
        index.set_ef(effort)
        return index, False

    return open_hnswlib, lambda index, q: index.knn_query(q, K + 1, num_threads=1)


def in_fresh_process(threads: int, function: Callable[..., dict], *args: Any) -> dict:
    """Run `function(*args)` in a new spawned interpreter whose BLAS/OpenMP pools have `threads` threads."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def prepare(work: Path, n: int, dim: int, space: str, seed: int, sample: int) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Vectors on disk (cached), sampled query ids, their exact top-K scores/ids and the data's statistics."""
    stem = work / f"vectors-{space}-{n}x{dim}-s{seed}"
    vectors_path, truth_path = stem.with_suffix(".npy"), Path(f"{stem}-q{sample}.npz")
    if not vectors_path.exists():
        t0 = time.perf_counter()
        np.save(vectors_path, generate(n, dim, space, seed))
        print(f"generated {n:,} x {dim} ({space}) in {time.perf_counter() - t0:.1f} s")
    vectors = np.load(vectors_path)
    if not truth_path.exists():
        queries = np.sort(np.random.default_rng([seed, 1]).choice(n, sample, replace=False))
        t0 = time.perf_counter()
        scores, ids = exact_top(vectors, queries, K + 5)
        print(f"exact top-{K} of {sample:,} queries in {time.perf_counter() - t0:.1f} s")
        np.savez(truth_path, queries=queries, scores=scores, ids=ids)
    truth = np.load(truth_path)
    queries, scores = truth["queries"], truth["scores"]
    pairs = np.random.default_rng([seed, 2]).integers(0, n, (20_000, 2))
    stats = {
        "mean_cos_random_pair": float(np.einsum("ij,ij->i", vectors[pairs[:, 0]], vectors[pairs[:, 1]]).mean()),
        "mean_cos_1st_neighbour": float(scores[:, 0].mean()),
        "mean_cos_10th_neighbour": float(scores[:, K - 1].mean()),
        "share_nonnegative": float((vectors[:CHUNK_ROWS] >= 0).mean()),
        "queries_with_ties_at_kth": int((scores[:, K] >= scores[:, K - 1] - TIE_EPS).sum()),
    }
    return vectors_path, queries, scores[:, K - 1], vectors, stats


def run(args: argparse.Namespace) -> dict:
    """Prepare the data, then measure every selected config with each thread count, each in its own process."""
    space = args.space if args.space != "auto" else ("embedding" if args.dim > 128 else "reduction")
    work = args.work / f"{space}-{args.n}x{args.dim}"
    work.mkdir(parents=True, exist_ok=True)
    vectors_path, queries, kth, vectors, stats = prepare(args.work, args.n, args.dim, space, args.seed, args.sample)
    print("data:", json.dumps({k: round(v, 4) for k, v in stats.items()}))
    configs = [c for c in CONFIGS if not args.configs or c.name in args.configs]
    rows = []
    for config in configs:
        for threads in args.threads:
            index_path = work / f"{config.name}-t{threads}.index"
            built = in_fresh_process(threads, measure_build, config, threads, vectors_path, queries, index_path)
            for point in built["sweep"]:
                point["recall"] = recall_at_k(vectors, queries, np.asarray(point.pop("found")), kth)
            effort = next((p["effort"] for p in built["sweep"] if p["recall"] >= 0.95), config.efforts()[-1])
            built["view"] = in_fresh_process(1, measure_view, config, index_path, vectors[queries[0]], effort)
            rows.append({"config": config.name, "library": config.library, "dtype": config.dtype, "m": config.m,
                         "ef_construction": config.ef_construction, "threads": threads, **built})
            index_path.unlink()
            print_row(rows[-1])
    return {"n": args.n, "dim": args.dim, "space": space, "seed": args.seed, "sample": len(queries), "k": K,
            "data": stats, "rows": rows}


def print_row(row: dict) -> None:
    """One line per build as it finishes, so long runs show progress."""
    best = next((p for p in row["sweep"] if p["recall"] >= 0.95), row["sweep"][-1])
    print(f"  {row['config']} t={row['threads']}: build {row['build_s']:.1f} s, recall {best['recall']:.3f} at {best['effort']}", flush=True)


def tables(report: dict) -> str:
    """Markdown tables: one line per build, one line per search setting."""
    head = (f"n={report['n']:,} dim={report['dim']} ({report['space']}), {report['sample']:,} queries, recall@{K} tie-aware\n\n"
            "| config | threads | build s | build CPU s | disk MB | build RSS growth MB | build peak RSS MB | mmap view | import s | cold open + 1st query ms | warm query ms | view RSS MB | add 1k s | remove 1k |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in report["rows"]:
        v, u = r["view"], r["update"]
        removal = f"{u['remove_s']:.3f} s" if "remove_s" in u else "no"
        cpu = f"{r['build_cpu_s']:.1f}" if "build_cpu_s" in r else "-"
        lines.append(f"| {r['config']} | {r['threads']} | {r['build_s']:.1f} | {cpu} | {r['disk_mb']:.0f} | {r['build_rss_growth_mb']:.0f} | "
                     f"{r['build_peak_rss_mb']:.0f} | {'yes' if v['memory_mapped'] else 'no (full load)'} | "
                     f"{v['import_s']:.2f} | {(v['load_s'] * 1000 + v['first_query_ms']):.1f} | {v['warm_query_ms']:.3f} | {v['rss_mb']:.0f} | {u['add_s']:.2f} | {removal} |")
    search_head = ("\n\n| config | ef / nprobe | recall (1-thread build) | recall (2-thread build) | p50 ms | p99 ms | batch q/s 1 thread | batch q/s 2 threads |\n"
                   "|---|---|---|---|---|---|---|---|\n")
    search = []
    for name in dict.fromkeys(r["config"] for r in report["rows"]):
        by_threads = {r["threads"]: r for r in report["rows"] if r["config"] == name}
        first = by_threads[min(by_threads)]
        for i, point in enumerate(first["sweep"]):
            cell = {t: by_threads[t]["sweep"][i] if t in by_threads else None for t in (1, 2)}
            search.append(f"| {name} | {point['effort']} | " + " | ".join(f"{cell[t]['recall']:.4f}" if cell[t] else "-" for t in (1, 2))
                          + f" | {point['p50_ms']:.3f} | {point['p99_ms']:.3f} | "
                          + " | ".join(f"{cell[t]['batch_qps']:,.0f}" if cell[t] else "-" for t in (1, 2)) + " |")
    return head + "\n".join(lines) + search_head + "\n".join(search)


def main() -> None:
    """CLI: python -m bench.ann [--n 100000] [--dim 200]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000, help="tracks (vectors)")
    parser.add_argument("--dim", type=int, default=200, help="200: musicnn-like embedding; <= 128: librosa reduction")
    parser.add_argument("--space", choices=("auto", "embedding", "reduction"), default="auto", help="auto: embedding above 128 dims")
    parser.add_argument("--sample", type=int, default=2_000, help="query tracks with exact ground truth")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--configs", nargs="*", default=[], help=f"subset of: {' '.join(c.name for c in CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="vectors, ground truth and index files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report; appended per (n, dim)")
    args = parser.parse_args()
    report = run(args)
    print(tables(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[f"{report['space']}-{args.n}x{args.dim}"] = report
    args.out.write_text(json.dumps(previous, indent=1))


if __name__ == "__main__":
    main()
