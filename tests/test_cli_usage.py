"""Bad invocations through the installed console script: the README's table is the test's table.

Usage errors exit 2 with one line and import neither Prefect nor Dask; paths that neither train nor tag import
neither XGBoost, scikit-learn nor matplotlib. Each invocation runs the installed script in a process of its own (its
exit status, stdout and stderr as the shell sees them) that also writes down the modules it imported: a fork of one
interpreter per module that has imported only what the script imports first (`genre_batch.cli`, checked to hold none
of those libraries), so that each of the ~40 invocations does not pay that import again (~0.3 s CPU each, measured).
`test_version_is_the_installed_one` execs the script itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "genre-batch"
START_UP = ("prefect", "distributed")
TRAINING = ("xgboost", "sklearn", "matplotlib")
ZYGOTE = """
import atexit, json, os, runpy, sys, traceback
script = sys.argv[1]
import genre_batch.cli  # the script's first import: the forks below start from it
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # one invocation, as a fresh process would run it: its argv, folder, environment and output files
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_CREAT), (2, job["stderr"], os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, mode), fd)
        sys.argv = [script, *job["argv"]]
        code = 1
        try:
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code
                if not (code is None or isinstance(code, int)):  # sys.exit("message"): the interpreter prints it, exits 1
                    print(code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
            atexit._run_exitfuncs()
            with open(job["modules"], "w") as out:
                json.dump(sorted({m.split('.')[0] for m in sys.modules}), out)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code or 0)  # never back into the loop
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def readme_rows() -> list[tuple[list[str], dict[str, str], int, str]]:
    """The rows of the README's bad-invocation table: (argv after genre-batch, extra environment, exit status, first line)."""
    text = (ROOT / "README.md").read_text().split("### Bad invocations", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`genre-batch"):
            continue
        invocation, status, first = (c.replace("\\|", "|") for c in cells)
        env = {"PREFECT_API_URL": ""} if "no `PREFECT_API_URL`" in invocation else {}
        argv = shlex.split(invocation.split("`")[1])[1:]
        rows.append((argv, env, int(status), first.strip("`")))
    return rows


ROWS = readme_rows()


def test_the_readme_table_is_read() -> None:
    assert len(ROWS) >= 19 and {status for _, _, status, _ in ROWS} == {1, 2}


def test_the_readme_verb_table_matches_the_cli() -> None:
    """Every verb is in the README's table of verbs and no other; each example parses, and each option a row names is
    one of its verb's (or of its subcommands', or a global one)."""
    import typer.main

    from genre_batch.cli import app

    group = typer.main.get_command(app)
    text = (ROOT / "README.md").read_text().split("\n## Commands", 1)[1].split("\n### ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w-]+)` \| .*$", text, flags=re.M)}
    assert set(rows) == set(group.commands)
    for verb, row in rows.items():
        command = group.commands[verb]
        subcommands = list(getattr(command, "commands", {}).values())
        options = {o for c in [group, command, *subcommands] for p in c.params for o in p.opts + p.secondary_opts}
        assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", row)) <= options, (verb, row)
        argv = shlex.split(row.split("` | `", 1)[1].split("`", 1)[0])[2:]
        if subcommands:
            command, argv = command.commands[argv[0]], argv[1:]
        command.make_context(f"genre-batch {verb}", argv)  # raises on an unknown option or a missing argument


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The folder the README's invocations run in: library/, store/ and bad-labels.csv (columns file,style)."""
    (tmp_path / "library").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "bad-labels.csv").write_text("file,style\nrock/a.mp3,rock\n")
    return tmp_path


def environment(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    """The test's environment with a private Prefect home, no Prefect server, and `extra` (an empty value unsets)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), **extra}
    env.pop("PREFECT_API_URL", None)
    return {k: v for k, v in env.items() if v}


class Zygote:
    """An interpreter that has imported the script's CLI module and forks a process per invocation of the script."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(CONSOLE_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.preloaded = set(json.loads(self.proc.stdout.readline()))

    def run(self, argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, set[str]]:
        """Run the installed console script with `argv`: the finished process (exit status, stdout, stderr) and the
        top-level modules it had imported at its end."""
        files = {name: cwd / f"probe-{name}" for name in ("stdout", "stderr", "modules")}
        for path in files.values():
            path.unlink(missing_ok=True)
        job = {"argv": argv, "cwd": str(cwd), "env": env, **{name: str(path) for name, path in files.items()}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        status = int(self.proc.stdout.readline())
        out, err = (files[name].read_text() for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess(argv, status, out, err), set(json.loads(files["modules"].read_text()))

    def close(self) -> None:
        """End the interpreter."""
        self.proc.stdin.close()
        self.proc.wait(60)


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    """The module's forking interpreter; it has loaded none of the start-up or training libraries."""
    forks = Zygote()
    try:
        assert not set(START_UP + TRAINING) & forks.preloaded, forks.preloaded
        yield forks
    finally:
        forks.close()


@pytest.mark.parametrize("argv, extra, status, first_line", ROWS, ids=[" ".join(r[0]) or "no-args" for r in ROWS])
def test_bad_invocation(argv: list[str], extra: dict[str, str], status: int, first_line: str, workdir: Path, zygote: Zygote) -> None:
    done, modules = zygote.run(argv, workdir, environment(workdir, extra))
    assert done.returncode == status, done.stderr
    assert done.stderr.splitlines()[0] == first_line
    assert done.stdout == "" and "Traceback" not in done.stderr
    if first_line.startswith("error:"):
        assert len(done.stderr.splitlines()) == 1
    if status == 2:
        assert not set(START_UP + TRAINING) & set(modules), "a usage error must not start Prefect, Dask or training libraries"


LATIN_1 = os.fsdecode(b"caf\xe9")
"""A folder name in Latin-1 (from a Windows or Samba share), as sys.argv holds it: its byte as a lone surrogate."""


@pytest.mark.parametrize(
    "argv, first_line",
    [
        (["extract", LATIN_1, "--store", "store"], "error: library caf\\xe9: its name is not valid UTF-8: rename it"),
        (["extract", LATIN_1, "--store", "store", "--dry-run"], "error: library caf\\xe9: its name is not valid UTF-8: rename it"),
        (["run", LATIN_1, "--store", "store", "--labels", "folders"], "error: library caf\\xe9: its name is not valid UTF-8: rename it"),
        (["run", "linked", "--store", "store", "--labels", "folders"],
         "error: library linked (resolved: {workdir}/caf\\xe9): its name is not valid UTF-8: rename it"),
        (["classify", "--store", "store", LATIN_1], "error: folder caf\\xe9: its name is not valid UTF-8: rename it"),
        (["classify", "--store", "store", LATIN_1 + ".mp3"], "error: file caf\\xe9.mp3: its name is not valid UTF-8: rename it"),
    ],
)
def test_a_library_whose_path_is_not_utf8_is_a_usage_error(argv: list[str], first_line: str, workdir: Path, zygote: Zygote) -> None:
    """The files' URIs would not be UTF-8 (every table's): one line naming the folder, before anything starts."""
    os.mkdir(os.path.join(workdir, LATIN_1))
    os.symlink(LATIN_1, workdir / "linked")
    done, modules = zygote.run(argv, workdir, environment(workdir, {}))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", first_line.format(workdir=workdir) + "\n")
    assert not set(START_UP + TRAINING) & modules


def test_version_is_the_installed_one(workdir: Path) -> None:
    from importlib.metadata import version

    done = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"genre-batch {version('genre-batch')}\n")


@pytest.mark.parametrize("argv", [["--help"], ["extract", "--help"], ["query", "--help"], ["run", "--help"]])
def test_help_imports_no_start_up_or_training_library(argv: list[str], workdir: Path, zygote: Zygote) -> None:
    done, modules = zygote.run(argv, workdir, environment(workdir, {}))
    assert done.returncode == 0 and not set(START_UP + TRAINING) & modules


def test_extract_json_summary_and_query_import_no_training_library(workdir: Path, zygote: Zygote) -> None:
    """A real extract (Prefect's ephemeral server; empty library, so no cluster) prints every summary key and, like a
    query, loads no training library."""
    env = environment(workdir, {})
    done, modules = zygote.run(["extract", "library", "--store", "store", "--format", "json"], workdir, env)
    assert done.returncode == 0 and "prefect" in modules and not set(TRAINING) & modules, done.stderr
    summary = json.loads(done.stdout)
    assert set(summary) == {"run_id", "flow", "status", "error", "started_at", "finished_at", "extract", "compact", "train_decision", "train", "tag", "failing_files"}
    assert (summary["flow"], summary["status"], summary["error"], summary["train"], summary["tag"], summary["failing_files"]) == ("extract", "completed", None, None, None, 0)
    assert summary["extract"]["discovered"] == 0 and summary["extract"]["library"] == str(workdir / "library")
    done, modules = zygote.run(["query", "--store", "store", "--format", "json", "SELECT count(*) AS n FROM errors"], workdir, env)
    assert (done.returncode, json.loads(done.stdout)) == (0, [{"n": 0}]), done.stderr  # errors are queryable before any catalog
    assert not set(TRAINING + START_UP) & modules


def test_extract_only_modules_import_no_training_library() -> None:
    code = "import sys, flows.pipeline, genre_batch.stages.extract, genre_batch.stages.compact, genre_batch.status, genre_batch.analysis.extraction, genre_batch.cluster; print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = {m.split(".")[0] for m in eval(done.stdout)}  # noqa: S307 - our own repr of a list of names
    assert {"prefect", "distributed", "librosa"} <= modules and not set(TRAINING) & modules


@pytest.fixture(scope="module")
def s3_env(moto_url: str) -> dict[str, str]:
    """Environment reaching the moto S3 server, with a bucket 'music' holding one object under library/."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket="music")
    client.put_object(Bucket="music", Key="library/a.wav", Body=b"RIFF")
    return {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.parametrize(
    "argv, first_line",
    [
        (["extract", "s3://nobucket/library", "--store", "store"], "error: library not found or not a folder: s3://nobucket/library"),
        (["extract", "s3://music/no-such-prefix", "--store", "store"], "error: library not found or not a folder: s3://music/no-such-prefix"),
        (["status", "--store", "s3://music/no-store"], "error: store not found: s3://music/no-store (no object under it)"),
        (["query", "--store", "s3://nobucket/store", "SELECT 1"], "error: the bucket nobucket of the store s3://nobucket/store does not exist"),
        (
            ["run", "s3://music/library", "--store", "s3://nobucket/store", "--labels", "folders"],
            "error: the bucket nobucket of the store s3://nobucket/store does not exist",
        ),
        (
            ["extract", "s3://music/library", "--store", "s3://music/library/a.wav"],
            "error: the store s3://music/library/a.wav is an object, not a folder: give the prefix to keep the store under",
        ),
    ],
)
def test_missing_buckets_and_prefixes_exit_1_before_anything_starts(
    argv: list[str], first_line: str, s3_env: dict[str, str], workdir: Path, zygote: Zygote
) -> None:
    done, modules = zygote.run(argv, workdir, environment(workdir, s3_env))
    assert (done.returncode, done.stdout, done.stderr) == (1, "", first_line + "\n")
    assert not set(START_UP + TRAINING) & modules
    assert list((workdir / "store").iterdir()) == []


@pytest.mark.parametrize("expression", ["0 2 * * *", "*/15 1-5 * jan-mar mon,wed,fri", "0 0 1 */2 7", "0 22-2 * * *", "@daily", "5 4 * * sun"])
def test_cron_expressions_prefect_accepts_pass_the_local_check(expression: str) -> None:
    from prefect._internal.schemas.validators import validate_cron_string

    from genre_batch import checks

    checks.cron(expression)
    assert validate_cron_string(expression) == expression  # Prefect agrees


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("0 2 * *", "4 fields, a cron expression has 5 (minute hour day-of-month month day-of-week)"),
        ("60 2 * * *", "minute '60' is not in 0-59"),
        ("0 2 0 * *", "day of month '0' is not in 1-31"),
        ("0 2 * foo *", "month 'foo' is not in 1-12"),
        ("*/0 2 * * *", "minute step '0' is not a positive number"),
        ("0 1-24 * * *", "hour '24' is not in 0-23"),
    ],
)
def test_bad_cron_expressions_are_usage_errors_naming_the_field(expression: str, reason: str) -> None:
    from prefect._internal.schemas.validators import validate_cron_string

    from genre_batch import UsageError, checks

    with pytest.raises(UsageError) as raised:
        checks.cron(expression)
    assert str(raised.value) == f"invalid --cron {expression!r}: {reason}"
    with pytest.raises(ValueError):
        validate_cron_string(expression)  # Prefect refuses it too


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "127.0.0.1:8786", "tls://scheduler.example:8786", "tcp://[::1]:8786", "inproc://10.0.0.1/123/1", None])
def test_scheduler_addresses_dask_accepts_pass_the_check(address: str | None) -> None:
    from genre_batch import checks

    checks.scheduler(address)  # raises UsageError for a refused one


@pytest.mark.parametrize("verb", ["extract", "run"])
def test_the_cli_defaults_are_the_stages_defaults(verb: str) -> None:
    """The CLI states the defaults of --features and --backfill-cap itself (it must not import the feature store to
    parse a command line): they are the extract stage's."""
    import inspect

    from genre_batch import cli
    from genre_batch.stages.extract import DEFAULT_FEATURES
    from genre_batch.storage.feature_store import BACKFILL_CAP

    defaults = inspect.signature(getattr(cli, verb)).parameters
    assert tuple(defaults["features"].default.split(",")) == DEFAULT_FEATURES
    assert defaults["backfill_cap"].default == BACKFILL_CAP
