"""Label sources: folders, embedded tags, CSV/Parquet files (which never reach outside the library)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genre_batch import GenreBatchError
from genre_batch.library import labels
from genre_batch.publishing import tagging

LIBRARY = "/music/lib"


def tracks() -> pa.Table:
    """Track rows as the feature store holds them."""
    return pa.table(
        {
            "uri": [f"{LIBRARY}/Rock/a.mp3", f"{LIBRARY}/jazz/live/b.flac", f"{LIBRARY}/c.ogg", f"{LIBRARY}/d.wav"],
            "tag_genre": ["  Hard  Rock ", None, "Jazz", ""],
        }
    )


def as_dict(table: pa.Table) -> dict[str, str]:
    """uri -> genre."""
    return dict(zip(table["uri"].to_pylist(), table["genre"].to_pylist()))


def test_folders_use_the_parent_folder_and_skip_files_at_the_root() -> None:
    assert as_dict(labels.resolve("folders", tracks(), LIBRARY)) == {
        f"{LIBRARY}/Rock/a.mp3": "rock",
        f"{LIBRARY}/jazz/live/b.flac": "live",
    }


def test_tags_are_normalised_and_blank_tags_ignored() -> None:
    assert as_dict(labels.resolve("tags", tracks(), LIBRARY)) == {f"{LIBRARY}/Rock/a.mp3": "hard rock", f"{LIBRARY}/c.ogg": "jazz"}


def test_a_genre_name_is_canonical_and_unknown_is_no_label() -> None:
    """`similar --genre` compares names as the catalog writes them, `unknown` (its abstentions) too; as a label,
    `unknown` is none."""
    assert labels.canonical("  Hard   ROCK ") == "hard rock" and labels.canonical(" Unknown") == "unknown"
    assert labels.normalise(" Unknown") is None and labels.normalise("  ") is None and labels.normalise("Hard  Rock") == "hard rock"


def test_a_tag_of_several_genres_labels_its_first() -> None:
    """`Rock; Pop` (Picard's and foobar2000's join) and ID3v2.4's NUL-separated values name their first genre; a `/`
    is part of a name; an abstention or blank value is skipped."""
    tagged = pa.table({"uri": [f"{LIBRARY}/{i}.mp3" for i in range(6)],
                       "tag_genre": ["Rock; Pop", "Hip-Hop\x00Jazz", "R&B/Soul", "Unknown; Blues", " ; ", ";Metal"]})
    assert list(as_dict(labels.resolve("tags", tagged, LIBRARY)).values()) == ["rock", "hip-hop", "r&b/soul", "blues", "metal"]
    assert labels.tag_genre("Rock; Pop") == "rock" and labels.tag_genre(None) is None and labels.tag_genre(" ; ") is None


def test_label_file_matches_uris_and_relative_paths_but_never_outside_the_library(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "file,genre\n"
        f"{LIBRARY}/Rock/a.mp3,Metal\n"  # a URI of the library
        "jazz/live/b.flac,Jazz\n"  # relative to the library root
        "../lib/d.wav,pop\n"  # climbs out of the root (even to come back): ignored
        "../../etc/passwd,rock\n"  # outside the library: ignored, never opened
        "/etc/passwd,rock\n"  # an absolute path that is no track: ignored
        "c.ogg,\n"  # no genre: ignored
    )
    got = as_dict(labels.resolve(str(csv), tracks(), LIBRARY))
    assert got == {f"{LIBRARY}/Rock/a.mp3": "metal", f"{LIBRARY}/jazz/live/b.flac": "jazz"}


def test_label_file_in_parquet_with_other_column_names(tmp_path: Path) -> None:
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"path": ["c.ogg"], "label": ["Ambient"]}), path)
    assert as_dict(labels.resolve(str(path), tracks(), LIBRARY)) == {f"{LIBRARY}/c.ogg": "ambient"}
    assert labels.label_source(str(path)) == "file:labels.parquet"


@pytest.mark.parametrize("content", [
    "\ufeffFile,Genre\r\nc.ogg,Ambient\r\n",  # a spreadsheet's export: byte-order mark, capitals, CRLF
    "path;label\n./c.ogg;Ambient\n",  # semicolons (spreadsheets of many locales)
    "uri\tgenre\nc.ogg\tAmbient\n",  # tabs
])
def test_label_files_as_spreadsheets_write_them(tmp_path: Path, content: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(content, encoding="utf-8")
    assert as_dict(labels.resolve(str(path), tracks(), LIBRARY)) == {f"{LIBRARY}/c.ogg": "ambient"}


@pytest.mark.parametrize(
    "content, message",
    [("name,style\nx,y\n", "needs a file column"), (None, "cannot read labels file"),
     ("file,genre\njazz\\live\\b.flac,Jazz\nnope.mp3,Rock\n",  # no row names a track: say so, not 'no labelled tracks'
      r"none of its 2 rows names a track of the store \(the first: 'jazz\\\\live\\\\b.flac'\); name files by URI or by a path relative to the library root /music/lib")],
)
def test_bad_label_files_are_clear_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "labels.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GenreBatchError, match=message):
        labels.resolve(str(path), tracks(), LIBRARY)


def test_unknown_is_never_a_label(tmp_path: Path) -> None:
    """'Unknown' (ID3 genre 255 as mutagen reads it) is the catalog's genre of an abstention, not a class to learn."""
    tagged = pa.table({"uri": [f"{LIBRARY}/Unknown/a.mp3", f"{LIBRARY}/b.mp3"], "tag_genre": [" Unknown ", "Rock"]})
    assert as_dict(labels.resolve("tags", tagged, LIBRARY)) == {f"{LIBRARY}/b.mp3": "rock"}
    assert as_dict(labels.resolve("folders", tagged, LIBRARY)) == {}
    path = tmp_path / "labels.csv"
    path.write_text("file,genre\nb.mp3,UNKNOWN\nUnknown/a.mp3,jazz\n")
    assert as_dict(labels.resolve(str(path), tagged, LIBRARY)) == {f"{LIBRARY}/Unknown/a.mp3": "jazz"}
    assert labels.normalise("unknown") is None and labels.UNKNOWN == tagging.UNKNOWN


def test_a_labels_file_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    """A spreadsheet's CSV export in a Windows code page: exit 2 with what to do, not a traceback."""
    from genre_batch import UsageError, checks

    path = tmp_path / "labels.csv"
    path.write_bytes("file;genre\na.flac;M\u00fasica\n".encode("cp1252"))
    with pytest.raises(UsageError, match=f"^cannot read labels file {path}: its text is not UTF-8 \\(save it as UTF-8\\)$"):
        checks.labels(str(path))


def test_a_labels_file_giving_a_file_two_genres_is_refused(tmp_path: Path) -> None:
    """The last row used to win silently; the same genre twice (in any spelling) is no conflict."""
    from genre_batch import UsageError, checks

    path = tmp_path / "labels.csv"
    path.write_text("file,genre\na.flac,Ambient\na.flac,ambient\nb.flac,Jazz\nb.flac,Rock\nb.flac,Pop\nc.flac,\nc.flac,Rock\n")
    with pytest.raises(UsageError, match=f"^labels file {path} gives 1 file two or more genres: b.flac: jazz, pop, rock; keep one row per file$"):
        checks.labels(str(path))
