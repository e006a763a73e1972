"""Prefect flows and the CLI, end to end, against a real temporary Prefect server and Dask cluster."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import cli

from flows.pipeline import deployment, nightly
from genre_batch.checks import NIGHTLY_CRON
from genre_batch.library.synth import STYLES
from genre_batch.publishing.pointer import published
from genre_batch.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_nightly_flow_end_to_end(
    library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str, prefect_server: None
) -> None:
    library, store = library_factory(per_style=3), tmp_path / "store"
    first = nightly(str(library), str(store), "folders", dask_scheduler, features=("librosa",))
    assert first["status"] == "completed"
    assert first["extract"]["extracted"] == 12 and first["train"]["promoted"]
    assert first["tag"]["rows"] == 12
    record = json.loads((store / "runs" / f"{first['run_id']}.json").read_text())
    assert record["status"] == "completed" and record["tag"]["snapshot"] == published(Store(str(store))).snapshot

    second = nightly(str(library), str(store), "folders", dask_scheduler, features=("librosa",))
    assert second["extract"]["extracted"] == 0
    assert "train" not in second and "same labelled data" in second["train_decision"]
    assert second["tag"]["model_version"] == first["train"]["version"]


def test_cli_run_query_classify(
    library_factory: Callable[..., Path], tmp_path: Path, dask_scheduler: str, prefect_server: None
) -> None:
    library, store = library_factory(per_style=3), str(tmp_path / "store")
    (library / "broken.mp3").write_bytes(b"\x00" * 100)
    code, out, _ = cli("run", str(library), "--store", store, "--labels", "folders", "--features", "librosa", "--scheduler", dask_scheduler)
    assert code == 0, out
    assert "13 audio files" in out and "12 extracted, 1 failed" in out and "broken.mp3: undecodable" in out

    code, out, _ = cli("query", "--store", store, "--format", "json", "SELECT genre, count(*) AS n FROM catalog GROUP BY genre ORDER BY genre")
    assert code == 0 and json.loads(out) == [{"genre": g, "n": 3} for g in sorted(STYLES)]
    code, out, _ = cli("query", "--store", store, "--format", "csv", "SELECT error_type FROM errors")
    assert code == 0 and out.splitlines() == ['"error_type"', '"undecodable"']
    code, out, _ = cli("query", "--store", store, "SELECT count(*) AS tracks FROM catalog")
    assert code == 0 and "tracks" in out and "12" in out and "(1 rows)" in out

    code, out, err = cli("run", str(library), "--store", store, "--features", "librosa", "--scheduler", dask_scheduler, "--strict")
    assert code == 3 and "0 extracted" in out and "run " in out  # completed, summary printed, status says: files fail
    assert err == "error: --strict: 1 files of the library could not be processed\n"

    code, out, _ = cli("evaluate", "--store", store, "--labels", "folders")
    assert code == 0 and "12 tracks (12 rows), 4 genres, xgboost on librosa, 3-fold CV grouped by track (12 groups)" in out
    report = json.loads(Path(out.split("report: ")[1].split("/report.json")[0], "report.json").read_text())
    assert report["cross_validation"]["accuracy"] > report["majority_baseline"] and report["tracks"] == 12
    assert 0 <= report["cross_validation"]["ece_calibrated"] <= 1

    clip = sorted((library / "chiptune").iterdir())[0]
    code, out, err = cli("classify", "--store", store, "--top", "2", str(clip), str(library / "broken.mp3"))
    assert code == 1 and err == "error: 1 of 2 files could not be classified\n"  # the good file is still printed
    first, second = out.splitlines()
    assert first.startswith(f"{clip}: chiptune ") and first.count(",") == 1
    assert second.startswith(f"{library / 'broken.mp3'}: error: undecodable")
    (library / "dangling.mp3").symlink_to(library / "gone.mp3")
    code, out, err = cli("classify", "--store", store, str(library / "dangling.mp3"))  # named as given, not as its target
    assert (code, out) == (1, f"{library / 'dangling.mp3'}: error: io_error: cannot read file: No such file or directory (FileNotFoundError)\n")
    code, out, _ = cli("classify", "--store", store, "--top", "2", "--format", "json", str(clip), str(library / "broken.mp3"))
    good, bad = json.loads(out)
    assert code == 1 and good["uri"] == str(clip) and [g["genre"] for g in good["genres"]][0] == "chiptune" and len(good["genres"]) == 2
    assert bad["uri"] == str(library / "broken.mp3") and bad["error"].startswith("undecodable")
    code, out, _ = cli("classify", "--store", store, "--top", "1", str(library / "chiptune"))  # a folder: its audio files
    named = [line.split(": ", 1) for line in out.splitlines()]
    assert code == 0 and [n for n, _ in named] == [str(f) for f in sorted((library / "chiptune").iterdir())]
    assert all(genres.startswith("chiptune ") for _, genres in named)
    code, on_cluster, _ = cli("classify", "--store", store, "--top", "1", "--scheduler", dask_scheduler, str(library / "chiptune"))
    assert code == 0 and on_cluster == out  # the same lines from Dask tasks
    (library / "empty").mkdir()
    code, _, err = cli("classify", "--store", store, str(library / "empty"))
    assert code == 1 and err == f"error: no audio files to classify in {library / 'empty'}\n"

    latin = library / "latin"  # what the listing of a folder skips is said, as extract says it; the rest is classified
    latin.mkdir()
    shutil.copy(clip, latin / clip.name)
    shutil.copy(clip, os.path.join(latin, os.fsdecode(b"caf\xe9" + clip.suffix.encode())))
    os.mkdir(os.path.join(latin, os.fsdecode(b"m\xfasica")))
    skipped = [f"{latin}/caf\\xe9{clip.suffix}: its name is not valid UTF-8: rename it", f"{latin}/m\\xfasica: its name is not valid UTF-8: rename it"]
    code, out, err = cli("classify", "--store", store, "--top", "1", str(latin))
    assert code == 0 and [line.split(": ")[0] for line in out.splitlines()] == [str(latin / clip.name)]
    assert sorted(err.splitlines()) == [f"warning: not listed: {s}" for s in skipped]
    code, out, err = cli("classify", "--store", store, "--top", "1", "--format", "json", str(latin))
    assert code == 0 and [f["uri"] for f in json.loads(out)] == [str(latin / clip.name)]  # the array of files classified, as before
    assert sorted(err.splitlines()) == [f"warning: not listed: {s}" for s in skipped]


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["extract", "/no/such/library", "--store", "/tmp/x"], 2, "library not found or not a folder: /no/such/library"),
        (["query", "--store", "{empty}/no/store", "SELECT 1"], 2, "store not found or not a folder: {empty}/no/store"),
        (["tag", "--store", "{empty}/no/store"], 2, "store not found or not a folder: {empty}/no/store"),
        (["query", "--store", "{empty}/no/store", "--format", "xml", "SELECT 1"], 2, "unknown format 'xml'"),
        (["query", "--store", "{empty}", "SELECT count(*) FROM catalog"], 1, "no published catalog in {empty}"),
        (["tag", "--store", "{empty}"], 4, "no current model in {empty}"),
        (["classify", "--store", "{empty}", "song.mp3"], 4, "no current model in {empty}"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], status: int, message: str, tmp_path: Path, prefect_server: None) -> None:
    code, out, err = cli(*[a.format(empty=tmp_path) for a in args])
    message = message.format(empty=tmp_path)
    assert code == status
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {message}")
    assert "Traceback" not in err + out


def test_prefect_server_not_starting_is_one_line(tmp_path: Path) -> None:
    """Prefect's ephemeral server that does not answer in time (here: a start-up timeout of 0 s) is one line, exit 1."""
    import os
    import subprocess
    import sys

    from conftest import make_library

    make_library(tmp_path / "library", 1, styles=STYLES[:1])
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    done = subprocess.run([sys.executable, "-m", "genre_batch.cli", "extract", str(tmp_path / "library"), "--store", str(tmp_path / "store"),
                           "--features", "librosa"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("error: Prefect's ephemeral API server did not answer within 0 s")
    assert not (tmp_path / "store" / "features").exists() or not any((tmp_path / "store" / "features").rglob("*.parquet"))


def test_cli_starts_prefects_ephemeral_server_and_leaves_no_process(tmp_path: Path) -> None:
    """Without PREFECT_API_URL the CLI starts Prefect's ephemeral server in the background while it imports the flows;
    the flow runs on it (here: an extraction of an empty library) and no process of the run is left behind."""
    import os
    import subprocess
    import sys

    import psutil

    home = str(tmp_path / "prefect-home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=home)
    (tmp_path / "library").mkdir()
    done = subprocess.run([sys.executable, "-m", "genre_batch.cli", "extract", str(tmp_path / "library"), "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "0 audio files" in done.stdout and done.stderr == "", done.stderr
    assert (tmp_path / "prefect-home" / "prefect.db").exists()  # the ephemeral server ran (its database)

    def ours(p: psutil.Process) -> bool:
        try:
            return p.environ().get("PREFECT_HOME") == home
        except psutil.Error:
            return False

    assert [p.cmdline() for p in psutil.process_iter() if ours(p)] == []


@pytest.mark.parametrize("verb", ["extract", "compact", "train", "evaluate", "tag", "run", "query", "classify", "write-tags", "similar", "demo", "serve", "status", "models", "prune"])
def test_every_verb_has_help(verb: str) -> None:
    code, out, _ = cli(verb, "--help")
    assert code == 0 and "Usage:" in out and "--help" in out


def test_scheduled_deployment_matches_prefect_yaml() -> None:
    served = nightly.to_deployment(name="nightly", cron=NIGHTLY_CRON, parameters={"library": "/l", "store": "/s"})
    assert [s.schedule.cron for s in served.schedules] == [NIGHTLY_CRON]
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [declared] = config["deployments"]
    assert declared["entrypoint"] == deployment("nightly", NIGHTLY_CRON, {}).entrypoint == "flows.pipeline.nightly"
    assert [s["cron"] for s in declared["schedules"]] == [NIGHTLY_CRON]
    assert set(declared["parameters"]) <= set(nightly.parameters.properties)
    assert declared["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert deployment("nightly", NIGHTLY_CRON, {}).concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert config["pull"] == [] and "PWD" not in yaml.safe_dump(config)  # no working directory from a shell
