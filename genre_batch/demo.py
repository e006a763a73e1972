"""Demo library: synthetic styles, some files carrying a genre tag, some not, one corrupt file."""

from __future__ import annotations

from pathlib import Path

from genre_batch.analysis.audio import SAMPLE_RATE
from genre_batch.library.synth import STYLES, render, write_audio

TAGGED_PER_STYLE = 10
UNTAGGED_PER_STYLE = 3
SECONDS = 8.0
TAGGED_FORMATS = ("flac", "mp3", "ogg", "m4a")
UNTAGGED_FORMATS = ("wav", "aiff", "opus")
CORRUPT_NAME = "broken.mp3"

EXAMPLE_QUERIES: tuple[tuple[str, str], ...] = (
    ("Genres in the catalog:", "SELECT genre, count(*) AS tracks, round(avg(confidence), 2) AS mean_confidence FROM catalog GROUP BY genre ORDER BY genre"),
    (
        "Untagged files, with the genre the model gave them (their names tell the style they were made in):",
        "SELECT regexp_extract(uri, '[^/]+$') AS file, genre, round(confidence, 2) AS confidence FROM catalog WHERE embedded_genre IS NULL ORDER BY file",
    ),
    ("Files that could not be processed:", "SELECT uri, error_type, message FROM errors"),
)


def describe() -> str:
    """One line saying what the demo library holds."""
    return (
        f"{len(STYLES)} styles ({', '.join(STYLES)}): {TAGGED_PER_STYLE} tagged and {UNTAGGED_PER_STYLE} untagged "
        f"{SECONDS:.0f} s files each, and 1 corrupt file"
    )


def write_once(path: Path, style: str, seed: int, tags: dict[str, str] | None) -> None:
    """Write a demo file unless it exists (a re-run leaves the library unchanged)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(path, render(style, SECONDS, seed), SAMPLE_RATE, tags)


def build(directory: Path) -> tuple[Path, Path]:
    """Create (or complete) the demo library under `directory`; returns (library, store) paths."""
    library = directory / "library"
    for s, style in enumerate(STYLES):
        for i in range(TAGGED_PER_STYLE):
            ext = TAGGED_FORMATS[i % len(TAGGED_FORMATS)]
            tags = {"genre": style, "artist": f"{style} artist {i % 3}", "album": f"{style} album {i % 2}"}
            write_once(library / "tagged" / f"{style}-{i:02d}.{ext}", style, 1000 * s + i, tags)
        for i in range(UNTAGGED_PER_STYLE):
            ext = UNTAGGED_FORMATS[i % len(UNTAGGED_FORMATS)]
            write_once(library / "inbox" / f"{style}-{i:02d}.{ext}", style, 1000 * s + 500 + i, None)
    corrupt = library / "inbox" / CORRUPT_NAME
    if not corrupt.exists():
        corrupt.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 16)
    return library, directory / "store"
