"""S3 faults: throttling and 5xx answers are retried with backoff; what still fails is recorded per file.

A moto S3 server and a fault-injecting HTTP proxy in front of it run on 127.0.0.1 inside the test process;
the pipeline (its flow process and its Dask workers) talks to the proxy only. The transient-fault run (the first run
of the publish test) starts the CLI's own local cluster (its workers inherit `--endpoint-url`); the other runs use the
session's cluster, whose workers are given the AWS variables as an operator gives them to external workers (a cluster
start saved per run).
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import s3fs
from conftest import cli

KEY, SECRET = "genre-batch-fault-key", "genre-batch-fault-secret-0123456789"
S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    429: ("TooManyRequests", "Too many requests, please slow down."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}

Rule = Callable[[str, str, int], int | None]
"""Decides a request's fate from (method, path with query, earlier requests with that method and path):
an HTTP status to answer with an S3 error instead of forwarding, or None to forward it."""


@dataclass(frozen=True)
class Exchange:
    """One request the proxy saw and how it was answered."""

    method: str
    target: str
    status: int
    injected: bool


def key_of(target: str) -> str:
    """The object key of a request target (path without bucket and query); empty for bucket requests."""
    return unquote(urlsplit(target).path.lstrip("/").partition("/")[2])


def area(target: str) -> str:
    """The top folder of a request's key ("library", "store"), or "" for a bucket request such as a listing."""
    return key_of(target).partition("/")[0]


def error_body(status: int) -> bytes:
    """An S3 XML error document for a status."""
    code, message = S3_ERRORS[status]
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>fault-injected</RequestId></Error>"
    ).encode()


class FaultProxy:
    """An HTTP proxy to an S3 server that answers the requests its rule picks with S3 errors itself."""

    def __init__(self, upstream: str, rule: Rule, after: Rule | None = None):
        self.upstream = urlsplit(upstream).netloc
        self.rule, self.after = rule, after
        self.exchanges: list[Exchange] = []
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def decide(self, method: str, target: str) -> int | None:
        """The status to inject for a request, counting it."""
        with self._lock:
            earlier = self._seen[(method, target)]
            self._seen[(method, target)] += 1
            return self.rule(method, target, earlier)

    def lost_answer(self, method: str, target: str) -> int | None:
        """For a forwarded request, the error status to answer instead of the server's answer (the request was applied)."""
        with self._lock:
            return self.after(method, target, self._seen[(method, target)] - 1) if self.after else None

    def record(self, exchange: Exchange) -> None:
        """Log an answered request."""
        with self._lock:
            self.exchanges.append(exchange)

    def injected(self) -> list[Exchange]:
        """The requests answered with an injected fault."""
        return [e for e in self.exchanges if e.injected]

    def forwarded(self) -> list[Exchange]:
        """The requests the S3 server answered."""
        return [e for e in self.exchanges if not e.injected]

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving `proxy`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        timeout = 10  # idle client connections end, so no handler thread outlives the test for long

        def handle_one(self) -> None:
            """Answer one request: an injected error or the upstream server's answer."""
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = proxy.decide(self.command, self.path)
            if status is None:
                status = self.forward(body)
                proxy.record(Exchange(self.command, self.path, status, injected=False))
                return
            payload = b"" if self.command == "HEAD" else error_body(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            proxy.record(Exchange(self.command, self.path, status, injected=True))

        def forward(self, body: bytes) -> int:
            """Relay the request to the upstream server and its answer to the client; returns the status."""
            conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
            try:
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                answer = conn.getresponse()
                payload = answer.read()
            finally:
                conn.close()
            lost = proxy.lost_answer(self.command, self.path)
            if lost is not None:  # applied upstream, but the client hears an error
                self.send_response(lost)
                self.send_header("Content-Length", str(len(error_body(lost))))
                self.end_headers()
                self.wfile.write(error_body(lost))
                return lost
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            length = answer.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return answer.status

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_one

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the exchanges are recorded instead."""

    return Handler


@pytest.fixture
def direct(moto_url: str) -> s3fs.S3FileSystem:
    """A client of the S3 server that bypasses the proxy (to prepare a library)."""
    return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=moto_url, skip_instance_cache=True)


@pytest.fixture
def start_proxy(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Rule], FaultProxy]]:
    """Start a fault proxy with a rule and point the standard AWS variables at it (restored afterwards)."""
    proxies: list[FaultProxy] = []

    def start(rule: Rule, after: Rule | None = None) -> FaultProxy:
        proxy = FaultProxy(moto_url, rule, after)
        proxy.start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)  # the CLI's --endpoint-url sets it too: restored on exit
        s3fs.S3FileSystem.clear_instance_cache()
        return proxy

    try:
        yield start
    finally:
        for proxy in proxies:
            proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def upload_library(direct: s3fs.S3FileSystem, local: Path, bucket: str) -> list[str]:
    """Upload a local library to bucket/library; returns the URIs of its files."""
    direct.mkdir(bucket)
    direct.put(str(local), f"{bucket}/library", recursive=True)
    return sorted(f"s3://{bucket}/library/{p.relative_to(local).as_posix()}" for p in local.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Bucket:
    """A generated library uploaded to s3://NAME/library, and the fault proxy the pipeline reaches it through."""

    name: str
    uris: list[str]
    proxy: FaultProxy
    scheduler: str | None

    @property
    def library(self) -> str:
        return f"s3://{self.name}/library"

    @property
    def store(self) -> str:
        return f"s3://{self.name}/store"

    def run(self, local: bool = False) -> tuple[int, str, str]:
        """`genre-batch run` of the library into the store, with folder labels, through the proxy (on the bucket's
        scheduler, else, or when `local`, on the CLI's own local cluster)."""
        on = ["--scheduler", self.scheduler] if self.scheduler and not local else []
        return cli("--endpoint-url", self.proxy.url, "run", self.library, "--store", self.store, "--labels", "folders", "--features", "librosa", *on)


@pytest.fixture
def bucket(
    start_proxy: Callable[[Rule], FaultProxy],
    direct: s3fs.S3FileSystem,
    library_factory: Callable[..., Path],
    prefect_server: None,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Callable[..., Bucket]:
    """Upload a library of `per_style` clips per genre to a bucket and start a proxy with `rule` in front of the server.

    `max_attempts` sets AWS_MAX_ATTEMPTS, the variable operators set (restored afterwards): fewer attempts keep a test short.
    With `session_cluster` the runs use the session's Dask cluster, its workers given the same AWS variables.
    """

    def make(name: str, per_style: int, rule: Rule, max_attempts: int | None = None, session_cluster: bool = False) -> Bucket:
        scheduler = request.getfixturevalue("dask_scheduler") if session_cluster else None  # started before the env changes
        uris = upload_library(direct, library_factory(per_style=per_style), name)
        if max_attempts is not None:
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(max_attempts))
        proxy = start_proxy(rule)
        if session_cluster:
            request.getfixturevalue("session_workers")()  # the workers get this process's AWS_* variables
        return Bucket(name, uris, proxy, scheduler)

    return make


def run_records(direct: s3fs.S3FileSystem, store: str) -> list[dict]:
    """The run records of a store (bucket/prefix), oldest first."""
    direct.invalidate_cache()
    return [json.loads(direct.cat_file(path)) for path in sorted(direct.glob(f"{store}/runs/*Z-*.json"))]


def query(store: str, sql: str) -> list[dict]:
    """Rows of a query over the store's catalog and errors tables."""
    code, out, err = cli("query", "--store", store, "--format", "json", sql)
    assert code == 0, out + err
    return json.loads(out)


@dataclass
class TransientFaults:
    """Every n-th distinct request of each kind (method and area) fails once, then succeeds; statuses cycle 503 / 500 / 429."""

    n: int
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    injected: int = 0

    def __call__(self, method: str, target: str, earlier: int) -> int | None:
        """The status to inject, if any."""
        if earlier:
            return None
        kind = (method, area(target))
        self.seen[kind] += 1
        if (self.seen[kind] - 1) % self.n:
            return None
        self.injected += 1
        return list(S3_ERRORS)[(self.injected - 1) % len(S3_ERRORS)]


def persistent(faults: dict[str, tuple[int, set[str]]]) -> Rule:
    """Every request with one of the listed methods on a key under a listed prefix fails with that prefix's status."""

    def rule(method: str, target: str, earlier: int) -> int | None:
        for prefix, (status, methods) in faults.items():
            if key_of(target).startswith(prefix) and method in methods:
                return status
        return None

    return rule


def no_faults(method: str, target: str, earlier: int) -> int | None:
    """Forward every request."""
    return None


def test_persistent_faults_on_objects_are_recorded_per_file(bucket: Callable[..., Bucket]) -> None:
    broken = {
        "library/ambient/ambient-0-00.wav": (503, {"GET"}),  # throttled: SlowDown on every read
        "library/chiptune/chiptune-0-01.flac": (500, {"HEAD", "GET"}),  # server error on every request
        "library/electronic/electronic-0-02.ogg": (429, {"GET"}),  # TooManyRequests on every read
    }
    faulty = bucket("persistent", per_style=4, rule=persistent(broken), max_attempts=2, session_cluster=True)  # 3 tracks per genre remain to train on
    uris, proxy, store = faulty.uris, faulty.proxy, faulty.store

    code, out, err = faulty.run()

    assert code == 0, out + err
    assert "16 audio files in s3://persistent/library; 13 extracted, 3 failed" in out
    assert "errors: 3 files could not be processed" in out
    failed = [f"s3://persistent/{key}" for key in sorted(broken)]
    assert [r["uri"] for r in query(store, "SELECT uri FROM catalog ORDER BY uri")] == sorted(set(uris) - set(failed))
    errors = query(store, "SELECT uri, stage, error_type, message FROM errors ORDER BY uri")
    assert [(r["uri"], r["stage"], r["error_type"]) for r in errors] == [(uri, "decode", "io_error") for uri in failed]
    reasons = ["reduce your request rate", "Internal Server Error", "Too many requests"]  # the server's words, per file
    assert all(r["message"].startswith("cannot read file: ") and reason in r["message"] for r, reason in zip(errors, reasons))
    assert not any(KEY in text or SECRET in text for text in [out, err] + [r["message"] for r in errors])

    by_key = {key: [e for e in proxy.exchanges if key_of(e.target) == key] for key in broken}
    slow_down, internal, too_many = by_key.values()
    assert [e.status for e in slow_down if e.method == "HEAD"] == [200]  # opened; then every read was throttled,
    assert len(reads := [e for e in slow_down if e.method == "GET"]) % 10 == 0 and reads  # 2 botocore x 5 s3fs attempts each
    assert [(e.method, e.status) for e in internal] == [("HEAD", 500)] * 2  # 2 attempts, then the file failed
    assert len(reads := [e for e in too_many if e.method == "GET"]) % 2 == 0 and reads  # 2 botocore attempts each
    assert all(e.injected for e in slow_down + internal + too_many if e.method == "GET")


def test_transient_faults_are_retried_a_failed_publish_keeps_the_previous_catalog_and_a_rerun_finishes_the_work(
    bucket: Callable[..., Bucket],
    direct: s3fs.S3FileSystem,
    library_factory: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    session_workers: Callable[[], None],
) -> None:
    """The first run meets transient faults on the CLI's own local cluster; the next two, on the session's cluster,
    meet a throttled publish and then none (one test: the transient run is the publish test's first run)."""
    publish = bucket("publish", per_style=3, rule=TransientFaults(n=5), session_cluster=True)
    uris, proxy, store = publish.uris, publish.proxy, publish.store

    code, out, err = publish.run(local=True)

    assert code == 0, out + err
    assert "12 audio files in s3://publish/library; 12 extracted, 0 failed" in out
    assert [r["uri"] for r in query(store, "SELECT uri FROM catalog ORDER BY uri")] == uris
    assert query(store, "SELECT * FROM errors") == []
    injected = proxy.injected()
    answered = {(e.method, e.target) for e in proxy.forwarded() if e.status < 300 or (e.method, e.status) == ("HEAD", 404)}  # 404: the store's prefix is no object
    assert {(e.method, e.target) for e in injected} <= answered  # every fault was retried until the server answered
    assert {e.status for e in injected} == set(S3_ERRORS)
    kinds = Counter((e.method, area(e.target)) for e in injected)
    assert kinds[("HEAD", "library")] == kinds[("GET", "library")] == 3  # on the workers: 1st, 6th, 11th of 12 objects
    assert kinds[("GET", "")] and kinds[("GET", "store")] and kinds[("PUT", "store")]  # listings, store reads and writes

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fewer attempts keep the throttled publish short
    s3fs.S3FileSystem.clear_instance_cache()
    session_workers()
    published = {path: direct.cat_file(path) for path in direct.find("publish/store/catalog")}
    more = library_factory(per_style=1, name="more", seed=1, styles=("ambient", "chiptune"))
    for path in sorted(p for p in more.rglob("*") if p.is_file()):
        direct.put_file(str(path), f"publish/library/{path.relative_to(more).as_posix()}")
    added = sorted(f"s3://publish/library/{p.relative_to(more).as_posix()}" for p in more.rglob("*") if p.is_file())

    proxy.rule = persistent({"store/catalog/": (503, {"PUT"})})  # publishing is throttled for the whole run
    code, out, err = publish.run()

    assert code == 1
    assert err.strip().splitlines() == [err.strip()]  # one line, no traceback
    assert err.strip().startswith("error: object store error: ") and "reduce your request rate" in err
    assert "Traceback" not in out + err and KEY not in out + err and SECRET not in out + err
    assert {path: direct.cat_file(path) for path in direct.find("publish/store/catalog")} == published  # nothing half-written
    assert [r["uri"] for r in query(store, "SELECT uri FROM catalog ORDER BY uri")] == uris
    first, failed = run_records(direct, "publish/store")
    assert first["status"] == "completed" and failed["status"] == "failed" and "reduce your request rate" in failed["error"]

    proxy.rule = no_faults
    code, out, err = publish.run()

    assert code == 0, out + err
    assert "14 audio files in s3://publish/library; 0 extracted, 0 failed, 14 unchanged" in out  # extracted by the failed run
    assert "trained on the same labelled data" in out  # the model the failed run trained is kept
    assert [r["uri"] for r in query(store, "SELECT uri FROM catalog ORDER BY uri")] == sorted(uris + added)
    assert [r["status"] for r in run_records(direct, "publish/store")] == ["completed", "failed", "completed"]


def test_conditional_write_applied_but_answered_5xx_is_not_a_lost_race(
    start_proxy: Callable[..., FaultProxy], direct: s3fs.S3FileSystem
) -> None:
    """The first PUT of a pointer reaches the server but its answer is lost in a 500; botocore retries it, the server
    answers 412 (the object now exists), and the write is recognised as ours by reading it back."""
    from genre_batch.storage.store import ConflictError, swap_bytes

    direct.mkdir("pointers")
    proxy = start_proxy(lambda method, target, earlier: None, lambda method, target, earlier: 500 if method == "PUT" and earlier == 0 else None)
    fs = s3fs.S3FileSystem()
    swap_bytes(fs, "pointers/CURRENT.json", b'{"snapshot": "a"}', None)
    puts = [e.status for e in proxy.exchanges if e.method == "PUT"]
    assert puts == [500, 412] and direct.cat_file("pointers/CURRENT.json") == b'{"snapshot": "a"}'
    with pytest.raises(ConflictError, match="changed by another writer"):  # a real lost race is still one
        swap_bytes(fs, "pointers/CURRENT.json", b'{"snapshot": "b"}', None)
