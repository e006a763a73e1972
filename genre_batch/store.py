"""The store: one fsspec URL holding everything the pipeline owns, with atomic writes."""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from genre_batch import GenreBatchError

RETRY_DEFAULTS = {"AWS_RETRY_MODE": "legacy", "AWS_MAX_ATTEMPTS": "5"}
"""botocore's retry settings for every S3 request of a run, unless set in the environment (to change them, set
these variables: they take precedence over retry_mode / max_attempts in ~/.aws/config).

Legacy mode retries HTTP 429, 500, 502, 503, 504 and 509 answers, throttling codes and connection errors, up to
5 attempts with jittered exponential backoff (random x 1, 2, 4, 8 s). Pinned because botocore already carries a
switch (AWS_NEW_RETRIES_2026) that makes `standard` the default (3 attempts), and standard mode does not retry
a 429 TooManyRequests answer. On top of this, s3fs retries a request that still ends in SlowDown up to 5 times.
"""


def use_retry_defaults() -> None:
    """Set RETRY_DEFAULTS where unset: botocore reads them when a client is created, and local workers inherit them."""
    for name, value in RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


use_retry_defaults()  # on import: before the flow process or a worker creates its first S3 client


@dataclass(frozen=True)
class Store:
    """Paths of the store layout under one root URL (local folder, s3://bucket/prefix, ...)."""

    url: str

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem the store lives on."""
        return fsspec.core.url_to_fs(self.url)[0]

    @cached_property
    def root(self) -> str:
        """The store root as a path of `fs`."""
        return fsspec.core.url_to_fs(self.url)[1].rstrip("/")

    def path(self, *parts: str) -> str:
        """A path inside the store."""
        return "/".join([self.root, *parts])

    @property
    def feature_parts(self) -> str:
        """Folder of immutable feature parts, one per extracted shard."""
        return self.path("features", "parts")

    @property
    def error_parts(self) -> str:
        """Folder of immutable error parts, one per shard that had failures."""
        return self.path("features", "errors")

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
    def runs(self) -> str:
        """Folder of run records."""
        return self.path("runs")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True when `fs` is the local disk."""
    return isinstance(fs, LocalFileSystem)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never a part."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
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


def version_token(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """What a conditional write compares: the ETag on object stores, None for a missing file or on disk."""
    if is_local(fs) or not fs.exists(path):
        return None
    return fs.info(path).get("ETag")


def swap_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, expected: str | None) -> None:
    """Replace a small file only if it is still the version read before (S3 If-Match / If-None-Match).

    On disk this is an atomic rename. On S3 the write is refused with a clear error when another writer
    changed the file in between; servers without conditional writes answer 501 and get a plain PUT.
    """
    from s3fs import S3FileSystem  # imported when needed: it costs 0.3 s of every CLI start

    if not isinstance(fs, S3FileSystem):
        write_bytes(fs, path, data)
        return
    bucket, key, _ = fs.split_path(path)
    condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as e:
        if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
            raise GenreBatchError(f"{fs.unstrip_protocol(path)} was changed by another writer during this run; nothing was switched") from None
        if "not implemented" not in str(e).lower():
            raise
        fs.pipe_file(path, data)
    fs.invalidate_cache(path)


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


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """Write an Arrow table as one Parquet file (row groups of `row_group_size` rows, else pyarrow's default), atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes(fs, path, buf.getvalue())


def read_table(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file."""
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write a JSON document atomically."""
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Read a JSON document."""
    with fs.open(path, "rb") as f:
        return json.load(f)


def list_files(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> list[str]:
    """Sorted paths of finished files with `suffix` directly in `folder` (temp files excluded)."""
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(suffix))
