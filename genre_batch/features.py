"""Audio features: one STFT per decoded span, every feature derived from it, pooled per window into a fixed vector."""

from __future__ import annotations

from functools import cache

import librosa
import numpy as np

FEATURE_VERSION = 3
"""Bumped whenever the vector's meaning changes; rows of other versions are re-extracted."""

WINDOW_S = 10.0
"""Length of the analysis windows a track is cut into: one feature row per window."""

MAX_WINDOWS = 6
"""Windows analysed per track at most, so that a track's cost does not grow with its length."""

SPREAD = (0.1, 0.25, 0.75, 0.9)
"""Where, as fractions of a long track, the windows beyond its middle 20 s are centred."""

N_FFT = 2048
HOP = 512
N_MELS = 128
N_MFCC = 20

STATISTICS: tuple[str, ...] = ("mean", "std", "min", "max", "median", "skew", "kurtosis")

SERIES: tuple[tuple[str, int], ...] = (
    ("mfcc", N_MFCC),
    ("mfcc_delta", N_MFCC),
    ("mfcc_delta2", N_MFCC),
    ("contrast", 7),
    ("chroma", 12),
    ("centroid", 1),
    ("bandwidth", 1),
    ("rolloff", 1),
    ("flatness", 1),
    ("zcr", 1),
    ("rms", 1),
    ("onset", 1),
)
"""Frame-level series (family, number of coefficients), in vector order."""

SCALARS: tuple[str, ...] = ("tempo_bpm",)
"""Track-level values appended after the pooled series."""


def _series_names(family: str, n: int) -> list[str]:
    """Names of a family's coefficient rows."""
    return [family] if n == 1 else [f"{family}_{i:02d}" for i in range(1, n + 1)]


FEATURE_NAMES: tuple[str, ...] = tuple(
    [f"{name}_{stat}" for family, n in SERIES for name in _series_names(family, n) for stat in STATISTICS]
    + list(SCALARS)
)
"""Column names of the feature vector, in order."""


def pool(series: np.ndarray) -> np.ndarray:
    """Pool each row of a (coefficients, frames) array into STATISTICS, row-major."""
    x = series.astype(np.float64)
    mean = x.mean(axis=1)
    dev = x - mean[:, None]
    var = (dev**2).mean(axis=1)
    safe = np.where(var > 1e-12, var, 1.0)
    skew = np.where(var > 1e-12, (dev**3).mean(axis=1) / safe**1.5, 0.0)
    kurt = np.where(var > 1e-12, (dev**4).mean(axis=1) / safe**2 - 3.0, 0.0)
    stats = np.stack([mean, np.sqrt(var), x.min(axis=1), x.max(axis=1), np.median(x, axis=1), skew, kurt], axis=1)
    return stats.reshape(-1)


@cache
def _filterbanks(sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """STFT bin frequencies, the mel filterbank and the chroma filterbank for `sr` (built once per process)."""
    freq = librosa.fft_frequencies(sr=sr, n_fft=N_FFT)
    mel = librosa.filters.mel(sr=sr, n_fft=N_FFT, n_mels=N_MELS)
    chroma = librosa.filters.chroma(sr=sr, n_fft=N_FFT, tuning=0.0)
    return freq, mel, chroma


def _normalised(x: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Columns of `x` divided by their norms; all-zero columns are left as they are (as librosa.util.normalize)."""
    return x / np.where(norms > np.finfo(np.float32).tiny, norms, 1.0)


def spectral_shape(mag: np.ndarray, freq: np.ndarray, roll_percent: float = 0.85) -> list[np.ndarray]:
    """Spectral centroid, bandwidth and rolloff frequency per frame (librosa's definitions, computed with matrix products)."""
    total = mag.sum(axis=0, dtype=np.float64)
    centroid = _normalised(freq @ mag.astype(np.float64), total)
    second = _normalised((freq**2) @ mag.astype(np.float64), total)
    bandwidth = np.sqrt(np.maximum(second - np.where(total > 0, centroid**2, 0.0), 0.0))
    cumulative = np.cumsum(mag, axis=0)
    rolloff = freq[(cumulative >= roll_percent * cumulative[-1]).argmax(axis=0)]
    return [centroid[None, :], bandwidth[None, :], rolloff[None, :]]


def zero_crossing_rate(y: np.ndarray, n_frames: int) -> np.ndarray:
    """Fraction of sign changes per STFT frame (librosa's centred, edge-padded frames), from one cumulative sum."""
    padded = np.pad(y, N_FFT // 2, mode="edge")
    changes = np.concatenate([[0], np.cumsum(np.diff(padded < -1e-10) != 0)])
    starts = np.arange(n_frames) * HOP
    return ((changes[starts + N_FFT - 1] - changes[starts]) / N_FFT)[None, :]


def frame_series(y: np.ndarray, sr: int) -> list[np.ndarray]:
    """Every frame-level series of SERIES, computed from one STFT."""
    freq, mel_basis, chroma_basis = _filterbanks(sr)
    mag = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP))
    power = mag**2
    mel_db = librosa.power_to_db(mel_basis @ power)
    mfcc = librosa.feature.mfcc(S=mel_db, n_mfcc=N_MFCC)
    raw_chroma = chroma_basis @ power
    return [
        mfcc,
        librosa.feature.delta(mfcc, order=1),
        librosa.feature.delta(mfcc, order=2),
        librosa.feature.spectral_contrast(S=mag, sr=sr, n_fft=N_FFT, hop_length=HOP),
        _normalised(raw_chroma, raw_chroma.max(axis=0)),
        *spectral_shape(mag, freq),
        librosa.feature.spectral_flatness(S=power, power=1.0),
        zero_crossing_rate(y, mag.shape[1]),
        librosa.feature.rms(S=mag, frame_length=N_FFT, hop_length=HOP),
        librosa.onset.onset_strength(S=mel_db, sr=sr, hop_length=HOP)[None, :],
    ]


def window_spans(duration_s: float) -> list[tuple[float, float]]:
    """The (start, length) spans of a track to analyse: its middle MAX_WINDOWS windows, or for a long track
    the middle two windows plus one centred at each SPREAD fraction."""
    budget = MAX_WINDOWS * WINDOW_S
    if duration_s < budget + WINDOW_S:
        length = min(duration_s, budget)
        return [((duration_s - length) / 2, length)]
    spread = [(f * duration_s - WINDOW_S / 2, WINDOW_S) for f in SPREAD]
    return sorted([(duration_s / 2 - WINDOW_S, 2 * WINDOW_S), *spread])


def windows(n_frames: int, sr: int, window_s: float = WINDOW_S) -> list[tuple[int, int]]:
    """Frame ranges of the whole windows that fit, centred in the excerpt; one window if none fits."""
    size = int(window_s * sr / HOP)  # rounded down, so that a 60 s span holds 6 windows
    count = n_frames // size
    if count == 0:
        return [(0, n_frames)]
    start = (n_frames - count * size) // 2
    return [(start + i * size, start + (i + 1) * size) for i in range(count)]


def window_starts(n_samples: int, sr: int) -> list[float]:
    """Start time in seconds of each window of a span of `n_samples` (matches `extract`'s rows)."""
    return [a * HOP / sr for a, _ in windows(1 + n_samples // HOP, sr)]


def tempo(onset: np.ndarray, sr: int) -> float:
    """Tempo in BPM of an onset-strength envelope."""
    return float(librosa.feature.tempo(onset_envelope=onset, sr=sr, hop_length=HOP)[0])


def warm_up() -> None:
    """Compile librosa's numba code (or load it from numba's on-disk cache) by extracting one second of noise."""
    extract(np.random.default_rng(0).uniform(-0.1, 0.1, 22050).astype(np.float32), 22050)


def extract(y: np.ndarray, sr: int) -> np.ndarray:
    """Feature vectors of a mono span's windows: a finite float32 (windows, features) array."""
    series = frame_series(y.astype(np.float32, copy=False), sr)
    stacked = np.vstack(series)  # (coefficients, frames): pooled row by row, in FEATURE_NAMES order
    rows = [np.append(pool(stacked[:, a:b]), tempo(series[-1][0, a:b], sr)) for a, b in windows(stacked.shape[1], sr)]
    return np.nan_to_num(np.vstack(rows), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
