"""genre-batch: distributed batch genre tagging of music libraries."""

__version__ = "0.1.0"


class GenreBatchError(Exception):
    """An error the user can act on; the CLI prints it as one line, without a traceback, and exits with `exit_code`."""

    exit_code = 1


class FileError(Exception):
    """One file a run cannot handle; `kind` is the short machine-readable reason its error record carries."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class NoModel(GenreBatchError):
    """A run kept its extraction but has no model to tag with (none was ever promoted, or the gate refused the new one)."""

    exit_code = 4


class PublishRefused(GenreBatchError):
    """A guard kept the previous catalog: the listing shrank, or a new model flips too many genres (see --force)."""

    exit_code = 5


class UsageError(GenreBatchError):
    """An invocation that cannot work, found before anything starts; the CLI exits with status 2."""

    exit_code = 2


def default_numba_cache_dir() -> str:
    """Where numba keeps librosa's compiled code when NUMBA_CACHE_DIR is unset (shared by CLI and local workers)."""
    import os.path

    return os.path.join(os.path.expanduser("~"), ".cache", "genre-batch", "numba")
