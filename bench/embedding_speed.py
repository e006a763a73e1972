"""CPU cost of the musicnn MSD embedding on one thread: per 3 s patch by batch size, per 60 s track by patch cap, RSS.

    python -m bench.embedding_speed                 # a generated 60 s signal
    python -m bench.embedding_speed --file x.mp3    # a real file, decoded to mono 16 kHz
    python -m bench.embedding_speed --file x.mp3 --alternatives   # also other runtimes of the same network

--alternatives (needs the `onnx` package: pip install -e '.[convert]') times the shipped float model at each
onnxruntime graph optimisation level and int8 versions of it made here with onnxruntime.quantization (dynamic;
static QDQ calibrated on the even patches of the signal), and compares their outputs on the odd patches with the
float model's: cosine of the embedding, top tag agreement. It also prints which wide units the CPU has.

Times are process CPU (time.process_time), the minimum over --reps calls after one warm-up call, so
that other load on a shared machine inflates them as little as possible.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import psutil  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402

from genre_batch.analysis import musicnn  # noqa: E402
from genre_batch.library.synth import render  # noqa: E402

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


def cpu_units() -> str:
    """The CPU's wide-vector and matrix units that int8/bf16 kernels could use, from /proc/cpuinfo."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def float_session(path: str, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    """A one-thread session on the model at path with the given graph optimisation level."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = musicnn.THREADS
    options.graph_optimization_level = level
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def quantised_models(folder: str, calibration: np.ndarray) -> dict[str, str]:
    """int8 versions of the shipped model written under folder: dynamic, and static QDQ (U8 activations, S8 weights
    per channel, MinMax ranges of the calibration patches); name -> path."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    class Patches(CalibrationDataReader):
        """Calibration patches one at a time."""

        def __init__(self, x: np.ndarray) -> None:
            self.batches = iter(x[i : i + 1] for i in range(len(x)))

        def get_next(self) -> dict | None:
            """The next patch as an input feed, None at the end."""
            batch = next(self.batches, None)
            return None if batch is None else {"logmel": batch}

    prepared = f"{folder}/prepared.onnx"
    quant_pre_process(str(musicnn.MODEL_PATH), prepared, skip_symbolic_shape=True)
    paths = {"int8 dynamic": f"{folder}/dynamic.onnx", "int8 static QDQ": f"{folder}/static.onnx"}
    quantize_dynamic(prepared, paths["int8 dynamic"], weight_type=QuantType.QInt8, per_channel=True)
    quantize_static(prepared, paths["int8 static QDQ"], Patches(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return paths


def agreement(session: ort.InferenceSession, patches: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> str:
    """Cosine of the embeddings (min, mean) and top tag agreement of session's outputs with the reference outputs."""
    outputs = [session.run(musicnn.OUTPUTS, {"logmel": patches[i : i + 1]}) for i in range(len(patches))]
    penultimate, tags = (np.concatenate([o[k] for o in outputs]) for k in (0, 1))
    cosine = (penultimate * reference[0]).sum(1) / np.linalg.norm(penultimate, axis=1) / np.linalg.norm(reference[0], axis=1)
    top = (tags.argmax(1) == reference[1].argmax(1)).mean()
    return f"embedding cosine min {cosine.min():.4f} mean {cosine.mean():.4f}, top tag agrees {top:.0%}, max tag error {np.abs(tags - reference[1]).max():.3f}"


def alternatives(patches: np.ndarray, reps: int) -> None:
    """Per-patch CPU and output agreement of the float model at each optimisation level and of int8 versions."""
    print(f"CPU units: {cpu_units()}")
    calibration, held_out = patches[0::2], patches[1::2]
    levels = ort.GraphOptimizationLevel
    reference = musicnn.embed(held_out)
    one = {"logmel": np.ascontiguousarray(patches[len(patches) // 2 : len(patches) // 2 + 1])}
    with tempfile.TemporaryDirectory() as folder:
        candidates = {f"float, graph optimisation {level.name}": (str(musicnn.MODEL_PATH), level)
                      for level in (levels.ORT_DISABLE_ALL, levels.ORT_ENABLE_BASIC, levels.ORT_ENABLE_EXTENDED, levels.ORT_ENABLE_ALL)}
        try:
            candidates |= {name: (path, levels.ORT_ENABLE_ALL) for name, path in quantised_models(folder, calibration).items()}
        except ImportError as exc:
            print(f"int8 skipped: {exc} (pip install -e '.[convert]')")
        for name, (path, level) in candidates.items():
            session = float_session(path, level)
            ms = cpu_ms(lambda session=session: session.run(musicnn.OUTPUTS, one), reps * 4)
            print(f"{name:<48} {ms:5.1f} ms per patch (batch 1); vs float: {agreement(session, held_out, reference)}")


def main() -> None:
    """Print the cost table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="audio file to embed (default: 60 s of generated 'electronic' music)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--alternatives", action="store_true", help="also time graph optimisation levels and int8 models (needs onnx)")
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
    if args.alternatives:
        alternatives(patches, args.reps)


if __name__ == "__main__":
    main()
