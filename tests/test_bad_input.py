"""Bad input next to good files (issue #6): each bad file is processed correctly or becomes exactly one error record
with a clear reason, every good file reaches the catalog, and nothing crashes.

One library holds the whole matrix and the real pipeline (`genre-batch run` on the session's Dask cluster and Prefect
server) runs on it once. Cases that need a hook between listing and reading (a file deleted or rewritten during the
run) drive discovery, planning and the Dask shards directly; the permission case reads as a process without the
capabilities that let root bypass file permissions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow.compute as pc
import pytest
import soundfile as sf
from conftest import PrefectServer, cli, current_features, make_library

from genre_batch.analysis import audio, features
from genre_batch.analysis.extraction import run_shards
from genre_batch.cluster import session
from genre_batch.library.discovery import discover
from genre_batch.library.synth import render, write_audio
from genre_batch.publishing import catalog
from genre_batch.stages.extract import no_progress
from genre_batch.storage.feature_store import current_errors, current_tracks, failed, plan, read_index, write_inventory
from genre_batch.storage.store import Store

SR = audio.SAMPLE_RATE
TONE_HZ = 440.0
LONG_RATE, LONG_S = 8000, 20 * 60
UNDECODABLE = "not a readable audio file ("
NO_SUCH_FILE = "cannot read file: No such file or directory (FileNotFoundError)"

@dataclass(frozen=True)
class Matrix:
    """A generated library and the end state a run must leave: catalog URIs and (error kind, message) per failing URI."""

    root: Path
    good: set[str]
    processed: set[str]
    errors: dict[str, tuple[str, str]]


@dataclass(frozen=True)
class Run:
    """The library after one `genre-batch run` on it: the store and the run's exit code and output."""

    matrix: Matrix
    store: Path
    code: int
    out: str


def tone(freq: float, seconds: float, sr: int, amplitude: float = 0.5) -> np.ndarray:
    """A float64 sine tone."""
    return amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * sr)) / sr)


def chirp(seconds: float, sr: int) -> np.ndarray:
    """A sine whose frequency rises linearly from 100 Hz by 0.5 Hz per second (so a window's pitch tells its place)."""
    t = np.arange(round(seconds * sr)) / sr
    return 0.5 * np.sin(2 * np.pi * (100 * t + t * t / 4))


def chirp_hz(t: float) -> float:
    """The chirp's frequency at `t` seconds."""
    return 100 + t / 2


def truncate(src: Path, dst: Path, n_bytes: int) -> None:
    """Write the first `n_bytes` of a file to another."""
    dst.write_bytes(src.read_bytes()[:n_bytes])


def write_video_only(path: Path) -> None:
    """An MP4 container holding one tiny video track and no audio."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 16
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))


def write_float_wav(path: Path, bad: float) -> None:
    """A 32-bit float WAV of a tone with a few samples replaced by `bad` (NaN or inf)."""
    y = tone(TONE_HZ, 1.0, 44100).astype(np.float32)
    y[1000:1010] = bad
    sf.write(path, y, 44100, subtype="FLOAT")


def write_truncated(root: Path) -> set[str]:
    """Valid MP3/FLAC files cut at half their bytes (processed) and inside their header (undecodable)."""
    for ext, header_bytes in (("mp3", 100), ("flac", 30)):  # FLAC: 'fLaC' + 34-byte STREAMINFO; MP3: inside frame 1
        full = write_audio(root / f"full.{ext}", render("chiptune", 3.0, seed=5), SR)
        truncate(full, root / f"cut-in-half.{ext}", full.stat().st_size // 2)
        truncate(full, root / f"cut-in-header.{ext}", header_bytes)
        full.unlink()
    return {str(root / "cut-in-half.mp3"), str(root / "cut-in-half.flac")}


def write_processed_oddities(root: Path) -> set[str]:
    """Unusual but valid files (unlabelled, in the library root) that must be analysed correctly."""
    sf.write(root / "long-20min.wav", chirp(LONG_S, LONG_RATE), LONG_RATE, subtype="PCM_16")
    for ext in ("flac", "wav"):
        sf.write(root / f"hires-96k-24bit.{ext}", tone(TONE_HZ, 3.0, 96000), 96000, subtype="PCM_24")
    common, opposite = tone(TONE_HZ, 3.0, 44100, 0.4), tone(1000.0, 3.0, 44100, 0.4)  # the mean of 8 channels cancels 1 kHz
    sf.write(root / "eight-channels.wav", np.stack([common + opposite] * 4 + [common - opposite] * 4, axis=1), 44100)
    (root / "linked.wav").symlink_to(root / "chiptune" / "chiptune-0-00.wav")
    names = ["long-20min.wav", "hires-96k-24bit.flac", "hires-96k-24bit.wav", "eight-channels.wav", "linked.wav"]
    return {str(root / n) for n in names} | write_truncated(root)


def write_failures(root: Path) -> dict[str, tuple[str, str]]:
    """Files that must each become one error record: name -> (error kind, part of the message)."""
    (root / "empty.wav").write_bytes(b"")
    (root / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(20_000))
    (root / "noise.m4a").write_bytes(np.random.default_rng(1).bytes(20_000))
    (root / "notes.flac").write_text("this is a text file, not audio\n" * 20)
    (root / "notes.wav").write_text("neither is this\n")
    write_video_only(root / "video-only.mp4")
    write_video_only(root / "video-only.m4a")
    write_audio(root / "silence.wav", np.zeros(3 * SR, np.float32), SR)
    write_audio(root / "silence.mp3", np.zeros(3 * SR, np.float32), SR)
    write_audio(root / "short.wav", render("chiptune", 0.2, seed=1), SR)
    write_float_wav(root / "nan.wav", np.nan)
    write_float_wav(root / "inf.wav", np.inf)
    (root / "self-loop.mp3").symlink_to("self-loop.mp3")
    (root / "dangling.flac").symlink_to("nowhere.flac")
    (root / "ambient" / "loop").symlink_to("..")  # a folder link back to the library root: not followed
    return {
        "empty.wav": ("empty", "file is empty (0 bytes)"),
        "noise.mp3": ("undecodable", UNDECODABLE),
        "noise.m4a": ("undecodable", UNDECODABLE),
        "notes.flac": ("undecodable", UNDECODABLE),
        "notes.wav": ("undecodable", UNDECODABLE),
        "cut-in-header.mp3": ("undecodable", UNDECODABLE),
        "cut-in-header.flac": ("undecodable", UNDECODABLE),
        "video-only.mp4": ("no_audio_stream", "has no audio stream"),
        "video-only.m4a": ("no_audio_stream", "has no audio stream"),
        "silence.wav": ("silent", "audio is digital silence (peak below -80 dBFS)"),
        "silence.mp3": ("silent", "audio is digital silence (peak below -80 dBFS)"),
        "short.wav": ("too_short", "audio is only 0.20 s long (minimum 0.5 s)"),
        "nan.wav": ("invalid_samples", "decoded audio contains NaN or infinite samples"),
        "inf.wav": ("invalid_samples", "decoded audio contains NaN or infinite samples"),
        "self-loop.mp3": ("io_error", "cannot read file: Too many levels of symbolic links (OSError)"),
        "dangling.flac": ("io_error", NO_SUCH_FILE),
    }


def write_locked(root: Path) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """A valid file with mode 000: processed where the workers may read it anyway (root), else a permission error."""
    locked = write_audio(root / "locked.flac", tone(TONE_HZ, 3.0, SR).astype(np.float32), SR)
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        return {str(locked)}, {}
    return set(), {str(locked): ("io_error", "cannot read file: Permission denied (PermissionError)")}


def build_matrix(root: Path) -> Matrix:
    """Write good files (3 per style, plus 2 with awkward names) and every bad case into one library."""
    good = {str(p) for p in make_library(root, per_style=3)}
    for style, name in (("chiptune", "it's \"quoted\" & spaced.wav"), ("ambient", "Café – Ünïcode 日本.flac")):
        good.add(str(write_audio(root / style / name, render(style, 3.0, seed=42), SR, {"genre": style})))
    processed = write_processed_oddities(root)
    errors = {str(root / name): expected for name, expected in write_failures(root).items()}
    locked_ok, locked_error = write_locked(root)
    return Matrix(root, good, processed | locked_ok, errors | locked_error)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, dask_scheduler: str, prefect_server: None) -> Run:
    """The bad-input library after one `genre-batch run --labels folders` on it."""
    base = tmp_path_factory.mktemp("bad-input")
    matrix, store = build_matrix(base / "library"), base / "store"
    code, out, _ = cli("run", str(matrix.root), "--store", str(store), "--labels", "folders", "--features", "librosa", "--scheduler", dask_scheduler)
    return Run(matrix, store, code, out)


def windows_of(run: Run, name: str) -> list[dict]:
    """The current feature rows (one per window) of a file of the library."""
    table = current_features(Store(str(run.store)))
    return table.filter(pc.equal(table["uri"], str(run.matrix.root / name))).to_pylist()


def test_run_completes_and_reports_every_failure(ran: Run) -> None:
    matrix = ran.matrix
    listed = len(matrix.good) + len(matrix.processed) + len(matrix.errors)
    assert ran.code == 0, ran.out
    assert f"extract: {listed} audio files" in ran.out
    assert f"{len(matrix.good) + len(matrix.processed)} extracted, {len(matrix.errors)} failed" in ran.out
    assert f"errors: {len(matrix.errors)} files could not be processed" in ran.out


def test_catalog_holds_exactly_the_good_and_the_processed_files(ran: Run) -> None:
    uris = catalog.read(Store(str(ran.store)))["uri"].to_pylist()
    assert len(uris) == len(set(uris))
    assert set(uris) == ran.matrix.good | ran.matrix.processed
    assert not [u for u in uris if "/loop/" in u]  # the folder link loop was not followed


def test_each_bad_file_is_one_error_record_with_a_clear_reason(ran: Run) -> None:
    store = Store(str(ran.store))
    recorded = failed(read_index(store)).to_pylist()
    assert sorted(r["uri"] for r in recorded) == sorted(ran.matrix.errors)  # one record per bad file, nothing else
    for row in recorded:
        kind, message = ran.matrix.errors[row["uri"]]
        assert (row["error_stage"], row["error_type"]) == ("decode", kind)
        assert message in row["error_message"] and str(ran.matrix.root) not in row["error_message"]
    assert {r["uri"] for r in current_errors(store).to_pylist()} == set(ran.matrix.errors)
    assert not set(current_features(store)["uri"].to_pylist()) & set(ran.matrix.errors)


def test_errors_table_and_strict_exit_status(ran: Run, dask_scheduler: str) -> None:
    code, out, _ = cli("query", "--store", str(ran.store), "--format", "json", "SELECT uri, error_type FROM errors")
    assert code == 0
    assert {r["uri"]: r["error_type"] for r in json.loads(out)} == {u: k for u, (k, _) in ran.matrix.errors.items()}
    code, out, _ = cli("query", "--store", str(ran.store), "SELECT uri, error_type FROM errors")  # a table on a pipe
    assert code == 0 and all(uri in out for uri in ran.matrix.errors)  # holds every value whole (rich cut at 80 columns)
    code, out, err = cli("run", str(ran.matrix.root), "--store", str(ran.store), "--features", "librosa", "--scheduler", dask_scheduler, "--strict")
    retried = sum(kind == "io_error" for kind, _ in ran.matrix.errors.values())  # unreadable files are tried again
    assert retried >= 2 and code == 3 and f"0 extracted, {retried} failed" in out
    assert err == f"error: --strict: {len(ran.matrix.errors)} files of the library could not be processed\n"  # no line left by the bar
    code, out, _ = cli("query", "--store", str(ran.store), "--format", "json", "SELECT uri, error_type FROM errors")
    assert {r["uri"]: r["error_type"] for r in json.loads(out)} == {u: k for u, (k, _) in ran.matrix.errors.items()}  # once each


def test_a_forced_dry_run_tells_failures_to_retry_from_files_forced(ran: Run) -> None:
    listed = len(ran.matrix.good) + len(ran.matrix.processed) + len(ran.matrix.errors)
    retried = sum(kind == "io_error" for kind, _ in ran.matrix.errors.values())  # retried even without --force
    code, out, _ = cli("extract", str(ran.matrix.root), "--store", str(ran.store), "--dry-run", "--force", "--format", "json")
    plan = json.loads(out)
    assert code == 0 and retried >= 2
    assert {k: plan[k] for k in ("new", "changed", "retried", "forced", "moved", "unchanged")} == {
        "new": 0, "changed": 0, "retried": retried, "forced": listed - retried, "moved": 0, "unchanged": 0}


def test_very_long_file_is_analysed_in_windows_spread_across_it(ran: Run) -> None:
    rows = windows_of(ran, "long-20min.wav")
    spans = features.window_spans(LONG_S)
    assert spans == [(115.0, 10.0), (295.0, 10.0), (590.0, 20.0), (895.0, 10.0), (1075.0, 10.0)]
    assert [r["window"] for r in rows] == list(range(6))
    assert [r["window_offset_s"] for r in rows] == pytest.approx([115, 295, 590, 600, 895, 1075], abs=0.05)  # windows of 430 frames sit centred in their span, up to a frame in
    assert rows[0]["duration_s"] == pytest.approx(LONG_S) and rows[0]["analysed_s"] == pytest.approx(60.0, abs=0.01)
    for r in rows:  # each window holds its own part of the file: the chirp's pitch at the window's centre
        assert r["centroid_mean"] == pytest.approx(chirp_hz(r["window_offset_s"] + 5), abs=10)


@pytest.mark.parametrize(
    ("name", "sample_rate", "channels"),
    [("hires-96k-24bit.flac", 96000, 1), ("hires-96k-24bit.wav", 96000, 1), ("eight-channels.wav", 44100, 8)],
)
def test_high_resolution_and_multichannel_files_keep_their_pitch(ran: Run, name: str, sample_rate: int, channels: int) -> None:
    (row,) = windows_of(ran, name)
    assert (row["sample_rate"], row["channels"]) == (sample_rate, channels)
    assert row["centroid_mean"] == pytest.approx(TONE_HZ, abs=15)  # 8 channels mixed wrongly would leave 1 kHz in
    (segment,), _ = audio.decode(str(ran.matrix.root / name))
    spectrum = np.abs(np.fft.rfft(segment.samples * np.hanning(len(segment.samples))))
    assert np.argmax(spectrum) * SR / len(segment.samples) == pytest.approx(TONE_HZ, abs=1)
    assert np.abs(segment.samples).max() == pytest.approx(0.5 if channels == 1 else 0.4, rel=0.02)  # 24-bit scaled right


@pytest.mark.parametrize("name", ["cut-in-half.mp3", "cut-in-half.flac"])
def test_truncated_file_is_analysed_up_to_where_it_ends(ran: Run, name: str) -> None:
    (row,) = windows_of(ran, name)
    assert 1.3 < row["analysed_s"] < 1.6


def test_awkward_names_and_file_links_are_processed(ran: Run) -> None:
    names = ["chiptune/it's \"quoted\" & spaced.wav", "ambient/Café – Ünïcode 日本.flac", "linked.wav"]
    rows = {name: windows_of(ran, name) for name in names}
    assert all(len(r) == 1 for r in rows.values())
    (target,) = windows_of(ran, "chiptune/chiptune-0-00.wav")
    assert (rows["linked.wav"][0]["size"], rows["linked.wav"][0]["fingerprint"]) == (target["size"], target["fingerprint"])


CANNOT_DROP_CAPS = 77
DROP_DAC_CAPS = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: out of the bounding set, so lost at exec even by root
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: needs CAP_SETPCAP
        print(os.strerror(ctypes.get_errno()), file=sys.stderr)
        sys.exit({CANNOT_DROP_CAPS})
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""

EXTRACT_LIBRARY = """
import sys
from genre_batch.library.discovery import discover
from genre_batch.analysis.extraction import extract_shard
from genre_batch.storage.feature_store import write_inventory
from genre_batch.storage.store import Store
inventory = discover(sys.argv[1])
extract_shard(Store(sys.argv[2]), inventory, "run-locked", 0)
write_inventory(Store(sys.argv[2]), inventory)
"""


def test_unreadable_file_is_one_io_error_record(tmp_path: Path) -> None:
    library, store = tmp_path / "library", tmp_path / "store"
    library.mkdir()
    locked = write_audio(library / "locked.wav", tone(TONE_HZ, 1.0, SR).astype(np.float32), SR)
    locked.chmod(0)
    # root reads any file; without the two capabilities that allow it, root meets file permissions like any user
    as_root = os.geteuid() == 0
    python = [sys.executable, "-c", DROP_DAC_CAPS] if as_root else [sys.executable]
    child = subprocess.run([*python, "-c", EXTRACT_LIBRARY, str(library), str(store)], capture_output=True, text=True)
    if as_root and child.returncode == CANNOT_DROP_CAPS:
        pytest.skip(
            "running as root, and prctl(PR_CAPBSET_DROP) of CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH failed "
            f"({child.stderr.strip()}; it needs CAP_SETPCAP): root would read the mode-000 file, so there is no "
            "permission error to test"
        )
    assert child.returncode == 0, child.stderr
    (error,) = current_errors(Store(str(store))).to_pylist()
    assert (error["uri"], error["error_type"]) == (str(locked), "io_error")
    assert error["message"] == "cannot read file: Permission denied (PermissionError)"


def test_file_deleted_or_rewritten_between_listing_and_reading(tmp_path: Path, dask_scheduler: str) -> None:
    library, store = tmp_path / "library", Store(str(tmp_path / "store"))
    (library / "chiptune").mkdir(parents=True)
    kept, gone, rewritten = (
        write_audio(library / "chiptune" / f"{name}.wav", render("chiptune", 3.0, seed), SR)
        for seed, name in enumerate(("kept", "gone", "rewritten"))
    )
    listed = discover(str(library))
    todo = plan(listed, read_index(store)).todo
    gone.unlink()
    write_audio(rewritten, render("percussion", 4.0, seed=9), SR)  # new content, new size
    with session(dask_scheduler) as cluster:
        first = run_shards(cluster, store, todo, "run-1", no_progress)
        write_inventory(store, listed)
        assert (first.extracted, first.failed, first.shard_failures) == (2, 1, [])
        (error,) = current_errors(store).to_pylist()
        assert (error["uri"], error["error_type"], error["message"]) == (str(gone), "io_error", NO_SUCH_FILE)
        read = current_tracks(store).to_pylist()
        by_uri = {r["uri"]: r for r in read}
        assert set(by_uri) == {str(kept), str(rewritten)}
        old = listed.filter(pc.equal(listed["uri"], str(rewritten))).to_pylist()[0]
        assert by_uri[str(rewritten)]["fingerprint"] == old["fingerprint"]  # as listed ...
        assert by_uri[str(rewritten)]["duration_s"] == pytest.approx(4.0, abs=0.01)  # ... with the content read

        relisted = discover(str(library))
        again = plan(relisted, read_index(store)).todo
        assert again["uri"].to_pylist() == [str(rewritten)]
        second = run_shards(cluster, store, again, "run-2", no_progress)
        write_inventory(store, relisted)
    assert (second.extracted, second.failed) == (1, 0)
    windows = current_features(store)
    mine = windows.filter(pc.equal(windows["uri"], str(rewritten))).to_pylist()
    new = relisted.filter(pc.equal(relisted["uri"], str(rewritten))).to_pylist()[0]
    assert {(r["fingerprint"], r["run_id"]) for r in mine} == {(new["fingerprint"], "run-2")} and len(mine) == 1
    assert current_errors(store).num_rows == 0  # the deleted file left the library, and its error with it


CLI_MAIN = "from genre_batch.cli import main; main()"


def test_an_unreadable_folder_keeps_its_files(
    tmp_path: Path, dask_scheduler: str, prefect_server: None, prefect_server_process: PrefectServer
) -> None:
    """A library folder the listing cannot read (here mode 000, read without root's capabilities) is reported, and the
    files the previous listing had under it stay: not removed from the store, not extracted again."""
    library, store = tmp_path / "library", tmp_path / "store"
    for folder, seeds in (("open", (0, 1)), ("locked", (2, 3))):
        (library / folder).mkdir(parents=True)
        for seed in seeds:
            write_audio(library / folder / f"{seed}.wav", render("chiptune", 2.0, seed), SR)
    code, out, err = cli("extract", str(library), "--store", str(store), "--features", "librosa", "--scheduler", dask_scheduler)
    assert code == 0, out + err
    write_audio(library / "open" / "new.wav", render("chiptune", 2.0, 9), SR)
    (library / "locked").chmod(0)
    try:
        python = [sys.executable, "-c", DROP_DAC_CAPS] if os.geteuid() == 0 else [sys.executable]
        env = {**os.environ, "PREFECT_API_URL": prefect_server_process.api_url()}
        runs = [subprocess.run([*python, "-c", CLI_MAIN, "extract", str(library), "--store", str(store), "--features", "librosa", *extra, "--format", "json"],
                               capture_output=True, text=True, env=env)
                for extra in (["--dry-run"], ["--scheduler", dask_scheduler], ["--scheduler", dask_scheduler, "--force"])]
    finally:
        (library / "locked").chmod(0o755)
    if runs[0].returncode == CANNOT_DROP_CAPS:
        pytest.skip(f"running as root, and dropping CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH failed ({runs[0].stderr.strip()})")
    plan, ran, forced = (json.loads(r.stdout) for r in runs)
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    unlisted = [f"{library / 'locked'}: Permission denied"]
    assert (plan["new"], plan["removed"], plan["unchanged"], plan["unlisted"]) == (1, 0, 4, unlisted)
    summary = ran["extract"]
    assert (summary["discovered"], summary["extracted"], summary["removed"], summary["unchanged"], summary["unlisted"]) == (5, 1, 0, 4, unlisted)
    assert sorted(Path(u).name for u in current_tracks(Store(str(store)))["uri"].to_pylist()) == ["0.wav", "1.wav", "2.wav", "3.wav", "new.wav"]
    summary = forced["extract"]  # --force extracts what it listed, not the kept files (it cannot read them)
    assert (summary["extracted"], summary["failed"], summary["unchanged"], summary["removed"]) == (3, 0, 2, 0)


def test_an_unreadable_library_folder_is_a_usage_error(tmp_path: Path) -> None:
    library = tmp_path / "library"
    library.mkdir()
    library.chmod(0)
    try:
        python = [sys.executable, "-c", DROP_DAC_CAPS] if os.geteuid() == 0 else [sys.executable]
        child = subprocess.run([*python, "-c", CLI_MAIN, "extract", str(library), "--store", str(tmp_path / "store"), "--dry-run"],
                               capture_output=True, text=True)
    finally:
        library.chmod(0o755)
    if child.returncode == CANNOT_DROP_CAPS:
        pytest.skip(f"running as root, and dropping CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH failed ({child.stderr.strip()})")
    assert (child.returncode, child.stdout, child.stderr) == (2, "", f"error: cannot list the library folder {library}: Permission denied\n")


def test_a_name_that_is_not_utf8_is_skipped_and_reported(tmp_path: Path, dask_scheduler: str, prefect_server: None) -> None:
    """Latin-1 names (from Windows or Samba shares) cannot be URIs in a UTF-8 table: the file, or a folder, is named in
    the summary and the rest of the library is extracted."""
    library, store = tmp_path / "library", tmp_path / "store"
    make_library(library, per_style=1)
    for name in (b"caf\xe9.wav", b"m\xfasica/x.wav"):
        target = bytes(library) + b"/" + name
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(write_audio(tmp_path / "plain.wav", render("chiptune", 1.0, 5), SR), target)
    code, out, err = cli("extract", str(library), "--store", str(store), "--features", "librosa", "--scheduler", dask_scheduler, "--format", "json")
    assert code == 0, out + err
    summary = json.loads(out)["extract"]
    reason = "its name is not valid UTF-8: rename it"
    assert sorted(summary["unlisted"]) == [f"{library}/caf\\xe9.wav: {reason}", f"{library}/m\\xfasica: {reason}"]
    assert summary["extracted"] == summary["discovered"] == len(list(library.rglob("*.*"))) - 2
