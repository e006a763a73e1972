"""Discovery: list a library's audio files with the fingerprints that detect changes."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa

from genre_batch import GenreBatchError
from genre_batch.storage.locations import is_utf8, local_path, printable
from genre_batch.storage.store import is_local, is_s3

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

LIST_BATCH = 50_000


@dataclass(frozen=True)
class Unlisted:
    """A folder or file of a library that the listing skipped, and why: what the previous listing had there is neither
    new nor removed."""

    path: str
    reason: str
    unreadable: bool = True
    """A folder that exists but could not be read: what the previous listing had under it is kept. False for a name
    that is not UTF-8, which no listing ever had."""

AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".m4a", ".mp4", ".aac", ".wma"}
)
"""Extensions of the files a listing picks up (lower case): every format analysis.audio decodes. Defined here, not
in analysis.audio, so that discovery and the inventory's readers (status, plan) never import PyAV or libsndfile."""


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


def local_listing(root: str, unlisted: list[Unlisted]) -> Iterator[tuple[str, int, str]]:
    """(path, size, version) of the files under a local folder, one folder at a time.

    A symbolic link to a file counts as that file, with the size and mtime of its target; a broken or looping link
    is kept (size 0), so that reading it records an error. Links to folders are not followed: no cycle, no duplicate.
    A folder under the root that cannot be read (permissions, a stale mount), and a file or folder whose name is not
    valid UTF-8 (URIs are UTF-8 in every table), are added to `unlisted` and skipped; an unreadable root is an error.
    """
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = os.scandir(folder)
        except FileNotFoundError:  # removed (or renamed) while the listing ran: gone, as its files are
            continue
        except OSError as e:
            if folder == root:
                raise GenreBatchError(f"cannot list the library folder {root}: {e.strerror or type(e).__name__}") from None
            unlisted.append(Unlisted(folder, e.strerror or type(e).__name__))
            continue
        with entries:
            for entry in entries:
                if not is_utf8(entry.name):
                    if entry.is_dir(follow_symlinks=False) or is_audio_path(entry.path):
                        unlisted.append(Unlisted(printable(entry.path), "its name is not valid UTF-8: rename it", unreadable=False))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif is_audio_path(entry.path):
                    found = local_file(entry)
                    if found is not None:
                        yield found


def local_file(entry: os.DirEntry) -> tuple[str, int, str] | None:
    """(path, size, version) of a listed file or link to a file; None for links to folders, pipes and the like."""
    if entry.is_symlink():
        try:
            target = os.stat(entry.path)
        except OSError:
            return entry.path, 0, repr(entry.stat(follow_symlinks=False).st_mtime)
        return (entry.path, target.st_size, repr(target.st_mtime)) if stat.S_ISREG(target.st_mode) else None
    if not entry.is_file(follow_symlinks=False):
        return None
    info = entry.stat(follow_symlinks=False)
    return entry.path, info.st_size, repr(info.st_mtime)


def s3_listing(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int, str]]:
    """(path, size, ETag) of the objects under a bucket prefix, one page of 1,000 at a time."""
    bucket, _, prefix = root.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/") and is_audio_path(obj["Key"]):
                yield f"{bucket}/{obj['Key']}", int(obj.get("Size") or 0), str(obj.get("ETag", "")).strip('"')
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def walk_listing(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int, str]]:
    """(path, size, version) of the files under a folder of any other filesystem, one folder at a time."""
    for _, _, files in fs.walk(root, detail=True):
        for info in files.values():
            if info.get("type") == "file" and is_audio_path(info["name"]):
                yield info["name"], int(info.get("size") or 0), file_version(info)


def listing(fs: fsspec.AbstractFileSystem, root: str, unlisted: list[Unlisted]) -> Iterator[tuple[str, int, str]]:
    """(path, size, version) of every audio file under a library root, streamed; local folders that cannot be read go
    to `unlisted` (an object store's listing fails as a whole)."""
    if is_local(fs):
        return local_listing(root, unlisted)
    if is_s3(fs):
        return s3_listing(fs, root)
    return walk_listing(fs, root)


def inventory_batch(fs: fsspec.AbstractFileSystem, rows: list[tuple[str, int, str]]) -> pa.Table:
    """Inventory rows of listed files."""
    uris = [uri_of(fs, path) for path, _, _ in rows]
    return pa.table(
        {
            "uri": uris,
            "track_id": [track_id(u) for u in uris],
            "fingerprint": [fingerprint(size, version) for _, size, version in rows],
            "size": [size for _, size, _ in rows],
            "version": [version for _, _, version in rows],
        },
        schema=INVENTORY_SCHEMA,
    )


def is_folder(location: str) -> bool:
    """A local folder, or a URL (not http) without an audio file's extension that is a prefix of an object store (one
    request): named audio files cost no request."""
    local = local_path(location)
    if local is not None:
        return os.path.isdir(local)
    if is_audio_path(location) or location.startswith(("http://", "https://")):  # a web page is no folder
        return False
    fs, path = fsspec.core.url_to_fs(location)
    return fs.isdir(path.rstrip("/"))


def files_of(locations: list[str]) -> tuple[list[str], list[str]]:
    """The files named, a folder or prefix standing for the audio files under it (in URI order, as `discover` lists
    them), and what the listings of those folders skipped ("path: reason")."""
    uris: list[str] = []
    skipped: list[str] = []
    for location in locations:
        if is_folder(location):
            listed = discover(location)
            uris += listed["uri"].to_pylist()
            skipped += unlisted_text(listed)
        else:
            uris.append(location)
    return uris, skipped


def discover(library: str) -> pa.Table:
    """List every audio file under a library URL, sorted by URI, with size, version and fingerprint.

    The listing is streamed and turned into Arrow in batches of LIST_BATCH files: no process holds more than the
    inventory table itself (about 150 bytes per file)."""
    fs, root = library_root(library)
    fs.invalidate_cache(root)
    tables, rows, unreadable = [], [], []
    for row in listing(fs, root, unreadable):
        rows.append(row)
        if len(rows) == LIST_BATCH:
            tables.append(inventory_batch(fs, rows))
            rows = []
    tables.append(inventory_batch(fs, rows))
    meta = {"library": uri_of(fs, root), "unlisted": json.dumps([[u.path, u.reason, u.unreadable] for u in unreadable])}
    return pa.concat_tables(tables).sort_by("uri").replace_schema_metadata(meta)


def unlisted(inventory: pa.Table) -> list[Unlisted]:
    """What a listing skipped (recorded in its metadata by `discover`)."""
    return [Unlisted(*pair) for pair in json.loads((inventory.schema.metadata or {}).get(b"unlisted", b"[]"))]


def unlisted_text(inventory: pa.Table) -> list[str]:
    """What a listing skipped, "path: reason"."""
    return [f"{u.path}: {u.reason}" for u in unlisted(inventory)]
