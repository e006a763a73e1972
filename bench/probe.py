"""In-process measurements run as a process of their own (so that the bench samples their peak RSS alone).

python -m bench.probe plan STORE       no-op plan: read_index + plan against the store's unchanged inventory, then the
                                       nightly flow's automatic-compaction check; prints JSON
python -m bench.probe tables STORE     the per-track tables a nightly tag flow process reads (inventory keys, current
                                       tracks, the errors table), one after the other: Arrow bytes and peak RSS of each
python -m bench.probe discover URL     genre_batch.library.discovery.discover of a library URL; prints JSON
python -m bench.probe sample STORE     the capped training sample of `genre-batch train --labels tags`, read by a
                                       2-worker local cluster into the training matrices (no fit); prints JSON
python -m bench.probe tag STORE        the tag stage (full re-tag + publish) on a 2-worker local cluster, no Prefect
python -m bench.probe nightly STORE    the tag stage as a nightly run does it (incremental when the model is unchanged)
python -m bench.probe steps STORE      the same, step by step (tag.Steps): wall, flow-process CPU, workers' CPU and the flow
                                       process's peak RSS after each step, the cluster started first; a table on stderr
python -m bench.probe compact STORE    the compact stage on a 2-worker local cluster, no Prefect
python -m bench.probe compact-groups STORE  the compaction's flow-process side alone (key columns, current rows,
                                       the workers' groups), nothing written; works on an index-only store
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pyarrow as pa

import bench  # noqa: F401  (one BLAS thread, shared numba cache: before numpy loads)
from genre_batch.cluster import Session, session
from genre_batch.library.discovery import discover
from genre_batch.stages import compact, runs, tag, train
from genre_batch.storage.feature_store import (
    CHOICE_COLUMNS,
    COMPACT_TARGET_WINDOWS,
    KEYS,
    SOURCE_COLUMNS,
    TRACK_COLUMNS,
    current_errors,
    current_tracks,
    index_files,
    index_sources,
    plan,
    read_index,
    read_inventory,
)
from genre_batch.stages.tag import peak_rss_mb
from genre_batch.storage.store import Store


def timed_plan(url: str) -> dict:
    """Seconds of each step of a no-op plan over a store (the index columns extraction reads), and what it found."""
    store = Store.at(url)
    t0 = time.perf_counter()
    inventory = read_inventory(store)
    t1 = time.perf_counter()
    index = read_index(store, CHOICE_COLUMNS)
    t2 = time.perf_counter()
    result = plan(inventory, index)
    t3 = time.perf_counter()
    needed = compact.needed(store)
    t4 = time.perf_counter()
    return {
        "tracks": inventory.num_rows, "index_rows": index.num_rows, "index_arrow_mb": round(index.nbytes / 1e6, 1),
        "todo": result.todo.num_rows, "moved": result.moved.num_rows, "unchanged": result.unchanged,
        "read_inventory_s": round(t1 - t0, 3), "read_index_s": round(t2 - t1, 3), "plan_s": round(t3 - t2, 3),
        "plan_total_s": round(t3 - t0, 3), "compaction_needed": needed, "compaction_check_s": round(t4 - t3, 3),
    }


def flow_tables(url: str) -> dict:
    """What the nightly tag flow's per-track tables cost in this process: each table's Arrow bytes, the Arrow pool's
    peak and the process's peak RSS after each step (the previous step's table dropped first, as the flow does)."""
    store = Store.at(url)
    pool = pa.default_memory_pool()
    steps: dict[str, dict] = {"start": {"rss_peak_mb": round(peak_rss_mb())}}

    def measure(name: str, make: Callable[[], pa.Table]) -> pa.Table:
        """Build a table, recording its rows, Arrow bytes, seconds, the pool's peak and this process's peak RSS."""
        t0 = time.perf_counter()
        table = make()
        steps[name] = {"rows": table.num_rows, "arrow_mb": round(table.nbytes / 1e6, 1), "s": round(time.perf_counter() - t0, 3),
                       "arrow_peak_mb": round(pool.max_memory() / 1e6), "rss_peak_mb": round(peak_rss_mb())}
        return table

    inventory = measure("inventory keys", lambda: read_inventory(store, KEYS))
    tracks = measure("current tracks (TRACK_COLUMNS)", lambda: current_tracks(store, inventory, columns=TRACK_COLUMNS))
    measure("errors table", lambda: current_errors(store))
    per_track = {k: round(v["arrow_mb"] * 1e6 / max(1, inventory.num_rows)) for k, v in steps.items() if "arrow_mb" in v}
    return {"tracks": inventory.num_rows, "current": tracks.num_rows, "steps": steps, "arrow_bytes_per_track": per_track}


def timed_discover(url: str) -> dict:
    """Seconds of a discovery of a library URL, and the files it found."""
    t0 = time.perf_counter()
    listing = discover(url)
    return {"files": listing.num_rows, "discover_s": round(time.perf_counter() - t0, 3), "arrow_mb": round(listing.nbytes / 1e6, 1)}


def timed_sample(url: str) -> dict:
    """Seconds and size of the capped training sample of a store (labels: embedded tags), as `train` builds it."""
    t0 = time.perf_counter()
    with session(n_workers=2) as cluster:
        data, labelled, cap = train.training_data(Store.at(url), "tags", cluster)
    return {
        "labelled_tracks": labelled.tracks.num_rows, "cap_per_genre": cap.tracks, "rows_per_genre": cap.rows, "sampled_tracks": len(data.y_track),
        "sampled_windows": len(data.y), "matrix_mb": round(data.X.nbytes / 1e6, 1), "sample_s": round(time.perf_counter() - t0, 3),
    }


def timed_stage(url: str, flow: str, full: bool = True) -> dict:
    """Seconds of the tag (full or as a nightly run does it) or compact stage under a run record, its summary, and the
    peak RSS of this process (the flow process of the stage) in MB."""
    store = Store.at(url)
    t0 = time.perf_counter()
    with runs.run_record(store, flow) as record, session(n_workers=2) as cluster:
        summary = tag.tag(store, record["run_id"], cluster, full=full) if flow == "tag" else compact.compact(store, cluster)
        record[flow] = runs.as_record(summary)
    return {"stage_s": round(time.perf_counter() - t0, 3), "record": record[flow], "peak_rss_mb": round(peak_rss_mb())}


def workers_cpu(cluster: Session) -> Callable[[], float]:
    """CPU seconds the cluster's worker processes have spent so far, summed."""
    return lambda: sum(cluster.client.run(time.process_time).values())


def tag_steps(url: str) -> dict:
    """The tag stage as a nightly run does it, step by step (tag.Steps), on a 2-worker local cluster started first (its
    start is a step of its own); prints the table on stderr."""
    store = Store.at(url)
    t0, c0 = time.perf_counter(), time.process_time()
    with runs.run_record(store, "tag") as record, session(n_workers=2) as cluster:
        steps = tag.Steps(others=workers_cpu(cluster))
        with steps.step("cluster start"):
            cluster.client  # noqa: B018  (starts the cluster and warms its workers)
        summary = tag.tag(store, record["run_id"], cluster, steps=steps)
        record["tag"] = runs.as_record(summary)
    print_steps(summary.steps, summary.predicted + summary.carried)
    return {"stage_s": round(time.perf_counter() - t0, 3), "stage_cpu_s": round(time.process_time() - c0, 3),
            "mode": summary.mode, "predicted": summary.predicted, "carried": summary.carried, "dropped": summary.dropped,
            "steps": summary.steps, "peak_rss_mb": round(peak_rss_mb())}


def print_steps(steps: dict[str, dict[str, float]], tracks: int) -> None:
    """The steps as a table on stderr, with the flow process's peak RSS per track."""
    print(f"{'step':<30} {'wall s':>8} {'flow CPU s':>10} {'workers CPU s':>13} {'flow peak MB':>12} {'B/track':>8}", file=sys.stderr)
    for name, row in steps.items():
        print(f"{name:<30} {row['wall_s']:>8.2f} {row['cpu_s']:>10.2f} {row.get('others_cpu_s', 0.0):>13.2f} "
              f"{row['peak_rss_mb']:>12.0f} {row['peak_rss_mb'] * 1e6 / max(1, tracks):>8.0f}", file=sys.stderr)
    total = {k: sum(r.get(k, 0.0) for r in steps.values()) for k in ("wall_s", "cpu_s", "others_cpu_s")}
    print(f"{'total':<30} {total['wall_s']:>8.2f} {total['cpu_s']:>10.2f} {total['others_cpu_s']:>13.2f}", file=sys.stderr)


def compaction_groups(url: str) -> dict:
    """The compaction's flow-process side alone (key columns of every index file, current rows, the workers' groups),
    nothing written: seconds and CPU of each step and this process's peak RSS (works on an index-only store)."""
    store = Store.at(url)
    t0, c0 = time.perf_counter(), time.process_time()
    files = index_files(store)
    keys = index_sources(store, files, SOURCE_COLUMNS)
    t1, c1 = time.perf_counter(), time.process_time()
    work = compact.groups(keys, read_inventory(store, KEYS), files, "probe", COMPACT_TARGET_WINDOWS)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"index_files": len(files), "index_rows": keys.num_rows, "keys_arrow_mb": round(keys.nbytes / 1e6, 1), "groups": len(work),
            "read_keys_s": round(t1 - t0, 2), "read_keys_cpu_s": round(c1 - c0, 2), "groups_s": round(t2 - t1, 2),
            "groups_cpu_s": round(c2 - c1, 2), "peak_rss_mb": round(peak_rss_mb())}


def main(argv: list[str]) -> int:
    """Run one probe and print its JSON."""
    probes = {"plan": timed_plan, "tables": flow_tables, "discover": timed_discover, "sample": timed_sample,
              "tag": lambda url: timed_stage(url, "tag"),
              "nightly": lambda url: timed_stage(url, "tag", full=False), "steps": tag_steps,
              "compact": lambda url: timed_stage(url, "compact"),
              "compact-groups": compaction_groups}
    if len(argv) != 2 or argv[0] not in probes:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(probes[argv[0]](argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
