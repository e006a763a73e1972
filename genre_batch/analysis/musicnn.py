"""musicnn's MSD model (Pons & Serra 2019) without TensorFlow: log-mel patches -> 200-dim embedding + 50 tags.

The network runs in onnxruntime from musicnn_msd.onnx, converted from musicnn 0.1.0's checkpoint by
scripts/convert_musicnn.py (licence and attribution: LICENSE-musicnn.md). On one thread it measured
~31 ms of CPU per 3 s patch against ~47 ms for the same network in numpy (OpenBLAS), at any batch size.
Measured and not used (bench/embedding_speed.py --alternatives, README): lower graph optimisation levels (~15 %
slower: ORT_ENABLE_ALL's blocked layout pays), int8 models (dynamic ~4x slower; static QDQ ~25 % slower and
embedding cosine ~0.6 with the float model) on this AVX2 CPU without VNNI, AVX-512 or AMX.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import librosa
import numpy as np
import onnxruntime as ort

from genre_batch.analysis.columns import EMBEDDING_DIM, TAG_NAMES

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
PATCH_FRAMES = 187  # musicnn's 3 s input: librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1
PATCH_SAMPLES = (PATCH_FRAMES - 1) * HOP + N_FFT  # samples under one patch's frames
MODEL_PATH = Path(__file__).with_name("musicnn_msd.onnx")  # written by scripts/convert_musicnn.py
MODEL_SHA256 = "e212994d5514583be5c8f16c28e3a1fac5f688d23b227047aef0dd4f4a4da93c"
OUTPUTS = ["penultimate", "tags"]
NETWORK_BATCH = 1  # patches per onnxruntime call: 4 or 8 measured no faster per patch and grew the arena by 200-380 MB
CHUNK = 8  # patches whose log-mel is computed at once by track_embedding (bounds memory on long tracks)
THREADS = 1  # one onnxruntime thread per process: Dask workers run one task per process


class ModelFileError(RuntimeError):
    """The shipped model file is missing or does not match its recorded checksum."""


def load_session(path: Path, sha256: str) -> ort.InferenceSession:
    """An onnxruntime session on the model at path, after checking the file's SHA-256 against sha256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"musicnn model not readable at {path}: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise ModelFileError(
            f"musicnn model at {path} has SHA-256 {digest}, expected {sha256}: the file is corrupt or was "
            "replaced; reinstall genre-batch or rerun scripts/convert_musicnn.py"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = THREADS
    return ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])


@cache
def session() -> ort.InferenceSession:
    """The shipped MSD musicnn model, checked and loaded once per process."""
    return load_session(MODEL_PATH, MODEL_SHA256)


def n_patches(n_samples: int) -> int:
    """Number of 3 s patches on musicnn's grid (non-overlapping, from frame 0); a short clip gets one padded patch."""
    n_frames = 1 + n_samples // HOP
    return max(1, (n_frames - PATCH_FRAMES) // PATCH_FRAMES + 1)


def patch_audio(y: np.ndarray, index: int) -> np.ndarray:
    """The samples under patch index of y, with the zeros librosa's centred framing pads at both ends."""
    start = index * PATCH_FRAMES * HOP - N_FFT // 2
    out = np.zeros(PATCH_SAMPLES, dtype=np.float32)
    lo, hi = max(start, 0), min(start + PATCH_SAMPLES, len(y))
    if hi > lo:
        out[lo - start : hi - start] = y[lo:hi]
    return out


def log_mel_patches(y: np.ndarray, indices: list[int]) -> np.ndarray:
    """musicnn's input for the given patches of 16 kHz mono y: log10(10000 mel + 1) in float32, [n, 187, 96]."""
    frames = np.stack([patch_audio(y, i) for i in indices])
    mel = librosa.feature.melspectrogram(
        y=frames, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, center=False
    )
    return np.log10(np.float32(10000) * mel.astype(np.float32) + np.float32(1)).transpose(0, 2, 1)


def log_mel(y: np.ndarray) -> np.ndarray:
    """All of musicnn's input patches of 16 kHz mono y, [n, 187, 96] float32."""
    return log_mel_patches(y, list(range(n_patches(len(y)))))


def embed(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """musicnn MSD outputs for log-mel patches [n, 187, 96]: (penultimate [n, 200], tag scores [n, 50])."""
    x = np.ascontiguousarray(patches, dtype=np.float32)
    if x.ndim != 3 or x.shape[1:] != (PATCH_FRAMES, N_MELS):
        raise ValueError(f"expected log-mel patches of shape [n, {PATCH_FRAMES}, {N_MELS}], got {x.shape}")
    outputs = [session().run(OUTPUTS, {"logmel": x[i : i + NETWORK_BATCH]}) for i in range(0, len(x), NETWORK_BATCH)]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def spread_patches(n_available: int, max_patches: int | None) -> list[int]:
    """Indices of at most max_patches patches out of n_available, centred in equal slices of the track (None: all)."""
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches must be >= 1 or None, got {max_patches}")
    if max_patches is None or max_patches >= n_available:
        return list(range(n_available))
    return [(2 * i + 1) * n_available // (2 * max_patches) for i in range(max_patches)]


def track_embedding(y: np.ndarray, max_patches: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean penultimate embedding [200] and mean tag scores [50] of 16 kHz mono y over spread patches, and their count.

    Patches lie on musicnn's grid (non-overlapping 3 s from the start; a partial last patch is dropped,
    a clip under 3 s is zero-padded to one patch); spread_patches picks at most max_patches of them.
    Log-mel and network run in batches, so memory stays bounded on long tracks.
    """
    if len(y) == 0:
        raise ValueError("cannot embed an empty signal")
    indices = spread_patches(n_patches(len(y)), max_patches)
    penultimate = np.zeros(EMBEDDING_DIM, np.float64)
    tags = np.zeros(len(TAG_NAMES), np.float64)
    for start in range(0, len(indices), CHUNK):
        batch_penultimate, batch_tags = embed(log_mel_patches(y, indices[start : start + CHUNK]))
        penultimate += batch_penultimate.sum(axis=0)
        tags += batch_tags.sum(axis=0)
    return (penultimate / len(indices)).astype(np.float32), (tags / len(indices)).astype(np.float32), len(indices)
