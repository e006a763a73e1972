"""Throughput of genre-batch on real music: per-file CPU of the librosa family and of the default extraction (librosa +
musicnn) vs the STFT floor and the seed recipe, the whole default pipeline, 1 vs 2 workers."""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import multiprocessing
import os
import pstats
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import psutil
import soundfile as sf
import soxr
from distributed import Client

import genre_batch
from bench.accuracy import recipe_features
from bench.accuracy import warm_up as warm_up_both
from bench.scale import (
    DEFAULT_WORK,
    MANIFEST,
    cli_command,
    cli_env,
    latest_record,
    print_targets,
    role,
    run_cli,
    target,
)
from genre_batch.analysis import audio, features
from genre_batch.library.discovery import AUDIO_EXTENSIONS
from genre_batch.analysis.extraction import extract_file, librosa_windows, musicnn_vector
from genre_batch.cluster import local_cluster, warm_up_workers
from genre_batch.stages.extract import DEFAULT_FEATURES
from genre_batch.storage.feature_store import LIBROSA, MUSICNN

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_OUT = Path("bench/results/throughput.json")
SR = 22050
N_FFT = 2048
HOP = 512
LONG_REPEATS = 3
"""Calls per long track in the per-file part (their median): each length is a class of one file, else one noisy sample."""
FLOOR_BLOCK_S = 120  # the floor decodes long files in blocks of this many seconds (same CPU, bounded memory)
RECIPE_MAX_S = 600.0  # the recipe loads the whole file: skipped above 10 minutes (60 min would need ~4 GB)
LONG_TRACKS_MIN: tuple[int, ...] = (5, 6, 7, 8, 9, 10, 60)
"""Lengths in minutes of the long MP3s made by concatenating clips of one genre folder."""
LONG_SOURCE_EXT = ".mp3"
SAMPLE_PER_FORMAT = 40
SPEEDUP_FILES = 200
PROFILE_REPEATS = 3
PROFILE_TOP = 14
LIBRARY_LAYOUT = 1  # bump when the library layout changes: cached libraries are rebuilt
SEED = 0


@dataclass(frozen=True)
class Library:
    """The benchmark library: real clips copied under new names, plus long tracks."""

    root: Path
    clips: list[Path]
    long: list[Path]

    def kind(self, path: Path) -> str:
        """A file's class in the report: 'mp3 clip', 'flac clip', or 'mp3 N min' for long tracks."""
        if path in self.long:
            return f"mp3 {round(sf.info(str(path)).duration / 60)} min"
        return f"{path.suffix.lower().lstrip('.')} clip"

    def counts(self) -> dict[str, int]:
        """Number of files of each clip class."""
        counts: dict[str, int] = {}
        for path in self.clips:
            counts[self.kind(path)] = counts.get(self.kind(path), 0) + 1
        return counts


def originals(data: Path) -> list[Path]:
    """Audio files of `data/<task>/<genre>/`, in a seeded shuffled order (any prefix mixes formats and genres)."""
    files = sorted(p for p in data.glob("*/*/*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise SystemExit(f"no audio files as <task>/<genre>/<file> in {data}")
    order = np.random.default_rng(SEED).permutation(len(files))
    return [files[i] for i in order]


def folder_of(source: Path) -> str:
    """Library folder (the genre label for --labels folders) of a source file: '<task>-<genre>'."""
    return f"{source.parent.parent.name}-{source.parent.name}"


def link(source: Path, target: Path) -> None:
    """Hardlink `source` as `target` (a copy across filesystems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def layout(path: Path) -> tuple[int, int]:
    """Sample rate and channels of an audio file."""
    info = sf.info(str(path))
    return info.samplerate, info.channels


def write_long_track(sources: list[Path], minutes: int, target: Path) -> None:
    """Concatenate the sources (cycling) into an MP3 of exactly `minutes`, at the first source's rate and channels."""
    rate, channels = layout(sources[0])
    usable = [s for s in sources if layout(s) == (rate, channels)]
    todo = minutes * 60 * rate
    partial = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(str(partial), "w", rate, channels, format="MP3") as out:
        for source in itertools.cycle(usable):
            data = sf.read(str(source), dtype="float32", always_2d=True)[0][:todo]
            out.write(data)
            todo -= len(data)
            if not todo:
                break
    partial.rename(target)


def long_tracks(data: Path, work: Path) -> list[tuple[Path, str]]:
    """The long MP3s (built once into work/long, two at a time) and the library folder each belongs to."""
    groups: dict[str, list[Path]] = {}
    for source in sorted(p for p in data.glob(f"*/*/*{LONG_SOURCE_EXT}")):
        groups.setdefault(folder_of(source), []).append(source)
    if not groups:
        raise SystemExit(f"no {LONG_SOURCE_EXT} clips in {data} to make long tracks from")
    folders = [sorted(groups)[i % len(groups)] for i in range(len(LONG_TRACKS_MIN))]
    targets = [work / "long" / f"{folder}-{m}min.mp3" for folder, m in zip(folders, LONG_TRACKS_MIN)]
    missing = [i for i, path in enumerate(targets) if not path.exists()]
    if missing:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(write_long_track, [groups[folders[i]] for i in missing], [LONG_TRACKS_MIN[i] for i in missing], [targets[i] for i in missing]))
    return list(zip(targets, folders))


def build_library(data: Path, work: Path, n_files: int) -> Library:
    """Real clips hardlinked under new names (c<copy>-<name>) up to `n_files` with the long tracks; reused if already built."""
    root = work / f"library-{n_files}"
    sources = originals(data)
    n_clips = n_files - len(LONG_TRACKS_MIN)
    if n_clips < 1:
        raise SystemExit(f"--files must exceed the {len(LONG_TRACKS_MIN)} long tracks")
    picks = [sources[i % len(sources)] for i in range(n_clips)]
    clips = [root / folder_of(s) / f"c{i // len(sources)}-{s.name}" for i, s in enumerate(picks)]
    made = long_tracks(data, work)
    long = [root / folder / f"long-{path.name.rsplit('-', 1)[1]}" for path, folder in made]
    manifest = {"layout": LIBRARY_LAYOUT, "data": str(data), "files": n_files, "long_minutes": list(LONG_TRACKS_MIN)}
    if (root / MANIFEST).exists() and json.loads((root / MANIFEST).read_text()) == manifest:
        return Library(root, clips, long)
    shutil.rmtree(root, ignore_errors=True)
    for source, clip in zip(picks, clips):
        link(source, clip)
    for (path, _), target_path in zip(made, long):
        link(path, target_path)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return Library(root, clips, long)


def subset(library: Library, work: Path, n_files: int) -> Path:
    """A library of hardlinks to the first `n_files` clips (the same mix of formats), for the 1- vs 2-worker runs."""
    root = work / f"speedup-{n_files}-of-{library.root.name}"
    manifest = {"source": str(library.root), "files": n_files}
    if (root / MANIFEST).exists() and json.loads((root / MANIFEST).read_text()) == manifest:
        return root
    shutil.rmtree(root, ignore_errors=True)
    for clip in library.clips[:n_files]:
        link(clip, root / clip.relative_to(library.root))
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def sample(library: Library, per_format: int) -> list[Path]:
    """Up to `per_format` distinct-content clips of each format (first copies) plus every long track."""
    chosen: dict[str, list[Path]] = {}
    for clip in library.clips:
        if clip.name.startswith("c0-") and len(chosen.setdefault(clip.suffix.lower(), [])) < per_format:
            chosen[clip.suffix.lower()].append(clip)
    return [p for group in chosen.values() for p in group] + library.long


def floor(path: Path) -> None:
    """The floor: decode the whole file with soundfile, mix to mono, resample to 22050 Hz, one STFT (n_fft 2048, hop 512)."""
    with sf.SoundFile(str(path)) as snd:
        rate, channels = snd.samplerate, snd.channels
        for block in snd.blocks(blocksize=FLOOR_BLOCK_S * rate, dtype="float32", always_2d=True):
            mono = block[:, 0] if channels == 1 else block @ np.full(channels, 1.0 / channels, dtype=np.float32)
            y = soxr.resample(mono, rate, SR) if rate != SR else mono
            librosa.stft(y, n_fft=N_FFT, hop_length=HOP)


def recipe(path: Path) -> None:
    """The seed-article recipe: librosa.load (whole file, 22050 Hz mono), then MFCC, contrast, chroma each from y."""
    y, sr = librosa.load(str(path), sr=SR, mono=True)
    recipe_features(y, sr)


def extractor(path: Path) -> None:
    """genre-batch's librosa family on one file, exactly as a worker runs it."""
    extract_file(str(path))


def default_extraction(path: Path) -> None:
    """genre-batch's default extraction on one file, as a worker's shard runs it: one decode, then the librosa windows
    and the musicnn vector (the families of stages.extract.DEFAULT_FEATURES)."""
    segments, _, _ = audio.load(str(path), features.window_spans)
    librosa_windows(segments)
    musicnn_vector(segments)


def check_default_families() -> None:
    """Refuse to run when extraction's default families are not the ones `default_extraction` computes."""
    if DEFAULT_FEATURES != (LIBROSA.name, MUSICNN.name):
        raise SystemExit(f"default_extraction measures librosa + musicnn, the default families are {DEFAULT_FEATURES}: update it")


def warm_up() -> None:
    """Compile (or load) librosa's numba code and load the musicnn model: first calls are not measured."""
    warm_up_both()
    musicnn_vector([audio.Segment(0.0, np.zeros(audio.SAMPLE_RATE * 3, np.float32))])


def cpu_ms(function: Callable[[Path], None], path: Path, repeats: int = 1) -> float:
    """CPU milliseconds (this process, one thread) of one call: the median of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function(path)
        times.append(1000 * (time.process_time() - started))
    return statistics.median(times)


def measure_files(library: Library, files: list[Path], with_recipe: bool = True) -> list[dict]:
    """Per-file CPU of the floor, the librosa extractor, the default extraction and (`with_recipe`) the recipe,
    interleaved file by file."""
    warm_up()
    rows = []
    for path in files:
        duration = sf.info(str(path)).duration
        row = {"file": str(path.relative_to(library.root)), "kind": library.kind(path), "duration_s": round(duration, 2)}
        repeats = LONG_REPEATS if path in library.long else 1
        row["extractor_ms"] = cpu_ms(extractor, path, repeats)
        row["default_ms"] = cpu_ms(default_extraction, path, repeats)
        row["floor_ms"] = cpu_ms(floor, path, repeats)
        row["recipe_ms"] = cpu_ms(recipe, path) if with_recipe and duration <= RECIPE_MAX_S else None
        rows.append(row)
    return rows


def by_kind(rows: list[dict]) -> dict[str, dict]:
    """Medians per file class: floor, extractor, default extraction, recipe, and the medians of per-file ratios to the floor."""
    kinds: dict[str, dict] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = [r for r in rows if r["kind"] == kind]
        recipes = [r["recipe_ms"] for r in group if r["recipe_ms"] is not None]
        kinds[kind] = {
            "files": len(group),
            "duration_s": statistics.median(r["duration_s"] for r in group),
            "floor_ms": statistics.median(r["floor_ms"] for r in group),
            "extractor_ms": statistics.median(r["extractor_ms"] for r in group),
            "recipe_ms": statistics.median(recipes) if recipes else None,
            "extractor_over_floor": statistics.median(r["extractor_ms"] / r["floor_ms"] for r in group),
            "default_ms": statistics.median(r["default_ms"] for r in group),
            "default_over_floor": statistics.median(r["default_ms"] / r["floor_ms"] for r in group),
        }
    return kinds


def label(function: tuple[str, int, str]) -> str:
    """A readable name of a profiled function: module path inside site-packages, or the builtin's name."""
    filename, _, name = function
    if filename == "~":
        return name
    parts = Path(filename).with_suffix("").parts
    start = parts.index("site-packages") + 1 if "site-packages" in parts else len(parts) - 2
    return f"{'.'.join(parts[start:])}.{name}"


def profile(path: Path, repeats: int = PROFILE_REPEATS, top: int = PROFILE_TOP) -> dict:
    """CPU ms per call of what genre-batch's code calls (cProfile, process time), largest first; package's own time apart."""
    profiler = cProfile.Profile(time.process_time)
    started = time.process_time()
    for _ in range(repeats):
        profiler.runcall(extract_file, str(path))
    total = 1000 * (time.process_time() - started) / repeats
    package = str(Path(genre_batch.__file__).parent)
    costs: dict[str, float] = {}
    own = 0.0
    for function, (_, _, tottime, _, callers) in pstats.Stats(profiler).stats.items():
        if function[0].startswith(package):
            own += tottime
            continue
        ms = sum(edge[3] for caller, edge in callers.items() if caller[0].startswith(package))
        if ms:
            costs[label(function)] = costs.get(label(function), 0.0) + 1000 * ms / repeats
    ranked = sorted(costs.items(), key=lambda kv: -kv[1])[:top]
    return {"file": path.name, "total_ms_profiled": round(total, 1), "package_own_ms": round(1000 * own / repeats, 1),
            "calls": [{"call": name, "ms": round(ms, 1)} for name, ms in ranked]}


def fresh_store(work: Path, name: str) -> Path:
    """An empty store folder in `work`."""
    store = work / "stores" / name
    shutil.rmtree(store, ignore_errors=True)
    return store


def library_estimate(library: Library, rows: list[dict], column: str) -> float:
    """Seconds of `column` for the whole library: clip medians times clip counts plus each long track's own measure."""
    kinds = by_kind(rows)
    clips = sum(kinds[kind][column] * n for kind, n in library.counts().items())
    long = sum(r[column] for r in rows if r["kind"] not in library.counts())
    return (clips + long) / 1000


def pipeline(library: Library, work: Path) -> dict:
    """genre-batch extract on a fresh store (default families and local cluster), a no-op re-run, then train and tag (the
    default model), each as CLI runs."""
    env = cli_env(work)
    store = fresh_store(work, "pipeline")
    load = os.getloadavg()[0]
    runs = {"extract": run_cli(cli_command("extract", str(library.root), "--store", str(store)), env)}
    record = latest_record(store)["extract"]
    runs["noop_extract"] = run_cli(cli_command("extract", str(library.root), "--store", str(store)), env)
    runs["train"] = run_cli(cli_command("train", "--store", str(store), "--labels", "folders"), env)
    runs["tag"] = run_cli(cli_command("tag", "--store", str(store)), env)
    out = {name: run.summary() for name, run in runs.items()}
    out["extract"].update(
        files=record["discovered"], extracted=record["extracted"], failed=record["failed"], shards=record["shards"],
        extraction_stage_wall_s=record["wall_s"], shard_cpu_s=record["cpu_s"],
        peak_rss_mb_per_worker=[round(mb) for mb in runs["extract"].peak_worker_rss_mb()], load_avg_1min_at_start=load,
    )
    return out


def worker_cpu() -> dict[int, float]:
    """CPU seconds so far of each Dask worker process started by this process."""
    me = psutil.Process()
    return {p.pid: sum(p.cpu_times()[:2]) for p in me.children(recursive=True) if role(p, me.pid) == "dask workers"}


def start_cluster(n_workers: int) -> tuple[object, Client, dict]:
    """Start a local cluster of `n_workers` in this process and warm it up; its wall time and CPU (this process + workers)."""
    wall, cpu = time.perf_counter(), time.process_time()
    cluster = local_cluster(n_workers)
    client = Client(cluster)
    warm_up_workers(client)
    cost = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu + sum(worker_cpu().values()), 2)}
    return cluster, client, cost


def speedup(library: Library, work: Path, n_files: int) -> dict:
    """The same clips extracted on a 1-worker and a 2-worker cluster started here (`--scheduler`); fresh store each."""
    root = subset(library, work, n_files)
    env = cli_env(work)
    out: dict = {"files": n_files, "library": str(root)}
    for n_workers in (1, 2):
        load = os.getloadavg()[0]
        cluster, client, start = start_cluster(n_workers)
        with cluster, client:
            store = fresh_store(work, f"speedup-{n_workers}")
            before = worker_cpu()
            run = run_cli(cli_command("extract", str(root), "--store", str(store), "--scheduler", cluster.scheduler_address), env)
            busy = [round(cpu - before.get(pid, 0.0), 1) for pid, cpu in worker_cpu().items()]
        record = latest_record(store)["extract"]
        out[f"workers_{n_workers}"] = {
            "cluster_start_and_warm_up": start, "cli": run.summary(), "extraction_stage_wall_s": record["wall_s"],
            "shard_cpu_s": record["cpu_s"], "files_per_s": round(record["extracted"] / record["wall_s"], 2),
            "worker_cpu_s": busy, "cores_used": round(sum(busy) / record["wall_s"], 2), "load_avg_1min_at_start": load,
        }
    one, two = out["workers_1"], out["workers_2"]
    out["speedup_extraction_stage"] = round(one["extraction_stage_wall_s"] / two["extraction_stage_wall_s"], 2)
    out["speedup_cli_wall"] = round(one["cli"]["wall_s"] / two["cli"]["wall_s"], 2)
    return out


def totals(library: Library, rows: list[dict], pipe: dict, cluster_start: dict) -> dict:
    """Whole-pipeline aggregates: CPU per file, files per second, fixed costs, overhead per file, sums of the floors and
    of the default extraction (what the pipeline's `extract` runs)."""
    run, noop = pipe["extract"], pipe["noop_extract"]
    files = run["files"]
    fixed_cpu = noop["cpu_s"] + cluster_start["cpu_s"]
    extractor_s = library_estimate(library, rows, "default_ms")
    return {
        "files": files,
        "wall_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
        "cpu_ms_per_file": round(1000 * run["cpu_s"] / files, 1),
        "files_per_s": round(files / run["wall_s"], 2),
        "fixed_wall_s": round(noop["wall_s"] + cluster_start["wall_s"], 2),
        "fixed_cpu_s": round(fixed_cpu, 2),
        "floor_sum_s": round(library_estimate(library, rows, "floor_ms"), 2),
        "extractor_sum_s": round(extractor_s, 2),
        "overhead_cpu_ms_per_file": round(1000 * (run["cpu_s"] - fixed_cpu - extractor_s) / files, 1),
        "shard_overhead_cpu_ms_per_file": round(1000 * (run["shard_cpu_s"] - extractor_s) / files, 1),
    }


def targets(kinds: dict[str, dict], agg: dict, speed: dict, pipe: dict) -> list[dict]:
    """The per-file and pipeline targets of issues #5 (librosa family) and #14 (the default extraction, embeddings
    included: <= 3.0x the floor) with their measured values."""
    longest = max((k for k in kinds if k.endswith(" min") and int(k.split()[1]) <= 10), key=lambda k: int(k.split()[1]))
    hour = max((k for k in kinds if k.endswith(" min")), key=lambda k: int(k.split()[1]))
    clips = [k for k in kinds if k.endswith("clip")]
    rows = [target(f"librosa extractor CPU/file vs floor, {k}s (median ratio)", kinds[k]["extractor_over_floor"], 1.6, "x") for k in clips]
    rows += [target(f"default extraction CPU/file vs floor, {k}s (median ratio)", kinds[k]["default_over_floor"], 3.0, "x") for k in clips]
    rows += [
        target("default pipeline total CPU vs sum of floors, start-up incl.", agg["cpu_s"] / agg["floor_sum_s"], 3.0, "x"),
        target(f"2 workers vs 1, throughput ({speed['files']} files, extraction stage)", speed["speedup_extraction_stage"], 1.8, "x", at_least=True),
        target(f"{longest} track vs a 60 s mp3 clip, extractor CPU", kinds[longest]["extractor_ms"] / kinds["mp3 clip"]["extractor_ms"], 2.0, "x"),
        target(f"peak RSS per worker, {hour} file in the batch", max(pipe["extract"]["peak_rss_mb_per_worker"]) / 1000, 1.5, "GB"),
    ]
    return rows


def print_report(report: dict) -> None:
    """Print the tables: per-file CPU, profile, pipeline, speedup, targets."""
    print_per_file(report)
    for p in report["profile"]:
        print(f"\nextract_file({p['file']}) under cProfile: {p['total_ms_profiled']:.0f} ms CPU; genre-batch's own code {p['package_own_ms']:.0f} ms; calls from it:")
        for c in p["calls"]:
            print(f"  {c['ms']:>7.1f} ms  {c['call']}")
    agg, pipe = report["totals"], report["pipeline"]
    print(f"\ndefault pipeline: genre-batch extract, {agg['files']} files (60-min file included), fresh store, local cluster of 2 workers")
    print(f"  wall {agg['wall_s']:.1f} s, CPU {agg['cpu_s']:.1f} s {pipe['extract']['cpu_s_by_role']}")
    print(f"  {agg['cpu_ms_per_file']:.0f} ms CPU/file, {agg['files_per_s']:.2f} files/s; extraction stage {pipe['extract']['extraction_stage_wall_s']:.1f} s wall, "
          f"shards {pipe['extract']['shard_cpu_s']:.1f} s CPU; peak RSS per worker {pipe['extract']['peak_rss_mb_per_worker']} MB")
    print(f"  fixed: no-op extract {pipe['noop_extract']['wall_s']:.1f} s wall, {pipe['noop_extract']['cpu_s']:.1f} s CPU {pipe['noop_extract']['cpu_s_by_role']}; "
          f"cluster start + warm-up (2 workers) {report['cluster_start']['wall_s']:.1f} s wall, {report['cluster_start']['cpu_s']:.1f} s CPU")
    print(f"  sum of floors {agg['floor_sum_s']:.1f} s, of the default extraction {agg['extractor_sum_s']:.1f} s (estimates from the sample); "
          f"overhead beyond extraction and fixed costs {agg['overhead_cpu_ms_per_file']:.0f} ms CPU/file (inside shards "
          f"{agg['shard_overhead_cpu_ms_per_file']:.0f} ms); total CPU / sum of floors {agg['cpu_s'] / agg['floor_sum_s']:.2f}x")
    for stage in ("train", "tag"):
        print(f"  {stage} (separate CLI run): {pipe[stage]['wall_s']:.1f} s wall, {pipe[stage]['cpu_s']:.1f} s CPU")
    s = report["speedup"]
    print(f"\nworkers ({s['files']} clips, cluster started by the bench, --scheduler):")
    for n in (1, 2):
        w = s[f"workers_{n}"]
        print(f"  {n}: extraction stage {w['extraction_stage_wall_s']:.1f} s ({w['files_per_s']:.2f} files/s), CLI {w['cli']['wall_s']:.1f} s wall; "
              f"cluster start + warm-up {w['cluster_start_and_warm_up']['wall_s']:.1f} s; worker CPU {w['worker_cpu_s']} s "
              f"({w['cores_used']:.2f} cores busy); load avg {w['load_avg_1min_at_start']:.1f}")
    print(f"  speedup {s['speedup_extraction_stage']:.2f}x (extraction stage), {s['speedup_cli_wall']:.2f}x (CLI wall)")


def run(data: Path, work: Path, n_files: int, per_format: int, speedup_files: int) -> dict:
    """Build the library, then every measurement of the report."""
    check_default_families()
    started = time.perf_counter()
    library = build_library(data, work, n_files)
    report: dict = {"data": str(data), "work": str(work), "library": str(library.root), "files": n_files,
                    "library_counts": {**library.counts(), "long tracks": len(library.long)}, "cpus": os.cpu_count(),
                    "library_build_s": round(time.perf_counter() - started, 1), "default_features": list(DEFAULT_FEATURES),
                    "load_avg_1min_at_start": os.getloadavg()[0]}
    rows = measure_files(library, sample(library, per_format))
    report["per_file"] = by_kind(rows)
    report["files_measured"] = rows
    firsts = {}
    for r in rows:
        firsts.setdefault(r["kind"], library.root / r["file"])
    report["profile"] = [profile(firsts[k]) for k in ("mp3 clip", "flac clip") if k in firsts]
    report["speedup"] = speedup(library, work, min(speedup_files, len(library.clips)))
    report["cluster_start"] = report["speedup"]["workers_2"]["cluster_start_and_warm_up"]
    report["pipeline"] = pipeline(library, work)
    report["totals"] = totals(library, rows, report["pipeline"], report["cluster_start"])
    report["targets"] = targets(report["per_file"], report["totals"], report["speedup"], report["pipeline"])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def clip_sample(data: Path, per_format: int) -> Library:
    """The data's own first `per_format` clips of each format (seeded order), as a library without long tracks."""
    chosen: dict[str, list[Path]] = {}
    for path in originals(data):
        if len(chosen.setdefault(path.suffix.lower(), [])) < per_format:
            chosen[path.suffix.lower()].append(path)
    return Library(data, [p for group in chosen.values() for p in group], [])


def per_file_only(data: Path, per_format: int) -> dict:
    """The per-file CPU table and its targets alone (no recipe, library copy, long tracks, pipeline or cluster runs):
    the #14 check of the default extraction against the floor, cheap enough for a loaded machine."""
    check_default_families()
    library = clip_sample(data, per_format)
    report: dict = {"data": str(data), "default_features": list(DEFAULT_FEATURES), "cpus": os.cpu_count(),
                    "load_avg_1min_at_start": os.getloadavg()[0]}
    rows = measure_files(library, library.clips, with_recipe=False)
    report["per_file"], report["files_measured"] = by_kind(rows), rows
    report["load_avg_1min_at_end"] = os.getloadavg()[0]
    clips = list(report["per_file"])
    report["targets"] = [target(f"librosa extractor CPU/file vs floor, {k}s (median ratio)", report["per_file"][k]["extractor_over_floor"], 1.6, "x") for k in clips]
    report["targets"] += [target(f"default extraction CPU/file vs floor, {k}s (median ratio)", report["per_file"][k]["default_over_floor"], 3.0, "x") for k in clips]
    return report


def print_per_file(report: dict) -> None:
    """Print the per-file CPU table."""
    print(f"default families: {','.join(report['default_features'])}")
    print(f"{'per-file CPU, one thread (median ms)':<38} {'files':>5} {'length':>7} {'floor':>7} {'librosa':>8} {'default':>8} {'recipe':>7} "
          f"{'librosa/floor':>13} {'default/floor':>13}")
    for kind, k in report["per_file"].items():
        recipe_ms = f"{k['recipe_ms']:.0f}" if k["recipe_ms"] is not None else "-"
        print(f"{kind:<38} {k['files']:>5} {k['duration_s']:>6.0f}s {k['floor_ms']:>7.0f} {k['extractor_ms']:>8.0f} {k['default_ms']:>8.0f} "
              f"{recipe_ms:>7} {k['extractor_over_floor']:>12.2f}x {k['default_over_floor']:>12.2f}x")


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.throughput [--data DIR] [--work DIR] [--files 1000] [--out FILE] [--skip-scale] [--per-file-only]."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"folder of <task>/<genre>/<audio> (default {DEFAULT_DATA}); read only")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"folder for the built library, stores and Prefect home (default {DEFAULT_WORK}); the library is reused between runs. Never inside the repository")
    parser.add_argument("--files", type=int, default=1000, help="files in the benchmark library, long tracks included (default 1000)")
    parser.add_argument("--sample", type=int, default=SAMPLE_PER_FORMAT, help=f"clips per format measured file by file (default {SAMPLE_PER_FORMAT}); long tracks always")
    parser.add_argument("--speedup-files", type=int, default=SPEEDUP_FILES, help=f"clips extracted on 1 and on 2 workers (default {SPEEDUP_FILES})")
    parser.add_argument("--skip-scale", action="store_true", help="skip the scale checks (10,000-file no-op run, 1M-row catalog; also: python -m bench.scale)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"write the report as JSON here (default {DEFAULT_OUT})")
    parser.add_argument("--per-file-only", action="store_true", help="only the per-file CPU table of --sample clips per format of --data and its targets (no library, pipeline or cluster runs)")
    args = parser.parse_args(argv)
    if args.per_file_only:
        report = per_file_only(args.data.resolve(), args.sample)
        print_per_file(report)
        print()
        print_targets(report["targets"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    work = args.work.resolve()
    if Path(__file__).resolve().parent.parent in [work, *work.parents]:
        parser.error("--work must be outside the repository: the library holds copies of the data")
    report = run(args.data.resolve(), work, args.files, args.sample, args.speedup_files)
    print_report(report)
    if not args.skip_scale:
        from bench import scale

        report["scale"] = scale.run(work)
        report["targets"] += scale.targets(report["scale"])
        print()
        scale.print_scale(report["scale"])
    print()
    print_targets(report["targets"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
