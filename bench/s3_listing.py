"""Listing time of large prefixes on a local S3 server (SeaweedFS `weed mini`, as tests/test_s3.py starts it).

Objects are empty and named like audio files (`lib-<n>/a<folder>/t<track>.mp3`, folders of 1,000), created once per
prefix by a thread pool of botocore PUTs and kept with the server's data folder, so a re-run only lists.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import botocore.session
from botocore.config import Config

KEY, SECRET = "genre-batch-bench-key", "genre-batch-bench-secret-0123456789"
BUCKET = "music"
PUT_THREADS = 32
PORT = 18333
"""Fixed, so that the server's data folder is reused (SeaweedFS serves gRPC on PORT + 10000)."""


def port_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_http(url: str, timeout: float = 120.0) -> None:
    """Wait until something answers HTTP at url."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answered at {url} within {timeout} s")


@contextmanager
def weed_server(data: Path) -> Iterator[str]:
    """A SeaweedFS S3 endpoint on 127.0.0.1:PORT with the bench's keys; stopped when the block ends."""
    if not (port_free(PORT) and port_free(PORT + 10000)):
        raise RuntimeError(f"port {PORT} or {PORT + 10000} is taken: is another bench's weed server running?")
    data.mkdir(parents=True, exist_ok=True)
    weed = Path(sys.executable).parent / "weed"
    with open(data / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            [str(weed), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={PORT}", "-admin.ui=false"],
            env={**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{PORT}/")
            yield f"http://127.0.0.1:{PORT}"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def client_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point botocore and s3fs at the server."""
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


def s3_client(endpoint: str):  # noqa: ANN201 (botocore clients are generated classes)
    """A botocore S3 client with a connection pool as large as the thread pool."""
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1",
        config=Config(max_pool_connections=PUT_THREADS, retries={"mode": "legacy", "max_attempts": 5}),
    )


def key_of(prefix: str, i: int) -> str:
    """The key of object i of a prefix."""
    return f"{prefix}/a{i // 1000:05d}/t{i:07d}.mp3"


def populate(endpoint: str, prefix: str, n: int) -> dict:
    """Create the n objects of a prefix unless a marker says they exist; returns PUT time and rate."""
    client = s3_client(endpoint)
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    marker = f"{prefix}/.complete"
    try:
        client.head_object(Bucket=BUCKET, Key=marker)
        return {"objects": n, "put": "cached"}
    except client.exceptions.ClientError:
        pass
    started = time.perf_counter()
    with ThreadPoolExecutor(PUT_THREADS) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=BUCKET, Key=key_of(prefix, i), Body=b""), range(n), chunksize=256))
    seconds = time.perf_counter() - started
    client.put_object(Bucket=BUCKET, Key=marker, Body=b"")  # hidden name: discovery skips it
    return {"objects": n, "put_s": round(seconds, 1), "puts_per_s": round(n / seconds)}
