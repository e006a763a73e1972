"""Cross-validated genre accuracy of genre-batch vs the seed-article recipe, per task, on real labelled music."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import xgboost as xgb
from sklearn.model_selection import StratifiedGroupKFold

from genre_batch import audio, extraction, features, training
from genre_batch.evaluation import majority_baseline, scores

SEED = 0
METHODS: tuple[str, ...] = ("genre-batch", "seed-recipe")
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CAVEAT = (
    "Splits keep each artist (embedded artist tag) whole where files carry one, as genre-batch evaluate does; "
    "gtzan-mini files carry no tags, so its splits are by track and its clips of one artist (blues, classical, "
    "reggae, rock: one artist each) still straddle folds: its numbers stay optimistic."
)


@dataclass(frozen=True)
class Task:
    """One labelled set: its files and integer genre labels (genres sorted by name)."""

    name: str
    files: list[Path]
    y: np.ndarray
    genres: list[str]


def discover(data: Path) -> list[Task]:
    """Each subfolder of `data` is a task, each of its subfolders a genre holding audio files."""
    tasks = []
    for task_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        genres = sorted(p.name for p in task_dir.iterdir() if p.is_dir())
        files = [
            (f, i)
            for i, g in enumerate(genres)
            for f in sorted((task_dir / g).iterdir())
            if f.suffix.lower() in audio.AUDIO_EXTENSIONS
        ]
        if files:
            tasks.append(Task(task_dir.name, [f for f, _ in files], np.array([i for _, i in files], np.int32), genres))
    return tasks


def recipe_features(y: np.ndarray, sr: int) -> np.ndarray:
    """Seed-article vector: mean and std over frames of MFCC (20), spectral contrast and chroma_stft, each from y."""
    series = [
        librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20),
        librosa.feature.spectral_contrast(y=y, sr=sr),
        librosa.feature.chroma_stft(y=y, sr=sr),
    ]
    return np.concatenate([np.concatenate([s.mean(axis=1), s.std(axis=1)]) for s in series]).astype(np.float32)


def extract_one(job: tuple[str, str]) -> tuple[np.ndarray | None, float, str | None]:
    """Features (windows x features for genre-batch, one vector for the recipe), CPU seconds and error of one job."""
    method, path = job
    start = time.process_time()
    try:
        if method == "genre-batch":
            _, vector = extraction.extract_file(path)  # exactly what the pipeline stores
        else:
            y, sr = librosa.load(path, sr=22050, mono=True)  # the recipe: whole file
            vector = recipe_features(y, sr)
    except Exception as e:  # a bad file is reported and left out of both methods
        return None, time.process_time() - start, f"{type(e).__name__}: {e}"
    return vector, time.process_time() - start, None


def warm_up() -> None:
    """Compile (or load) librosa's numba code for both extractors: in the parent before the pool, then per worker."""
    features.warm_up()
    recipe_features(np.random.default_rng(0).uniform(-0.1, 0.1, 22050).astype(np.float32), 22050)


def extract_all(tasks: list[Task], workers: int) -> dict[tuple[str, str, int], tuple[np.ndarray | None, float, str | None]]:
    """Run both extractors on every file of every task in a pool; keyed by (task, method, file index)."""
    keys = [(t.name, m, i) for t in tasks for i in range(len(t.files)) for m in METHODS]
    paths = {t.name: t.files for t in tasks}
    jobs = [(m, str(paths[name][i])) for name, m, i in keys]
    context = multiprocessing.get_context("spawn")  # children load the numba code the parent just cached
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=warm_up) as pool:
        return dict(zip(keys, pool.map(extract_one, jobs, chunksize=4)))


def stacked(X: list[np.ndarray], tracks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The windows of the given tracks, one matrix, and the position in `tracks` of each window's track."""
    return np.vstack([X[i] for i in tracks]), np.repeat(np.arange(len(tracks)), [len(X[i]) for i in tracks])


def fit_predict(
    method: str, X: list[np.ndarray], y: np.ndarray, groups: np.ndarray, train: np.ndarray, test: np.ndarray, n_classes: int
) -> np.ndarray:
    """Predicted classes of the test tracks: genre-batch trains on windows and averages them; the recipe is per track."""
    if method == "genre-batch":
        X_train, train_track = stacked(X, train)
        model, _ = training.fit(X_train, y[train][train_track], n_classes, train_track, groups[train])
        X_test, test_track = stacked(X, test)
        return training.per_track(training.predict_proba(model, X_test), test_track, len(test)).argmax(axis=1)
    model = xgb.XGBClassifier(n_jobs=1)
    return model.fit(np.stack([X[i] for i in train]), y[train]).predict(np.stack([X[i] for i in test]))


def evaluate(task: Task, X: dict[str, list[np.ndarray]], y: np.ndarray, groups: np.ndarray, n_folds: int) -> dict[str, dict]:
    """Per-fold accuracy and macro-F1 of each method on the same stratified, grouped folds."""
    splits = list(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=SEED).split(y, y, groups))
    out: dict[str, dict] = {}
    for method in METHODS:
        folds = [scores(y[te], fit_predict(method, X[method], y, groups, tr, te, len(task.genres)), task.genres) for tr, te in splits]
        acc = np.array([f["accuracy"] for f in folds])
        f1 = np.array([f["macro_f1"] for f in folds])
        out[method] = {
            "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
            "macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std()),
            "fold_accuracy": acc.tolist(), "fold_macro_f1": f1.tolist(),
            "n_features": int(X[method][0].shape[-1]),
        }
    return out


def run(data: Path, n_folds: int, workers: int) -> dict:
    """Extract, cross-validate and collect every number of the report."""
    wall = time.perf_counter()
    tasks = discover(data)
    if not tasks:
        raise SystemExit(f"no tasks (subfolders with genre folders of audio files) in {data}")
    warm_up()
    extracted = extract_all(tasks, workers)
    extraction_s = time.perf_counter() - wall
    report: dict = {"data": str(data), "folds": n_folds, "seed": SEED, "workers": workers, "caveat": CAVEAT, "tasks": {}}
    for task in tasks:
        rows = [(task.name, m, i) for i in range(len(task.files)) for m in METHODS]
        errors = {str(task.files[i]) + f" [{m}]": extracted[(task.name, m, i)][2] for _, m, i in rows if extracted[(task.name, m, i)][2]}
        keep = [i for i in range(len(task.files)) if all(extracted[(task.name, m, i)][0] is not None for m in METHODS)]
        y = task.y[keep]
        if np.bincount(y, minlength=len(task.genres)).min() < n_folds:
            raise SystemExit(f"{task.name}: a genre has fewer than {n_folds} usable files; use fewer --folds")
        artists = [audio.read_tags(str(task.files[i])).artist for i in keep]
        X = {m: [extracted[(task.name, m, i)][0] for i in keep] for m in METHODS}
        groups = np.unique([a or str(task.files[i]) for a, i in zip(artists, keep)], return_inverse=True)[1]
        results = evaluate(task, X, y, groups, n_folds)
        for m in METHODS:
            results[m]["ms_per_file_median"] = 1000 * float(np.median([extracted[(task.name, m, i)][1] for i in keep]))
        report["tasks"][task.name] = {
            "genres": task.genres, "n_files": len(keep), "majority_baseline": majority_baseline(y),
            "artists": {"tagged_files": sum(a is not None for a in artists), "distinct": len({a for a in artists if a})},
            "errors": errors, "methods": results,
        }
    report["extraction_wall_s"] = extraction_s
    report["wall_s"] = time.perf_counter() - wall
    return report


def print_table(report: dict) -> None:
    """Print the results table, errors and caveats."""
    print(f"{'task':<11} {'method':<12} {'files':>5} {'accuracy':>15} {'macro-F1':>15} {'ms/file':>8} {'feat':>5}")
    for name, t in report["tasks"].items():
        for m, r in t["methods"].items():
            print(
                f"{name:<11} {m:<12} {t['n_files']:>5} {r['accuracy_mean']:>8.3f} ± {r['accuracy_std']:.3f}"
                f" {r['macro_f1_mean']:>8.3f} ± {r['macro_f1_std']:.3f} {r['ms_per_file_median']:>8.0f} {r['n_features']:>5}"
            )
        a = t["artists"]
        print(f"{name:<11} {'majority':<12} {t['n_files']:>5} {t['majority_baseline']:>8.3f}"
              f"   artists (tags): {a['distinct']} distinct in {a['tagged_files']} tagged files")
        for where, why in t["errors"].items():
            print(f"  left out: {where}: {why}")
    print(
        f"\n{report['folds']}-fold stratified group CV (shuffle, seed {report['seed']}), same folds for both methods; "
        "mean ± std over folds (ddof 0); ms/file: median per-file CPU time (time.process_time) of decode + features."
    )
    print(f"Note: {report['caveat']}")
    print(f"Wall time: {report['wall_s']:.0f} s (extraction {report['extraction_wall_s']:.0f} s with {report['workers']} workers)")


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.accuracy [--data DIR] [--folds 5] [--json out.json] [--workers 2]."""
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"folder of tasks (default {DEFAULT_DATA})")
    parser.add_argument("--folds", type=int, default=5, help="stratified k-fold splits (default 5)")
    parser.add_argument("--json", type=Path, help="also write the full report (with per-fold scores) here")
    parser.add_argument("--workers", type=int, default=2, help="extraction processes (default 2)")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    report = run(args.data.resolve(), args.folds, args.workers)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
