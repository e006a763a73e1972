"""Checks of an invocation before Prefect or Dask start: local ones raise UsageError (exit 2), network ones GenreBatchError (exit 1).

This module imports neither Prefect nor Dask, so that a wrong invocation costs no start-up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from genre_batch import GenreBatchError, UsageError
from genre_batch.storage.locations import absolute, is_url, is_utf8, local_path, printable

LABEL_KINDS = ("folders", "tags")
LABEL_FILE_SUFFIXES = (".csv", ".parquet")
SUMMARY_FORMATS = ("text", "json")
QUERY_FORMATS = ("table", "csv", "json")
SERVER_COMMAND = "prefect server start --host 127.0.0.1 --port 4200"
SERVER_API_URL = "http://127.0.0.1:4200/api"
NIGHTLY_CRON = "0 2 * * *"
"""Default schedule of the nightly deployment: every day at 02:00 (UTC unless a timezone is given)."""


DASK_SCHEMES = ("tcp", "tls", "ws", "wss", "inproc", "ucx")
HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")
"""host:port of a network scheduler address ([IPv6]:port too)."""


def scheduler(address: str | None) -> None:
    """A Dask scheduler address as distributed parses it: [scheme://]host:port (tcp by default), any location for
    inproc and ucx."""
    if address is None:
        return
    scheme, location = address.split("://", 1) if "://" in address else ("tcp", address)
    if scheme not in DASK_SCHEMES:
        raise UsageError(f"--scheduler {address}: unknown scheme {scheme}://; use one of {', '.join(DASK_SCHEMES)}, e.g. tcp://127.0.0.1:8786")
    if (scheme in ("inproc", "ucx") and location) or HOST_PORT.fullmatch(location):
        return
    raise UsageError(f"--scheduler {address}: not a Dask scheduler address; give host:port, e.g. tcp://127.0.0.1:8786")


def given(location: str, what: str) -> None:
    """A location is not empty (an unset shell variable would otherwise name the current folder)."""
    if not location.strip():
        raise UsageError(f"{what} is an empty string: give a folder or URL")


def protocol(location: str, what: str) -> None:
    """A URL's protocol must be one fsspec knows and can use here (its package installed)."""
    if not is_url(location):
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(location.split("://", 1)[0])
    except (ValueError, ImportError) as e:  # Protocol not known: foo / Install gcsfs to access Google Storage
        raise UsageError(f"{what} {location}: {e}") from None


def endpoint(url: str | None) -> None:
    """An S3 endpoint is an http(s) URL with a host."""
    from urllib.parse import urlsplit

    parts = urlsplit(url) if url is not None else None
    if parts is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise UsageError(f"--endpoint-url {url}: not an http(s) URL with a host, e.g. http://127.0.0.1:8333")


def library(location: str) -> None:
    """A local library must be an existing folder this process may list, with a UTF-8 path; a library URL's protocol
    one fsspec can use."""
    given(location, "library")
    protocol(location, "library")
    if not is_url(location) and not Path(local_path(location)).is_dir():
        raise UsageError(f"library not found or not a folder: {location}")
    utf8_path(location, "library")
    if not is_url(location) and not os.access(local_path(location), os.R_OK | os.X_OK):
        raise UsageError(f"cannot list the library folder {location}: Permission denied")


def utf8_path(location: str, what: str) -> None:
    """A local path given on the command line must be valid UTF-8, as given and as resolved: every table and JSON
    output holds URIs as UTF-8 (a file or subfolder with another name met by a listing is skipped instead)."""
    if is_url(location) or is_utf8(absolute(location)):
        return
    named = printable(location) if not is_utf8(location) else f"{location} (resolved: {printable(absolute(location))})"
    raise UsageError(f"{what} {named}: its name is not valid UTF-8: rename it")


def classified_paths(locations: list[str]) -> None:
    """Each local file or folder given to `classify` has a UTF-8 path."""
    for location in locations:
        if not is_url(location):
            utf8_path(location, "folder" if os.path.isdir(local_path(location)) else "file")


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_folder(location: str, what: str) -> None:
    """A local folder that a run writes to must be a folder, or creatable in a writable parent; a URL's protocol one
    fsspec can use."""
    given(location, what)
    if is_url(location):
        protocol(location, what)
        return
    path = Path(local_path(location))
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise UsageError(f"{what} {location} is not a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {location} is not writable: no write permission on {existing}")


def labels(spec: str | None) -> None:
    """A label spec is 'folders', 'tags', or an existing local CSV/Parquet file with a file and a genre column."""
    if spec is None or spec in LABEL_KINDS or is_url(spec):
        return
    path = Path(local_path(spec))
    if not path.is_file() or path.suffix.lower() not in LABEL_FILE_SUFFIXES:
        raise UsageError(f"--labels {spec}: not 'folders', 'tags' or an existing .csv/.parquet file")
    from genre_batch.library.labels import read_label_file

    try:
        read_label_file(str(path))
    except GenreBatchError as e:
        raise UsageError(str(e).replace(str(path), spec)) from None


CLASSIFIERS = ("xgboost", "linear")
"""Model kinds of `train --classifier` (genre_batch.modelling.model.KINDS; listed here so that a usage error loads no xgboost)."""


def classifier(kind: str | None, all_tracks: bool = False) -> None:
    """--classifier is one of CLASSIFIERS; --all-tracks fits with xgboost.dask, so not with another one."""
    if kind is not None and kind not in CLASSIFIERS:
        raise UsageError(f"--classifier {kind}: use one of {', '.join(CLASSIFIERS)}")
    if all_tracks and kind not in (None, "xgboost"):
        raise UsageError(f"--all-tracks fits with xgboost.dask: it cannot be used with --classifier {kind}")


def grouping(value: str) -> None:
    """--group-by is one of training.GROUPINGS or a column of the track index."""
    from genre_batch.modelling.training import GROUPINGS
    from genre_batch.storage.feature_store import INDEX_SCHEMA

    if value not in GROUPINGS and value not in INDEX_SCHEMA.names:
        raise UsageError(f"--group-by {value}: use one of {', '.join(GROUPINGS)} or a column of the track index (e.g. tag_genre)")


RETRAIN_POLICIES = ("auto", "always", "never")


def retrain_policy(policy: str) -> None:
    """--retrain is auto, always or never."""
    if policy not in RETRAIN_POLICIES:
        raise UsageError(f"--retrain {policy}: use one of {', '.join(RETRAIN_POLICIES)}")


def summary_format(fmt: str) -> None:
    """The output format of a run summary is text or json."""
    if fmt not in SUMMARY_FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(SUMMARY_FORMATS)}")


def query_format(fmt: str) -> None:
    """The output format of a query is table, csv or json."""
    if fmt not in QUERY_FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(QUERY_FORMATS)}")


SIMILAR_MAX_TOP = 1000
"""Most neighbours `similar --top` returns per track."""


def genre_name(genre: str | None) -> None:
    """`similar --genre` names a genre (not an empty string)."""
    if genre is not None and not genre.strip():
        raise UsageError("--genre needs a genre name, e.g. --genre rock")


def sql_statement(sql: str) -> None:
    """A query needs a statement."""
    if not sql.strip().strip(";").strip():
        raise UsageError("empty SQL statement: give one, e.g. \"SELECT genre, count(*) FROM catalog GROUP BY 1\"")


def write_tags_options(undo: str | None, apply: bool, only_missing: bool, min_confidence: float | None) -> None:
    """`write-tags --undo RUN` restores by itself: it takes no --apply, --only-missing or --min-confidence."""
    given = [name for name, on in (("--apply", apply), ("--only-missing", only_missing), ("--min-confidence", min_confidence is not None)) if on]
    if undo is not None and given:
        raise UsageError(f"--undo restores a write-back run's old tags by itself: drop {', '.join(given)}")


def write_back_run(store: str, run_id: str) -> None:
    """`--undo RUN` names a write-back run recorded in the store (its files writes/RUN-<n>.parquet); one listing request on S3."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(store if is_url(store) else local_path(store))
    try:
        names = fs.ls(f"{root.rstrip('/')}/writes", detail=False)
    except FileNotFoundError:
        names = []
    runs = {n.rsplit("/", 1)[-1].rsplit("-", 1)[0] for n in names if n.endswith(".parquet")}
    if run_id not in runs:
        raise UsageError(f"no write-back run {run_id} in the store {store}: see genre-batch query \"SELECT DISTINCT run_id FROM writes\"")
    from genre_batch.library.writeback import already_undone
    from genre_batch.storage.store import Store

    undone_by = already_undone(Store.at(store), run_id)
    if undone_by:
        raise UsageError(f"write-back run {run_id} was already undone by run {undone_by}: to write its tags again, undo {undone_by}")


def remote_library(location: str) -> None:
    """A library on an object store must exist (one listing request); credentials are checked on the way."""
    if is_url(location):
        from genre_batch.library.discovery import library_root

        library_root(location)


S3_SCHEMES = ("s3://", "s3a://")


def access_denied(location: str, path: str) -> GenreBatchError:
    """The error of a store that these credentials may not reach (`path`: the store's path, its bucket first)."""
    return GenreBatchError(f"access denied to the store {location} (bucket {path.split('/', 1)[0]}): check the credentials")


def s3_bucket(location: str) -> tuple[Any, str]:
    """The filesystem and path of a store on S3, once its bucket is found to exist and these credentials to reach it
    (one request, two when they may list only a prefix of it): a refused request is access denied, not a missing bucket."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    bucket, _, prefix = path.rstrip("/").partition("/")
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise GenreBatchError(f"the bucket {bucket} of the store {location} does not exist") from None
    except PermissionError:  # HeadBucket needs s3:ListBucket on the whole bucket; credentials may hold it for a prefix
        try:
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except PermissionError:
            raise access_denied(location, path) from None
    return fs, path


def remote_store(location: str) -> None:
    """A store on S3 that a verb writes: its bucket is reachable (`s3_bucket`), and its prefix is not an object (one
    more request)."""
    if not location.startswith(S3_SCHEMES):
        return
    fs, path = s3_bucket(location)
    if "/" in path.strip("/") and fs.isfile(path.rstrip("/")):
        raise GenreBatchError(f"the store {location} is an object, not a folder: give the prefix to keep the store under")


def training_options(spec: str | None, retrain: str, min_accuracy: float, abstain_below: float, group_by: str) -> None:
    """`run` trains only with --labels: options of training without it are a mistake, not ignored."""
    named = [option for option, on in (("--retrain always", retrain == "always"), ("--min-accuracy", min_accuracy != 0.0),
                                       ("--abstain-below", abstain_below != 0.0), (f"--group-by {group_by}", group_by != "auto")) if on]
    if spec is None and named:
        raise UsageError(f"{', '.join(named)}: only used when the run trains, and it trains only with --labels folders|tags|FILE")


def local_store_has(store: str, path: str, missing: str) -> None:
    """A local store holds `path` (relative to it), else a usage error saying what is `missing`; stores on object stores
    are checked by the run itself."""
    if not is_url(store) and not (Path(local_path(store)) / path).exists():
        raise UsageError(f"the store {store} {missing}")


def extracted(store: str) -> None:
    """A verb that reads features needs a store with an extracted library (its inventory)."""
    local_store_has(store, "features/inventory.parquet", "has no extracted library yet: run 'genre-batch extract LIBRARY' first")


def published(store: str) -> None:
    """A verb that reads the catalog needs a published snapshot (its pointer)."""
    local_store_has(store, "catalog/CURRENT.json", "has no published catalog yet: run 'genre-batch tag' (or 'run') first")


def is_store(store: str) -> None:
    """A folder given as the store of a verb that changes it must already be a store."""
    if not is_url(store) and not any((Path(local_path(store)) / part).is_dir() for part in ("features", "models", "catalog", "runs")):
        raise UsageError(f"{store} is not a genre-batch store (no features, models, catalog or runs folder)")


def has_model(store: str) -> None:
    """`tag` needs a current model: without one it ends as a run would, with NoModel (exit 4), but before anything starts
    (reading the pointer only: the stage checks the model itself)."""
    from genre_batch.modelling import registry
    from genre_batch.storage.store import Store

    s = Store.at(store)
    if registry.current_version(s) is None:
        raise registry.no_model(s)


def remote_store_found(location: str) -> None:
    """A store on an object store that a verb reads holds something (one request; on S3 after `s3_bucket`'s): a wrong
    bucket or prefix would read as an empty store. On S3 "not found" means that: a refusal is access denied."""
    if not is_url(location):
        return
    import fsspec

    s3 = location.startswith(S3_SCHEMES)
    fs, path = s3_bucket(location) if s3 else fsspec.core.url_to_fs(location)
    try:
        found = fs.exists(path.rstrip("/"))
    except PermissionError:
        raise access_denied(location, path) from None
    if not found:
        raise GenreBatchError(f"store not found: {location} (no object under it{'' if s3 else ', or not visible with these credentials'})")


def has_model_or_labels(store: str, spec: str | None, verb: str = "run") -> None:
    """`run` (or the nightly runs `serve` schedules) without --labels needs a current model to tag with."""
    if spec is not None:
        return
    from genre_batch.modelling import registry
    from genre_batch.storage.store import Store

    if registry.current_version(Store.at(store)) is None:
        raise UsageError(f"the store {store} has no current model and {verb} got no --labels: add --labels folders|tags|FILE to train one")


def prefect_api_url() -> str | None:
    """The Prefect API URL the process would use (environment, profile or settings file), None for the ephemeral API."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def prefect_ephemeral() -> bool:
    """Whether Prefect will start its ephemeral API server for a flow run: no API URL and ephemeral mode enabled."""
    from prefect.settings import get_current_settings

    return prefect_api_url() is None and get_current_settings().server.ephemeral.enabled


EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"
"""How Prefect 3 words the RuntimeError of an ephemeral API server that did not answer in time (it has no type of its own)."""


def prefect_start_error(error: BaseException) -> str | None:
    """One line for Prefect's ephemeral API server not starting in time, None for any other error."""
    if not (isinstance(error, RuntimeError) and str(error).startswith(EPHEMERAL_TIMEOUT)):
        return None
    import os

    waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "?")
    return (f"Prefect's ephemeral API server did not answer within {waited} s (a busy machine?): nothing was run; raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a server with '{SERVER_COMMAND}' and "
            f"'export PREFECT_API_URL={SERVER_API_URL}'")


CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
               ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
               ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))
"""The five fields of a cron expression: name, range, and the names that stand for numbers (from the range's start)."""
CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def cron_value(token: str, field: tuple[str, int, int, tuple[str, ...]]) -> None:
    """One value of a cron field (a number or a month/day name), checked against the field's range."""
    name, low, high, names = field
    value = names.index(token.lower()) + low if token.lower() in names else int(token) if token.isdigit() else None
    if value is None or not low <= value <= high:
        raise UsageError(f"{name} {token!r} is not in {low}-{high}")


def cron_item(item: str, field: tuple[str, int, int, tuple[str, ...]]) -> None:
    """One comma-separated item of a cron field: *, a value or a range, each optionally /step."""
    span, _, step = item.partition("/")
    if _ and not (step.isdigit() and int(step) > 0):
        raise UsageError(f"{field[0]} step {step!r} is not a positive number")
    if span != "*":
        for value in span.split("-", 1):
            cron_value(value, field)


def cron(expression: str) -> None:
    """A five-field cron expression (or @daily, ...) as Prefect's schedules accept it; UsageError naming the bad field."""
    fields = expression.split()
    if len(fields) == 1 and fields[0].lower() in CRON_MACROS:
        return
    try:
        if len(fields) != len(CRON_FIELDS):
            raise UsageError(f"{len(fields)} fields, a cron expression has 5 (minute hour day-of-month month day-of-week)")
        for text, field in zip(fields, CRON_FIELDS):
            for item in text.split(","):
                cron_item(item, field)
    except UsageError as e:
        raise UsageError(f"invalid --cron {expression!r}: {e}") from None


def prefect_server() -> str:
    """`serve` needs a real Prefect server (the ephemeral API schedules nothing); returns its API URL."""
    url = prefect_api_url()
    if url is None:
        raise GenreBatchError(
            f"serve needs a Prefect server (the ephemeral API runs no scheduler): start one with "
            f"'{SERVER_COMMAND}' and 'export PREFECT_API_URL={SERVER_API_URL}'"
        )
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # a server answered (Prefect Cloud may want credentials for /health): the API is there
    except OSError as e:
        raise GenreBatchError(f"no Prefect server answers at PREFECT_API_URL={url} ({e}): start one with '{SERVER_COMMAND}'") from None
    return url
