"""Extraction: shards of files fanned out over Dask, one Parquet part per shard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import soxr

from genre_batch.analysis import audio, features, musicnn
from genre_batch.cluster import Session
from genre_batch.storage.feature_store import (
    FAMILIES,
    LIBROSA,
    MUSICNN,
    Family,
    copy_rows,
    feature_table,
    index_table,
    musicnn_table,
    write_parts,
)
from genre_batch.storage.store import Store

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


def split(todo: pa.Table, size: int) -> Iterator[pa.Table]:
    """Cut the files to extract into shards of `size` rows, each copied when it is taken (a shard's task carries its
    own rows, not the buffers of the whole list)."""
    return (copy_rows(todo, i, min(size, todo.num_rows - i)) for i in range(0, todo.num_rows, size))


def now() -> datetime:
    """The current time in UTC."""
    return datetime.now(timezone.utc)


MUSICNN_PATCHES = 3
"""3 s patches per track for the musicnn family, spread over the decoded spans. Budget (#14): extraction with the
family <= 3.0x the decode+STFT floor. Measured on 60 s MP3s (one thread, medians of 10): floor 85 ms, librosa 128 ms,
musicnn 74/105/134 ms at 2/3/4 patches: 2.38x/2.75x/3.09x. Three is the most that fits (README, musicnn family)."""


def file_meta(info: audio.AudioInfo, tags: audio.Tags) -> dict:
    """Provenance of a decoded file: its stream, the analysed span and its embedded tags."""
    return {
        "duration_s": info.duration_s,
        "sample_rate": info.sample_rate,
        "channels": info.channels,
        "offset_s": info.offset_s,
        "analysed_s": info.analysed_s,
        "tag_genre": tags.genre,
        "tag_artist": tags.artist,
        "tag_album": tags.album,
    }


def librosa_windows(segments: list[audio.Segment]) -> tuple[list[float], np.ndarray]:
    """Offsets in seconds and librosa features of the analysis windows of the decoded spans."""
    sr = audio.SAMPLE_RATE
    offsets = [s.offset_s + t for s in segments for t in features.window_starts(len(s.samples), sr)]
    return offsets, np.vstack([features.extract(s.samples, sr) for s in segments])


def musicnn_vector(segments: list[audio.Segment], max_patches: int | None = MUSICNN_PATCHES) -> tuple[np.ndarray, int]:
    """musicnn's mean embedding and tag scores [250] of the decoded spans (resampled to 16 kHz and joined end to end,
    not the whole file), and the number of patches averaged (max_patches None: every patch)."""
    y = np.concatenate([soxr.resample(s.samples, audio.SAMPLE_RATE, musicnn.SAMPLE_RATE) for s in segments]).astype(np.float32)
    embedding, tags, patches = musicnn.track_embedding(y, max_patches)
    return np.concatenate([embedding, tags]), patches


def extract_file(uri: str) -> tuple[dict, np.ndarray]:
    """Decode one file's analysis spans and compute its provenance and its windows' features (raises audio.AudioError)."""
    segments, info, tags = audio.load(uri, features.window_spans)
    offsets, matrix = librosa_windows(segments)
    return {**file_meta(info, tags), "window_offsets_s": offsets}, matrix


def error_row(file: dict, stage: str, error_type: str, message: str, run_id: str, family: Family = LIBROSA) -> dict:
    """The index row of a file that could not be processed for a family."""
    return {
        **file,
        "family": family.name,
        "feature_version": family.version,
        "row_start": 0,
        "row_count": 0,
        "error_type": error_type,
        "error_stage": stage,
        "error_message": message,
        "run_id": run_id,
        "extracted_at": now(),
    }


@dataclass
class Shard:
    """The rows a shard collects before it writes its parts and its index file."""

    name: str
    run_id: str
    windows: list[dict] = field(default_factory=list)
    matrices: list[np.ndarray] = field(default_factory=list)
    tracks: list[dict] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    patches: list[int] = field(default_factory=list)
    index: list[dict] = field(default_factory=list)

    def add_librosa(self, file: dict, meta: dict, segments: list[audio.Segment]) -> None:
        """Compute and collect a file's librosa windows and their index row."""
        offsets, matrix = librosa_windows(segments)
        stamp = {"feature_version": LIBROSA.version, "run_id": self.run_id, "extracted_at": now()}
        self.index.append({**file, **meta, **stamp, "family": LIBROSA.name, "part": self.name, "row_start": len(self.windows), "row_count": len(offsets)})
        self.windows += [{**file, **meta, **stamp, "window": i, "window_offset_s": t} for i, t in enumerate(offsets)]
        self.matrices.append(matrix)

    def add_musicnn(self, file: dict, meta: dict, segments: list[audio.Segment]) -> None:
        """Compute and collect a file's musicnn row and its index row."""
        vector, patches = musicnn_vector(segments)
        stamp = {"feature_version": MUSICNN.version, "run_id": self.run_id, "extracted_at": now()}
        self.index.append({**file, **meta, **stamp, "family": MUSICNN.name, "part": self.name, "row_start": len(self.tracks), "row_count": 1})
        self.tracks.append({**file, **stamp})
        self.vectors.append(vector)
        self.patches.append(patches)

    def write(self, store: Store) -> None:
        """Write the shard's part of each family, then its one index file."""
        parts = {LIBROSA: feature_table(self.windows, self.matrices), MUSICNN: musicnn_table(self.tracks, self.vectors, self.patches)}
        write_parts(store, self.name, parts, index_table(self.index))


def extract_shard(store: Store, files: pa.Table, run_id: str, shard: int) -> ShardResult:
    """Extract every file of a shard for the families its `families` column names, from one decode per file, then
    write one part per family and the shard's index file (runs on a worker)."""
    started = time.process_time()
    out = Shard(f"{run_id}-{shard:05d}.parquet", run_id)
    failed = 0
    for file in files.to_pylist():
        families = [FAMILIES[name] for name in file.pop("families", [LIBROSA.name])]
        try:
            segments, info, tags = audio.load(file["uri"], features.window_spans)
        except Exception as e:  # an AudioError is the file's fault; anything else on one file must not sink the shard either
            kind = e.kind if isinstance(e, audio.AudioError) else type(e).__name__
            out.index += [error_row(file, "decode", kind, str(e) or repr(e), run_id, f) for f in families]
            failed += 1
            continue
        meta = file_meta(info, tags)
        errors = 0
        for family in families:
            try:
                (out.add_librosa if family == LIBROSA else out.add_musicnn)(file, meta, segments)
            except Exception as e:  # a bug or a library failure on one file must not sink the shard
                out.index.append(error_row(file, "features", type(e).__name__, str(e) or repr(e), run_id, family))
                errors += 1
        failed += errors > 0
    out.write(store)
    return ShardResult(shard, files.num_rows, files.num_rows - failed, failed, time.process_time() - started)


def run_shards(session: Session, store: Store, todo: pa.Table, run_id: str, on_progress: Progress) -> ExtractionResult:
    """Extract the planned files on the cluster's warmed workers, a few shards in flight per worker
    (`Session.completed`), reporting progress as shards finish; a shard's failure is recorded and the others go on."""
    started = time.perf_counter()
    n_workers = max(1, len(session.warm_client.scheduler_info(n_workers=-1)["workers"]))
    size = shard_size(todo.num_rows, n_workers)
    result = ExtractionResult(files=todo.num_rows, shards=math.ceil(todo.num_rows / size))
    on_progress(0, todo.num_rows, 0)
    done = 0
    calls = ((extract_shard, store, files, run_id, i) for i, files in enumerate(split(todo, size)))
    for index, future in session.completed(calls, name=f"extract-{run_id}"):  # keys extract-<run_id>-<shard>
        try:
            shard: ShardResult = future.result()
        except Exception as e:
            files = min(size, todo.num_rows - index * size)
            result.shard_failures.append(f"shard {index} ({files} files): {type(e).__name__}: {e}")
            done += files
        else:
            result.extracted += shard.extracted
            result.failed += shard.failed
            result.cpu_s += shard.cpu_s
            done += shard.files
        on_progress(done, todo.num_rows, result.failed)
    result.wall_s = time.perf_counter() - started
    return result
