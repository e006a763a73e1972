"""What cross-validation and the final fit cost the old way (serial, every fold refitted) and the new way (folds without
the refit, all fits as tasks on a 2-worker local cluster), on a capped synthetic training sample.

The sample: the scale stores' generator (`bench.synthetic_store`: its genres, 6 windows per track, 603 librosa columns),
capped per genre as `train` caps (`training.sample`, grouped by artist) at `--cap` tracks per genre (default: a quarter
of the cap `train` takes on such a store, `bench.learning_curve.default_cap() // 4`, so that it runs in minutes).
- old: `training.fit_tracks` (refit) on each fold's training tracks, then the final fit, one after another here;
- new: `stages.train.submit_fits` on a fresh 2-worker `LocalCluster` (its start-up not counted), as `train` runs them
  (folds not refitted when every genre has MAX_FOLDS+ artists among a fold's training tracks: `training.refits`;
  the generator has 10 tracks per artist: under ~70 per genre some genre of a fold has fewer, and it is refitted).
Printed for both: CPU s (this process + the workers' user+sys), wall s, rounds (or C) per fold, CV accuracy, peak RSS;
whether the two final models are the same bytes; then a projection to the full cap (127,560 windows): CPU per boosting
round per window from the old way's runs, times the rows and rounds each run boosts at the full cap.

    nice -n 5 python -m bench.train_fits [--cap N] [--kind xgboost|linear] [--ways old,new] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from functools import partial

import numpy as np
import pyarrow as pa

from bench import synthetic_store
from bench.learning_curve import capped, default_cap, population, synthetic_windows
from genre_batch.cluster import session
from genre_batch.modelling import training
from genre_batch.modelling.model import EARLY_STOPPING, MAX_FOLDS, MAX_ROUNDS
from genre_batch.stages.tag import peak_rss_mb
from genre_batch.stages.train import submit_fits

WORKERS = 2
FULL_CAP_WINDOWS = 127_560
"""Windows of the sample `train` takes at the cap on a 10-genre, 6-window library (2,126 tracks per genre)."""
INNER_FIT_SHARE = (MAX_FOLDS - 1) / MAX_FOLDS
"""Share of a fit's rows that early stopping boosts on (the rest is its validation fold)."""
FOLD_SHARE = (MAX_FOLDS - 1) / MAX_FOLDS
"""Share of the sample a cross-validation fold is fitted on."""


def sample(cap: int, seed: int = 0) -> training.TrainingSet:
    """The generator's training set at `cap` tracks per genre (grouped by artist), as `train` builds one."""
    genres = list(synthetic_store.GENRES)
    i = np.arange(population(cap, 0, seed))
    y = synthetic_store.genre_of(i, seed).astype(np.int32)
    artists = [f"artist {a}" for a in (i // synthetic_store.TRACKS_PER_ARTIST).tolist()]
    names = [synthetic_store.uri_of(k) for k in i.tolist()]
    chosen = capped(i, y, artists, names, genres, cap)
    rows = synthetic_windows(chosen, seed)
    tracks = pa.table({"uri": [names[t] for t in chosen], "genre": [genres[y[t]] for t in chosen],
                       "tag_artist": [artists[t] for t in chosen]})
    return training.training_set(rows.X, rows.track, tracks, genres, "artist", "bench", {})


def accuracy(data: training.TrainingSet, oof: training.OutOfFold) -> float:
    """Track accuracy of out-of-fold probabilities."""
    return round(float((oof.probabilities.argmax(axis=1) == data.y_track).mean()), 4)


def worker_usage() -> tuple[float, float]:
    """A worker's CPU seconds so far (user + sys) and its peak RSS in MB (runs on each worker)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, peak_rss_mb()


def old_way(data: training.TrainingSet, kind: str) -> tuple[dict, training.Fitted]:
    """Cross-validation with every fold refitted, then the final fit, one after another in this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    result, fits = np.zeros((len(data.y_track), len(data.genres))), []
    for train, test in training.splits(data, training.folds(data)):
        fitted = training.fit_tracks(data, train, kind)
        result[test] = training.predict_tracks(fitted.model, data, test)
        fits.append(fitted.cost())
    final = training.fit_tracks(data, np.arange(len(data.y_track)), kind)
    oof = training.OutOfFold(result, fits)
    report = {"cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1),
              "folds": fits, "final": final.cost(), "cv_accuracy": accuracy(data, oof), "peak_rss_mb": round(peak_rss_mb(), 1)}
    return report, final


def new_way(data: training.TrainingSet, kind: str) -> tuple[dict, training.Fitted]:
    """Folds (without the refit unless `training.refits`) and the final fit as concurrent tasks on a fresh 2-worker
    local cluster (as `train`)."""
    with session(n_workers=WORKERS) as cluster:
        client = cluster.client
        started = client.run(worker_usage)
        wall, cpu = time.perf_counter(), time.process_time()
        oof, packed = submit_fits(cluster, data, kind, partial(training.final_fit, kind=kind)).results()
        flow_cpu, elapsed = time.process_time() - cpu, time.perf_counter() - wall
        ended = client.run(worker_usage)
    workers_cpu = sum(ended[w][0] - started[w][0] for w in ended)
    final = packed.unpacked()
    report = {"cpu_s": round(flow_cpu + workers_cpu, 1), "flow_cpu_s": round(flow_cpu, 1), "workers_cpu_s": round(workers_cpu, 1),
              "wall_s": round(elapsed, 1), "folds": oof.fits, "final": final.cost(), "cv_accuracy": accuracy(data, oof),
              "peak_rss_mb": round(peak_rss_mb(), 1), "workers_peak_rss_mb": sorted(round(e[1], 1) for e in ended.values())}
    return report, final


def boosted(windows: float, rounds: int, refit: bool) -> float:
    """Window-rounds one fit boosts: early stopping on the rows outside its validation fold for the chosen rounds plus
    the patience (at most MAX_ROUNDS), then, when refitted, all its rows for the chosen rounds."""
    stopping = INNER_FIT_SHARE * windows * min(MAX_ROUNDS, rounds + EARLY_STOPPING)
    return stopping + (windows * rounds if refit else 0.0)


def projection(data: training.TrainingSet, old: dict, rounds: int) -> dict:
    """CPU of the old and the new way at the full cap, from the old way's CPU per window-round here, if every fit chose
    `rounds` there; the new way's wall on WORKERS workers (the final fit first, then folds to the least busy worker)."""
    here = sum(boosted(f["windows"], f["num_boost_round"], True) for f in [*old["folds"], old["final"]])
    per = old["cpu_s"] / here
    fold, final = FOLD_SHARE * FULL_CAP_WINDOWS, FULL_CAP_WINDOWS
    old_cpu = per * (MAX_FOLDS * boosted(fold, rounds, True) + boosted(final, rounds, True))
    tasks = [per * boosted(final, rounds, True)] + [per * boosted(fold, rounds, False)] * MAX_FOLDS
    busy = [0.0] * WORKERS
    for t in tasks:
        busy[busy.index(min(busy))] += t
    return {"rounds": rounds, "cpu_us_per_window_round": round(per * 1e6, 2), "old_cpu_h": round(old_cpu / 3600, 2),
            "new_cpu_h": round(sum(tasks) / 3600, 2), "new_wall_h": round(max(busy) / 3600, 2), "windows": FULL_CAP_WINDOWS,
            "matrix_mb": round(FULL_CAP_WINDOWS * len(data.columns) * 4 / 1e6)}


def main() -> None:
    """Run both ways on one sample, print and (with --out) save the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=default_cap() // 4, help="tracks per genre (default: default_cap() // 4)")
    parser.add_argument("--kind", default="xgboost", choices=["xgboost", "linear"])
    parser.add_argument("--ways", default="old,new", help="which ways to run (old, new or both: old,new)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    ways = args.ways.split(",")
    data = sample(args.cap)
    print(f"sample: {args.cap} per genre, {len(data.y_track)} tracks, {len(data.y)} windows x {data.X.shape[1]} "
          f"({data.X.nbytes / 1e6:.0f} MB), {training.folds(data)} folds, refitted folds "
          f"{[training.refits(data, train) for train, _ in training.splits(data, training.folds(data))]}, load {os.getloadavg()}", flush=True)
    report: dict = {"cap_per_genre": args.cap, "kind": args.kind, "tracks": len(data.y_track), "windows": len(data.y)}
    finals = {}
    if "old" in ways:
        report["old"], finals["old"] = old_way(data, args.kind)
        print(f"old (serial, every fold refitted): {json.dumps(report['old'])}, load {os.getloadavg()}", flush=True)
        if args.kind == "xgboost":
            rounds = [f["num_boost_round"] for f in [*report["old"]["folds"], report["old"]["final"]]]
            report["projection"] = [projection(data, report["old"], r) for r in (max(rounds), MAX_ROUNDS)]
            print(f"projection to {FULL_CAP_WINDOWS} windows: {json.dumps(report['projection'])}", flush=True)
    if "new" in ways:
        report["new"], finals["new"] = new_way(data, args.kind)
        print(f"new ({WORKERS} workers, folds as `training.refits` says): {json.dumps(report['new'])}, load {os.getloadavg()}", flush=True)
    if len(finals) == 2:
        report["final_model_identical"] = finals["old"].model.to_files() == finals["new"].model.to_files()
        print(f"final model identical (same bytes): {report['final_model_identical']}; CPU old {report['old']['cpu_s']} s -> "
              f"new {report['new']['cpu_s']} s, wall {report['old']['wall_s']} s -> {report['new']['wall_s']} s", flush=True)
    report["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
