"""The store: one fsspec URL holding everything the pipeline owns, its layout, and its atomic and conditional writes.

fsspec and pyarrow are imported where they are used: a local store's small reads (`exists`, `read_json`, `open`) go
through Python's own file API, so that the read verbs (`query`, `similar`) on a local store never load fsspec, whose
import scans every installed package's entry points (0.1-0.15 s CPU of a CLI start).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any, TypeVar

from genre_batch import GenreBatchError
from genre_batch.storage.locations import absolute, local_path

if TYPE_CHECKING:
    import fsspec
    import pyarrow as pa

T = TypeVar("T")
RETRY_DEFAULTS = {"AWS_RETRY_MODE": "legacy", "AWS_MAX_ATTEMPTS": "5"}
"""botocore's retry settings for every S3 request of a run, unless set in the environment (to change them, set
these variables: they take precedence over retry_mode / max_attempts in ~/.aws/config).

Legacy mode retries HTTP 429, 500, 502, 503, 504 and 509 answers, throttling codes and connection errors, up to
5 attempts with jittered exponential backoff (random x 1, 2, 4, 8 s). Pinned because botocore already carries a
switch (AWS_NEW_RETRIES_2026) that makes `standard` the default (3 attempts), and standard mode does not retry
a 429 TooManyRequests answer. On top of this, s3fs retries a request that still ends in SlowDown up to 5 times.
"""

POINTER = "CURRENT.json"
"""Name of the catalog's pointer file: which snapshot readers see (genre_batch.publishing.catalog writes it)."""

TEMP_MARK = ".tmp-"
"""Infix of the temporary file an atomic local write renames into place; a kill mid-write can leave one behind."""


def use_retry_defaults() -> None:
    """Set RETRY_DEFAULTS where unset: botocore reads them when a client is created, and local workers inherit them."""
    for name, value in RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


use_retry_defaults()  # on import: before the flow process or a worker creates its first S3 client


class ConflictError(GenreBatchError):
    """A conditional write found that another writer changed the file since it was read."""


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True when `fs` is the local disk."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """True when `fs` speaks the S3 API (which has conditional writes)."""
    return "s3" in fs.protocol if isinstance(fs.protocol, tuple) else fs.protocol in ("s3", "s3a")


def file_system(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of one file's URI (protocol://path, or a local path), taken literally: fsspec's URL
    parsing reads a '::' in a file's name as a chain of filesystems."""
    import fsspec

    protocol, path = fsspec.core.split_protocol(uri)
    return fsspec.filesystem(protocol or "file"), path


@dataclass(frozen=True)
class Store:
    """The store under one root URL (local folder, s3://bucket/prefix): its layout and its reads and writes."""

    url: str

    @classmethod
    def at(cls, url: str) -> Store:
        """The store at a URL or local path (made absolute, so that workers elsewhere find the same folder)."""
        return cls(absolute(url))

    @cached_property
    def local(self) -> bool:
        """True when the store is a folder of the local disk."""
        return local_path(self.url) is not None

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem the store lives on."""
        import fsspec

        return fsspec.core.url_to_fs(self.url)[0]

    @cached_property
    def root(self) -> str:
        """The store root as a path of `fs` (found without fsspec for a local store)."""
        local = local_path(self.url)
        if local is not None:
            return local
        import fsspec

        return fsspec.core.url_to_fs(self.url)[1].rstrip("/")

    def path(self, *parts: str) -> str:
        """A path inside the store."""
        return "/".join([self.root, *parts])

    def uri(self, path: str) -> str:
        """The URL of a path of the store (for messages)."""
        return path if self.local else self.fs.unstrip_protocol(path)

    @property
    def features(self) -> str:
        """Folder of the feature store (parts, track index, inventory)."""
        return self.path("features")

    @property
    def feature_parts(self) -> str:
        """Folder of immutable feature parts of the librosa family."""
        return self.path("features", "parts")

    @property
    def error_parts(self) -> str:
        """Folder of error parts written before the track index existed (read once, when the index is built)."""
        return self.path("features", "errors")

    @property
    def index(self) -> str:
        """Folder of the track index: one small Parquet file per part (and per compaction)."""
        return self.path("features", "index")

    @property
    def inventory(self) -> str:
        """The library listing of the last completed extraction."""
        return self.path("features", "inventory.parquet")

    @property
    def models(self) -> str:
        """Folder of registered models."""
        return self.path("models")

    @property
    def catalog(self) -> str:
        """Folder of catalog snapshots and the CURRENT pointer."""
        return self.path("catalog")

    @property
    def pointer(self) -> str:
        """The catalog's pointer file (CURRENT.json): the published snapshot's files, vector space and lists."""
        return self.path("catalog", POINTER)

    @property
    def runs(self) -> str:
        """Folder of run records."""
        return self.path("runs")

    @property
    def evaluations(self) -> str:
        """Folder of evaluation reports."""
        return self.path("evaluations")

    def exists(self, path: str) -> bool:
        """True when a file or folder exists."""
        return os.path.exists(path) if self.local else self.fs.exists(path)

    def open(self, path: str) -> IO[bytes]:
        """A file of the store opened for reading (binary)."""
        return open(path, "rb") if self.local else self.fs.open(path, "rb")

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically: readers see the old file or the new one, never a part."""
        write_bytes(self.fs, path, data)

    def write_table(self, path: str, table: pa.Table, row_group_size: int | None = None, options: dict | None = None) -> None:
        """Write an Arrow table as one Parquet file, atomically (`options`: Parquet writer options over zstd)."""
        write_table(self.fs, path, table, row_group_size, options)

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file (on disk memory-mapped: files are immutable, replaced by rename; a Python file object
        made Arrow copy the whole file into its heap first, ~3x the page faults of a 70 MB catalog file's read)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if self.local:
                return pq.read_table(pa.memory_map(path), columns=columns)
            with self.open(path) as f:
                return pq.read_table(f, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            if not damaged(e):
                raise
            raise GenreBatchError(f"damaged Parquet file in the store: {self.uri(path)} ({str(e).splitlines()[0]}); see the README, Reliability") from None

    @contextmanager
    def naming_damage(self, files: list[str]) -> Iterator[None]:
        """Around a dataset's read of `files`: a damaged file becomes the error `read_table` gives, naming it (the
        files are read again one by one to find it)."""
        import pyarrow as pa

        try:
            yield
        except (pa.ArrowInvalid, OSError) as e:
            if not damaged(e):
                raise
            for path in files:
                self.read_table(path)
            raise GenreBatchError(f"damaged Parquet file in the store, among {len(files)} files ({str(e).splitlines()[0]})") from None

    def parquet_schema(self, path: str) -> pa.Schema:
        """The schema and metadata of a Parquet file (its footer only)."""
        import pyarrow.parquet as pq

        with self.open(path) as f:
            return pq.read_schema(f)

    def parquet_rows(self, path: str) -> int:
        """The row count of a Parquet file (its footer only)."""
        import pyarrow.parquet as pq

        with self.open(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def write_json(self, path: str, obj: Any) -> None:
        """Write a JSON document atomically."""
        write_json(self.fs, path, obj)

    def read_json(self, path: str) -> Any:
        """Read a JSON document; a damaged one is an error naming it."""
        with self.open(path) as f:
            try:
                return json.load(f)
            except ValueError as e:
                raise GenreBatchError(f"damaged JSON file in the store: {self.uri(path)} ({e})") from None

    def read_parsed(self, path: str, parse: Callable[[Any], T]) -> T:
        """Read a JSON document into the object `parse` makes of it; a damaged one (unparsable, a field missing or of
        the wrong type) is an error naming it."""
        document = self.read_json(path)
        if not isinstance(document, dict):
            raise GenreBatchError(f"damaged JSON file in the store: {self.uri(path)} (not an object)")
        try:
            return parse(document)
        except KeyError as e:
            raise GenreBatchError(f"damaged JSON file in the store: {self.uri(path)} (no field {e})") from None
        except (TypeError, ValueError) as e:  # a field of the wrong type or form (a date that is not ISO 8601)
            raise GenreBatchError(f"damaged JSON file in the store: {self.uri(path)} ({e})") from None

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Sorted paths of finished files with `suffix` directly in `folder` (temporary files excluded)."""
        return list_files(self.fs, folder, suffix)

    def delete(self, paths: list[str]) -> None:
        """Delete files (missing ones are fine)."""
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

    def version_token(self, path: str) -> str | None:
        """What a conditional write of `path` compares: None when the file is missing."""
        return version_token(self.fs, path)

    def swap(self, path: str, data: bytes, expected: str | None) -> None:
        """Replace a small file only if it is still the version `expected` (None: only if missing); else ConflictError."""
        swap_bytes(self.fs, path, data, expected)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never a part."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)  # one PUT: object stores make it visible whole or not at all


def content_token(data: bytes) -> str:
    """The version token of a local file: a hash of its content."""
    return hashlib.sha1(data).hexdigest()


def version_token(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """What a conditional write compares: the ETag on S3, a content hash on disk; None for a missing file."""
    try:
        if is_local(fs):
            with open(path, "rb") as f:
                return content_token(f.read())
        fs.invalidate_cache(path)
        return fs.info(path).get("ETag")
    except FileNotFoundError:
        return None


@contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive flock on `path`.lock for a read-compare-write on local disk (released if the process dies)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def s3_error_code(e: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind an s3fs error (('', 0) when it is not an S3 answer)."""
    from botocore.exceptions import ClientError

    cause = e if isinstance(e, ClientError) else e.__cause__
    if not isinstance(cause, ClientError):
        return "", 0
    return cause.response.get("Error", {}).get("Code", ""), int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def swap_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, expected: str | None) -> None:
    """Replace a small file only if it is still the version read before; ConflictError when another writer changed it.

    On disk: compare-and-rename under an exclusive flock. On S3: one PUT with If-Match / If-None-Match; a PUT that
    was applied but answered an error (a 5xx after the retries) is recognised by reading the object back. Backends
    without conditional writes (and S3 servers answering 501) are refused: a plain write could lose a race.
    """
    where = path if is_local(fs) else fs.unstrip_protocol(path)
    if is_local(fs):
        with locked(path):
            if version_token(fs, path) != expected:
                raise ConflictError(f"{where} was changed by another writer during this run; nothing was switched")
            write_bytes(fs, path, data)
        return
    if not is_s3(fs):
        raise GenreBatchError(f"{where}: the {fs.protocol} backend has no conditional writes; use a local folder or s3:// for the store")
    bucket, key, _ = fs.split_path(path)
    condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as e:
        code, status = s3_error_code(e)
        if code == "NotImplemented" or status == 501:
            raise GenreBatchError(f"{where}: the S3 server does not support conditional writes (If-Match), which the store needs") from None
        if not applied(fs, path, data):  # a 5xx may hide a PUT that went through: it is ours if the content is
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise ConflictError(f"{where} was changed by another writer during this run; nothing was switched") from None
            raise
    fs.invalidate_cache(path)


def applied(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """True when the object at `path` holds exactly `data` (a write answered with an error went through)."""
    fs.invalidate_cache(path)
    try:
        return fs.cat_file(path) == data
    except OSError:
        return False


def damaged(e: BaseException) -> bool:
    """True for a Parquet read error that means a damaged file: pyarrow's ArrowInvalid (no footer, truncated) or its
    own OSError, which carries no errno (a corrupt page or footer); the OS's and s3fs's errors carry one, or are a
    missing or forbidden file."""
    import pyarrow as pa

    return isinstance(e, pa.ArrowInvalid) or (isinstance(e, OSError) and e.errno is None and not isinstance(e, FileNotFoundError | PermissionError))


def storage_error(e: BaseException) -> str | None:
    """A one-line explanation of a storage access failure (never containing credentials), else None."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return "no AWS credentials found (looked in the standard chain: environment, profile, instance role)"
    if isinstance(e, PermissionError):
        return f"access denied: {e.strerror or e}"
    if isinstance(e, BotoCoreError):
        return f"object store error: {e}"
    if isinstance(e, OSError) and isinstance(e.__cause__, ClientError):  # s3fs's translation of an S3 error answer
        return f"object store error: {e.__cause__}"
    return None


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, row_group_size: int | None = None,
                options: dict | None = None) -> None:
    """Write an Arrow table as one Parquet file (row groups of `row_group_size` rows, else pyarrow's default), atomically;
    every column zstd-compressed unless `options` (pyarrow.parquet.write_table keywords) say otherwise."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, **{"compression": "zstd", **(options or {})})
    write_bytes(fs, path, buf.getvalue())


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write a JSON document atomically."""
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def list_files(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> list[str]:
    """Sorted paths of finished files with `suffix` directly in `folder` (temp files excluded)."""
    fs.invalidate_cache(folder)
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in names if p.endswith(suffix) and TEMP_MARK not in p.rsplit("/", 1)[-1])
