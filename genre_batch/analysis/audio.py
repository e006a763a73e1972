"""Audio decoding (libsndfile first, FFmpeg via PyAV as fallback) and embedded tag reading."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import av
import mutagen
import numpy as np
import soundfile as sf
import soxr
from mutagen.id3 import ID3

from genre_batch import FileError
from genre_batch.storage.locations import local_path
from genre_batch.storage.store import file_system

SAMPLE_RATE = 22050
PEAK_LIMIT = 1e4
"""Float formats may exceed full scale (1.0) a little; samples 80 dB over it are garbage, and their powers overflow."""
SILENCE_DBFS = -80.0
"""Audio whose analysed samples all stay below this peak level is digital silence: an error, it has no genre."""
_PREROLL_S = 0.25  # decoded and dropped before a seek target: libsndfile's MP3 decoder outputs ~0.1 s of zeros after a seek
_ID3_FRAMES = {"genre": "TCON", "artist": "TPE1", "album": "TALB"}

Span = tuple[float, float]
"""A part of a file to decode: (start, length) in seconds."""

SpanPlan = Callable[[float], list[Span]]
"""Chooses the sorted, non-overlapping spans to decode from a file's duration in seconds."""


class AudioError(FileError):
    """A file that cannot be analysed."""


@dataclass(frozen=True)
class AudioInfo:
    """Native properties of a decoded file and how much of it was analysed."""

    duration_s: float
    sample_rate: int
    channels: int
    offset_s: float
    analysed_s: float


@dataclass(frozen=True)
class Segment:
    """A decoded span: mono float32 samples at SAMPLE_RATE starting `offset_s` seconds into the file."""

    offset_s: float
    samples: np.ndarray


@dataclass(frozen=True)
class Tags:
    """Embedded genre/artist/album tags; None where absent."""

    genre: str | None = None
    artist: str | None = None
    album: str | None = None


@dataclass(frozen=True)
class _Native:
    """Decoded spans as (start sample, mono float32 samples) at the file's native rate."""

    parts: list[tuple[int, np.ndarray]]
    sample_rate: int
    channels: int
    duration_s: float


def whole(duration_s: float) -> list[Span]:
    """The span plan that decodes the whole file."""
    return [(0.0, duration_s)]


@contextmanager
def _opened(uri: str) -> Iterator[IO[bytes]]:
    """An open file of a local path (builtin open: its reads cost less CPU than fsspec's local file object's) or of an
    fsspec URL; open and read failures become AudioError("io_error")."""
    local = local_path(uri)
    try:
        fs, path = file_system(uri) if local is None else (None, local)
    except ValueError as e:  # an unknown protocol
        raise AudioError("io_error", f"cannot open: {e}") from e
    try:
        if local is not None and not stat.S_ISREG(os.stat(local).st_mode):  # a pipe would block the open, a device never end
            raise AudioError("io_error", "not a regular file (a pipe, device or socket)")
        with fs.open(path, "rb") if fs is not None else open(local, "rb") as f:
            yield f
    except OSError as e:
        raise AudioError("io_error", f"cannot read file: {_os_reason(e)}") from e


def _decoded(f: IO[bytes], spans: SpanPlan, min_seconds: float) -> tuple[list[Segment], AudioInfo]:
    """Decode the planned spans of an open file to mono float32 at SAMPLE_RATE."""
    if not f.read(1):
        raise AudioError("empty", "file is empty (0 bytes)")
    f.seek(0)
    native = _decode_native(f, spans)
    rate = native.sample_rate
    parts = [Segment(start / rate, _to_sample_rate(x, rate)) for start, x in native.parts if len(x)]
    # A span shorter than a file's minimum is left out: a file cut short (its header promises more audio than it
    # holds) decodes only a few samples of the span across its end, too few for an STFT window or a delta.
    segments = [s for s in parts if len(s.samples) >= min_seconds * SAMPLE_RATE]
    if not segments:
        longest_s = max((len(s.samples) for s in parts), default=0) / SAMPLE_RATE
        raise AudioError("too_short", f"audio is only {longest_s:.2f} s long (minimum {min_seconds:g} s)")
    analysed_s = sum(len(s.samples) for s in segments) / SAMPLE_RATE
    peaks = [_peak(s.samples) for s in segments]
    if not np.isfinite(peaks).all():
        raise AudioError("invalid_samples", "decoded audio contains NaN or infinite samples")
    if max(peaks) > PEAK_LIMIT:
        raise AudioError("invalid_samples", f"decoded audio peaks at {max(peaks):.3g}, over {PEAK_LIMIT:g} (full scale is 1): a broken float file")
    if max(peaks) < 10 ** (SILENCE_DBFS / 20):
        raise AudioError("silent", f"audio is digital silence (peak below {SILENCE_DBFS:g} dBFS)")
    return segments, AudioInfo(native.duration_s, rate, native.channels, segments[0].offset_s, analysed_s)


def _peak(samples: np.ndarray) -> float:
    """Largest absolute sample value (NaN if a sample is NaN), from two reductions without np.abs's temporary array."""
    return float(np.maximum(samples.max(), -samples.min()))


def decode(uri: str, spans: SpanPlan = whole, min_seconds: float = 0.5) -> tuple[list[Segment], AudioInfo]:
    """Decode the planned spans of a file (the whole file by default) to mono float32 at SAMPLE_RATE."""
    with _opened(uri) as f:
        return _decoded(f, spans, min_seconds)


def load(uri: str, spans: SpanPlan = whole, min_seconds: float = 0.5) -> tuple[list[Segment], AudioInfo, Tags]:
    """Read a file's tags and decode its planned spans through one open file (one open, one listing on object stores)."""
    with _opened(uri) as f:
        tags = _tags_of(f)
        f.seek(0)
        segments, info = _decoded(f, spans, min_seconds)
    return segments, info, tags


OS_REASONS = {FileNotFoundError: "no such file or object", PermissionError: "access denied", IsADirectoryError: "a folder, not a file"}
"""What an OS error means when it carries no text of its own (s3fs raises them so)."""


def _os_reason(e: OSError) -> str:
    """Describe an OS error without its file name (which may be a URL carrying credentials)."""
    reason = e.strerror or next((text for kind, text in OS_REASONS.items() if isinstance(e, kind)), None)
    return f"{reason} ({type(e).__name__})" if reason else type(e).__name__


def _to_sample_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono float32 samples from `rate` to SAMPLE_RATE."""
    if rate == SAMPLE_RATE or len(samples) == 0:
        return samples
    return soxr.resample(samples, rate, SAMPLE_RATE)


def _span_indices(spans: list[Span], rate: int, frames: int) -> list[tuple[int, int]]:
    """Start and end sample indices of each span, clipped to the file's `frames` samples; empty spans dropped."""
    bounds = [(max(0, round(start * rate)), min(frames, round((start + length) * rate))) for start, length in spans]
    return [(a, b) for a, b in bounds if b > a]


def _decode_native(f: IO[bytes], spans: SpanPlan) -> _Native:
    """Decode the planned spans with libsndfile, falling back to FFmpeg for formats libsndfile lacks."""
    try:
        return _decode_soundfile(f, spans)
    except sf.LibsndfileError as e:
        sndfile_reason = e.error_string
    f.seek(0)
    try:
        return _decode_av(f, spans)
    except (av.FFmpegError, ValueError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise AudioError("undecodable", f"not a readable audio file (libsndfile: {sndfile_reason}; ffmpeg: {reason})") from e


def _decode_soundfile(f: IO[bytes], spans: SpanPlan) -> _Native:
    """Read the planned spans with libsndfile, seeking instead of decoding what is skipped."""
    source = _CallbackSafeFile(f)
    try:
        with sf.SoundFile(source) as snd:
            rate, channels = snd.samplerate, snd.channels
            duration_s = snd.frames / rate
            parts = [(start, _read_span(snd, start, end)) for start, end in _span_indices(spans(duration_s), rate, snd.frames)]
    finally:
        source.raise_pending()  # an I/O error takes precedence over what libsndfile made of it
    return _Native(parts, rate, channels, duration_s)


def _read_span(snd: sf.SoundFile, start: int, end: int) -> np.ndarray:
    """Mono samples [start, end) of an open SoundFile, decoding a short preroll before a seek target."""
    preroll = min(start, round(_PREROLL_S * snd.samplerate))
    if snd.tell() != start - preroll:
        snd.seek(start - preroll)
    return _downmix(snd.read(end - start + preroll, dtype="float32", always_2d=True)[preroll:])


class _CallbackSafeFile:
    """File wrapper for libsndfile's callbacks: cffi prints and swallows an I/O error raised there (libsndfile then
    sees end of file and WAV audio is silently truncated), so it is kept here and re-raised afterwards."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self._error: Exception | None = None

    def readinto(self, buffer: Any) -> int:
        """Read into a buffer; 0 bytes (end of file to libsndfile) after an error."""
        try:
            return self._f.readinto(buffer)
        except Exception as e:  # re-raised by raise_pending()
            self._error = self._error or e
            return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        """Seek; -1 (failure to libsndfile) after an error."""
        try:
            return self._f.seek(offset, whence)
        except Exception as e:  # re-raised by raise_pending()
            self._error = self._error or e
            return -1

    def tell(self) -> int:
        """Current position (file objects track it without I/O, so it does not fail)."""
        return self._f.tell()

    def read(self, size: int = -1) -> bytes:
        """Read bytes (soundfile requires the method; libsndfile reads through readinto)."""
        return self._f.read(size)

    def raise_pending(self) -> None:
        """Re-raise the first error seen inside a callback, if any."""
        if self._error is not None:
            raise self._error


def _downmix(frames: np.ndarray) -> np.ndarray:
    """Average a float32 (samples, channels) array to mono (a matrix product: far faster than mean)."""
    channels = frames.shape[1]
    return frames[:, 0] if channels == 1 else frames @ np.full(channels, 1.0 / channels, dtype=np.float32)


def _decode_av(f: IO[bytes], spans: SpanPlan) -> _Native:
    """Decode the planned spans with FFmpeg, seeking to each one."""
    with av.open(f) as container:
        if not container.streams.audio:
            raise AudioError("no_audio_stream", f"container ({container.format.name}) has no audio stream")
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        if not rate or not channels:
            raise AudioError("undecodable", f"not a readable audio file (ffmpeg: {container.format.name} stream without audio parameters)")
        header_s = _av_duration(container, stream)
        if header_s is not None:
            parts = [
                (start, _decode_span(container, stream, rate, start, end))
                for start, end in _span_indices(spans(header_s), rate, round(header_s * rate))
            ]
            return _Native(parts, rate, channels, header_s)
        samples = _decode_range(container, stream, 0, None)  # no duration in the header: decode all, then take the spans
    duration_s = len(samples) / rate
    return _Native([(a, samples[a:b]) for a, b in _span_indices(spans(duration_s), rate, len(samples))], rate, channels, duration_s)


def _decode_span(container: Any, stream: Any, rate: int, start: int, end: int) -> np.ndarray:
    """Seek to a span (unless it starts the file) and decode it; `rate` is the stream's sample rate."""
    if start:
        container.seek(int(start / rate / stream.time_base) + (stream.start_time or 0), stream=stream)
    return _decode_range(container, stream, start, end)


def _av_duration(container: Any, stream: Any) -> float | None:
    """Duration in seconds from the stream or container header, or None if unknown."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _decode_range(container: Any, stream: Any, start: int, end: int | None) -> np.ndarray:
    """Decode mono samples in [start, end) (native-rate sample indices), skipping corrupt packets."""
    blocks: list[np.ndarray] = []
    first: int | None = None
    total = 0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.InvalidDataError:
            continue
        for frame in frames:
            if first is None:
                first = start if frame.pts is None else _sample_index(frame.pts, stream)
                planar, channels = frame.format.is_planar, frame.layout.nb_channels
            blocks.append(frame.to_ndarray())
            total += frame.samples
        if end is not None and first is not None and first + total >= end:
            break
    if first is None:
        return np.zeros(0, dtype=np.float32)
    mono = _to_mono(np.concatenate(blocks, axis=1), planar, channels)
    return mono[max(0, start - first) : None if end is None else max(0, end - first)]


def _sample_index(pts: int, stream: Any) -> int:
    """Native-rate sample index of a presentation timestamp, counted from the stream start."""
    return round(float((pts - (stream.start_time or 0)) * stream.time_base) * stream.codec_context.sample_rate)


def _to_mono(data: np.ndarray, planar: bool, channels: int) -> np.ndarray:
    """Convert FFmpeg samples (planar (channels, n) or packed (1, n * channels)) to mono float32 in [-1, 1]."""
    frames = data.T if planar else data.reshape(-1, channels)
    mono = _downmix(frames.astype(np.float32, copy=False))
    if data.dtype.kind == "u":
        return (mono - 128.0) / 128.0
    if data.dtype.kind == "i":
        return mono / float(2 ** (8 * data.dtype.itemsize - 1))
    return mono


def read_tags(uri: str) -> Tags:
    """Read embedded genre/artist/album tags (ID3, Vorbis comment, FLAC, MP4); empty Tags if none or unreadable."""
    try:
        with _opened(uri) as f:
            return _tags_of(f)
    except Exception:  # an unopenable file has no readable tags; tags are optional
        return Tags()


def _tags_of(f: IO[bytes]) -> Tags:
    """Tags of an open file; empty Tags if none or unreadable."""
    try:
        audio = mutagen.File(f, easy=True)
    except Exception:  # mutagen's parsers raise assorted errors on malformed files; tags are optional
        return Tags()
    if audio is None or audio.tags is None:
        return Tags()
    if isinstance(audio.tags, ID3):
        return Tags(**{key: _id3_text(audio.tags, frame_id) for key, frame_id in _ID3_FRAMES.items()})
    return Tags(**{key: _first(audio.tags.get(key)) for key in _ID3_FRAMES})


def _id3_text(tags: ID3, frame_id: str) -> str | None:
    """First value of a raw ID3 text frame (genres resolved from ID3v1 numbers), or None."""
    frame = tags.get(frame_id)
    if frame is None:
        return None
    return _first(frame.genres if frame_id == "TCON" else frame.text)


def _first(values: list[Any] | None) -> str | None:
    """First tag value as a stripped string, or None if missing or blank."""
    if not values:
        return None
    text = str(values[0]).strip()
    return text or None
