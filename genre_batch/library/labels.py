"""Labels: the genre of each training track, from folders, embedded tags or a CSV/Parquet file."""

from __future__ import annotations

import posixpath
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genre_batch import GenreBatchError

LABELS_SCHEMA = pa.schema([("uri", pa.string()), ("genre", pa.string())])
FILE_COLUMNS = ("file", "uri", "path")
GENRE_COLUMNS = ("genre", "label")


UNKNOWN = "unknown"
"""The catalog's genre of a track the model abstained on: never a label, so a tag, folder or labels file saying
'Unknown' (mutagen reads ID3 genre 255 so) gives none, and the model never has a class of that name."""


def canonical(genre: str) -> str:
    """A genre name as the catalog writes it: trimmed, inner spaces single, lower-case."""
    return " ".join(genre.split()).casefold()


def normalise(genre: str | None) -> str | None:
    """Canonical genre name of a label: `canonical`; None for blanks and UNKNOWN."""
    if genre is None:
        return None
    genre = canonical(genre)
    return None if genre in ("", UNKNOWN) else genre


TAG_SEPARATORS = re.compile("[;\x00]")
"""What separates the values of one genre tag holding several (`Rock; Pop`: Picard, foobar2000 and MusicBrainz join
them with `; `; a NUL is ID3v2.4's separator). A `/` is not one: `R&B/Soul` is one genre."""


def tag_genre(tag: str | None) -> str | None:
    """The genre a file's genre tag names: its first value that is a genre (normalised), where it holds several."""
    return next((g for g in map(normalise, TAG_SEPARATORS.split(tag)) if g), None) if tag is not None else None


def label_source(spec: str) -> str:
    """A stable description of a label spec, stored with the model."""
    return spec if spec in ("folders", "tags") else f"file:{posixpath.basename(spec)}"


def from_folders(tracks: pa.Table, library: str) -> pa.Table:
    """Genre = name of the parent folder, for tracks inside a sub-folder of the library (not one named 'Unknown')."""
    prefix = library.rstrip("/") + "/"
    rows = []
    for uri in tracks["uri"].to_pylist():
        relative = uri[len(prefix):] if uri.startswith(prefix) else None
        genre = normalise(posixpath.basename(posixpath.dirname(relative))) if relative and "/" in relative else None
        if genre:
            rows.append({"uri": uri, "genre": genre})
    return pa.Table.from_pylist(rows, schema=LABELS_SCHEMA)


def without_written(tracks: pa.Table, written: pa.Table | None) -> pa.Table:
    """Tracks (index rows) with the genre tag cleared where genre-batch wrote it: `written` holds the (uri, fingerprint)
    of those file contents (the writes table). A prediction written back is neither a label nor a disagreement."""
    if written is None or written.num_rows == 0 or tracks.num_rows == 0:
        return tracks
    ours = pc.is_in(pc.binary_join_element_wise(tracks["uri"], tracks["fingerprint"], "\x00"),
                    value_set=pc.binary_join_element_wise(written["uri"], written["fingerprint"], "\x00").combine_chunks())
    cleared = pc.if_else(ours, pa.scalar(None, pa.string()), tracks["tag_genre"])
    return tracks.set_column(tracks.schema.get_field_index("tag_genre"), "tag_genre", cleared)


def from_tags(tracks: pa.Table) -> pa.Table:
    """Genre = the genre tag embedded in the file (its first value, `tag_genre`)."""
    genres = [tag_genre(g) for g in tracks["tag_genre"].to_pylist()]
    table = pa.table({"uri": tracks["uri"], "genre": pa.array(genres, pa.string())}, schema=LABELS_SCHEMA)
    return table.filter(pc.is_valid(table["genre"]))


def delimiter_of(path: str) -> str:
    """A CSV file's delimiter: the first of ',', ';' (spreadsheets in many locales) or a tab in its header line."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    return next((d for d in ",;\t" if d in header), ",")


def read_label_file(path: str) -> pa.Table:
    """Read a CSV (comma, semicolon or tab separated) or Parquet label file with a file column and a genre column
    (names in any case)."""
    try:
        if path.lower().endswith(".parquet"):
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter_of(path)))
    except (OSError, pa.ArrowInvalid) as e:
        raise GenreBatchError(f"cannot read labels file {path}: {e}") from None
    named = {c.strip().lower(): c for c in reversed(table.column_names)}  # the first of a name in any case
    file_col = next((named[c] for c in FILE_COLUMNS if c in named), None)
    genre_col = next((named[c] for c in GENRE_COLUMNS if c in named), None)
    if file_col is None or genre_col is None:
        raise GenreBatchError(
            f"labels file {path} needs a file column ({'/'.join(FILE_COLUMNS)}) and a genre column "
            f"({'/'.join(GENRE_COLUMNS)}); it has: {', '.join(table.column_names)}"
        )
    try:
        labels = pa.table({"file": table[file_col].cast(pa.string()), "genre": table[genre_col].cast(pa.string())})
    except pa.ArrowInvalid:  # bytes that are not UTF-8: a spreadsheet's export in a Windows code page
        raise GenreBatchError(f"cannot read labels file {path}: its text is not UTF-8 (save it as UTF-8)") from None
    check_conflicts(labels, path)
    return labels


CONFLICTS_SHOWN = 3


def check_conflicts(labels: pa.Table, path: str) -> None:
    """Refuse a labels file that gives one file two genres (which one is meant cannot be guessed), naming the first few."""
    seen: dict[str, str] = {}
    conflicts: dict[str, set[str]] = {}
    for file, genre in zip(labels["file"].to_pylist(), labels["genre"].to_pylist()):
        genre = normalise(genre)
        if genre is not None and seen.setdefault(file, genre) != genre:
            conflicts.setdefault(file, {seen[file]}).add(genre)
    if conflicts:
        shown = "; ".join(f"{file}: {', '.join(sorted(genres))}" for file, genres in list(conflicts.items())[:CONFLICTS_SHOWN])
        more = f" (and {len(conflicts) - CONFLICTS_SHOWN} more)" if len(conflicts) > CONFLICTS_SHOWN else ""
        files = f"{len(conflicts)} file{'s' if len(conflicts) > 1 else ''}"
        raise GenreBatchError(f"labels file {path} gives {files} two or more genres: {shown}{more}; keep one row per file")


def from_file(tracks: pa.Table, path: str, library: str) -> pa.Table:
    """Genre from a label file; its file column is a URI or a path relative to the library root."""
    given = read_label_file(path)
    known = set(tracks["uri"].to_pylist())
    prefix = library.rstrip("/") + "/"
    genres: dict[str, str] = {}
    matched = 0
    for file, genre in zip(given["file"].to_pylist(), given["genre"].to_pylist()):
        uri = file if file in known else prefix + posixpath.normpath((file or "").lstrip("/"))
        if uri in known:  # paths outside the library never match a track
            matched += 1
            if normalise(genre):
                genres[uri] = normalise(genre)
    if given.num_rows and not matched:
        raise GenreBatchError(
            f"labels file {path}: none of its {given.num_rows} rows names a track of the store (the first: {given['file'][0].as_py()!r}); "
            f"name files by URI or by a path relative to the library root {library}, with '/' between folders"
        )
    return pa.table({"uri": list(genres), "genre": list(genres.values())}, schema=LABELS_SCHEMA)


def resolve(spec: str, tracks: pa.Table, library: str, written: pa.Table | None = None) -> pa.Table:
    """Labels (uri, genre) for the tracks of the store, from a spec: folders, tags (never those genre-batch wrote:
    `written`, see without_written), or a file path."""
    if spec == "folders":
        return from_folders(tracks, library)
    if spec == "tags":
        return from_tags(without_written(tracks, written))
    return from_file(tracks, spec, library)
