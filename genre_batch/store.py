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


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write an Arrow table as one Parquet file, atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
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
