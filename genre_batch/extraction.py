"""Extraction: shards of files fanned out over Dask, one Parquet part per shard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from distributed import Client, as_completed

from genre_batch import audio, features
from genre_batch.feature_store import LIBROSA, feature_table, index_table, write_shard
from genre_batch.store import Store

MAX_SHARD_SIZE = 256
SHARDS_PER_WORKER = 4

Progress = Callable[[int, int, int], None]
"""Called with (files done, files in total, errors so far) after each shard."""


@dataclass(frozen=True)
class ShardResult:
    """What one shard produced."""

    shard: int
    files: int
    extracted: int
    failed: int
    cpu_s: float


@dataclass
class ExtractionResult:
    """What an extraction produced, over all shards."""

    files: int = 0
    extracted: int = 0
    failed: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    shards: int = 0
    shard_failures: list[str] = field(default_factory=list)


def shard_size(n_files: int, n_workers: int, max_size: int = MAX_SHARD_SIZE) -> int:
    """Files per shard: enough shards to balance the workers, at most `max_size` files each."""
    return max(1, min(max_size, math.ceil(n_files / max(1, n_workers * SHARDS_PER_WORKER))))


def split(todo: pa.Table, size: int) -> list[pa.Table]:
    """Cut the files to extract into shards of `size` rows."""
    return [todo.slice(i, size) for i in range(0, todo.num_rows, size)]


def now() -> datetime:
    """The current time in UTC."""
    return datetime.now(timezone.utc)


def extract_file(uri: str) -> tuple[dict, np.ndarray]:
    """Decode one file's analysis spans and compute its provenance and its windows' features (raises audio.AudioError)."""
    segments, info, tags = audio.load(uri, features.window_spans)
    sr = audio.SAMPLE_RATE
    meta = {
        "duration_s": info.duration_s,
        "sample_rate": info.sample_rate,
        "channels": info.channels,
        "offset_s": info.offset_s,
        "analysed_s": info.analysed_s,
        "tag_genre": tags.genre,
        "tag_artist": tags.artist,
        "tag_album": tags.album,
        "window_offsets_s": [s.offset_s + t for s in segments for t in features.window_starts(len(s.samples), sr)],
    }
    return meta, np.vstack([features.extract(s.samples, sr) for s in segments])


def error_row(file: dict, stage: str, error_type: str, message: str, run_id: str) -> dict:
    """The index row of a file that could not be processed."""
    return {
        **file,
        "family": LIBROSA.name,
        "feature_version": LIBROSA.version,
        "row_start": 0,
        "row_count": 0,
        "error_type": error_type,
        "error_stage": stage,
        "error_message": message,
        "run_id": run_id,
        "extracted_at": now(),
    }


def extract_shard(store: Store, files: pa.Table, run_id: str, shard: int) -> ShardResult:
    """Extract every file of a shard, then write its feature part and its index file (runs on a worker)."""
    started = time.process_time()
    name = f"{run_id}-{shard:05d}.parquet"
    rows: list[dict] = []
    matrices: list[np.ndarray] = []
    index: list[dict] = []
    for file in files.to_pylist():
        try:
            meta, matrix = extract_file(file["uri"])
        except audio.AudioError as e:
            index.append(error_row(file, "decode", e.kind, str(e), run_id))
            continue
        except Exception as e:  # a bug or a library failure on one file must not sink the shard
            index.append(error_row(file, "features", type(e).__name__, str(e) or repr(e), run_id))
            continue
        stamp = {"feature_version": LIBROSA.version, "run_id": run_id, "extracted_at": now()}
        offsets = meta.pop("window_offsets_s")
        index.append({**file, **meta, **stamp, "family": LIBROSA.name, "part": name, "row_start": len(rows), "row_count": len(offsets)})
        rows += [{**file, **meta, **stamp, "window": i, "window_offset_s": t} for i, t in enumerate(offsets)]
        matrices.append(matrix)
    write_shard(store, name, feature_table(rows, matrices), index_table(index))
    failed = sum(1 for r in index if r.get("error_type"))
    return ShardResult(shard, files.num_rows, len(index) - failed, failed, time.process_time() - started)


def run_shards(client: Client, store: Store, todo: pa.Table, run_id: str, on_progress: Progress) -> ExtractionResult:
    """Extract the planned files on the cluster, reporting progress as shards finish."""
    started = time.perf_counter()
    n_workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    shards = split(todo, shard_size(todo.num_rows, n_workers))
    result = ExtractionResult(files=todo.num_rows, shards=len(shards))
    on_progress(0, todo.num_rows, 0)
    futures = [
        client.submit(extract_shard, store, files, run_id, i, key=f"extract-{run_id}-{i}", pure=False)
        for i, files in enumerate(shards)
    ]
    position = {future: i for i, future in enumerate(futures)}
    done = 0
    for future in as_completed(futures):
        index = position[future]
        try:
            shard: ShardResult = future.result()
        except Exception as e:
            result.shard_failures.append(f"shard {index} ({shards[index].num_rows} files): {type(e).__name__}: {e}")
            done += shards[index].num_rows
        else:
            result.extracted += shard.extracted
            result.failed += shard.failed
            result.cpu_s += shard.cpu_s
            done += shard.files
        on_progress(done, todo.num_rows, result.failed)
    result.wall_s = time.perf_counter() - started
    return result
