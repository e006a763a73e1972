"""The nightly tag's steps at scale, task by task (issue #12): `stages.tag.tag` run in this process on a hard-linked copy
of a store whose changes are extracted but not yet tagged, with the Dask session started before the clock runs (its
start is not the tag's cost), each worker call wrapped to report its wall and CPU seconds, process and peak RSS.

    python -m bench.tag_steps PRE_NIGHT_STORE_DIR WORK_DIR [--build] [--profile-workers] [--imports-first]

PRE_NIGHT_STORE_DIR holds `store/` (e.g. a `bench.synthetic_store.linked_copy` of a tagged 1M store after
`simulate_changes`); it is copied with `cp -al` into WORK_DIR/run and never written. Without --build the run stops
before the similar build (another stage's cost); the new snapshot's genre files are written and left in WORK_DIR/run
for comparison (`--compare OTHER_RUN_DIR`: row for row, every column but run_id and tagged_at). Prints the flow process's steps
(wall, CPU, peak RSS), each step's worker tasks (sum and max of wall and CPU, per worker), and the workers' CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import time
from collections import defaultdict
from pathlib import Path

RUN_ID = "20261201T230000Z-benchtag"


def timed(profile: bool, fn, *args):  # noqa: ANN001, ANN202 (any worker call)
    """Run fn(*args) on a worker: its result and what it cost (wall, CPU, pid, peak RSS; cProfile's top with `profile`)."""
    from genre_batch.stages.tag import peak_rss_mb

    prof = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    result = fn(*args)
    if prof:
        prof.disable()
    cost = {"fn": fn.__name__, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "pid": os.getpid(), "hwm": peak_rss_mb()}
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
        cost["profile"] = text.getvalue()
    return result, cost


def worker_imports(store_url: str, version: str) -> dict:
    """Wall and CPU seconds of importing the tagging module and loading the model in a worker that has done neither."""
    wall, cpu = time.perf_counter(), time.process_time()
    import genre_batch.publishing.tagging as tagging
    from genre_batch.storage.store import Store

    imported = (round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2))
    wall, cpu = time.perf_counter(), time.process_time()
    tagging.worker_model(Store(store_url), version)
    return {"import_tagging_wall_cpu_s": imported, "model_load_wall_cpu_s": (round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2))}


def compare(a: Path, b: Path) -> list[str]:
    """Per genre file and change feed of the newest snapshots of two runs: equal (every column but run_id and
    tagged_at) or not, rows, bytes."""
    import pyarrow.parquet as pq

    def newest(run: Path) -> Path:
        return sorted(d for d in (run / "store" / "catalog" / "snapshots").iterdir() if d.is_dir())[-1]  # names sort by time

    lines = []
    for f in [*sorted(newest(a).glob("genre-*.parquet")), newest(a) / "changes.parquet"]:
        g = newest(b) / f.name
        x, y = pq.read_table(f), pq.read_table(g)
        columns = [c for c in x.column_names if c not in ("run_id", "tagged_at")]
        same = x.select(columns).equals(y.select(columns))
        lines.append(f"{f.name}: {x.num_rows} / {y.num_rows} rows, {'equal' if same else 'DIFFERENT'}, {f.stat().st_size} / {g.stat().st_size} bytes")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Copy the store, run the tag stage with every worker call timed, print the steps and tasks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pre", type=Path, help="folder holding store/ with the night's changes extracted, not yet tagged")
    p.add_argument("work", type=Path, help="scratch folder: the copy is WORK/run")
    p.add_argument("--build", action="store_true", help="run the similar build and the switch too")
    p.add_argument("--profile-workers", action="store_true", help="cProfile every worker call (slower)")
    p.add_argument("--imports-first", action="store_true", help="import tagging and load the model on the workers before the clock")
    p.add_argument("--compare", type=Path, help="another run folder (holding store/): compare the newest snapshots row for row")
    a = p.parse_args(argv)
    run = a.work / "run"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    a.work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(a.pre), str(run)], check=True)

    from genre_batch.cluster import Session, session, trim_memory
    from genre_batch.modelling import registry
    from genre_batch.publishing import similar
    from genre_batch.stages import tag
    from genre_batch.storage.store import Store

    store = Store.at(str(run / "store"))
    costs: list[dict] = []

    def run_timed(self: Session, calls: list[tuple]) -> list:
        """Session.run with every call timed on its worker."""
        if not calls:
            return []
        client = self.client
        out = client.gather([client.submit(timed, a.profile_workers, *call, pure=False) for call in calls])
        client.run(trim_memory)
        costs.extend(c for _, c in out)
        return [r for r, _ in out]

    class Stop(Exception):
        """Raised instead of the similar build."""

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop

    Session.run = run_timed
    if not a.build:
        similar.build = stop
    steps = tag.Steps()
    with session() as s:
        client = s.client
        if a.imports_first:
            print("worker imports:", list(client.run(worker_imports, store.url, registry.current_version(store)).values()))
        load, workers_cpu = os.getloadavg()[0], sum(client.run(time.process_time).values())
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            summary = tag.tag(store, RUN_ID, s, steps=steps)
            print(f"mode {summary.mode}: predicted {summary.predicted}, carried {summary.carried}, dropped {summary.dropped}")
        except Stop:
            print("stopped before the similar build")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        workers_cpu = sum(client.run(time.process_time).values()) - workers_cpu
        peaks = sorted(round(v) for v in client.run(tag.peak_rss_mb).values())
    print(f"tag(): {wall:.1f} s wall; CPU s: flow process {cpu:.1f}, workers {workers_cpu:.1f}; load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"peak RSS MB: flow process {tag.peak_rss_mb():.0f}, workers {peaks}")
    for name, row in steps.taken.items():
        print(f"  step {name:34s} wall {row['wall_s']:7.2f} s  CPU {row['cpu_s']:6.2f} s  peak RSS {row.get('peak_rss_mb')} MB")
    by_fn: dict[str, list[dict]] = defaultdict(list)
    for c in costs:
        by_fn[c["fn"]].append(c)
    for fn, items in by_fn.items():
        per_worker = {pid: round(sum(i["cpu"] for i in items if i["pid"] == pid), 2) for pid in sorted({i["pid"] for i in items})}
        print(f"  tasks {fn:16s} x{len(items):3d}: CPU sum {sum(i['cpu'] for i in items):6.2f} s (per worker {list(per_worker.values())}), "
              f"max {max(i['cpu'] for i in items):5.2f}; wall sum {sum(i['wall'] for i in items):6.2f}, max {max(i['wall'] for i in items):5.2f}; "
              f"peak RSS {max(i['hwm'] for i in items):.0f} MB")
        if a.profile_workers:
            print(items[0]["profile"])
    if a.compare:
        print("\n".join(compare(a.compare, run)))


if __name__ == "__main__":
    main()
