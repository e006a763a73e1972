"""genre-batch: distributed batch genre tagging of music libraries."""

__version__ = "0.1.0"


class GenreBatchError(Exception):
    """An error the user can act on; the CLI prints it as one line, without a traceback."""
