"""genre-batch: distributed batch genre tagging of music libraries."""

__version__ = "0.1.0"


class GenreBatchError(Exception):
    """An error the user can act on; the CLI prints it as one line, without a traceback."""


class UsageError(GenreBatchError):
    """An invocation that cannot work, found before anything starts; the CLI exits with status 2."""


def default_numba_cache_dir() -> str:
    """Where numba keeps librosa's compiled code when NUMBA_CACHE_DIR is unset (shared by CLI and local workers)."""
    import os.path

    return os.path.join(os.path.expanduser("~"), ".cache", "genre-batch", "numba")
