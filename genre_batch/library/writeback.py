"""Write-back: the catalog's predicted genres written into the files' genre tags (opt-in), recorded, and undoable.

Each file is replaced whole: on disk a tagged copy in the same folder is renamed over it; on S3 the object is
downloaded, tagged and PUT back with If-Match on the ETag read. Only the genre tag changes (mutagen rewrites tag
blocks, never audio frames). Every attempt is a row of the `writes` table (`writes/<run_id>-<n>.parquet`); the
written files' track index rows are re-keyed to their new fingerprint, so that no run extracts them again.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import fsspec
import mutagen
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from mutagen.asf import ASFTags
from mutagen.id3 import ID3, TCON, Encoding
from mutagen.mp4 import MP4Tags

from genre_batch import FileError
from genre_batch.library.discovery import fingerprint
from genre_batch.library.labels import UNKNOWN
from genre_batch.publishing import catalog
from genre_batch.storage.feature_store import FAMILIES, INDEX_SCHEMA, read_index, read_inventory, rekeyed, resolved
from genre_batch.storage.store import TEMP_MARK, Store, file_system, is_local, is_s3, s3_error_code

WRITES_VERSION = 1
TIMESTAMP = pa.timestamp("ms", tz="UTC")
WRITES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("action", pa.string()),
        ("undoes", pa.string()),
        ("uri", pa.string()),
        ("track_id", pa.string()),
        ("old_tag", pa.list_(pa.string())),
        ("new_tag", pa.list_(pa.string())),
        ("confidence", pa.float64()),
        ("model_version", pa.string()),
        ("outcome", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("old_fingerprint", pa.string()),
        ("new_fingerprint", pa.string()),
        ("written_at", TIMESTAMP),
    ]
).with_metadata({"genre_batch.writes_version": str(WRITES_VERSION)})
"""One row per file a write-back run tried: `action` write or undo, the genre tag's values before and after, the
catalog row's confidence and model, `outcome` written / restored / failed (with `error_type`, `message`), and the
file's fingerprint before and after."""

FLUSH_ROWS = 256
"""Rows per writes file: a kill loses the records of at most this many files (their tags then count as people's)."""

VORBIS_KEY, MP4_KEY, ASF_KEY = "genre", "\xa9gen", "WM/Genre"


class WriteError(FileError):
    """A file whose tags cannot be written."""


@dataclass(frozen=True)
class Choice:
    """Which catalog rows a write-back run writes."""

    min_confidence: float = 0.0
    only_missing: bool = False


# Tags of one local file ---------------------------------------------------------------------------------------


def opened(path: str) -> mutagen.FileType:
    """The file parsed by mutagen, with a tag block to edit; WriteError('unsupported_format') if it has none."""
    try:
        audio = mutagen.File(path)
    except Exception as e:  # mutagen's parsers raise assorted errors on files they cannot parse
        raise WriteError("unsupported_format", f"mutagen cannot parse it: {e}") from None
    if audio is None:
        raise WriteError("unsupported_format", "no tag format mutagen can write (ID3, Vorbis comment, FLAC, MP4, ASF)")
    if audio.tags is None:
        try:
            audio.add_tags()
        except Exception as e:  # formats whose tags mutagen reads but cannot create
            raise WriteError("unsupported_format", f"mutagen cannot add tags to a {type(audio).__name__} file: {e}") from None
    if not isinstance(audio.tags, ID3 | MP4Tags | ASFTags) and not hasattr(audio.tags, "vendor"):
        raise WriteError("unsupported_format", f"no genre tag in {type(audio.tags).__name__} tags")
    return audio


def genre_values(audio: mutagen.FileType) -> list[str]:
    """The raw values of the genre tag (ID3 TCON text, Vorbis GENRE, MP4 ©gen, ASF WM/Genre); [] when absent."""
    tags = audio.tags
    if isinstance(tags, ID3):
        frame = tags.get("TCON")
        return [str(t) for t in frame.text] if frame is not None else []
    key = MP4_KEY if isinstance(tags, MP4Tags) else ASF_KEY if isinstance(tags, ASFTags) else VORBIS_KEY
    return [str(v) for v in tags.get(key, [])]


def set_genre(audio: mutagen.FileType, values: list[str]) -> None:
    """Replace the genre tag by `values` ([] removes it) and save the file in place."""
    tags = audio.tags
    if isinstance(tags, ID3):
        tags.delall("TCON")
        if values:
            tags.add(TCON(encoding=Encoding.UTF8, text=values))
    else:
        key = MP4_KEY if isinstance(tags, MP4Tags) else ASF_KEY if isinstance(tags, ASFTags) else VORBIS_KEY
        if key in tags:
            del tags[key]
        if values:
            tags[key] = values
    audio.save()


def retag(path: str, values: list[str]) -> list[str]:
    """Set the genre tag of a local file; returns the values it had."""
    audio = opened(path)
    old = genre_values(audio)
    set_genre(audio, values)
    return old


# Replacing a file atomically ----------------------------------------------------------------------------------


def local_fingerprint(path: str) -> tuple[str, int, str]:
    """(fingerprint, size, version) of a local file as discovery computes them; WriteError('vanished') if it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise WriteError("vanished", "the file is no longer there") from None
    return fingerprint(st.st_size, repr(st.st_mtime)), st.st_size, repr(st.st_mtime)


def read_only(st: os.stat_result, path: str) -> bool:
    """True for a file nobody may write (no write permission bit: respected even by root), or that we may not write."""
    return not st.st_mode & 0o222 or not os.access(path, os.W_OK)


def replace_local(path: str, expected: str, values: list[str]) -> tuple[list[str], tuple[str, int, str]]:
    """Tag a copy in the file's folder and rename it over the file, if the file is still the version `expected`;
    returns the old values and the new (fingerprint, size, version). A link is followed: its target is replaced."""
    target = os.path.realpath(path)
    if local_fingerprint(target)[0] != expected:
        raise WriteError("changed_since_tagging", "the file changed since the catalog row was made: run genre-batch again first")
    st = os.stat(target)
    if read_only(st, target):
        raise WriteError("read_only", "the file is read-only")
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".genre-batch{TEMP_MARK}{uuid.uuid4().hex}")  # not from the name: a long one has no room for more
    try:
        shutil.copyfile(target, tmp)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        old = retag(tmp, values)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if local_fingerprint(target)[0] != expected:  # a writer got in while we tagged the copy
            raise WriteError("changed_since_tagging", "the file changed while its copy was tagged; it was left alone")
        os.replace(tmp, target)
    except PermissionError as e:
        raise WriteError("read_only", f"cannot write in its folder: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return old, local_fingerprint(target)


def replace_s3(fs: fsspec.AbstractFileSystem, path: str, expected: str, values: list[str]) -> tuple[list[str], tuple[str, int, str]]:
    """Download an object, tag it and PUT it back with If-Match on the ETag read, if it is still the version
    `expected`; returns the old values and the new (fingerprint, size, ETag)."""
    bucket, key, _ = fs.split_path(path)
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        raise WriteError("vanished", "the object is no longer there") from None
    etag = str(head["ETag"]).strip('"')
    if fingerprint(int(head["ContentLength"]), etag) != expected:
        raise WriteError("changed_since_tagging", "the object changed since the catalog row was made: run genre-batch again first")
    suffix = os.path.splitext(key)[1]
    with tempfile.TemporaryDirectory(prefix="genre-batch-write-") as folder:
        local = os.path.join(folder, f"file{suffix}")
        with open(local, "wb") as f:  # should another version be read, the PUT's If-Match on the ETag above refuses it
            f.write(fs.cat_file(path))
        old = retag(local, values)
        with open(local, "rb") as f:
            data = f.read()
    try:
        answer = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=head["ETag"])
    except OSError as e:
        code, status = s3_error_code(e)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            raise WriteError("changed_since_tagging", "the object was changed by another writer while it was tagged; it was left alone") from None
        raise
    fs.invalidate_cache(path)
    new_etag = str(answer["ETag"]).strip('"')
    return old, (fingerprint(len(data), new_etag), len(data), new_etag)


def replace(uri: str, expected: str, values: list[str]) -> tuple[list[str], tuple[str, int, str]]:
    """Set a file's genre tag to `values` if it is still the version `expected`: (old values, (fingerprint, size, version))."""
    if "://" not in uri:  # a local path, read as audio.py reads it
        return replace_local(uri, expected, values)
    fs, path = file_system(uri)
    if is_local(fs):
        return replace_local(path, expected, values)
    if is_s3(fs):
        return replace_s3(fs, path, expected, values)
    raise WriteError("unsupported_store", f"the {fs.protocol} backend has no conditional writes: write-back needs a local folder or s3://")


# The writes table ---------------------------------------------------------------------------------------------


def writes_folder(store: Store) -> str:
    """Folder of the writes table."""
    return store.path("writes")


def read_writes(store: Store) -> pa.Table:
    """Every row of the writes table (empty before the first write-back)."""
    files = store.list(writes_folder(store), ".parquet")
    if not files:
        return WRITES_SCHEMA.empty_table()
    with store.naming_damage(files):
        return ds.dataset(files, filesystem=store.fs, format="parquet", schema=WRITES_SCHEMA).to_table()


def successful_writes(writes: pa.Table) -> pa.Table:
    """The rows of files a write (not an undo) wrote."""
    return writes.filter(pc.and_(pc.equal(writes["action"], "write"), pc.equal(writes["outcome"], "written")))


def retagged(store: Store) -> pa.Table:
    """(uri, new_fingerprint, old_fingerprint) of every tag genre-batch wrote or restored: contents that differ from the
    one before only in the genre tag (the same audio, whose features were kept)."""
    writes = read_writes(store)
    done = writes.filter(pc.is_in(writes["outcome"], value_set=pa.array(["written", "restored"])))
    return done.select(["uri", "new_fingerprint", "old_fingerprint"])


def written(store: Store) -> pa.Table:
    """(uri, fingerprint) of file contents whose genre tag genre-batch wrote: predictions, never labels or disagreements."""
    done = successful_writes(read_writes(store))
    return pa.table({"uri": done["uri"], "fingerprint": done["new_fingerprint"]})


# Choosing and writing -----------------------------------------------------------------------------------------


CANDIDATE_COLUMNS = ["uri", "track_id", "fingerprint", "genre", "confidence", "embedded_genre", "model_version"]


def chosen(rows: pa.Table, choice: Choice) -> pa.Table:
    """Catalog rows to write: a genre (not unknown) at or over the confidence, differing from the embedded tag
    (missing, with only_missing)."""
    keep = pc.and_kleene(pc.not_equal(rows["genre"], UNKNOWN), pc.greater_equal(rows["confidence"], choice.min_confidence))
    missing = pc.is_null(rows["embedded_genre"])
    keep = pc.and_kleene(keep, missing if choice.only_missing else pc.or_kleene(missing, pc.not_equal(rows["embedded_genre"], rows["genre"])))
    return rows.filter(keep)


def already_written(rows: pa.Table, writes: pa.Table) -> pa.Table:
    """Catalog rows no write-back has handled yet: neither tagged from this content already, nor holding this genre
    from an earlier write."""
    done = successful_writes(writes)
    before = pa.table({"uri": done["uri"], "fingerprint": done["old_fingerprint"]})
    same = pa.table({"uri": done["uri"], "fingerprint": done["new_fingerprint"], "genre": pc.list_element(done["new_tag"], 0)})
    rows = rows.join(before, keys=["uri", "fingerprint"], join_type="left anti")
    return rows.join(same, keys=["uri", "fingerprint", "genre"], join_type="left anti")


def candidates(store: Store, choice: Choice) -> pa.Table:
    """The published catalog's rows a write-back would write, in URI order (read one genre file at a time)."""
    writes = read_writes(store)
    tables = [chosen(store.read_table(path, CANDIDATE_COLUMNS), choice) for path in catalog.files(store)]
    rows = pa.concat_tables(tables) if tables else catalog.CATALOG_SCHEMA.empty_table().select(CANDIDATE_COLUMNS)
    return already_written(rows, writes).sort_by("uri")


def record(run_id: str, row: dict, action: str, new: list[str], **facts: object) -> dict:
    """A writes row for a file of a run (its catalog or writes row `row`)."""
    return {
        "run_id": run_id, "action": action, "undoes": None, "uri": row["uri"], "track_id": row["track_id"],
        "old_tag": None, "new_tag": new, "confidence": row.get("confidence"), "model_version": row.get("model_version"),
        "outcome": None, "error_type": None, "message": None, "old_fingerprint": row.get("fingerprint"),
        "new_fingerprint": None, "written_at": datetime.now(timezone.utc), **facts,
    }


def attempt(run_id: str, row: dict, action: str, values: list[str], outcome: str, **facts: object) -> tuple[dict, tuple[str, int, str] | None]:
    """Write one file's genre tag; its writes row (failed with the reason when it cannot be written) and new listing facts."""
    try:
        old, (new_fp, size, version) = replace(row["uri"], row["fingerprint"], values)
    except WriteError as e:
        return record(run_id, row, action, values, outcome="failed", error_type=e.kind, message=str(e), **facts), None
    except OSError as e:
        return record(run_id, row, action, values, outcome="failed", error_type="io_error", message=str(e.strerror or e), **facts), None
    except mutagen.MutagenError as e:  # a tag block mutagen parsed but cannot save
        return record(run_id, row, action, values, outcome="failed", error_type="tag_error", message=str(e), **facts), None
    return record(run_id, row, action, values, old_tag=old, outcome=outcome, new_fingerprint=new_fp, **facts), (new_fp, size, version)


def flushed(store: Store, run_id: str, rows: list[dict], number: int) -> None:
    """Write a batch of writes rows as one file of the writes table."""
    store.write_table(f"{writes_folder(store)}/{run_id}-{number:05d}.parquet", pa.Table.from_pylist(rows, schema=WRITES_SCHEMA))


REKEYED_SCHEMA = pa.schema([INDEX_SCHEMA.field("uri"), INDEX_SCHEMA.field("fingerprint").with_name("old_fingerprint"),
                            *(INDEX_SCHEMA.field(name) for name in ("fingerprint", "size", "version", "tag_genre"))])
"""The written files' keys and new listing facts, as `feature_store.rekeyed` takes them."""


def keep_features(store: Store, run_id: str, done: list[tuple[dict, tuple[str, int, str]]]) -> None:
    """Re-key the written files' index rows to their new fingerprint and update the stored listing: no re-extraction."""
    if not done:
        return
    files = pa.Table.from_pylist(
        [{"uri": r["uri"], "old_fingerprint": r["old_fingerprint"], "fingerprint": fp, "size": size, "version": version,
          "tag_genre": (r["new_tag"] or [None])[0]} for r, (fp, size, version) in done],
        schema=REKEYED_SCHEMA,  # typed: an undo that restores no tag at all has only nulls in tag_genre
    )
    inventory = read_inventory(store)
    old_keys = pa.table({"uri": files["uri"], "fingerprint": files["old_fingerprint"]})
    index = read_index(store)
    current = pa.concat_tables([resolved(index, old_keys, family) for family in FAMILIES.values()])
    store.write_table(f"{store.index}/{run_id}-writes.parquet", rekeyed(current, files))
    listed = inventory.join(old_keys, keys=["uri", "fingerprint"], join_type="left semi")
    if listed.num_rows:
        kept = inventory.join(old_keys, keys=["uri", "fingerprint"], join_type="left anti")
        new = files.join(listed.select(["uri", "track_id"]), keys="uri", join_type="inner").select(inventory.column_names)
        store.write_table(store.inventory, pa.concat_tables([kept, new.cast(inventory.schema)]).sort_by("uri").replace_schema_metadata(inventory.schema.metadata))


def run(store: Store, run_id: str, todo: Iterator[tuple[dict, str, list[str], dict]]) -> pa.Table:
    """Write each file of `todo` (row, action, values, extra facts), recording every attempt; returns the run's rows."""
    rows, batch, done, number = [], [], [], 0
    for row, action, values, facts in todo:
        outcome = "written" if action == "write" else "restored"
        result, listed = attempt(run_id, row, action, values, outcome, **facts)
        batch.append(result)
        if listed is not None:
            done.append((result, listed))
        if len(batch) == FLUSH_ROWS:
            flushed(store, run_id, batch, number)
            rows, batch, number = rows + batch, [], number + 1
    if batch or not rows:
        flushed(store, run_id, batch, number)
    keep_features(store, run_id, done)
    return pa.Table.from_pylist(rows + batch, schema=WRITES_SCHEMA)


def write(store: Store, run_id: str, rows: pa.Table) -> pa.Table:
    """Write the predicted genre of each candidate row into its file; returns the run's writes rows."""
    return run(store, run_id, ((r, "write", [r["genre"]], {}) for r in rows.to_pylist()))


def standing_undoes(writes: pa.Table, undone: str) -> list[str]:
    """The runs that restored files of run `undone` and have not been undone themselves."""
    runs = sorted(set(writes.filter(pc.and_(pc.equal(writes["undoes"], undone), pc.equal(writes["outcome"], "restored")))["run_id"].to_pylist()))
    return [run_id for run_id in runs if not standing_undoes(writes, run_id)]


def undo_rows(store: Store, undone: str) -> pa.Table:
    """The files a write-back run wrote or restored, with the fingerprint they got (what an undo expects to find),
    less those an undo of it still standing has restored."""
    return pending(read_writes(store), undone)


def pending(writes: pa.Table, undone: str) -> pa.Table:
    """`undo_rows` of the writes table `writes`."""
    done = writes.filter(pc.and_(pc.equal(writes["run_id"], undone), pc.is_in(writes["outcome"], value_set=pa.array(["written", "restored"]))))
    restored = writes.filter(pc.and_(pc.is_in(writes["run_id"], value_set=pa.array(standing_undoes(writes, undone), pa.string())),
                                     pc.equal(writes["outcome"], "restored")))["uri"]
    return done.filter(pc.invert(pc.is_in(done["uri"], value_set=restored.combine_chunks())))


def already_undone(store: Store, undone: str) -> str | None:
    """The undo run that restored every file run `undone` changed (and still stands), if one did."""
    writes = read_writes(store)
    standing = standing_undoes(writes, undone)
    return standing[-1] if standing and pending(writes, undone).num_rows == 0 else None


def undo(store: Store, run_id: str, undone: str) -> pa.Table:
    """Restore the genre tag each file had before run `undone`, for the files not changed since; returns the rows."""
    todo = (
        ({**r, "fingerprint": r["new_fingerprint"]}, "undo", r["old_tag"] or [], {"undoes": undone})
        for r in undo_rows(store, undone).to_pylist()
    )
    return run(store, run_id, todo)


def preview(rows: pa.Table) -> list[dict]:
    """What a write-back would write, in the shape of its writes rows: uri, old_tag (the embedded genre the catalog
    saw, normalised), new_tag, confidence, outcome `would_write`."""
    return [
        {"uri": r["uri"], "old_tag": [r["embedded_genre"]] if r["embedded_genre"] else [], "new_tag": [r["genre"]],
         "confidence": r["confidence"], "outcome": "would_write", "error_type": None, "message": None}
        for r in rows.select(["uri", "embedded_genre", "genre", "confidence"]).to_pylist()
    ]
