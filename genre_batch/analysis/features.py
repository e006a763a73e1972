"""Audio features: one STFT per decoded span, every feature derived from it, pooled per window into a fixed vector."""

from __future__ import annotations

from functools import cache
from itertools import pairwise

import librosa
import numba
import numpy as np
import scipy.fft

from genre_batch.analysis.columns import N_MFCC

WINDOW_S = 10.0
"""Length of the analysis windows a track is cut into: one feature row per window."""

MAX_WINDOWS = 6
"""Windows analysed per track at most, so that a track's cost does not grow with its length."""

SPREAD = (0.1, 0.25, 0.75, 0.9)
"""Where, as fractions of a long track, the windows beyond its middle 20 s are centred."""

N_FFT = 2048
HOP = 512
N_MELS = 128


def _statistics(x: np.ndarray) -> np.ndarray:
    """STATISTICS of a float64 array along its last axis, on a new last axis."""
    mean = x.mean(axis=-1)
    dev = x - mean[..., None]
    dev2 = dev * dev
    var = dev2.mean(axis=-1)
    ok = var > 1e-12
    safe = np.where(ok, var, 1.0)
    skew = np.where(ok, (dev2 * dev).mean(axis=-1) / safe**1.5, 0.0)
    kurt = np.where(ok, (dev2 * dev2).mean(axis=-1) / safe**2 - 3.0, 0.0)
    return np.stack([mean, np.sqrt(var), x.min(axis=-1), x.max(axis=-1), _median(x), skew, kurt], axis=-1)


def _median(x: np.ndarray) -> np.ndarray:
    """np.median along the last axis, from a sort (faster than np.median's partition here); NaN where a NaN is."""
    ordered = np.sort(x, axis=-1)  # NaN sorts last
    n = x.shape[-1]
    return np.where(np.isnan(ordered[..., -1]), np.nan, (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2)


def pool_windows(series: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Each row of a (coefficients, frames) array pooled into STATISTICS (row-major) per window, for the contiguous,
    equally long windows `windows` returns, in one pass: (windows, coefficients x STATISTICS)."""
    start, end = bounds[0][0], bounds[-1][1]
    stacked = series[:, start:end].astype(np.float64).reshape(len(series), len(bounds), -1).transpose(1, 0, 2)
    return _statistics(stacked).reshape(len(bounds), -1)


@cache
def _filterbanks(sr: int) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]], np.ndarray]:
    """STFT bin frequencies, the mel filterbank (banded) and the chroma filterbank for `sr` (built once per process)."""
    freq = librosa.fft_frequencies(sr=sr, n_fft=N_FFT)
    mel = librosa.filters.mel(sr=sr, n_fft=N_FFT, n_mels=N_MELS)
    chroma = librosa.filters.chroma(sr=sr, n_fft=N_FFT, tuning=0.0)
    return freq, _banded(mel), chroma


def _banded(basis: np.ndarray, rows: int = 8) -> list[tuple[int, int, np.ndarray]]:
    """A filterbank cut into groups of `rows` filters, each with the (first, end) bins outside which its weights are 0."""
    groups = []
    for start in range(0, len(basis), rows):
        weighted = np.flatnonzero(basis[start : start + rows].any(axis=0))
        first, end = (int(weighted[0]), int(weighted[-1]) + 1) if len(weighted) else (0, 0)
        groups.append((first, end, np.ascontiguousarray(basis[start : start + rows, first:end])))
    return groups


def _apply_banded(groups: list[tuple[int, int, np.ndarray]], spectrogram: np.ndarray) -> np.ndarray:
    """A banded filterbank times a (bins, frames) spectrogram: the dense product without its zero terms."""
    return np.vstack([weights @ spectrogram[first:end] for first, end, weights in groups])


@cache
def _contrast_bands(sr: int, fmin: float = 200.0, n_bands: int = 6, quantile: float = 0.02) -> list[tuple[int, int, int]]:
    """(first bin, end bin, bins averaged) of each spectral-contrast band, chosen as librosa.feature.spectral_contrast does."""
    freq = librosa.fft_frequencies(sr=sr, n_fft=N_FFT)
    bands = []
    for k, (low, high) in enumerate(pairwise([0.0, *(fmin * 2.0 ** np.arange(n_bands + 1))])):
        inside = np.flatnonzero((freq >= low) & (freq <= high))
        first = int(inside[0]) - (k > 0)  # librosa adds the bin below every band but the first,
        last = len(freq) - 1 if k == n_bands else int(inside[-1])  # every bin above the last band,
        count = max(int(np.rint(quantile * (last + 1 - first))), 1)
        bands.append((first, last + 1 if k == n_bands else last, count))  # then drops the top bin of every band but the last
    return bands


@cache
def _tempo_tables(sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Autocorrelation window, BPM and log prior per lag, and FFT length of librosa.feature.tempo's defaults at `sr`."""
    win = int(librosa.time_to_frames(8.0, sr=sr, hop_length=HOP))
    bpms = librosa.tempo_frequencies(win, hop_length=HOP, sr=sr)
    logprior = -0.5 * (np.log2(bpms) - np.log2(120.0)) ** 2
    logprior[: int(np.argmax(bpms < 320.0))] = -np.inf
    return librosa.filters.get_window("hann", win, fftbins=True), bpms, logprior, scipy.fft.next_fast_len(2 * win - 1, real=True)


def _normalised(x: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Columns of `x` divided by their norms; all-zero columns are left as they are (as librosa.util.normalize)."""
    return x / np.where(norms > np.finfo(np.float32).tiny, norms, 1.0)


@numba.njit(cache=True)
def _shape_sums(mag: np.ndarray, freq: np.ndarray, roll_percent: float) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a float32 (bins, frames) magnitude, the float64 sums of mag, freq * mag and freq**2 * mag, and the
    first bin whose float32 running sum reaches roll_percent of the float32 total (librosa's rolloff; bin 0 if none)."""
    n_bins, n_frames = mag.shape
    moments = np.empty((3, n_frames))
    rolloff = np.zeros(n_frames, np.int64)
    for t in range(n_frames):
        total, s0, s1, s2 = np.float32(0.0), 0.0, 0.0, 0.0
        for i in range(n_bins):
            total += mag[i, t]
            m = np.float64(mag[i, t])
            s0 += m
            s1 += freq[i] * m
            s2 += freq[i] * freq[i] * m
        moments[0, t], moments[1, t], moments[2, t] = s0, s1, s2
        threshold = np.float32(roll_percent) * total
        running = np.float32(0.0)
        for i in range(n_bins):
            running += mag[i, t]
            if running >= threshold:
                rolloff[t] = i
                break
    return moments, rolloff


def spectral_shape(mag: np.ndarray, freq: np.ndarray, roll_percent: float = 0.85) -> list[np.ndarray]:
    """Spectral centroid, bandwidth and rolloff frequency per frame (librosa's definitions, in one pass over `mag`)."""
    (total, first, second), rolloff = _shape_sums(np.asfortranarray(mag, dtype=np.float32), freq, roll_percent)
    centroid = _normalised(first, total)
    bandwidth = np.sqrt(np.maximum(_normalised(second, total) - np.where(total > 0, centroid**2, 0.0), 0.0))
    return [centroid[None, :], bandwidth[None, :], freq[rolloff][None, :]]


def spectral_contrast(mag: np.ndarray, sr: int) -> np.ndarray:
    """librosa.feature.spectral_contrast of a magnitude spectrogram (its defaults): each band sorted once, without librosa's
    masked copies, and min/max where a band's quantile is one bin."""
    peaks, valleys = [], []
    for first, end, count in _contrast_bands(sr):
        band = mag[first:end]
        if count == 1:
            valleys.append(band.min(axis=0))
            peaks.append(band.max(axis=0))
        else:
            ordered = np.sort(band, axis=0)
            valleys.append(ordered[:count].mean(axis=0))
            peaks.append(ordered[-count:].mean(axis=0))
    return librosa.power_to_db(np.array(peaks, np.float64)) - librosa.power_to_db(np.array(valleys, np.float64))


@numba.njit(cache=True)
def _flatness(power: np.ndarray) -> np.ndarray:
    """Per frame of a (bins, frames) power, librosa's spectral flatness with amin 1e-10, in float64: one logarithm per
    product of 16 bins (each at least 1e-10, so a product is at least 1e-160: nothing underflows)."""
    n_bins, n_frames = power.shape
    flatness = np.empty(n_frames)
    for t in range(n_frames):
        logs, total, product = 0.0, 0.0, 1.0
        for i in range(n_bins):
            p = np.float64(max(power[i, t], np.float32(1e-10)))
            total += p
            product *= p
            if i % 16 == 15:
                logs += np.log(product)
                product = 1.0
        flatness[t] = np.exp((logs + np.log(product)) / n_bins) / (total / n_bins)
    return flatness


def spectral_flatness(power: np.ndarray) -> np.ndarray:
    """librosa.feature.spectral_flatness of a float32 power spectrogram (amin 1e-10)."""
    return _flatness(power)[None, :]


def rms(power: np.ndarray) -> np.ndarray:
    """librosa.feature.rms of a magnitude spectrogram, from its power (DC and Nyquist bins count once, the others twice)."""
    return np.sqrt((2 * power.sum(axis=0) - power[0] - power[-1]) / N_FFT**2)[None, :]


def zero_crossing_rate(y: np.ndarray, n_frames: int) -> np.ndarray:
    """Fraction of sign changes per STFT frame (librosa's centred, edge-padded frames), from counts per hop."""
    negative = np.pad(y, N_FFT // 2, mode="edge") < -1e-10
    changes = np.zeros(-(-len(negative) // HOP) * HOP, np.int32)  # changes[i]: sample i is on the other side of 0 than i - 1
    np.not_equal(negative[1:], negative[:-1], out=changes[1 : len(negative)], casting="unsafe")
    per_hop = changes.reshape(-1, HOP).sum(axis=1)
    starts = np.arange(n_frames)
    counts = np.lib.stride_tricks.sliding_window_view(per_hop, N_FFT // HOP)[:n_frames].sum(axis=1) - changes[starts * HOP]
    return (counts / N_FFT)[None, :]


def frame_series(y: np.ndarray, sr: int) -> list[np.ndarray]:
    """Every frame-level series of SERIES, computed from one STFT."""
    freq, mel_bands, chroma_basis = _filterbanks(sr)
    mag = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP))
    power = mag * mag
    mel_db = librosa.power_to_db(_apply_banded(mel_bands, power))
    mfcc = librosa.feature.mfcc(S=mel_db, n_mfcc=N_MFCC)
    raw_chroma = chroma_basis @ power
    return [
        mfcc,
        librosa.feature.delta(mfcc, order=1),
        librosa.feature.delta(mfcc, order=2),
        spectral_contrast(mag, sr),
        _normalised(raw_chroma, raw_chroma.max(axis=0)),
        *spectral_shape(mag, freq),
        spectral_flatness(power),
        zero_crossing_rate(y, mag.shape[1]),
        rms(power),
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
    """Tempo in BPM of an onset-strength envelope: librosa.feature.tempo's (mean of the frames' normalised autocorrelations,
    log-normal prior at 120 BPM), the frames' power spectra weighted and summed before a single inverse FFT."""
    window, bpms, logprior, n_fft = _tempo_tables(sr)
    padded = np.pad(onset, len(window) // 2, mode="linear_ramp", end_values=[0, 0])
    frames = np.lib.stride_tricks.sliding_window_view(padded, len(window))[: len(onset)] * window
    peaks = np.einsum("ij,ij->i", frames, frames)  # each frame's autocorrelation at lag 0, its largest
    weights = 1.0 / np.where(peaks < np.finfo(np.float64).tiny, 1.0, peaks) / len(onset)
    spectrum = np.abs(scipy.fft.rfft(frames, n=n_fft, axis=1)) ** 2
    tempogram = scipy.fft.irfft(weights @ spectrum, n=n_fft)[: len(window)]
    return float(bpms[np.argmax(np.log1p(1e6 * tempogram) + logprior)])


def warm_up() -> None:
    """Compile librosa's and this module's numba code (or load it from numba's on-disk cache) by extracting 1 s of noise."""
    extract(np.random.default_rng(0).uniform(-0.1, 0.1, 22050).astype(np.float32), 22050)


def extract(y: np.ndarray, sr: int) -> np.ndarray:
    """Feature vectors of a mono span's windows: a finite float32 (windows, features) array."""
    series = frame_series(y.astype(np.float32, copy=False), sr)
    stacked = np.vstack(series)  # (coefficients, frames): pooled row by row, in FEATURE_NAMES order
    bounds = windows(stacked.shape[1], sr)
    tempos = [[tempo(series[-1][0, a:b], sr)] for a, b in bounds]
    return np.nan_to_num(np.hstack([pool_windows(stacked, bounds), tempos]), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
