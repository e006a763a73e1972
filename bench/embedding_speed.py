"""CPU cost of the musicnn MSD embedding on one thread: per 3 s patch by batch size, per 60 s track by patch cap, RSS.

    python -m bench.embedding_speed                 # a generated 60 s signal
    python -m bench.embedding_speed --file x.mp3    # a real file, decoded to mono 16 kHz

Times are process CPU (time.process_time), the minimum over --reps calls after one warm-up call, so
that other load on a shared machine inflates them as little as possible.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402

from genre_batch.embedding import musicnn  # noqa: E402
from genre_batch.synth import render  # noqa: E402

BATCH_SIZES = (1, 4, 8, 16)
PATCH_CAPS = (4, 8, None)


def cpu_ms(call: Callable[[], object], reps: int) -> float:
    """Minimum process CPU time of call over reps runs after one warm-up run, in ms."""
    call()
    times = []
    for _ in range(reps):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return 1000 * min(times)


def rss_mb() -> float:
    """Resident set size of this process in MB."""
    return psutil.Process().memory_info().rss / 1e6


def mono_16k(path: str) -> np.ndarray:
    """A file decoded with soundfile, downmixed and resampled to 16 kHz float32."""
    y, rate = sf.read(path, dtype="float32", always_2d=True)
    return soxr.resample(y.mean(axis=1), rate, musicnn.SAMPLE_RATE).astype(np.float32)


def main() -> None:
    """Print the cost table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="audio file to embed (default: 60 s of generated 'electronic' music)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    y = mono_16k(args.file) if args.file else render("electronic", 60.0, 0, sr=musicnn.SAMPLE_RATE)
    rss_before = rss_mb()
    start = time.perf_counter()
    musicnn.session()
    load_s = time.perf_counter() - start
    rss_loaded = rss_mb()
    patches = musicnn.log_mel(y)
    rss_log_mel = rss_mb()
    musicnn.embed(patches)
    print(f"signal {len(y) / musicnn.SAMPLE_RATE:.1f} s, {len(patches)} patches; onnxruntime threads {musicnn.THREADS}")
    print(
        f"model load + checksum {1000 * load_s:.0f} ms; RSS {rss_before:.0f} MB before, {rss_loaded:.0f} MB with the "
        f"model, {rss_log_mel:.0f} MB after a log-mel (librosa loaded), {rss_mb():.0f} MB after embedding all patches"
    )
    per_patch = cpu_ms(lambda: musicnn.log_mel_patches(y, [len(patches) // 2]), args.reps * 4)
    print(f"log-mel: {per_patch:.2f} ms per patch")
    for batch in BATCH_SIZES:
        feed = {"logmel": np.ascontiguousarray(np.resize(patches, (batch, *patches.shape[1:])))}
        ms = cpu_ms(lambda feed=feed: musicnn.session().run(musicnn.OUTPUTS, feed), args.reps)
        print(f"network, batch {batch:2d} per onnxruntime call: {ms / batch:.1f} ms per patch, RSS now {rss_mb():.0f} MB")
    for cap in PATCH_CAPS:
        used = musicnn.track_embedding(y, cap)[2]
        ms = cpu_ms(lambda cap=cap: musicnn.track_embedding(y, cap), args.reps)
        print(f"track_embedding, max_patches={cap}: {used} patches, {ms:.0f} ms per track")


if __name__ == "__main__":
    main()
