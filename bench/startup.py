"""Start-up timeline of one CLI command: `python -m bench.startup tag --store S` runs genre-batch in this process and
prints, for each event, seconds since the process started (wall) and this process's CPU seconds so far.

Events: CLI module loaded, Prefect's ephemeral server start called / answering, flow function entered, first task
function entered, Dask cluster asked for / ready (with workers warmed), first Dask tasks submitted, first Dask tasks
done, end. The wrappers only time: the command runs unchanged.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

HEAVY = ("librosa", "numba", "scipy", "sklearn", "xgboost", "matplotlib", "av", "soundfile", "soxr", "faiss", "pandas",
         "duckdb", "mutagen", "distributed", "sqlalchemy", "fastapi")
"""Packages whose import costs a start 0.1-1.5 s of CPU each: which of them the command's own process loaded is printed."""
EVENTS: list[tuple[str, float, float]] = []
STARTED = psutil.Process().create_time()


def mark(event: str) -> None:
    """Record an event: wall seconds since the process started, CPU seconds of this process."""
    EVENTS.append((event, time.time() - STARTED, time.process_time()))


def timed(owner: Any, name: str, before: str, after: str | None = None, once: bool = True) -> None:
    """Wrap `owner.name` so that calling it records `before` (and `after` when it returns); only the first call when `once`."""
    original = getattr(owner, name)
    calls = []

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = not calls
        calls.append(1)
        if first or not once:
            mark(before)
        result = original(*args, **kwargs)
        if after and (first or not once):
            mark(after)
        return result

    setattr(owner, name, wrapper)


def patch_server(server: Any) -> None:
    """Time Prefect's ephemeral server start."""
    timed(server.SubprocessASGIServer, "start", "prefect server: start called", "prefect server: answering")


def patch_pipeline(pipeline: Any) -> None:
    """Time the flow and the first task."""
    mark("flows.pipeline imported")
    for flow in (pipeline.tag_flow, pipeline.nightly):
        timed(flow, "fn", "flow function entered")
    for task in (pipeline.tag_task, pipeline.extract_task):
        timed(task, "fn", "first task function entered")


def patch_cluster(cluster: Any) -> None:
    """Time the Dask cluster's start and the first Dask tasks."""
    timed(cluster, "dask_client", "dask client: asked for")
    timed(cluster, "local_cluster", "dask local cluster: starting", "dask local cluster: started")
    if hasattr(cluster, "cluster_client"):  # this session's background start (genre_batch.cluster.Session.start_soon)
        timed(cluster, "cluster_client", "dask client on the started cluster: asked for", "dask client: connected")
    timed(cluster, "warm_up_workers", "dask workers: warming", "dask workers: warmed")
    timed(cluster.Session, "run", "first dask tasks submitted", "first dask tasks done")


PATCHES: dict[str, Callable[[Any], None]] = {
    "prefect.server.api.server": patch_server, "flows.pipeline": patch_pipeline, "genre_batch.cluster": patch_cluster,
}


class Patching(importlib.abc.MetaPathFinder):
    """Patches a module of PATCHES right after it is executed, wherever and whenever it is first imported."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        """The path finder's spec of a patched module, its loader wrapped; None for other modules."""
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def print_timeline(events: list[tuple[str, float, float]]) -> None:
    """The events as lines: wall seconds since process start, CPU seconds of this process, event."""
    print(f"{'wall s':>7} {'cpu s':>7}  event (load {os.getloadavg()[0]:.2f})")
    for event, wall, cpu in events:
        print(f"{wall:7.2f} {cpu:7.2f}  {event}")
    print(json.dumps([{"event": e, "wall_s": round(w, 2), "cpu_s": round(c, 2)} for e, w, c in events]))


def main(argv: list[str]) -> int:
    """Run the genre-batch command `argv` with the timeline recorded; its exit status."""
    mark("python started, bench.startup loaded")
    sys.meta_path.insert(0, Patching())
    from genre_batch import cli

    mark("genre_batch.cli loaded")
    status = cli.run_app(argv)
    mark(f"command returned {status}")
    print_timeline(EVENTS)
    print("loaded in this process:", ", ".join(m for m in HEAVY if m in sys.modules))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
