"""Discovery: list a library's audio files with the fingerprints that detect changes."""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat

import fsspec
import pyarrow as pa

from genre_batch import GenreBatchError
from genre_batch.audio import AUDIO_EXTENSIONS
from genre_batch.store import is_local

INVENTORY_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("track_id", pa.string()),
        ("fingerprint", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
    ]
)
"""One row per audio file found: `version` is the ETag on object stores, the mtime on disks."""


def track_id(uri: str) -> str:
    """Stable id of a track: a hash of its URI."""
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def fingerprint(size: int, version: str) -> str:
    """Change detector of a file: a hash of its size and its ETag or mtime."""
    return hashlib.sha1(f"{size}:{version}".encode()).hexdigest()[:16]


def file_version(info: dict) -> str:
    """The ETag of an object, else the modification time of a file."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return repr(info.get("mtime") or info.get("LastModified") or info.get("last_modified") or "")


def is_audio_path(path: str) -> bool:
    """True for a visible file whose extension names an audio format."""
    name = posixpath.basename(path)
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in AUDIO_EXTENSIONS


def uri_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI stored for a file: an absolute path on local disk, protocol://path elsewhere."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def library_root(library: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a library URL, checked to exist."""
    fs, root = fsspec.core.url_to_fs(library)
    root = root.rstrip("/") or "/"
    if not fs.isdir(root):
        raise GenreBatchError(f"library not found or not a folder: {library}")
    return fs, root


def files_of(found: dict[str, dict]) -> dict[str, dict]:
    """The files of a listing: regular files, and local symbolic links to files (which fsspec lists as "other").

    A link to a file counts as that file, with the size and mtime of its target. A broken or looping link is
    kept as listed, so that reading it records an error. Links to folders are not followed: no cycle, no duplicate.
    """
    files = {}
    for path, info in found.items():
        if info.get("type") == "file":
            files[path] = info
        elif info.get("islink"):
            target = link_target(path, info)
            if target is not None:
                files[path] = target
    return files


def link_target(path: str, info: dict) -> dict | None:
    """The listing entry of a local link to a file: its target's size and mtime, or as listed if broken or looping;
    None when it points to something else (a folder, a pipe)."""
    try:
        target = os.stat(path)
    except OSError:
        return info
    return {**info, "size": target.st_size, "mtime": target.st_mtime} if stat.S_ISREG(target.st_mode) else None


def discover(library: str) -> pa.Table:
    """List every audio file under a library URL, sorted by URI, with size, version and fingerprint."""
    fs, root = library_root(library)
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    rows = sorted(
        (uri_of(fs, path), int(info.get("size") or 0), file_version(info))
        for path, info in files_of(found).items()
        if is_audio_path(path)
    )
    uris = [r[0] for r in rows]
    return pa.table(
        {
            "uri": uris,
            "track_id": [track_id(u) for u in uris],
            "fingerprint": [fingerprint(size, version) for _, size, version in rows],
            "size": [r[1] for r in rows],
            "version": [r[2] for r in rows],
        },
        schema=INVENTORY_SCHEMA,
    ).replace_schema_metadata({"library": uri_of(fs, root)})
