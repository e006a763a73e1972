"""Locations: local paths and URLs told apart without fsspec or pyarrow (the CLI's checks use them before any import)."""

from __future__ import annotations

import os
from pathlib import Path

LOCAL_PROTOCOLS = ("file://", "local://")
"""URL prefixes of the local disk (fsspec's LocalFileSystem); a location without "://" is a local path too."""


def local_path(url: str) -> str | None:
    """The absolute path of a local path or file:// URL; None for a URL of another filesystem."""
    for prefix in LOCAL_PROTOCOLS:
        if url.startswith(prefix):
            return os.path.abspath(os.path.expanduser(url.removeprefix(prefix)))
    return None if "://" in url else os.path.abspath(os.path.expanduser(url))


def is_url(location: str) -> bool:
    """True for a URL of a filesystem other than the local disk (a path on another system)."""
    return local_path(location) is None


def absolute(url: str) -> str:
    """A local path made absolute, links resolved (workers may run elsewhere); URLs unchanged. A link loop or a broken
    link is left as named: reading it is the error, and the error names the path given, not a missing target."""
    if "://" in url:
        return url
    given = Path(url).expanduser()
    try:
        resolved = given.resolve()  # links first, then "..", as the OS reads the path
        if resolved.exists() or not os.path.lexists(given):
            return str(resolved)
    except (RuntimeError, OSError):  # a symbolic link loop
        pass
    return str(given.absolute().parent.resolve() / given.name)


def is_utf8(name: str) -> bool:
    """True for a path or file name that is valid UTF-8 (os.scandir and sys.argv keep other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """A path whose bytes are not all UTF-8, with those bytes written as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
