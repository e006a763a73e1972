"""Features on synthetic signals with known answers."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from genre_batch.analysis import columns, features
from genre_batch.analysis.audio import SAMPLE_RATE
from genre_batch.library.synth import STYLES, render

SR = SAMPLE_RATE


def named(matrix: np.ndarray) -> dict[str, float]:
    """The single window's features of a short excerpt as a name -> value dict."""
    assert matrix.shape[0] == 1
    return dict(zip(columns.FEATURE_NAMES, matrix[0].tolist()))


def sine(freq: float, seconds: float = 3.0, amplitude: float = 0.5) -> np.ndarray:
    """A pure tone."""
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def clicks(bpm: float, seconds: float = 8.0) -> np.ndarray:
    """A click track: short decaying noise bursts at `bpm`."""
    y = np.zeros(int(seconds * SR), np.float32)
    burst = (np.random.default_rng(0).standard_normal(400) * np.exp(-np.arange(400) / 60)).astype(np.float32)
    for start in np.arange(0, seconds, 60.0 / bpm):
        i = int(start * SR)
        y[i : i + 400] += burst[: len(y) - i]
    return y


def test_names_are_unique_and_match_series() -> None:
    expected = sum(n for _, n in columns.SERIES) * len(columns.STATISTICS) + len(columns.SCALARS)
    assert len(columns.FEATURE_NAMES) == expected == len(set(columns.FEATURE_NAMES))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("seconds, windows", [(0.5, 1), (3.0, 1), (20.0, 2), (35.0, 3)])
def test_windows_are_finite_float32_of_fixed_length(style: str, seconds: float, windows: int) -> None:
    matrix = features.extract(render(style, seconds, seed=1), SR)
    assert matrix.dtype == np.float32
    assert matrix.shape == (windows, len(columns.FEATURE_NAMES))
    assert np.isfinite(matrix).all()


def test_windows_are_whole_centred_and_match_their_start_times() -> None:
    size = int(features.WINDOW_S * SR / features.HOP)
    assert len(features.windows(1 + round(60 * SR) // features.HOP, SR)) == 6  # a 60 s span holds 6 windows
    bounds = features.windows(3 * size + 10, SR)
    assert bounds == [(5, 5 + size), (5 + size, 5 + 2 * size), (5 + 2 * size, 5 + 3 * size)]
    assert features.windows(size - 1, SR) == [(0, size - 1)]  # shorter than a window: one window, all of it
    n_samples = int(35 * SR)
    starts = features.window_starts(n_samples, SR)
    assert len(starts) == features.extract(render("chiptune", 35.0, 2), SR).shape[0]
    assert starts[1] - starts[0] == pytest.approx(features.WINDOW_S, abs=0.05)


@pytest.mark.parametrize("duration", [0.4, 3.0, 30.0, 60.0, 69.9, 70.0, 240.0, 7200.0])
def test_window_spans_cover_the_middle_and_bound_the_cost(duration: float) -> None:
    spans = features.window_spans(duration)
    assert all(0.0 <= a and a + n <= duration + 1e-9 for a, n in spans)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # sorted, non-overlapping
    assert sum(n for _, n in spans) <= features.MAX_WINDOWS * features.WINDOW_S  # cost independent of length
    assert any(a <= duration / 2 <= a + n for a, n in spans)  # the middle is always analysed
    if duration < (features.MAX_WINDOWS + 1) * features.WINDOW_S:
        assert len(spans) == 1 and spans[0][1] == pytest.approx(min(duration, 60.0))
    else:
        assert len(spans) == len(features.SPREAD) + 1
        centres = sorted(a + n / 2 for a, n in spans)
        assert centres == pytest.approx(sorted([duration / 2, *(f * duration for f in features.SPREAD)]))


def test_each_window_describes_its_own_part_of_the_excerpt() -> None:
    y = np.concatenate([sine(220.0, features.WINDOW_S), sine(1760.0, features.WINDOW_S)])
    matrix = features.extract(y, SR)
    centroid = columns.FEATURE_NAMES.index("centroid_mean")
    assert matrix[0, centroid] == pytest.approx(220.0, rel=0.1)
    assert matrix[1, centroid] == pytest.approx(1760.0, rel=0.1)


def noise(seconds: float = 3.0, amplitude: float = 0.5) -> np.ndarray:
    """Uniform white noise."""
    return np.random.default_rng(0).uniform(-amplitude, amplitude, int(seconds * SR)).astype(np.float32)


SIGNALS = {
    **{style: lambda style=style: render(style, 12.0, seed=4) for style in STYLES},
    "tone": lambda: sine(440.0),
    "low tone": lambda: sine(55.0, amplitude=0.01),
    "noise": noise,
    "clicks": lambda: clicks(120.0),
    "silence": lambda: np.zeros(2 * SR, np.float32),
    "short noise": lambda: noise(0.2),  # 9 frames: the fewest librosa.feature.delta accepts
    "half silent": lambda: np.concatenate([np.zeros(SR, np.float32), sine(880.0, 1.0)]),
}
"""Synthetic signals the reimplemented series are checked on against librosa."""


@pytest.mark.parametrize("name", SIGNALS)
def test_fast_series_match_librosa(name: str) -> None:
    y = SIGNALS[name]()
    mag = np.abs(librosa.stft(y, n_fft=features.N_FFT, hop_length=features.HOP))
    power = mag**2
    mel_db = librosa.power_to_db(librosa.feature.melspectrogram(S=power, sr=SR, n_mels=features.N_MELS))
    frames = {"n_fft": features.N_FFT, "hop_length": features.HOP}
    expected = {  # librosa's own functions, as extract used them: family -> (series, rtol, atol)
        "mfcc": (librosa.feature.mfcc(S=mel_db, n_mfcc=columns.N_MFCC), 1e-4, 1e-3),
        "contrast": (librosa.feature.spectral_contrast(S=mag, sr=SR, **frames), 1e-5, 1e-4),
        "chroma": (librosa.feature.chroma_stft(S=power, sr=SR, tuning=0.0), 1e-4, 1e-6),
        "centroid": (librosa.feature.spectral_centroid(S=mag, sr=SR), 1e-4, 1e-3),
        "bandwidth": (librosa.feature.spectral_bandwidth(S=mag, sr=SR), 1e-4, 1e-3),
        "rolloff": (librosa.feature.spectral_rolloff(S=mag, sr=SR), 0, 0),  # the same float32 running sums: the same bins
        "flatness": (librosa.feature.spectral_flatness(S=power, power=1.0), 1e-5, 1e-12),
        "zcr": (librosa.feature.zero_crossing_rate(y, frame_length=features.N_FFT, hop_length=features.HOP), 0, 0),
        "rms": (librosa.feature.rms(S=mag, frame_length=features.N_FFT, hop_length=features.HOP), 1e-5, 1e-9),
        "onset": (librosa.onset.onset_strength(S=mel_db, sr=SR, hop_length=features.HOP)[None, :], 1e-4, 1e-4),
    }
    series = dict(zip([f for f, _ in columns.SERIES], features.frame_series(y, SR)))
    for family, (want, rtol, atol) in expected.items():  # compared as extract keeps them: non-finite values zeroed
        got = np.nan_to_num(series[family], nan=0.0, posinf=0.0, neginf=0.0)
        np.testing.assert_allclose(got, np.nan_to_num(want, nan=0.0, posinf=0.0, neginf=0.0), rtol=rtol, atol=atol, err_msg=family)
    onset = series["onset"][0]
    for a, b in [(0, len(onset)), (0, 5), (len(onset) // 2, len(onset))]:  # whole, very short, second half
        assert features.tempo(onset[a:b], SR) == librosa.feature.tempo(onset_envelope=onset[a:b], sr=SR, hop_length=features.HOP)[0]


@pytest.mark.parametrize("sr", [16000, 44100])
def test_contrast_bands_follow_the_sample_rate(sr: int) -> None:
    mag = np.abs(librosa.stft(noise(2.0), n_fft=features.N_FFT, hop_length=features.HOP))
    want = librosa.feature.spectral_contrast(S=mag, sr=sr, n_fft=features.N_FFT, hop_length=features.HOP)
    np.testing.assert_allclose(features.spectral_contrast(mag, sr), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bpm", [60.0, 97.0, 128.0, 174.0])
def test_tempo_matches_librosa_on_click_tracks(bpm: float) -> None:
    y = clicks(bpm, 20.0)
    mel_db = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=SR, n_fft=features.N_FFT, hop_length=features.HOP))
    onset = librosa.onset.onset_strength(S=mel_db, sr=SR, hop_length=features.HOP)
    for a, b in features.windows(len(onset), SR):
        assert features.tempo(onset[a:b], SR) == librosa.feature.tempo(onset_envelope=onset[a:b], sr=SR, hop_length=features.HOP)[0]


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the moments of a row holding inf
@pytest.mark.parametrize("frames", [1, 2, 7, 430, 431])
def test_pooled_median_min_max_match_numpy(frames: int) -> None:
    series = np.random.default_rng(frames).standard_normal((4, frames)).astype(np.float32)
    series[2, 0] = np.nan  # non-finite values propagate as in numpy (and extract then zeroes them)
    series[3, -1] = np.inf
    stats = features.pool_windows(series, [(0, frames)])[0].reshape(4, len(columns.STATISTICS))
    for stat, numpy_stat in (("median", np.median), ("min", np.min), ("max", np.max)):
        i = columns.STATISTICS.index(stat)
        np.testing.assert_array_equal(stats[:, i], numpy_stat(series.astype(np.float64), axis=1))


def test_pool_windows_pools_each_window() -> None:
    series = np.random.default_rng(2).standard_normal((5, 3 * 431 + 7)).astype(np.float32)
    series[1] = 3.0  # a constant row: std, skew and kurtosis 0
    for bounds in (features.windows(series.shape[1], SR), [(0, series.shape[1])]):
        want = np.vstack([features.pool_windows(series[:, a:b], [(0, b - a)]) for a, b in bounds])  # window by window
        np.testing.assert_allclose(features.pool_windows(series, bounds), want, rtol=1e-12, atol=1e-12)


def test_silence_gives_finite_vector() -> None:
    assert np.isfinite(features.extract(np.zeros(SR * 2, np.float32), SR)).all()


def test_pure_tone_centroid_and_chroma() -> None:
    f = named(features.extract(sine(440.0), SR))
    assert f["centroid_mean"] == pytest.approx(440.0, rel=0.05)
    chroma = [f[f"chroma_{i:02d}_mean"] for i in range(1, 13)]
    assert int(np.argmax(chroma)) == 9  # C, C#, D, ..., A is the tenth pitch class


def test_higher_tone_has_higher_centroid_and_louder_has_higher_rms() -> None:
    low, high, loud = (named(features.extract(y, SR)) for y in (sine(220), sine(1760), sine(220, amplitude=0.9)))
    assert high["centroid_mean"] > 4 * low["centroid_mean"]
    assert loud["rms_mean"] == pytest.approx(low["rms_mean"] * 0.9 / 0.5, rel=0.02)


def test_noise_is_flatter_and_crosses_zero_more_than_a_tone() -> None:
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, SR * 3).astype(np.float32)
    n, t = named(features.extract(noise, SR)), named(features.extract(sine(440), SR))
    assert n["flatness_mean"] > 10 * t["flatness_mean"]
    assert n["zcr_mean"] > 5 * t["zcr_mean"]


@pytest.mark.parametrize("bpm", [90.0, 120.0, 150.0])
def test_tempo_of_a_click_track(bpm: float) -> None:
    assert named(features.extract(clicks(bpm), SR))["tempo_bpm"] == pytest.approx(bpm, rel=0.05)


def test_pool_statistics_on_known_rows() -> None:
    series = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    stats = features.pool_windows(series, [(0, 4)])[0].reshape(2, len(columns.STATISTICS))
    row = dict(zip(columns.STATISTICS, stats[0]))
    assert (row["mean"], row["min"], row["max"], row["median"]) == (2.5, 1.0, 4.0, 2.5)
    assert row["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert row["skew"] == pytest.approx(0.0)
    constant = dict(zip(columns.STATISTICS, stats[1]))
    assert constant["std"] == constant["skew"] == constant["kurtosis"] == 0.0
