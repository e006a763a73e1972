"""Tests for audio decoding, tag reading and the synthetic audio generator (fixtures generated in tmp_path)."""

import warnings
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
import soundfile as sf

from genre_batch.analysis.audio import SAMPLE_RATE, AudioError, Span, Tags, decode, read_tags
from genre_batch.library.discovery import AUDIO_EXTENSIONS
from genre_batch.analysis.features import window_spans
from genre_batch.library.synth import FORMATS, STYLES, render, write_audio

NATIVE_RATE = 44100



def _middle(seconds: float):
    """A span plan: the middle `seconds` of a file (all of it if shorter)."""

    def plan(duration_s: float) -> list[Span]:
        length = min(seconds, duration_s)
        return [((duration_s - length) / 2, length)]

    return plan


def _mono(uri: str, seconds: float | None = None, **kwargs):
    """Decode one contiguous span (the middle `seconds`, or the whole file) to (samples, info)."""
    segments, info = decode(uri, _middle(seconds), **kwargs) if seconds else decode(uri, **kwargs)
    assert len(segments) == 1
    return segments[0].samples, info


def _tone(freq: float, seconds: float, sr: int = NATIVE_RATE, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine tone."""
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * sr)) / sr)).astype(np.float32)


def _dominant_hz(y: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Frequency of the strongest FFT bin of a windowed signal."""
    return float(np.argmax(np.abs(np.fft.rfft(y * np.hanning(len(y)))))) * sr / len(y)


def _band_level(y: np.ndarray, freq: float, sr: int = SAMPLE_RATE) -> float:
    """Peak FFT magnitude within 20 Hz of `freq`."""
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    hz = np.fft.rfftfreq(len(y), 1 / sr)
    return float(spectrum[np.abs(hz - freq) < 20].max())


def _expect_error(uri: str | Path, kind: str, **kwargs: float) -> AudioError:
    """Decode `uri`, asserting it fails with the given kind and an informative message."""
    with pytest.raises(AudioError) as info:
        decode(str(uri), **kwargs)
    assert info.value.kind == kind
    assert len(str(info.value)) > 10
    return info.value


def test_audio_extensions_cover_written_formats() -> None:
    assert {f".{fmt}" for fmt in FORMATS} <= AUDIO_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in AUDIO_EXTENSIONS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mono_round_trip_keeps_pitch_and_duration(tmp_path: Path, fmt: str) -> None:
    path = write_audio(tmp_path / f"tone.{fmt}", _tone(440.0, 2.0), NATIVE_RATE)
    y, info = _mono(str(path))
    assert y.dtype == np.float32 and y.ndim == 1
    assert info.sample_rate == (48000 if fmt == "opus" else NATIVE_RATE)
    assert info.channels == 1
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    assert info.offset_s == 0.0
    assert info.analysed_s == pytest.approx(len(y) / SAMPLE_RATE)
    assert len(y) / SAMPLE_RATE == pytest.approx(2.0, abs=0.1)
    assert _dominant_hz(y) == pytest.approx(440.0, abs=2.0)
    assert 0.3 < np.abs(y).max() < 1.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_stereo_is_downmixed_by_mean(tmp_path: Path, fmt: str) -> None:
    common, opposite = _tone(440.0, 2.0, amplitude=0.4), _tone(1000.0, 2.0, amplitude=0.4)
    path = write_audio(tmp_path / f"stereo.{fmt}", np.stack([common + opposite, common - opposite], axis=1), NATIVE_RATE)
    y, info = _mono(str(path))
    assert info.channels == 2 and y.ndim == 1
    assert _dominant_hz(y) == pytest.approx(440.0, abs=2.0)
    assert _band_level(y, 1000.0) < 0.1 * _band_level(y, 440.0)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a"])
def test_long_file_decodes_only_the_middle(tmp_path: Path, fmt: str) -> None:
    sr = SAMPLE_RATE
    segment_hz = np.array([300, 400, 500, 600, 700, 800, 900, 1000, 1100])
    t = np.arange(90 * sr) / sr
    signal = (0.5 * np.sin(2 * np.pi * segment_hz[(t // 10).astype(int)] * t)).astype(np.float32)
    y, info = _mono(str(write_audio(tmp_path / f"long.{fmt}", signal, sr)), 20)
    assert info.duration_s == pytest.approx(90.0, abs=0.1)
    assert info.offset_s == pytest.approx(35.0, abs=0.01)
    assert info.analysed_s == pytest.approx(20.0, abs=0.01)
    assert len(y) == pytest.approx(20 * sr, abs=2)
    # the excerpt covers 35-55 s: the end of segment 3, all of segment 4, the start of segment 5
    assert _dominant_hz(y[round(0.5 * sr) : round(4.5 * sr)]) == pytest.approx(600, abs=5)
    assert _dominant_hz(y[round(5.5 * sr) : round(14.5 * sr)]) == pytest.approx(700, abs=5)
    assert _dominant_hz(y[round(15.5 * sr) : round(19.5 * sr)]) == pytest.approx(800, abs=5)
    assert np.abs(y[: round(0.05 * sr)]).max() > 0.3  # no silent decoder warm-up at the seek point


@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a"])
def test_long_track_decodes_windows_spread_across_it(tmp_path: Path, fmt: str) -> None:
    sr = SAMPLE_RATE
    t = np.arange(200 * sr) / sr
    signal = (0.5 * np.sin(2 * np.pi * (200 + 100 * (t // 10)) * t)).astype(np.float32)  # 200 Hz, 300 Hz, ... per 10 s
    segments, info = decode(str(write_audio(tmp_path / f"track.{fmt}", signal, sr)), window_spans)
    # 200 s: windows centred at 10% (20 s), 25% (50 s), the middle 20 s, 75% (150 s) and 90% (180 s)
    assert [s.offset_s for s in segments] == pytest.approx([15.0, 45.0, 90.0, 145.0, 175.0], abs=0.01)
    assert [len(s.samples) / sr for s in segments] == pytest.approx([10.0, 10.0, 20.0, 10.0, 10.0], abs=0.01)
    assert info.analysed_s == pytest.approx(60.0, abs=0.05) and info.offset_s == pytest.approx(15.0, abs=0.01)
    for s in segments:  # each segment holds its own part of the file: the tone of the 10 s block it starts in
        head = s.samples[round(0.5 * sr) : round(4.5 * sr)]
        assert _dominant_hz(head) == pytest.approx(200 + 100 * (s.offset_s // 10), abs=5)
        assert np.abs(s.samples[: round(0.05 * sr)]).max() > 0.3  # no silent decoder warm-up at any seek point


class _StreamSink:
    """A write-only, non-seekable byte sink, so muxers cannot go back and write a duration header."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)


def test_stream_without_duration_header_still_yields_the_middle(tmp_path: Path) -> None:
    sr = SAMPLE_RATE
    t = np.arange(30 * sr) / sr
    signal = (16000 * np.sin(2 * np.pi * np.where(t < 15, 440, 880) * t)).astype(np.int16)
    sink = _StreamSink()
    with av.open(sink, "w", format="matroska") as container:
        stream = container.add_stream("flac", rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(signal[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts = sr, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    path = tmp_path / "live.mka"
    path.write_bytes(bytes(sink.data))
    with av.open(str(path)) as container:
        assert container.duration is None
    y, info = _mono(str(path), 10)
    assert info.duration_s == pytest.approx(30.0, abs=0.01)
    assert info.offset_s == pytest.approx(10.0, abs=0.01) and info.analysed_s == pytest.approx(10.0, abs=0.01)
    assert _dominant_hz(y[: round(4.5 * sr)]) == pytest.approx(440, abs=3)
    assert _dominant_hz(y[round(5.5 * sr) :]) == pytest.approx(880, abs=3)


def test_short_file_with_max_seconds_is_decoded_whole(tmp_path: Path) -> None:
    y, info = _mono(str(write_audio(tmp_path / "short.flac", _tone(440.0, 3.0), NATIVE_RATE)), 20)
    assert info.offset_s == 0.0 and info.analysed_s == pytest.approx(3.0, abs=0.01)


def test_fsspec_url_is_decoded_and_tagged(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "remote.mp3", _tone(440.0, 1.0), NATIVE_RATE, {"genre": "Jazz"})
    fs = fsspec.filesystem("memory")
    fs.pipe("/test-audio/remote.mp3", path.read_bytes())
    try:
        y, info = _mono("memory://test-audio/remote.mp3")
        assert info.duration_s == pytest.approx(1.0, abs=0.1)
        assert _dominant_hz(y) == pytest.approx(440.0, abs=2.0)
        assert read_tags("memory://test-audio/remote.mp3") == Tags(genre="Jazz")
    finally:
        fs.rm("/test-audio/remote.mp3")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").touch()
    assert "empty" in str(_expect_error(tmp_path / "empty.wav", "empty"))


@pytest.mark.parametrize(
    ("name", "content"),
    [("noise.mp3", np.random.default_rng(0).bytes(20_000)), ("notes.wav", b"this is a text file, not audio\n" * 50)],
)
def test_undecodable_file(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    message = str(_expect_error(tmp_path / name, "undecodable"))
    assert "libsndfile" in message and "ffmpeg" in message
    assert str(tmp_path) not in message


def test_container_without_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        for _ in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    assert "no audio stream" in str(_expect_error(path, "no_audio_stream"))


def test_too_short(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "clip.wav", _tone(440.0, 0.2), NATIVE_RATE)
    assert "0.20 s" in str(_expect_error(path, "too_short"))
    assert decode(str(path), min_seconds=0.1)[1].analysed_s == pytest.approx(0.2)


@pytest.mark.parametrize(("name", "peak_dbfs"), [("zeros.wav", -np.inf), ("zeros.mp3", -np.inf), ("faint.flac", -85.0)])
def test_digital_silence(tmp_path: Path, name: str, peak_dbfs: float) -> None:
    path = write_audio(tmp_path / name, _tone(440.0, 2.0, amplitude=10 ** (peak_dbfs / 20)), NATIVE_RATE)
    assert str(_expect_error(path, "silent")) == "audio is digital silence (peak below -80 dBFS)"


def test_quiet_audio_above_the_silence_threshold_is_decoded(tmp_path: Path) -> None:
    y, _ = _mono(str(write_audio(tmp_path / "quiet.flac", _tone(440.0, 2.0, amplitude=10 ** (-70 / 20)), NATIVE_RATE)))
    assert _dominant_hz(y) == pytest.approx(440.0, abs=2.0)


def test_short_silence_is_too_short(tmp_path: Path) -> None:
    _expect_error(write_audio(tmp_path / "blip.wav", np.zeros(4410, np.float32), NATIVE_RATE), "too_short")


def test_missing_file(tmp_path: Path) -> None:
    message = str(_expect_error(tmp_path / "missing.mp3", "io_error"))
    assert "No such file" in message and str(tmp_path) not in message


def test_os_errors_without_text_say_what_they_mean() -> None:
    """s3fs raises PermissionError and FileNotFoundError with no text: the reason still says what happened."""
    from genre_batch.analysis.audio import _os_reason

    assert _os_reason(PermissionError()) == "access denied (PermissionError)"
    assert _os_reason(FileNotFoundError("s3://bucket/key")) == "no such file or object (FileNotFoundError)"  # never the name
    assert _os_reason(OSError()) == "OSError"


def test_nan_samples(tmp_path: Path) -> None:
    y = _tone(440.0, 1.0)
    y[1000:1010] = np.nan
    sf.write(tmp_path / "nan.wav", y, NATIVE_RATE, subtype="FLOAT")
    assert "NaN" in str(_expect_error(tmp_path / "nan.wav", "invalid_samples"))


def test_negative_infinite_samples(tmp_path: Path) -> None:
    y = _tone(440.0, 1.0)
    y[1000] = -np.inf
    sf.write(tmp_path / "neginf.wav", y, NATIVE_RATE, subtype="FLOAT")
    assert "infinite" in str(_expect_error(tmp_path / "neginf.wav", "invalid_samples"))


def test_a_negative_only_peak_is_not_silence(tmp_path: Path) -> None:
    y = np.zeros(NATIVE_RATE, np.float32)
    y[1000:1100] = -0.5
    sf.write(tmp_path / "dip.wav", y, NATIVE_RATE, subtype="FLOAT")
    assert np.abs(_mono(str(tmp_path / "dip.wav"))[0]).max() > 0.1


@pytest.mark.parametrize("fmt", FORMATS)
def test_tags_round_trip(tmp_path: Path, fmt: str) -> None:
    tags = {"genre": " Synth Pop ", "artist": "Ada Lovelace", "album": "Analytical Engine"}
    path = write_audio(tmp_path / f"tagged.{fmt}", _tone(440.0, 1.0), NATIVE_RATE, tags)
    assert read_tags(str(path)) == Tags(genre="Synth Pop", artist="Ada Lovelace", album="Analytical Engine")
    assert decode(str(path))[1].duration_s == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("fmt", ["mp3", "flac", "ogg", "m4a"])
def test_untagged_file_has_empty_tags(tmp_path: Path, fmt: str) -> None:
    assert read_tags(str(write_audio(tmp_path / f"plain.{fmt}", _tone(440.0, 1.0), NATIVE_RATE))) == Tags()


def test_partial_tags(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "partial.flac", _tone(440.0, 1.0), NATIVE_RATE, {"artist": "Solo", "genre": "  "})
    assert read_tags(str(path)) == Tags(artist="Solo")


@pytest.mark.parametrize("name", ["garbage.mp3", "garbage.m4a", "missing.flac"])
def test_unreadable_file_has_empty_tags(tmp_path: Path, name: str) -> None:
    if name.startswith("garbage"):
        (tmp_path / name).write_bytes(np.random.default_rng(1).bytes(5000))
    assert read_tags(str(tmp_path / name)) == Tags()


@pytest.mark.parametrize("style", STYLES)
def test_render_is_finite_bounded_and_deterministic(style: str) -> None:
    y = render(style, 3.0, seed=7)
    assert y.dtype == np.float32 and y.shape == (3 * 22050,)
    assert np.isfinite(y).all()
    assert 0.1 < np.abs(y).max() <= 1.0
    np.testing.assert_array_equal(y, render(style, 3.0, seed=7))
    assert not np.array_equal(y, render(style, 3.0, seed=8))
    assert render(style, 0.5, seed=1, sr=16000).shape == (8000,)


def test_render_rejects_unknown_style() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        render("polka", 1.0, seed=0)


def test_write_audio_rejects_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported extension"):
        write_audio(tmp_path / "x.xyz", _tone(440.0, 0.1), NATIVE_RATE)


def test_a_pipe_or_device_is_an_io_error_not_a_hang(tmp_path: Path) -> None:
    """`classify` takes any path a user names: a FIFO would block the open, /dev/zero never ends."""
    import os

    fifo = tmp_path / "stream.mp3"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(AudioError, match="not a regular file") as raised:
            decode(path)
        assert raised.value.kind == "io_error"


def test_float_samples_far_over_full_scale_are_invalid(tmp_path: Path) -> None:
    """Finite but absurd float samples (3e29) would overflow the features' powers into inf: an invalid_samples record."""
    path = tmp_path / "huge.wav"
    sf.write(path, (3e29 * _tone(330.0, 2.0)).astype(np.float32), NATIVE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"decoded audio peaks at 1\.5e\+29, over 10000 \(full scale is 1\)") as raised:
        decode(str(path))
    assert raised.value.kind == "invalid_samples"
    loud = tmp_path / "loud.wav"  # a little over full scale is a float file's right
    sf.write(loud, (1.5 * _tone(330.0, 2.0) / 0.5).astype(np.float32), NATIVE_RATE, subtype="FLOAT")
    assert decode(str(loud))[1].duration_s == pytest.approx(2.0)


def test_a_link_loop_or_a_broken_link_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`classify` and `similar` read (and name) a file as `absolute` makes it: a link that leads nowhere stays the path
    given; a link to a file, or a path still to be created under a linked folder, is resolved."""
    from genre_batch.storage.locations import absolute

    (tmp_path / "a.mp3").symlink_to(tmp_path / "b.mp3")
    (tmp_path / "b.mp3").symlink_to(tmp_path / "a.mp3")
    assert absolute(str(tmp_path / "a.mp3")) == str(tmp_path / "a.mp3")
    with pytest.raises(AudioError, match="Too many levels of symbolic links"):
        decode(str(tmp_path / "a.mp3"))
    (tmp_path / "dangling.mp3").symlink_to(tmp_path / "gone" / "target.mp3")
    monkeypatch.chdir(tmp_path)
    assert absolute("dangling.mp3") == str(tmp_path / "dangling.mp3")
    with pytest.raises(AudioError, match="No such file or directory"):
        decode(absolute("dangling.mp3"))
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "song.mp3").write_bytes(b"")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "song.mp3").symlink_to(tmp_path / "real" / "song.mp3")
    assert absolute("song.mp3") == str(tmp_path / "real" / "song.mp3")
    assert absolute("linked/new-store") == str(tmp_path / "real" / "new-store")
    (tmp_path / "real" / "x").mkdir()
    (tmp_path / "deep").symlink_to(tmp_path / "real" / "x")
    assert absolute("deep/../song.mp3") == str(tmp_path / "real" / "song.mp3")  # the link first, then "..", as the OS reads it
    (tmp_path / "real" / "gone.mp3").symlink_to(tmp_path / "nowhere.mp3")
    assert absolute("linked/gone.mp3") == str(tmp_path / "real" / "gone.mp3")  # a broken link: named, in its folder resolved


def _promise_more(flac: Path, total_samples: int) -> None:
    """Make a FLAC file's STREAMINFO promise `total_samples` (a file cut short keeps the header of the whole)."""
    data = bytearray(flac.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first: its 36-bit sample count ends at byte 26
    packed = int.from_bytes(data[18:26], "big")
    data[18:26] = ((packed >> 36 << 36) | total_samples).to_bytes(8, "big")
    flac.write_bytes(bytes(data))


def test_a_span_past_the_end_of_a_file_cut_short_is_left_out(tmp_path: Path) -> None:
    """A FLAC whose header promises 80 s and that holds 67.05 s: the span centred at 90 % decodes 0.05 s, too few
    samples for an STFT window (librosa warned "n_fft=2048 is too large" and its deltas raised, failing the file). The
    span is left out; the others are analysed, without a warning."""
    from genre_batch.analysis.extraction import librosa_windows

    path = tmp_path / "cut.flac"
    write_audio(path, render("electronic", 67.05, 7), SAMPLE_RATE)
    _promise_more(path, 80 * SAMPLE_RATE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segments, info = decode(str(path), window_spans)
        offsets, rows = librosa_windows(segments)
    assert [w for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    assert info.duration_s == 80.0 and [len(s.samples) / SAMPLE_RATE for s in segments] == [10.0, 10.0, 20.0, 10.0]
    assert info.analysed_s == 50.0 and offsets == pytest.approx([3.0, 15.0, 30.0, 40.0, 55.0], abs=0.05) and np.isfinite(rows).all()
    with pytest.raises(AudioError, match=r"^audio is only 0\.05 s long \(minimum 0\.5 s\)$"):
        decode(str(path), lambda duration_s: [(67.0, 10.0)])  # only that span: too short, as a file of 0.05 s
