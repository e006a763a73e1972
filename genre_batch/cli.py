"""Command line: genre-batch extract | compact | train | evaluate | tag | run | models | status | prune | query | classify | write-tags | similar | demo | serve.

Arguments, label specs, formats and local paths are checked before Prefect or Dask are imported (genre_batch.checks):
a usage error costs no start-up, exits 2 and prints one line.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer._coercion import RuntimeParam, build_runtime_param
from typer.core import TyperCommand, TyperGroup

from genre_batch import GenreBatchError, UsageError, checks, default_numba_cache_dir, signals
from genre_batch.storage.locations import absolute, is_url, local_path

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from genre_batch.modelling.registry import ModelPointer
    from genre_batch.progress import Report
    from genre_batch.storage.store import Store


def plain_value(annotation: Any, low: float | None, high: float | None, value: Any) -> Any:
    """`value` as typer's coercion returns it, when it is plain: a str for a str, a bool for a bool; a whole number
    (digits) for an int or a decimal (digits, one point) for a float, within [low, high]; a list of str for list[str].
    None otherwise."""
    if annotation in (str, bool):
        return value if isinstance(value, annotation) else None
    if annotation == list[str]:
        return list(value) if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value) else None
    if annotation not in (int, float):
        return None
    digits = value.replace(".", "", 1) if isinstance(value, str) and annotation is float else value
    if isinstance(digits, str) and digits.isascii() and digits.isdigit():
        value = annotation(value)
    if type(value) is not annotation or (low is not None and value < low) or (high is not None and value > high):
        return None
    return value


@dataclass(frozen=True)
class PlainFirst(RuntimeParam):
    """typer's coercion of one parameter, taking plain values (plain_value) without the pydantic TypeAdapter typer
    builds for every parameter (importing pydantic and building them: 0.15 s CPU of a start); any other value, and
    so every error message, goes to typer's own coercion. Built on typer 0.29's internal coercion classes
    (typer._coercion; pyproject pins typer below 0.30): tests/test_similar_cli.py compares both on every parameter."""

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        """The plain value, else typer's coercion of it."""
        plain = plain_value(self.annotation, self.parameter_info.min, self.parameter_info.max, value)
        return plain if plain is not None else build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)


def plain_first(params: list[Any]) -> list[Any]:
    """The parameters of a command (its --help included), each coerced by PlainFirst."""
    for param in params:
        if param._runtime_param is None:
            param._runtime_param = PlainFirst(param.type_descriptor.parameter_info, param.type_descriptor.annotation)
    return params


class PlainFirstCommand(TyperCommand):
    """A typer command whose parameters are coerced by PlainFirst."""

    def get_params(self, ctx: Any) -> list[Any]:
        """The command's parameters, as parsing and help see them."""
        return plain_first(super().get_params(ctx))


class PlainFirstGroup(TyperGroup):
    """A typer group whose own parameters are coerced by PlainFirst (its commands are PlainFirstCommand)."""

    def get_params(self, ctx: Any) -> list[Any]:
        """The group's parameters, as parsing and help see them."""
        return plain_first(super().get_params(ctx))


app = typer.Typer(
    cls=PlainFirstGroup,
    help="Distributed batch genre tagging of music libraries: audio -> features -> classifier (linear or XGBoost) -> Parquet catalog.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

T = TypeVar("T")

CONTROL_CODES = str.maketrans(dict.fromkeys((7, 8, 11, 12, 13)))
"""Bell, backspace, vertical tab, form feed and carriage return: left out of printed lines, as rich's console does."""


def say(text: str, err: bool = False) -> None:
    """Print lines for people on stdout (stderr with `err`) as rich's console printed them (control codes left out,
    tabs expanded, flushed: stdout and stderr lines keep their order in one log), without loading rich (0.07-0.1 s CPU
    of a start): it draws only tables and progress bars."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text.translate(CONTROL_CODES).expandtabs(8) + "\n")
    stream.flush()


UNBOUNDED = 1_000_000
"""The console width of a pipe or file: tables keep their natural width (rich would cut them to 80 columns)."""


@functools.cache
def console(stderr: bool = False) -> Console:
    """rich's console on stdout (or stderr), for tables and progress bars: a terminal's width (or COLUMNS), unbounded on
    a pipe or file, so that a table written there holds every value whole (URIs, model versions)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else UNBOUNDED
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}
QUIET_CONSOLE = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL"}

StoreOpt = Annotated[
    str,
    typer.Option(
        "--store", "-s", envvar="GENRE_BATCH_STORE", help="Store URL (folder or s3://bucket/prefix) holding features, models, catalog."
    ),
]


def checked_option(check: Callable[[str | None], None], name: str) -> Callable[[str | None], str | None]:
    """An option callback: the value refused while the command line is parsed, like any malformed option."""

    def callback(value: str | None) -> str | None:
        """The value, once `check` passes it."""
        try:
            check(value)
        except UsageError as e:
            raise typer.BadParameter(str(e).removeprefix(f"{name} {value}: ")) from None
        return value

    return callback


SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", envvar="DASK_SCHEDULER_ADDRESS", callback=checked_option(checks.scheduler, "--scheduler"),
                 help="Dask scheduler address (tcp://host:8786). Default: a local cluster, one single-threaded worker per core."),
]
LabelsOpt = Annotated[
    str | None,
    typer.Option("--labels", "-l", help="Label source: 'folders' (parent folder = genre), 'tags' (embedded genre tag), or a CSV/Parquet file with file and genre columns."),
]
MinAccuracyOpt = Annotated[
    float, typer.Option("--min-accuracy", min=0.0, max=1.0, help="Promote a new model only if its cross-validated accuracy reaches this (and beats the majority baseline).")
]
AbstainOpt = Annotated[
    float, typer.Option("--abstain-below", min=0.0, max=1.0, help="Tracks whose calibrated confidence is under this get genre 'unknown' (probabilities kept). Stored with the model.")
]
GroupByOpt = Annotated[
    str,
    typer.Option("--group-by", help="Keep these groups whole in evaluation splits: auto (artist tags, else album tags, else track), track, artist, album, folder, or a feature-store column."),
]
STRICT_EXIT = 3
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help=f"Exit with status {STRICT_EXIT} when any file of the library currently fails (see the errors table)."),
]
FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="Summary format: text (for people) or json (one object on stdout, keys in the README).")
]
ListFormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="Output format: text (for people) or json (one array on stdout, keys in the README).")
]
FeaturesOpt = Annotated[
    str,
    typer.Option("--features", help="Feature families to extract, comma-separated: librosa (always) and musicnn. New and changed files get every one; files lacking one are backfilled, --backfill-cap per run."),
]
TrainFeaturesOpt = Annotated[
    str | None,
    typer.Option("--features", help="Feature families the model is trained on, comma-separated: librosa, musicnn or both (default: the current model's, else librosa,musicnn when every track has musicnn features, else librosa). Recorded in the model card; tagging feeds the model the same families."),
]
ClassifierOpt = Annotated[
    str | None,
    typer.Option("--classifier", help="xgboost (gradient-boosted trees) or linear (standardised L2 logistic regression); default: the current model's when training on its families, else linear with musicnn and xgboost on librosa alone. Recorded in the model card."),
]
BackfillCapOpt = Annotated[
    int, typer.Option("--backfill-cap", min=0, help="At most this many files per run extracted only for a family they lack.")
]
DEFAULT_STORE = "genre-batch-store"
SUMMARY_KEYS = ("run_id", "flow", "status", "error", "started_at", "finished_at", "extract", "compact", "train_decision", "train", "tag")
"""Keys of the JSON summary (--format json), besides failing_files; a stage that did not run is null."""


def feature_names(value: str) -> tuple[str, ...]:
    """The family names of a --features value, checked."""
    from genre_batch.storage.feature_store import FAMILIES

    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown or not names:
        raise UsageError(f"--features {value!r}: unknown family {', '.join(unknown) or '(none given)'}; choose from {', '.join(FAMILIES)}")
    return names


DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan (new, changed, to retry, re-extracted by extract --force, backfilled with a family they lack, moved, removed, unchanged; whether the listing guard refuses; with run --labels, would it train) and stop: no lease taken, nothing written, no cluster started."),
]


def print_plan(library: str, store: str, force: bool, allow_shrink: bool, labels: str | None, retrain: str,
               features: tuple[str, ...], backfill_cap: int, fmt: str) -> None:
    """Print what a run would do, without the lease and without writing (the retrain decision reads the features already
    extracted); `force` re-extracts every file (extract --force), `allow_shrink` passes the listing guard (run --force);
    `features` and `backfill_cap` as the run takes them."""
    from dataclasses import asdict

    from genre_batch.stages.extract import dry_run
    from genre_batch.storage.store import Store

    s = Store.at(store)
    plan = asdict(dry_run(absolute(library), s, force, allow_shrink, features, backfill_cap))
    if labels is not None and s.exists(s.inventory):
        from genre_batch.stages.retrain import retrain_decision

        plan["would_train"], plan["train_reason"] = retrain_decision(s, labels, retrain)
        if plan["new"] + plan["changed"]:
            plan["train_reason"] += f"; judged on the features already extracted: {plan['new'] + plan['changed']} new or changed files not counted"
    elif labels is not None:
        plan["would_train"], plan["train_reason"] = True, "no features extracted yet"
    if fmt == "json":
        print_json(plan)
        return
    forced = f"{plan['forced']} re-extracted by --force, " if force else ""
    say(
        f"plan: {plan['discovered']} audio files in {plan['library']}: {plan['new']} new, {plan['changed']} changed, "
        f"{plan['retried']} to retry, {forced}{plan['moved']} moved, {plan['removed']} removed, {plan['unchanged']} unchanged",
    )
    if plan["backfill"] or plan["backfill_left"]:
        say(f"backfill: {plan['backfill']} files get the feature families they lack ({', '.join(features)}; at most "
            f"{backfill_cap} per family), {plan['backfill_left']} left for later runs")
    if "would_train" in plan:
        say(f"train: {'yes' if plan['would_train'] else 'no'} ({plan['train_reason']})")
    if plan["refused"]:
        say(f"refused: {plan['refused']}")
    say_unlisted(plan["unlisted"])
    say("dry run: nothing was written")


def say_unlisted(skipped: list[str]) -> None:
    """Warn, on stderr, of what the listing skipped ("path: reason")."""
    for path in skipped:
        say(f"warning: not listed: {path}", err=True)


def finite(obj: object) -> object:
    """`obj` with NaN and infinite floats as None: strict JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def print_json(obj: object) -> None:
    """One JSON document on stdout (NaN and infinities as null)."""
    sys.stdout.write(json.dumps(finite(obj), sort_keys=True, default=str) + "\n")


RetrainOpt = Annotated[
    str,
    typer.Option("--retrain", help="When to train a new model: auto (no model; or, unless pinned, more than 5 % of the labelled set changed, or any change after 30 days), always, never."),
]


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a GenreBatchError as one line on stderr, without a traceback, and exit with its status (UsageError 2,
    NoModel 4, PublishRefused 5, others 1); a storage failure or Prefect's server not starting likewise, with status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from genre_batch.storage.store import storage_error

        try:
            return command(*args, **kwargs)
        except GenreBatchError as e:
            say(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except Exception as e:
            message = storage_error(e) or checks.prefect_start_error(e)
            if message is None:
                raise
            say(f"error: {message}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def version() -> str:
    """The installed version of genre-batch."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from genre_batch import __version__

    try:
        return installed("genre-batch")
    except PackageNotFoundError:
        return __version__


def show_version(value: bool) -> None:
    """--version: print the version and exit."""
    if value:
        say(f"genre-batch {version()}")
        raise typer.Exit(0)


@app.callback()
def options(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's flow and task logs on the console (serve always shows them).")] = False,
    endpoint_url: Annotated[
        str | None,
        typer.Option("--endpoint-url", callback=checked_option(checks.endpoint, "--endpoint-url"),
                     help="S3-compatible endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). Credentials come from the standard AWS chain."),
    ] = None,
    _version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Distributed batch genre tagging of music libraries."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url  # read by botocore here and by local workers
    logged = verbose or ctx.invoked_subcommand == "serve"  # a server's log: its runs, and runs cancelled by the concurrency limit
    for key, value in {**PREFECT_DEFAULTS, **({} if logged else QUIET_CONSOLE)}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("NUMBA_CACHE_DIR", default_numba_cache_dir())  # before numba loads: one cache for all


@contextmanager
def prefect_api_starting() -> Iterator[None]:
    """Prefect's ephemeral API server (when it will use one) starting in a background thread while the block runs (the
    flows' imports: 2-3 s of CPU), instead of after them; at the end of the block, wait until it answers (its start's
    error, if any, raised here: checks.prefect_start_error). With PREFECT_API_URL set, the block just runs."""
    if not checks.prefect_ephemeral():
        yield
        return
    # What get_client imports to start the server, imported in this thread: two threads importing Prefect's modules
    # at once can deadlock on its circular imports.
    import prefect.server.api.server  # noqa: F401
    from prefect import get_client

    failures: list[Exception] = []

    def start() -> None:
        try:
            get_client(sync_client=True)  # starts the ephemeral server and waits until it answers (Prefect's own start)
        except Exception as e:
            failures.append(e)

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    yield
    thread.join()
    if failures:
        raise failures[0]


def progress_bar() -> Progress:
    """Progress bars of the long stages (extraction's files, training's fits), on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=True,
    )


def progress_text(news: Report) -> tuple[str, str]:
    """A stage's bar label and the words after its count: extraction's (and classification's) files and errors, the
    training sample's batches read, the tracks tagged, the publishing steps and training's fits (with the step in work)."""
    if news.stage == "extract":
        return "extracting", f"files, {news.errors} errors"
    if news.stage == "classify":
        return "classifying", f"files, {news.errors} errors"
    if news.stage == "read":
        return "reading sample", f"batches; {news.note}"
    if news.stage == "tag":
        return "tagging", "tracks"
    if news.stage == "publish":
        return "publishing", f"steps; {news.note}"
    return "fitting", f"fits; {news.note}"


def with_progress(call: Callable[[], T]) -> T:
    """Run a flow (or a stage), drawing a progress bar for each long stage once it reports progress."""
    from genre_batch import progress

    bar = progress_bar()
    bars: dict[str, TaskID] = {}

    def update(news: Report) -> None:
        if console(stderr=True).is_terminal:  # rich draws nothing elsewhere but would leave an empty line behind
            bar.start()
        label, what = progress_text(news)
        if news.stage not in bars:
            bars[news.stage] = bar.add_task(label, total=None, what=what)
        bar.update(bars[news.stage], completed=news.done, total=news.total, what=what)

    try:
        with progress.listening(update):
            return call()
    finally:
        if bar.live.is_started:
            bar.stop()


def print_extract(summary: dict) -> None:
    """Print what an extraction did."""
    say(
        f"extract: {summary['discovered']} audio files in {summary['library']}; "
        f"{summary['extracted']} extracted, {summary['failed']} failed, {summary['unchanged']} unchanged, "
        f"{summary['moved']} moved, {summary['removed']} removed"
        + (f"; {summary['backfilled']} backfilled for a new family, {summary['backfill_left']} left for later runs" if summary.get("backfilled") or summary.get("backfill_left") else "")
        + (f" ({summary['wall_s']:.1f} s, {summary['cpu_s'] / max(1, summary['extracted'] + summary['failed']):.3f} CPU s/file)" if summary["shards"] else ""),
    )
    say_unlisted(summary.get("unlisted") or [])


def print_train(summary: dict) -> None:
    """Print what a training did."""
    state = "promoted to current" if summary["promoted"] else "REFUSED by the promotion gate, not made current"
    sample = f" (a sample of {summary['sampled_tracks']})" if summary["sampled_tracks"] < summary["tracks"] else ""
    say(
        f"train: model {summary['version']} ({summary.get('classifier', 'xgboost')} on {','.join(summary.get('features', ['librosa']))}) "
        f"on {summary['tracks']} tracks{sample}, {len(summary['genres'])} genres "
        f"(labels: {summary['label_source']}); cross-validated accuracy (grouped by {summary['grouping']}) {summary['cv_accuracy']:.3f}, "
        f"macro-F1 {summary['cv_macro_f1']:.3f}; held-out accuracy {summary['holdout_accuracy']:.3f}; {state}: {summary['reason']}",
    )
    if summary["dropped_genres"]:
        say(f"  genres with too few tracks, left out: {summary['dropped_genres']}")
    if summary.get("hint"):
        say(f"  hint: {summary['hint']}")


def print_tag(summary: dict) -> None:
    """Print what a tagging published."""
    genres = ", ".join(f"{g} {n}" for g, n in summary["genres"].items())
    if summary["mode"] == "unchanged":
        say(f"tag: catalog snapshot {summary['snapshot']} is up to date ({summary['rows']} tracks, model {summary['model_version']})")
        return
    how = (
        f"{summary['predicted']} predicted, {summary['carried']} carried over, {summary['dropped']} dropped"
        if summary["mode"] == "incremental" else f"all {summary['predicted']} predicted"
    )
    say(
        f"tag: published catalog snapshot {summary['snapshot']}: {summary['rows']} tracks with model "
        f"{summary['model_version']} ({genres}; {how}); {summary['disagreements']} disagree with their embedded tag",
    )


def print_compact(summary: dict) -> None:
    """Print what a compaction did."""
    say(
        f"compact: {summary['parts_before']} parts -> {summary['parts_after']}, index rows {summary['index_rows_before']} -> "
        f"{summary['index_rows_after']} ({summary['tracks']} current tracks)",
    )


def print_errors(store_url: str, limit: int = 10) -> int:
    """Print the files that currently fail, with their reasons; returns how many there are."""
    from genre_batch.storage.feature_store import current_errors
    from genre_batch.storage.store import Store

    errors = current_errors(Store.at(store_url))
    if errors.num_rows == 0:
        return 0
    say(f"errors: {errors.num_rows} files could not be processed (query them: SELECT * FROM errors):")
    for row in errors.slice(0, limit).to_pylist():
        say(f"  {row['uri']}: {row['error_type']}: {row['message']}")
    if errors.num_rows > limit:
        say(f"  ... and {errors.num_rows - limit} more")
    return errors.num_rows


def failing_files(store_url: str) -> int:
    """How many files of the library currently fail."""
    from genre_batch.storage.feature_store import current_errors
    from genre_batch.storage.store import Store

    return current_errors(Store(store_url)).num_rows


def json_summary(record: dict, failing: int) -> dict:
    """The stable JSON summary of a run record: every key of SUMMARY_KEYS (null when absent) and failing_files."""
    return {**{key: record.get(key) for key in SUMMARY_KEYS}, "failing_files": failing}


def print_record(record: dict, store_url: str, strict: bool = False, fmt: str = "text") -> None:
    """Print the summary of a run record (text or json); with `strict`, exit STRICT_EXIT when library files currently fail."""
    if fmt == "json":
        failing = failing_files(store_url)
        print_json(json_summary(record, failing))
    else:
        failing = print_text_record(record, store_url)
    if strict and failing:
        say(f"error: --strict: {failing} files of the library could not be processed", err=True)
        raise typer.Exit(STRICT_EXIT)


def print_text_record(record: dict, store_url: str) -> int:
    """Print the summary of a run record for people; returns how many library files currently fail."""
    if "extract" in record:
        print_extract(record["extract"])
    if record.get("compact"):
        print_compact(record["compact"])
    if "train_decision" in record:
        say(f"train decision: {record['train_decision']}")
    if "train" in record:
        print_train(record["train"])
    if "tag" in record:
        print_tag(record["tag"])
    failing = print_errors(store_url)
    say(f"run {record['run_id']} {record.get('status', 'completed')}")
    return failing


def recorded(call: Callable[[], dict], store_url: str, strict: bool = False, fmt: str = "text") -> None:
    """Run a flow and print its record (`print_record`). A run that ends with no model to tag with (exit 4) or held by a
    guard (exit 5) still prints its JSON summary with --format json, from the record it wrote, before its error line."""
    from datetime import datetime, timezone

    from genre_batch import NoModel, PublishRefused

    started = datetime.now(timezone.utc).isoformat()
    try:
        record = call()
    except (NoModel, PublishRefused):
        if fmt == "json":
            from genre_batch.status import run_records
            from genre_batch.storage.store import Store

            s = Store(store_url)
            written = run_records(s)
            newest = s.read_json(written[-1]) if written else {}
            if newest.get("started_at", "") >= started:  # this run's (it held the store's lease), not an earlier one's
                print_json(json_summary(newest, failing_files(store_url)))
        raise
    print_record(record, store_url, strict, fmt)


def check_writer(library: str | None, store: str, fmt: str, labels: str | None = None) -> None:
    """Checks of a store-writing verb: local ones first (exit 2), then one request each to a remote library and store (exit 1)."""
    if library is not None:
        checks.library(library)
    checks.writable_folder(store, "store")
    checks.labels(labels)
    checks.summary_format(fmt)
    if library is not None:
        checks.remote_library(library)
    checks.remote_store(store)


def check_reader(store: str) -> None:
    """A verb that reads the store: a local store must be an existing folder, a URL's protocol one fsspec can use (a store
    on an object store is checked to hold something by `checks.remote_store_found`, after every local check)."""
    checks.given(store, "store")
    checks.protocol(store, "store")
    if not is_url(store) and not Path(local_path(store)).is_dir():
        raise UsageError(f"store not found or not a folder: {store}")


@app.command(cls=PlainFirstCommand)
@friendly
def extract(
    library: Annotated[str, typer.Argument(help="Library folder or URL (s3://bucket/prefix, ...).")],
    store: StoreOpt = DEFAULT_STORE,
    scheduler: SchedulerOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Re-extract every file, changed or not (and accept a listing over 30 % smaller than the last, or without over 30 % of its files).")] = False,
    features: FeaturesOpt = "librosa,musicnn",
    backfill_cap: BackfillCapOpt = 50_000,
    dry_run: DryRunOpt = False,
    strict: StrictOpt = False,
    fmt: FormatOpt = "text",
) -> None:
    """Extract features of new and changed audio files of LIBRARY into the store."""
    check_writer(library, store, fmt)
    names = feature_names(features)
    if dry_run:
        print_plan(library, store, force, force, None, "auto", names, backfill_cap, fmt)
        return
    with prefect_api_starting():
        from flows.pipeline import extract_flow

    store = absolute(store)
    recorded(lambda: with_progress(lambda: extract_flow(absolute(library), store, scheduler, force, names, backfill_cap)), store, strict, fmt)


@app.command(cls=PlainFirstCommand)
@friendly
def compact(store: StoreOpt = DEFAULT_STORE, scheduler: SchedulerOpt = None, fmt: FormatOpt = "text") -> None:
    """Rewrite the feature store's current rows into large parts, dropping superseded rows and leftover files."""
    check_reader(store)
    check_writer(None, store, fmt)
    checks.extracted(store)
    checks.remote_store_found(store)
    with prefect_api_starting():
        from flows.pipeline import compact_flow

    store = absolute(store)
    recorded(lambda: compact_flow(store, scheduler), store, fmt=fmt)


@app.command(cls=PlainFirstCommand)
@friendly
def status(store: StoreOpt = DEFAULT_STORE, fmt: FormatOpt = "text") -> None:
    """The store at a glance: current model and its scores, catalog snapshot, last runs, current errors by kind, lease holder."""
    checks.summary_format(fmt)
    check_reader(store)
    checks.remote_store_found(store)
    from genre_batch.status import status as store_status
    from genre_batch.storage.store import Store

    facts = store_status(Store.at(store))
    if fmt == "json":
        print_json(facts)
        return
    model, snapshot = facts["model"], facts["catalog"]
    say(f"store: {facts['store']} ({facts['tracks']} tracks with features)")
    say(
        f"model: {model['version']}{' (pinned)' if model['pinned'] else ''}, CV accuracy {model['cv_accuracy']:.3f}, "
        f"held-out {model['holdout_accuracy']:.3f}, {model['tracks']} labelled tracks, {model['genres']} genres" if model else "model: none",
    )
    say(
        f"catalog: snapshot {snapshot['snapshot']}, {snapshot['rows']} rows, model {snapshot['model_version']}, published {snapshot['published_at']}"
        if snapshot else "catalog: none published",
    )
    say("errors: " + (", ".join(f"{k} {n}" for k, n in facts["errors_by_kind"].items()) or "none"))
    for run in facts["last_runs"]:
        took = f" in {run['duration_s']:.0f} s" if run["duration_s"] is not None else ""
        say(f"run {run['run_id']} ({run['flow']}): {run['status']}{took}" + (f": {run['error']}" if run["error"] else ""))
    say(lease_line(facts["lease"]))


def lease_line(holder: dict | None) -> str:
    """What `status` says of the run lease: free, held, or stale (left by a run that died or hung)."""
    if holder is None:
        return "lease: free"
    run = f"run {holder['run_id']} (pid {holder['pid']} on {holder['host']})"
    if holder["stale"]:
        return f"lease: stale ({holder['stale']}): left by {run}, valid until {holder['expires_at']}; the next run takes it over"
    return f"lease: held by {run} until {holder['expires_at']}"


models_app = typer.Typer(cls=PlainFirstGroup, help="List, inspect, promote, roll back and pin the store's models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
VersionArg = Annotated[str, typer.Argument(help="A model version (see 'genre-batch models list').")]
RETAG_NOTE = "the catalog is not re-tagged now: the next 'tag' or 'run' re-tags every track with it"


@models_app.command("list", cls=PlainFirstCommand)
@friendly
def models_list(store: StoreOpt = DEFAULT_STORE, fmt: ListFormatOpt = "text") -> None:
    """Every registered model: version, created, classifier and feature families, tracks, genres, CV and held-out accuracy, gate, current marker."""
    checks.summary_format(fmt)
    check_reader(store)
    checks.remote_store_found(store)
    from rich.table import Table

    from genre_batch.modelling import registry
    from genre_batch.storage.store import Store

    rows = registry.catalogue(Store.at(store))
    if fmt == "json":
        print_json(rows)
        return
    view = Table("", "version", "created", "model", "tracks", "genres", "CV acc", "held-out acc", "gate")
    view.columns[1].no_wrap = True  # what `models show` and `promote` take: whole even in 80 columns (a pipe)
    view.columns[1].min_width = max((len(r["version"]) for r in rows), default=0)
    for r in rows:
        mark = ("*" if r["current"] else "") + ("P" if r["pinned"] else "")
        view.add_row(mark, r["version"], r["created_at"][:16].replace("T", " "), f"{r['classifier']} {r['features']}", str(r["tracks"]),
                     str(r["genres"]), f"{r['cv_accuracy']:.3f}", f"{r['holdout_accuracy']:.3f}", "passed" if r["gate_passed"] else "refused")
    console().print(view, markup=False)
    say("(* current, P pinned)")


@models_app.command("show", cls=PlainFirstCommand)
@friendly
def models_show(version: VersionArg, store: StoreOpt = DEFAULT_STORE) -> None:
    """A model's card (JSON): genres, metrics, sample, gate, parameters, provenance."""
    check_reader(store)
    checks.remote_store_found(store)
    from genre_batch.modelling import registry
    from genre_batch.storage.store import Store

    s = Store.at(store)
    if version not in registry.versions(s):
        raise GenreBatchError(f"no model {version} in {s.url}: see 'genre-batch models list'")
    print_json(registry.card(s, version).document)


def switch_model(store: str, change: Callable[[Store], ModelPointer], fmt: str) -> None:
    """Change the model pointer under the store's run lease and say what is current now (the pointer, with json)."""
    checks.summary_format(fmt)
    check_reader(store)
    checks.remote_store_found(store)
    from genre_batch.modelling import registry
    from genre_batch.stages.runs import new_run_id
    from genre_batch.storage import lease
    from genre_batch.storage.store import Store

    s = Store.at(store)
    with lease.held(s, new_run_id()):
        before = registry.pointer(s)
        pointer = change(s)
    if fmt == "json":
        print_json(pointer.document)
        return
    now = f"models: current model is {pointer.version}" + (" (pinned)" if pointer.pinned else "")
    if before is None or pointer.version != before.version:
        say(f"{now}; {RETAG_NOTE}")
    else:
        say(now + ("" if pointer.pinned != before.pinned else " (unchanged)"))


@models_app.command("promote", cls=PlainFirstCommand)
@friendly
def models_promote(
    version: VersionArg,
    store: StoreOpt = DEFAULT_STORE,
    force: Annotated[bool, typer.Option("--force", help="Promote a model the promotion gate refused.")] = False,
    fmt: FormatOpt = "text",
) -> None:
    """Make a registered model current (a gate-refused one only with --force); the catalog is re-tagged by the next tag or run."""
    from genre_batch.modelling import registry

    switch_model(store, lambda s: registry.promote_checked(s, version, force), fmt)


@models_app.command("rollback", cls=PlainFirstCommand)
@friendly
def models_rollback(store: StoreOpt = DEFAULT_STORE, fmt: FormatOpt = "text") -> None:
    """Make the previous current model current again (from the pointer's history)."""
    from genre_batch.modelling import registry

    switch_model(store, registry.rollback, fmt)


@models_app.command("pin", cls=PlainFirstCommand)
@friendly
def models_pin(
    store: StoreOpt = DEFAULT_STORE,
    unpin: Annotated[bool, typer.Option("--unpin", help="Let automatic retraining replace the current model again.")] = False,
    fmt: FormatOpt = "text",
) -> None:
    """Pin the current model: 'run --retrain auto' never replaces a pinned model (--unpin lifts it)."""
    from genre_batch.modelling import registry

    switch_model(store, lambda s: registry.pin(s, not unpin), fmt)


@app.command(cls=PlainFirstCommand)
@friendly
def prune(
    store: StoreOpt = DEFAULT_STORE,
    keep_models: Annotated[int, typer.Option("--keep-models", min=1, help="Models to keep (the current one and its history always stay).")] = 10,
    keep_runs: Annotated[int, typer.Option("--keep-runs", min=1, help="Run records to keep.")] = 100,
    keep_evaluations: Annotated[int, typer.Option("--keep-evaluations", min=1, help="Evaluation reports to keep.")] = 10,
    fmt: FormatOpt = "text",
) -> None:
    """Delete old models, run records and evaluation reports, keeping the newest of each."""
    checks.summary_format(fmt)
    check_reader(store)
    checks.is_store(store)
    checks.remote_store_found(store)
    from genre_batch.modelling import registry
    from genre_batch.stages.runs import new_run_id
    from genre_batch.status import prune_evaluations, prune_runs
    from genre_batch.storage import lease
    from genre_batch.storage.store import Store

    s = Store.at(store)
    with lease.held(s, new_run_id()):
        models = registry.prune(s, keep_models)
        records = prune_runs(s, keep_runs)
        reports = prune_evaluations(s, keep_evaluations)
    if fmt == "json":
        print_json({"models": models, "run_records": records, "evaluations": reports})
        return
    say(f"prune: {len(models)} models, {len(records)} run records, {len(reports)} evaluation reports deleted")


@app.command(cls=PlainFirstCommand)
@friendly
def train(
    store: StoreOpt = DEFAULT_STORE,
    labels: LabelsOpt = "folders",
    scheduler: SchedulerOpt = None,
    min_accuracy: MinAccuracyOpt = 0.0,
    abstain_below: AbstainOpt = 0.0,
    group_by: GroupByOpt = "auto",
    all_tracks: Annotated[bool, typer.Option("--all-tracks", help="Fit the final model on every labelled track with xgboost.dask on the cluster (evaluation stays on the capped sample; xgboost only).")] = False,
    features: TrainFeaturesOpt = None,
    classifier: ClassifierOpt = None,
    fmt: FormatOpt = "text",
) -> None:
    """Train, evaluate and register a model on the labelled tracks of the store; make it current if it passes."""
    check_reader(store)
    families = None if features is None else list(feature_names(features))
    checks.classifier(classifier, all_tracks)
    checks.grouping(group_by)
    check_writer(None, store, fmt, labels)
    checks.extracted(store)
    checks.remote_store_found(store)
    with prefect_api_starting():
        from flows.pipeline import train_flow

    store = absolute(store)
    recorded(lambda: with_progress(lambda: train_flow(store, labels_spec(labels), scheduler, min_accuracy, abstain_below, group_by, all_tracks, families, classifier)),
             store, fmt=fmt)


@app.command(cls=PlainFirstCommand)
@friendly
def evaluate(
    store: StoreOpt = DEFAULT_STORE,
    labels: LabelsOpt = "folders",
    scheduler: SchedulerOpt = None,
    group_by: GroupByOpt = "auto",
    features: TrainFeaturesOpt = None,
    classifier: ClassifierOpt = None,
    fmt: FormatOpt = "text",
) -> None:
    """Grouped, stratified cross-validation of the labelled tracks; writes a report (nothing is registered)."""
    checks.summary_format(fmt)
    check_reader(store)
    checks.labels(labels)
    families = None if features is None else list(feature_names(features))
    checks.classifier(classifier)
    checks.grouping(group_by)
    checks.extracted(store)
    checks.remote_store_found(store)
    from genre_batch import progress
    from genre_batch.cluster import session
    from genre_batch.stages import train as stage
    from genre_batch.storage.store import Store

    with session(scheduler) as cluster:
        report = with_progress(lambda: stage.evaluate(Store.at(store), labels_spec(labels), cluster, group_by, families, classifier, progress.report))
    if fmt == "json":
        print_json(report)
        return
    cv = report["cross_validation"]
    say(
        f"evaluate: {report['tracks']} tracks ({report['windows']} rows), {len(report['genres'])} genres, "
        f"{report['classifier']} on {', '.join(report['feature_families'])}, "
        f"{cv['folds']}-fold CV grouped by {cv['grouping']} ({cv['groups']} groups): accuracy {cv['accuracy']:.3f}, "
        f"macro-F1 {cv['macro_f1']:.3f} (majority baseline {report['majority_baseline']:.3f}); calibration error "
        f"{cv['ece']:.3f} -> {cv['ece_calibrated']:.3f} at temperature {cv['temperature']:.2f}",
    )
    for genre, s in cv["per_genre"].items():
        say(f"  {genre}: precision {s['precision']:.2f} recall {s['recall']:.2f} F1 {s['f1']:.2f} ({s['support']} tracks)")
    say(f"report: {report['report']}/report.json, confusion_matrix.png")


@app.command(cls=PlainFirstCommand)
@friendly
def tag(
    store: StoreOpt = DEFAULT_STORE,
    scheduler: SchedulerOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Predict every track, even those the published snapshot already holds for the current model.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Publish even when a new model gives more than 30 % of the tracks another genre.")] = False,
    fmt: FormatOpt = "text",
) -> None:
    """Tag the store's tracks with the current model (new and changed ones only, when the model is unchanged) and publish a catalog snapshot."""
    check_reader(store)
    check_writer(None, store, fmt)
    checks.remote_store_found(store)
    checks.has_model(store)
    with prefect_api_starting():
        from flows.pipeline import tag_flow

    store = absolute(store)
    recorded(lambda: with_progress(lambda: tag_flow(store, scheduler, full, force)), store, fmt=fmt)


def labels_spec(labels: str | None) -> str | None:
    """A label spec with a local file path made absolute."""
    return labels if labels in (None, "folders", "tags") else absolute(labels)


@app.command(cls=PlainFirstCommand)
@friendly
def run(
    library: Annotated[str, typer.Argument(help="Library folder or URL (s3://bucket/prefix, ...).")],
    store: StoreOpt = DEFAULT_STORE,
    labels: LabelsOpt = None,
    scheduler: SchedulerOpt = None,
    min_accuracy: MinAccuracyOpt = 0.0,
    abstain_below: AbstainOpt = 0.0,
    group_by: GroupByOpt = "auto",
    retrain: RetrainOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Publish past the guards: a listing with over 30 % fewer files or without over 30 % of the last one's, a new model changing over 30 % of the genres.")] = False,
    features: FeaturesOpt = "librosa,musicnn",
    backfill_cap: BackfillCapOpt = 50_000,
    dry_run: DryRunOpt = False,
    strict: StrictOpt = False,
    fmt: FormatOpt = "text",
) -> None:
    """The nightly job as one Prefect flow: extract what changed, retrain as --retrain says, tag what changed, publish."""
    checks.retrain_policy(retrain)
    checks.grouping(group_by)
    checks.training_options(labels, retrain, min_accuracy, abstain_below, group_by)
    names = feature_names(features)
    check_writer(library, store, fmt, labels)
    checks.has_model_or_labels(store, labels)
    if dry_run:
        print_plan(library, store, False, force, labels_spec(labels), retrain, names, backfill_cap, fmt)
        return
    with prefect_api_starting():
        from flows.pipeline import nightly

    store = absolute(store)
    recorded(lambda: with_progress(
        lambda: nightly(absolute(library), store, labels_spec(labels), scheduler, min_accuracy, abstain_below, group_by, retrain, force, names, backfill_cap)
    ), store, strict, fmt)


def render(store: Store, sql: str, fmt: str) -> None:
    """Run a query on a store and print its result as a table, CSV or JSON."""
    from genre_batch.publishing import query as q

    if fmt == "csv":
        sys.stdout.write(q.to_csv(q.run(store, sql)))
        return
    result = q.fetch(store, sql)
    if fmt == "json":
        sys.stdout.write(q.to_json(result) + "\n")
        return
    from rich.table import Table

    view = Table(*result.columns, show_lines=False)
    for row in q.rows(result):
        view.add_row(*("" if v is None else str(v) for v in row.values()))
    console().print(view, markup=False)
    say(f"({len(result.rows)} rows)")


@app.command(cls=PlainFirstCommand)
@friendly
def query(
    sql: Annotated[str, typer.Argument(help="SELECT or EXPLAIN over tables catalog (the published snapshot), changes, \"similar\" (quoted), errors (queryable before any catalog) and writes.")],
    store: StoreOpt = DEFAULT_STORE,
    fmt: Annotated[str, typer.Option("--format", "-f", help="Output format: table, csv or json.")] = "table",
) -> None:
    """Run read-only DuckDB SQL over the published catalog, its change feed and similar lists, the error records and the write-back record."""
    checks.sql_statement(sql)
    checks.query_format(fmt)
    check_reader(store)
    checks.remote_store_found(store)
    from genre_batch.storage.store import Store

    render(Store.at(store), sql, fmt)


@app.command(cls=PlainFirstCommand)
@friendly
def classify(
    files: Annotated[list[str], typer.Argument(help="Audio files or URLs to classify; a folder or an S3 prefix stands for the audio files under it.")],
    store: StoreOpt = DEFAULT_STORE,
    top: Annotated[int, typer.Option("--top", min=1, help="How many genres to show per file.")] = 3,
    scheduler: SchedulerOpt = None,
    fmt: ListFormatOpt = "text",
) -> None:
    """Predict the genres of files with the current model of the store (nothing is stored); exit 1 if any file failed.

    Up to 64 files are decoded in this process; more, or any number with --scheduler, by Dask tasks."""
    checks.summary_format(fmt)
    check_reader(store)
    checks.classified_paths(files)
    checks.remote_store_found(store)
    from genre_batch.cluster import session
    from genre_batch.library.discovery import files_of
    from genre_batch.publishing.tagging import CLASSIFY_IN_PROCESS, classify_files
    from genre_batch.storage.store import Store

    uris, skipped = files_of([absolute(f) for f in files])
    say_unlisted(skipped)  # on stderr with either format: the JSON array holds the files classified
    if not uris:
        raise GenreBatchError(f"no audio files to classify in {', '.join(files)}")
    with session(scheduler) as cluster:  # started only when used
        on = cluster if scheduler or len(uris) > CLASSIFY_IN_PROCESS else None
        results = with_progress(lambda: classify_files(Store.at(store), uris, top, on))
    failed = sum(isinstance(result, str) for _, result in results)
    if fmt == "json":
        print_json([{"uri": uri, "error": r} if isinstance(r, str) else {"uri": uri, "genres": [{"genre": g, "probability": p} for g, p in r]}
                    for uri, r in results])
    else:
        for uri, result in results:
            say(f"{uri}: error: {result}" if isinstance(result, str) else f"{uri}: " + ", ".join(f"{g} {p:.2f}" for g, p in result))
    if failed:
        say(f"error: {failed} of {len(results)} files could not be classified", err=True)
        raise typer.Exit(1)


WRITE_FAILURES_SHOWN = 10


def write_back(store: str, choice: Any, undo: str | None) -> dict:
    """Write the chosen catalog genres into the files (or undo a write-back run) under the lease; the run's summary."""
    from genre_batch.library import writeback
    from genre_batch.stages.runs import run_record
    from genre_batch.storage.store import Store

    s = Store.at(store)
    with run_record(s, "write-tags") as record:
        rows = writeback.undo(s, record["run_id"], undo) if undo else writeback.write(s, record["run_id"], writeback.candidates(s, choice))
        files = [{k: r[k] for k in ("uri", "old_tag", "new_tag", "confidence", "outcome", "error_type", "message")} for r in rows.to_pylist()]
        done = sum(f["outcome"] != "failed" for f in files)
        record.update(undoes=undo, written=done, failed=len(files) - done)
    return {"run_id": record["run_id"], "applied": True, "undoes": undo, "written": done, "failed": len(files) - done, "files": files}


def print_write_back(summary: dict) -> None:
    """Print what a write-back did (or, without --apply, would do)."""
    if not summary["applied"]:
        for f in summary["files"]:
            say(f"  {f['uri']}: {'; '.join(f['old_tag']) or '(no genre tag)'} -> {f['new_tag'][0]} ({f['confidence']:.2f})")
        say(f"write-tags: {len(summary['files'])} files would be written; nothing was written (add --apply to write them)")
        return
    verb = f"restored the tags run {summary['undoes']} wrote in" if summary["undoes"] else "wrote the genre tag of"
    say(f"write-tags: run {summary['run_id']} {verb} {summary['written']} files, {summary['failed']} failed")
    failures = [f for f in summary["files"] if f["outcome"] == "failed"]
    for f in failures[:WRITE_FAILURES_SHOWN]:
        say(f"  {f['uri']}: {f['error_type']}: {f['message']}")
    if failures:
        say(f"  (all of them: genre-batch query \"SELECT * FROM writes WHERE run_id = '{summary['run_id']}' AND outcome = 'failed'\")")


@app.command("write-tags", cls=PlainFirstCommand)
@friendly
def write_tags(
    store: StoreOpt = DEFAULT_STORE,
    min_confidence: Annotated[
        float | None, typer.Option("--min-confidence", min=0.0, max=1.0, help="Write only genres predicted with at least this calibrated confidence (default 0).")
    ] = None,
    only_missing: Annotated[bool, typer.Option("--only-missing", help="Write only into files without a genre tag (or with one genre-batch wrote).")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Write the tags; without it, print what would be written and change nothing.")] = False,
    undo: Annotated[str | None, typer.Option("--undo", metavar="RUN", help="Restore the genre tags a write-back run replaced, in files not changed since.")] = None,
    fmt: FormatOpt = "text",
) -> None:
    """Write the catalog's predicted genres into the files' genre tags (only with --apply), or undo a write-back run."""
    checks.summary_format(fmt)
    check_reader(store)
    checks.write_tags_options(undo, apply, only_missing, min_confidence)
    checks.remote_store_found(store)
    if undo is not None:
        checks.write_back_run(store, undo)
    else:
        checks.published(store)
    from genre_batch.library import writeback
    from genre_batch.storage.store import Store

    choice = writeback.Choice(min_confidence or 0.0, only_missing)
    if apply or undo is not None:
        summary = write_back(store, choice, undo)
    else:
        rows = writeback.preview(writeback.candidates(Store.at(store), choice))
        summary = {"run_id": None, "applied": False, "undoes": None, "written": 0, "failed": 0, "files": rows}
    if fmt == "json":
        print_json(summary)
    else:
        print_write_back(summary)


@app.command(cls=PlainFirstCommand)
@friendly
def similar(
    tracks: Annotated[list[str], typer.Argument(help="Catalog tracks (track_id or uri) or audio files outside the catalog (extracted now, nothing stored).")],
    store: StoreOpt = DEFAULT_STORE,
    top: Annotated[int, typer.Option("--top", min=1, max=checks.SIMILAR_MAX_TOP, help="How many similar tracks per track.")] = 10,
    genre: Annotated[str | None, typer.Option("--genre", help="Only neighbours of this genre (searches deeper until --top are found).")] = None,
    fmt: ListFormatOpt = "text",
) -> None:
    """The most similar catalog tracks (cosine of the snapshot's embeddings) of catalog tracks or audio files; exit 1 if
    any track is neither (the others are still answered)."""
    checks.summary_format(fmt)
    checks.genre_name(genre)
    check_reader(store)
    checks.remote_store_found(store)
    from dataclasses import asdict

    from genre_batch.publishing import similar as neighbours
    from genre_batch.storage.store import Store

    answers = neighbours.answer(Store.at(store), [(t, absolute(t)) for t in tracks], top, genre)
    unanswered = [a.error for a in answers if isinstance(a, neighbours.Unanswered)]
    if fmt == "json":
        print_json([asdict(a) for a in answers])
    else:
        for a in answers:
            if isinstance(a, neighbours.Answer):
                say(f"{a.uri} ({a.genre or 'not in the catalog'}, from the {a.source}):")
                for n in a.neighbours:
                    say(f"  {n['rank']:>3}. {n['score']:.3f}  {n['uri']}  ({n['genre']})")
    for error in unanswered:
        say(f"error: {error}", err=True)
    if unanswered:
        raise typer.Exit(1)


@app.command(cls=PlainFirstCommand)
@friendly
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to build the demo library and store.")] = Path("genre-batch-demo"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Build a small synthetic library (tagged, untagged and one corrupt file), run the nightly job on it, show the catalog."""
    checks.writable_folder(str(directory), "demo folder")
    with prefect_api_starting():
        from flows.pipeline import nightly
    from genre_batch import demo as demo_library
    from genre_batch.storage.store import Store

    library, store = demo_library.build(directory.resolve())
    say(f"demo library: {library} ({demo_library.describe()})")
    record = with_progress(lambda: nightly(str(library), str(store), "tags", scheduler, 0.0))
    print_record(record, str(store))
    for title, sql in demo_library.EXAMPLE_QUERIES:
        say(f"\n{title}\n$ genre-batch query --store {store} \"{sql}\"")
        render(Store.at(str(store)), sql, "table")


@app.command(cls=PlainFirstCommand)
@friendly
def serve(
    library: Annotated[str, typer.Argument(help="Library folder or URL (s3://bucket/prefix, ...).")],
    store: StoreOpt = DEFAULT_STORE,
    labels: LabelsOpt = None,
    scheduler: SchedulerOpt = None,
    cron: Annotated[str, typer.Option("--cron", help="Cron schedule of the nightly run (UTC).")] = checks.NIGHTLY_CRON,
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "nightly",
) -> None:
    """Register the nightly flow as a scheduled Prefect deployment on a Prefect server and serve it (runs until stopped)."""
    check_writer(library, store, "text", labels)
    checks.has_model_or_labels(store, labels, "serve")
    checks.cron(cron)
    checks.prefect_server()
    from prefect import serve as serve_deployments

    from flows.pipeline import deployment

    parameters = {"library": absolute(library), "store": absolute(store), "labels": labels_spec(labels), "scheduler": scheduler}
    try:
        scheduled = deployment(name, cron, parameters)
    except ValueError as e:  # pydantic's ValidationError: a cron Prefect does not accept
        raise UsageError(f"invalid --cron {cron!r}: {str(e).splitlines()[-1].strip()}") from None
    serve_deployments(scheduled)


def usage_message(e: Exception) -> str:
    """One line for a command-line parsing error, naming the help to read."""
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {e.format_message()}{where}"  # type: ignore[attr-defined]


def app_for(argv: list[str]) -> typer.Typer:
    """The app with only the command argv[0] names (typer builds the parameters of every command it holds, 2 ms
    each: 0.04 s CPU of a start), or the whole app when argv[0] names no command (an option, `models`, a typo)."""
    chosen = [c for c in app.registered_commands if argv and (c.name or typer.main.get_command_name(c.callback.__name__)) == argv[0]]
    if not chosen:
        return app
    single = copy.copy(app)
    single.registered_commands, single.registered_groups = chosen, []
    return single


def run_app(argv: list[str]) -> int:
    """Run the command line on `argv`; returns the exit status (2 for parsing errors, printed as one line)."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click: its exceptions live here
    from typer._click.exceptions import UsageError as ParsingError

    command = typer.main.get_command(app_for(argv))
    try:
        status = command.main(argv, prog_name="genre-batch", standalone_mode=False)
    except NoArgsIsHelpError as e:
        say(e.format_message(), err=True)
        return 2
    except ParsingError as e:
        say(usage_message(e), err=True)
        return 2
    except ClickException as e:
        say(f"error: {e.format_message()}", err=True)
        return e.exit_code
    return status if isinstance(status, int) else 0


def main() -> None:
    """Entry point of the genre-batch command: SIGINT/SIGTERM end it with status 130/143 after the run unwinds."""
    try:
        with signals.interruptible():
            status = run_app(sys.argv[1:])
    except BaseException as e:
        signum = signals.signal_number(e)
        if signum is None:
            raise
        say(f"error: interrupted by {signals.signal_name(signum)}", err=True)
        status = signals.exit_status(signum)
    sys.exit(status)


if __name__ == "__main__":
    main()
