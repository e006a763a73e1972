"""S3 end to end against a real S3 server process (SeaweedFS `weed mini`) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import s3fs
from conftest import cli
from test_servers import free_port

from genre_batch import GenreBatchError
from genre_batch.analysis import audio
from genre_batch.library import writeback
from genre_batch.library.discovery import discover
from genre_batch.library.synth import STYLES, render, write_audio
from genre_batch.publishing import catalog
from genre_batch.storage.store import Store, swap_bytes, version_token

KEY, SECRET = "genre-batch-test-key", "genre-batch-test-secret-0123456789"
GRPC_OFFSET = 10000  # SeaweedFS serves gRPC on the S3 port + 10000


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Wait until something answers HTTP at url."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # an HTTP answer, even 403, means the server is up
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing answered at {url} within {timeout} s")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 server accepting KEY/SECRET; stopped after the module, also on failure."""
    port, data = free_port(GRPC_OFFSET), tmp_path_factory.mktemp("weed")
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-s3.port={port}", "-admin.ui=false"],
        env={**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> s3fs.S3FileSystem:
    """Credentials and endpoint from the standard AWS variables (inherited by local Dask workers)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


def test_run_with_library_and_store_on_s3(
    s3: s3fs.S3FileSystem,
    library_factory: Callable[..., Path],
    prefect_server: None,
    dask_scheduler: str,
    session_workers: Callable[[], None],
) -> None:
    """On the session's Dask cluster, its workers given the AWS variables (test_s3_faults.py runs S3 on a local cluster)."""
    session_workers()
    local = library_factory(per_style=3)
    (local / "broken.mp3").write_bytes(b"\x00" * 64)
    s3.mkdir("music")
    s3.put(str(local), "music/library", recursive=True)
    library, store = "s3://music/library", "s3://music/genre-batch"

    code, out, err = cli("run", library, "--store", store, "--labels", "folders", "--features", "librosa", "--scheduler", dask_scheduler)
    assert code == 0, out + err
    assert KEY not in out + err and SECRET not in out + err
    assert "13 audio files in s3://music/library" in out and "12 extracted, 1 failed" in out

    code, out, _ = cli("query", "--store", store, "--format", "json", "SELECT genre, count(*) AS n FROM catalog GROUP BY genre ORDER BY genre")
    assert code == 0 and json.loads(out) == [{"genre": g, "n": 3} for g in sorted(STYLES)]
    code, out, _ = cli("query", "--store", store, "--format", "json", "SELECT uri, error_type FROM errors")
    assert json.loads(out) == [{"uri": "s3://music/library/broken.mp3", "error_type": "undecodable"}]
    table = catalog.read(Store(store))
    assert all(u.startswith("s3://music/library/") for u in table["uri"].to_pylist()) and table.num_rows == 12
    assert s3.exists("music/genre-batch/catalog/CURRENT.json") and s3.exists("music/genre-batch/features/inventory.parquet")

    s3.invalidate_cache()
    before = sorted(s3.find("music/genre-batch/features"))
    code, out, _ = cli("run", library, "--store", store, "--labels", "folders", "--features", "librosa", "--scheduler", dask_scheduler)
    assert code == 0 and "0 extracted, 0 failed, 13 unchanged" in out and "trained on the same labelled data" in out
    s3.invalidate_cache()
    assert sorted(s3.find("music/genre-batch/features")) == before

    # credentials never reach stored data: features, errors, models, catalog, run records
    stored = s3.find("music/genre-batch")
    assert any("/runs/" in p for p in stored) and any(p.endswith("model.ubj") for p in stored)
    for path in stored:
        data = s3.cat_file(path)
        assert KEY.encode() not in data and SECRET.encode() not in data, path
    model = next(p for p in stored if p.endswith("model.ubj"))
    assert s3.cat_file(model)[:1] == b"{" and not s3.cat_file(model).startswith(b"\x80")  # UBJSON, not a pickle

    # a prefix stands for the audio files under it, as a local folder does
    code, out, err = cli("classify", "s3://music/library/", "--store", store, "--top", "1", "--format", "json")
    answers = {a["uri"]: a for a in json.loads(out)}
    assert code == 1 and "1 of 13 files could not be classified" in err
    assert set(answers) == {f"s3://music/library/{p.relative_to(local)}" for p in local.rglob("*.*")}
    assert "error" in answers["s3://music/library/broken.mp3"] and sum("genres" in a for a in answers.values()) == 12


ODD_KEYS = ["Live [2001]/a::b.wav", "c#d?e.wav", "f g {h}.flac", "*star*.ogg"]
"""Object keys holding URL and glob syntax: '::' (fsspec's chain of filesystems), '#' and '?', brackets, braces, '*'."""


def test_object_keys_with_url_and_glob_syntax_are_listed_read_and_written(s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    """Such a key is a name: a '::' in one used to fail the whole shard that read it (a TypeError, not an audio error)."""
    s3.mkdir("odd")
    for i, key in enumerate(ODD_KEYS):
        local = write_audio(tmp_path / f"{i}{Path(key).suffix}", render("chiptune", 1.0, i), audio.SAMPLE_RATE, {"genre": "Jazz"})
        s3.put_file(str(local), f"odd/lib/{key}")
    listing = discover("s3://odd/lib").to_pylist()
    assert sorted(r["uri"] for r in listing) == sorted(f"s3://odd/lib/{key}" for key in ODD_KEYS)
    for row in listing:
        _, info, tags = audio.load(row["uri"])
        assert info.duration_s > 0.9 and tags.genre == "Jazz", row["uri"]
    chained = next(r for r in listing if "::" in r["uri"])
    old, _ = writeback.replace(chained["uri"], chained["fingerprint"], ["rock"])
    assert old == ["Jazz"] and audio.read_tags(chained["uri"]).genre == "rock"


def test_wrong_credentials_give_one_clear_line(s3: s3fs.S3FileSystem, monkeypatch: pytest.MonkeyPatch, prefect_server: None) -> None:
    s3.mkdir("private")
    s3.pipe_file("private/library/a.wav", b"RIFF")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    code, out, err = cli("run", "s3://private/library", "--store", "s3://private/store")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: access denied")
    assert "Traceback" not in out + err and "not-the-secret" not in out + err and KEY not in out + err


@pytest.mark.parametrize("store", ["s3://guarded/store", "s3://guarded"])
def test_wrong_credentials_for_a_store_on_s3_are_access_denied(
    store: str, s3: s3fs.S3FileSystem, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The store's bucket check meets the refusal (403) for verbs that write the store and for those that read it: it
    says so, not that the bucket or the store is missing; those are said only when they are (credentials that reach it)."""
    s3.makedirs("guarded", exist_ok=True)
    s3.pipe_file("guarded/store/features/inventory.parquet", b"PAR1")  # the store holds something
    found = [(["status", "--store", "s3://nobucket/store"], "error: the bucket nobucket of the store s3://nobucket/store does not exist"),
             (["query", "--store", "s3://guarded/nostore", "SELECT 1"], "error: store not found: s3://guarded/nostore (no object under it)")]
    for argv, line in found:
        assert cli(*argv) == (1, "", line + "\n")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    denied = f"error: access denied to the store {store} (bucket guarded): check the credentials\n"
    for argv in (["extract", str(tmp_path), "--store", store], ["status", "--store", store], ["query", "--store", store, "SELECT 1"]):
        assert cli(*argv) == (1, "", denied), argv


def test_pointer_swap_refuses_a_concurrent_change(s3: s3fs.S3FileSystem) -> None:
    s3.mkdir("swap")
    path = "swap/catalog/CURRENT.json"
    swap_bytes(s3, path, b'{"snapshot": "a"}', None)  # If-None-Match: created
    seen = version_token(s3, path)
    with pytest.raises(GenreBatchError, match="changed by another writer"):
        swap_bytes(s3, path, b'{"snapshot": "x"}', None)  # must not overwrite an existing pointer blindly
    swap_bytes(s3, path, b'{"snapshot": "b"}', seen)  # If-Match: our version is still there
    with pytest.raises(GenreBatchError, match="changed by another writer"):
        swap_bytes(s3, path, b'{"snapshot": "c"}', seen)  # someone (we) changed it since `seen`
    assert s3.cat_file(path) == b'{"snapshot": "b"}'


def test_workers_copying_the_same_index_file_at_once_both_get_it(s3: s3fs.S3FileSystem, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two list or routing tasks of one host fetch a snapshot's index file into the local cache at the same moment:
    each copy has its own name (the full suite failed when both used one `.tmp` name and the second rename found
    nothing)."""
    import threading

    from genre_batch.publishing import similar

    monkeypatch.setattr(similar.tempfile, "gettempdir", lambda: str(tmp_path))
    s3.mkdir("cache")
    s3.pipe_file("cache/catalog/snapshots/x/similar/cells.faiss", b"cells " * 1000)
    store = Store("s3://cache")
    both_inside = threading.Barrier(2)
    real = store.fs.get_file

    def get_file(path: str, local: str) -> None:
        real(path, local)
        both_inside.wait(10)  # each thread has its copy before either renames it

    monkeypatch.setattr(store.fs, "get_file", get_file)
    got, failed = [], []

    def fetch() -> None:
        try:
            got.append(similar.local_file(store, "snapshots/x/similar/cells.faiss"))
        except OSError as e:
            failed.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failed and len(got) == 2 and got[0] == got[1]
    assert Path(got[0]).read_bytes() == b"cells " * 1000
    assert [p.name for p in Path(got[0]).parent.iterdir()] == [Path(got[0]).name]  # no copy left behind


def test_the_local_cache_keeps_one_folder_per_snapshot_and_drops_idle_ones(s3: s3fs.S3FileSystem, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each night's snapshot has new index parts; their copies in a worker's temp folder go once idle for an hour,
    when another snapshot's first file is copied (before, every night's copies stayed)."""
    from genre_batch.publishing import similar

    monkeypatch.setattr(similar.tempfile, "gettempdir", lambda: str(tmp_path))
    s3.mkdir("nightly")
    for snapshot in ("a", "b", "c"):
        for name in ("cells.faiss", "index-00000.faiss"):
            s3.pipe_file(f"nightly/catalog/snapshots/{snapshot}/similar/{name}", f"{snapshot} {name}".encode())
    store = Store("s3://nightly")
    a = [similar.local_file(store, f"snapshots/a/similar/{n}") for n in ("cells.faiss", "index-00000.faiss")]
    b = similar.local_file(store, "snapshots/b/similar/cells.faiss")
    assert Path(a[0]).parent == Path(a[1]).parent != Path(b).parent and Path(a[1]).read_bytes() == b"a index-00000.faiss"
    root = tmp_path / "genre-batch-similar"
    (root / "0123.faiss").write_bytes(b"a copy of an earlier version")
    for stale in (Path(a[0]).parent, root / "0123.faiss"):
        os.utime(stale, (time.time() - 2 * similar.CACHE_IDLE_S,) * 2)
    assert similar.local_file(store, "snapshots/b/similar/index-00000.faiss")  # b's folder exists: nothing pruned
    assert Path(a[0]).exists()
    c = similar.local_file(store, "snapshots/c/similar/cells.faiss")  # a new snapshot's first copy: idle folders go
    assert sorted(p.name for p in root.iterdir()) == sorted([Path(b).parent.name, Path(c).parent.name])
    assert Path(c).read_bytes() == b"c cells.faiss"
