"""Deterministic synthetic music "genres" and a multi-format audio writer for demos and tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import mutagen
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr
from mutagen.id3 import ID3, TALB, TCON, TPE1, Encoding

STYLES: tuple[str, ...] = ("ambient", "chiptune", "electronic", "percussion")
FORMATS: tuple[str, ...] = ("wav", "flac", "ogg", "opus", "mp3", "aiff", "m4a")

OPUS_RATE = 48000
_WRITE_BLOCK = 65536
_MAJOR = np.array([0, 4, 7, 11])
_MINOR = np.array([0, 3, 7, 10])
_SF_FORMATS: dict[str, tuple[str, str | None]] = {
    "wav": ("WAV", None),
    "flac": ("FLAC", None),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "aiff": ("AIFF", None),
}
_ID3_FRAMES = {"genre": TCON, "artist": TPE1, "album": TALB}


def _hz(midi: npt.ArrayLike) -> np.ndarray:
    """Convert MIDI note numbers to float32 frequencies in Hz."""
    return (440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)).astype(np.float32)


def _seconds(n: int, sr: int) -> np.ndarray:
    """Time in seconds of the first `n` samples, as float32."""
    return np.arange(n, dtype=np.float32) / np.float32(sr)


def _square(cycles: np.ndarray, duty: float) -> np.ndarray:
    """Square wave of phase `cycles` (in [0, 1)) with the given duty cycle."""
    return np.where(cycles < duty, np.float32(1.0), np.float32(-1.0))


def _notes(freqs: np.ndarray, envelope: np.ndarray, sr: int, wave: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Concatenate one note per frequency, each len(envelope) samples long, restarting the phase per note."""
    cycles = freqs[:, None] * _seconds(len(envelope), sr)
    return (wave(cycles - np.floor(cycles)) * envelope).ravel()


def _smear(x: np.ndarray, delays: np.ndarray) -> np.ndarray:
    """Add decaying delayed copies of `x` (a cheap reverb-like tail)."""
    y = x.copy()
    for i, d in enumerate(delays):
        y[d:] += np.float32(0.7 ** (i + 1)) * x[: len(x) - d]
    return y


def _ambient(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Slow low pad chords with amplitude swells and a reverb-like smear."""
    chord_n = int(rng.uniform(4.0, 7.0) * sr)
    roots = rng.integers(36, 48) + rng.choice([0, 5, 7, 9, -3], size=4)
    k = _seconds(chord_n, sr)
    fade = np.minimum(1.0, np.minimum(k, k[::-1]) / np.float32(0.8))
    pad = np.zeros(chord_n * -(-n // chord_n), dtype=np.float32)
    for voice, interval in enumerate((0, 7, 12, 16)):
        freqs = _hz(roots[np.arange(len(pad) // chord_n) % len(roots)] + interval)
        sine = _notes(freqs, fade, sr, lambda c: np.sin(np.float32(2 * np.pi) * c))
        triangle = _notes(freqs, fade, sr, lambda c: 2.0 * np.abs(2.0 * c - 1.0) - 1.0)
        pad += (0.7 * sine + 0.3 * triangle) / np.float32(1.0 + voice)
    t = _seconds(n, sr)
    swell = 0.6 + 0.4 * np.sin(np.float32(2 * np.pi * rng.uniform(0.08, 0.2)) * t + np.float32(rng.uniform(0, 2 * np.pi)))
    return _smear(pad[:n] * swell, np.sort(rng.integers(int(0.03 * sr), int(0.35 * sr), size=8)))


def _chiptune(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Fast square-wave arpeggios (with a square bass) in the mid/high register, looped per bar."""
    step = int(sr * 60.0 / rng.uniform(140.0, 170.0) / 4)
    root = rng.integers(60, 72)
    chords = [root + off + (_MAJOR if rng.random() < 0.5 else _MINOR) for off in rng.choice([0, 5, 7, 9, -2], 4)]
    order = rng.permutation(8)
    lead_freqs = _hz(np.concatenate([np.r_[c, c + 12][order] for c in chords]))
    envelope = 0.4 + 0.6 * np.exp(-np.arange(step, dtype=np.float32) / np.float32(0.6 * step))
    duty = rng.choice([0.125, 0.25])
    lead = _notes(lead_freqs, envelope, sr, lambda c: _square(c, duty))
    bass = _notes(_hz([c[0] - 24 for c in chords]), np.ones(8 * step, dtype=np.float32), sr, lambda c: _square(c, 0.5))
    return np.resize(0.6 * lead + 0.25 * bass, n)


def _electronic(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Four-on-the-floor kick, off-beat noise hi-hats and a pulsing saw bass, looped per bar."""
    half = int(sr * 30.0 / rng.uniform(120.0, 130.0))
    tb = _seconds(2 * half, sr)
    tau = np.float32(0.04)
    kick_cycles = 50.0 * tb + (160.0 - 50.0) * tau * (1.0 - np.exp(-tb / tau))
    kick = np.sin(np.float32(2 * np.pi) * kick_cycles) * np.exp(-tb / np.float32(0.18))
    noise = rng.standard_normal(half, dtype=np.float32)
    hat = np.r_[np.zeros(half, dtype=np.float32), np.diff(noise, prepend=noise[:1]) * np.exp(-tb[:half] / np.float32(0.03))]
    bass_freqs = _hz(rng.integers(33, 41) + rng.choice([0, 0, 3, 5, 7, 10, 12], size=8))
    bass = _notes(bass_freqs, np.exp(-tb[:half] / np.float32(0.12)), sr, lambda c: 2.0 * c - 1.0)
    return np.resize(np.tile(0.9 * kick + 0.25 * hat, 4) + 0.3 * bass, n)


def _percussion(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Irregular noise bursts and pitch-dropping toms without sustained pitch."""
    onsets = np.cumsum(rng.exponential(0.22, size=int(n / sr / 0.05) + 8) + 0.05)
    onsets = (onsets[onsets < n / sr] * sr).astype(np.int64)
    kt = _seconds(int(0.35 * sr), sr)
    kernels = [rng.standard_normal(len(kt), dtype=np.float32) * np.exp(-kt / np.float32(0.05))]
    for f0 in rng.uniform(80.0, 220.0, size=3).astype(np.float32):
        cycles = 0.6 * f0 * kt + 0.4 * f0 * 0.05 * (1.0 - np.exp(-kt / np.float32(0.05)))
        kernels.append(np.sin(np.float32(2 * np.pi) * cycles) * np.exp(-kt / np.float32(0.09)))
    y = np.zeros(n, dtype=np.float32)
    for onset, kind, gain in zip(onsets, rng.integers(0, 4, size=len(onsets)), rng.uniform(0.4, 1.0, size=len(onsets))):
        end = min(n, onset + len(kt))
        y[onset:end] += np.float32(gain) * kernels[kind][: end - onset]
    return y


_RENDERERS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "ambient": _ambient,
    "chiptune": _chiptune,
    "electronic": _electronic,
    "percussion": _percussion,
}


def render(style: str, seconds: float, seed: int, sr: int = 22050) -> np.ndarray:
    """Render `seconds` of a synthetic style as mono float32 in [-1, 1]."""
    if style not in _RENDERERS:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    n = int(round(seconds * sr))
    rng = np.random.default_rng([seed, STYLES.index(style)])
    y = _RENDERERS[style](n, sr, rng) + np.float32(10 ** (-50 / 20)) * rng.standard_normal(n, dtype=np.float32)
    peak = float(np.max(np.abs(y))) if n else 0.0
    return y * np.float32(0.8 / peak) if peak > 0 else y


def _write_soundfile(path: Path, frames: np.ndarray, sr: int, fmt: str, subtype: str | None) -> None:
    """Write with libsndfile in blocks (one huge Vorbis write overflows libvorbis' stack and segfaults)."""
    with sf.SoundFile(path, "w", sr, frames.shape[1], subtype, format=fmt) as out:
        for start in range(0, len(frames), _WRITE_BLOCK):
            out.write(frames[start : start + _WRITE_BLOCK])


def _write_m4a(path: Path, y: np.ndarray, sr: int) -> None:
    """Encode float samples of shape (n, channels) as AAC in an MP4 container."""
    layout = "mono" if y.shape[1] == 1 else "stereo"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sr, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(y.T), format="fltp", layout=layout)
        frame.sample_rate = sr
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_tags(path: Path, tags: dict[str, str]) -> None:
    """Write genre/artist/album tags with mutagen (easy interfaces; raw ID3 frames for WAV/AIFF, which have none)."""
    audio = mutagen.File(path, easy=True)
    if audio.tags is None:
        audio.add_tags()
    if isinstance(audio.tags, ID3):
        for key, value in tags.items():
            audio.tags.add(_ID3_FRAMES[key](encoding=Encoding.UTF8, text=[value]))
    else:
        audio.tags.update({key: [value] for key, value in tags.items()})
    audio.save()


def write_audio(path: str | Path, y: np.ndarray, sr: int, tags: dict[str, str] | None = None) -> Path:
    """Write audio in the format given by the path's extension, with optional genre/artist/album tags."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(f"unsupported extension {path.suffix!r}; expected one of {', '.join(FORMATS)}")
    frames = np.asarray(y, dtype=np.float32)
    frames = frames[:, None] if frames.ndim == 1 else frames
    if ext == "m4a":
        _write_m4a(path, frames, sr)
    else:
        if ext == "opus" and sr != OPUS_RATE:
            frames, sr = soxr.resample(frames, sr, OPUS_RATE), OPUS_RATE
        _write_soundfile(path, frames, sr, *_SF_FORMATS[ext])
    if tags:
        _write_tags(path, tags)
    return path
