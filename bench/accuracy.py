"""Cross-validated genre accuracy on real labelled music: feature families x classifiers of genre-batch (issue #14),
per task, on the same grouped folds, with per-genre F1 and paired bootstrap intervals against the default; optionally
the seed-article recipe."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import xgboost as xgb
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold

from genre_batch.analysis import audio, extraction, features
from genre_batch.analysis.columns import EMBEDDING_VERSION, FEATURE_VERSION
from genre_batch.library.discovery import AUDIO_EXTENSIONS
from genre_batch.modelling import training
from genre_batch.modelling.evaluation import majority_baseline, scores
from genre_batch.modelling.model import default_kind

SEED = 0
"""Default seed of the folds (and of the bootstrap); `--seeds` picks other splits."""
BOOTSTRAP = 2000
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "genre-batch-accuracy"
FAMILY_SETS: tuple[tuple[str, ...], ...] = (("librosa",), ("musicnn",), ("librosa", "musicnn"))
CLASSIFIERS: tuple[str, ...] = ("xgboost", "linear")
DEFAULT = (tuple(training.DEFAULT_FAMILIES), default_kind(training.DEFAULT_FAMILIES))
"""The configuration every other one is compared with (paired, over tracks) unless --reference names another."""
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
            if f.suffix.lower() in AUDIO_EXTENSIONS
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


def cache_path(cache: Path, path: str, recipe: bool, patches: int | None) -> Path:
    """Where one file's features are cached: keyed by path, size, mtime, feature and embedding versions, patches."""
    stat = os.stat(path)
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{FEATURE_VERSION}|{EMBEDDING_VERSION}|{patches}|{recipe}"
    return cache / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"


def extract_one(job: tuple[str, str, bool, int | None]) -> dict:
    """One file's features, as the pipeline stores them (one decode: librosa windows and the musicnn vector over at
    most `patches` patches, None: all), with the CPU seconds of each step; cached under the cache folder. A bad file
    gives its error."""
    path, cache, recipe, patches = job
    target = cache_path(Path(cache), path, recipe, patches)
    if target.exists():
        with np.load(target, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}
    try:
        start = time.process_time()
        segments, _, _ = audio.load(path, features.window_spans)
        decoded = time.process_time()
        _, windows = extraction.librosa_windows(segments)
        librosa_done = time.process_time()
        vector, _ = extraction.musicnn_vector(segments, patches)
        result = {"librosa": windows, "musicnn": vector,
                  "cpu": np.array([decoded - start, librosa_done - decoded, time.process_time() - librosa_done])}
        if recipe:
            start = time.process_time()
            y, sr = librosa.load(path, sr=22050, mono=True)  # the recipe: whole file
            result |= {"recipe": recipe_features(y, sr), "recipe_cpu": np.array(time.process_time() - start)}
    except Exception as e:  # a bad file is reported and left out
        return {"error": np.array(f"{type(e).__name__}: {e}")}
    np.savez(target, **result)
    return result


def warm_up() -> None:
    """Compile (or load) librosa's numba code: in the parent before the pool, then per worker."""
    features.warm_up()
    recipe_features(np.random.default_rng(0).uniform(-0.1, 0.1, 22050).astype(np.float32), 22050)


def extract_all(tasks: list[Task], workers: int, cache: Path, recipe: bool, patches: int | None) -> dict[tuple[str, int], dict]:
    """Features of every file of every task, in a pool; keyed by (task, file index)."""
    cache.mkdir(parents=True, exist_ok=True)
    keys = [(t.name, i) for t in tasks for i in range(len(t.files))]
    paths = {t.name: t.files for t in tasks}
    jobs = [(str(paths[name][i]), str(cache), recipe, patches) for name, i in keys]
    context = multiprocessing.get_context("spawn")  # children load the numba code the parent just cached
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=warm_up) as pool:
        return dict(zip(keys, pool.map(extract_one, jobs, chunksize=2)))


def rows(extracted: list[dict], families: tuple[str, ...]) -> list[np.ndarray]:
    """Each track's feature rows for a family set, as training.family_rows joins them: librosa windows with the
    musicnn vector repeated beside each, or the musicnn vector alone as one row."""
    out = []
    for e in extracted:
        parts = [e["librosa"]] if "librosa" in families else []
        if "musicnn" in families:
            parts.append(np.repeat(e["musicnn"][None, :], len(parts[0]) if parts else 1, axis=0))
        out.append(np.hstack(parts).astype(np.float32))
    return out


def stacked(X: list[np.ndarray], tracks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the given tracks, one matrix, and the position in `tracks` of each row's track."""
    return np.vstack([X[i] for i in tracks]), np.repeat(np.arange(len(tracks)), [len(X[i]) for i in tracks])


def out_of_fold(X: list[np.ndarray], y: np.ndarray, groups: np.ndarray, splits: list, n_classes: int, kind: str,
                columns: list[str]) -> np.ndarray:
    """Out-of-fold track probabilities: `training.fit` on the rows of the training tracks (balanced weights, the
    kind's own validation fold), rows' probabilities averaged per test track."""
    result = np.zeros((len(y), n_classes))
    for train, test in splits:
        X_train, train_track = stacked(X, train)
        model = training.fit(X_train, y[train][train_track], n_classes, train_track, groups[train], kind, columns)
        X_test, test_track = stacked(X, test)
        result[test] = training.per_track(model.predict_proba(X_test), test_track, len(test))
    return result


def recipe_predictions(X: list[np.ndarray], y: np.ndarray, splits: list) -> np.ndarray:
    """Out-of-fold predicted classes of the seed recipe: default XGBClassifier on one vector per track."""
    predicted = np.zeros(len(y), np.int64)
    for train, test in splits:
        model = xgb.XGBClassifier(n_jobs=1).fit(np.stack([X[i] for i in train]), y[train])
        predicted[test] = model.predict(np.stack([X[i] for i in test]))
    return predicted


def paired_interval(correct: np.ndarray, reference: np.ndarray, n: int = BOOTSTRAP, seed: int = SEED) -> dict:
    """Accuracy difference (this minus reference) over the same tracks, with a 95 % percentile interval of a
    bootstrap that resamples tracks (the pairs stay together)."""
    rng = np.random.default_rng(seed)
    diff = correct.astype(np.float64) - reference.astype(np.float64)
    draws = rng.integers(0, len(diff), (n, len(diff)))
    means = diff[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high), "clear_win": bool(low > 0)}


def summary(y: np.ndarray, predicted: np.ndarray, splits: list, genres: list[str]) -> dict:
    """Accuracy and macro-F1 per fold (mean, std), per-genre F1 over all out-of-fold predictions."""
    folds = [scores(y[te], predicted[te], genres) for _, te in splits]
    acc = np.array([f["accuracy"] for f in folds])
    f1 = np.array([f["macro_f1"] for f in folds])
    per_genre = f1_score(y, predicted, labels=list(range(len(genres))), average=None, zero_division=0)
    return {
        "accuracy": float((predicted == y).mean()), "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
        "macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std()),
        "fold_accuracy": acc.tolist(), "fold_macro_f1": f1.tolist(),
        "per_genre_f1": {g: float(v) for g, v in zip(genres, per_genre)},
    }


def name_of(families: tuple[str, ...], kind: str) -> str:
    """A configuration's label: families joined by +, then the classifier."""
    return f"{'+'.join(families)} / {kind}"


def evaluate(task: Task, extracted: list[dict], y: np.ndarray, groups: np.ndarray, n_folds: int, recipe: bool, seed: int = SEED,
             reference: str = name_of(*DEFAULT), only: frozenset[str] | None = None) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Every family set x classifier (those named in `only`, if given, and the reference) and the recipe on the same
    stratified, grouped folds, paired against `reference`; with each configuration's per-track correctness."""
    splits = list(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(y, y, groups))
    predictions: dict[str, np.ndarray] = {}
    out: dict[str, dict] = {}
    for families in FAMILY_SETS:
        X = rows(extracted, families)
        for kind in CLASSIFIERS:
            if only is not None and name_of(families, kind) not in only | {reference}:
                continue
            start = time.process_time()
            oof = out_of_fold(X, y, groups, splits, len(task.genres), kind, training.columns_of(families))
            name = name_of(families, kind)
            predictions[name] = oof.argmax(axis=1)
            out[name] = {**summary(y, predictions[name], splits, task.genres), "n_features": int(X[0].shape[1]),
                         "fit_cpu_s": time.process_time() - start}
    if recipe:
        predictions["seed recipe"] = recipe_predictions([e["recipe"] for e in extracted], y, splits)
        out["seed recipe"] = {**summary(y, predictions["seed recipe"], splits, task.genres), "n_features": int(extracted[0]["recipe"].shape[0])}
    correct = {name: p == y for name, p in predictions.items()}
    for name, result in out.items():
        result["vs_default"] = paired_interval(correct[name], correct[reference], seed=seed)
    return out, correct


def pooled(correct: list[dict[str, np.ndarray]], reference: str) -> dict[str, dict]:
    """Paired intervals over tracks of each configuration vs `reference`, a track's correctness averaged over the
    splits of several seeds (so the split's own variance is in it)."""
    mean = {name: np.mean([c[name] for c in correct], axis=0) for name in correct[0]}
    return {name: paired_interval(m, mean[reference]) for name, m in mean.items()}


def run(data: Path, n_folds: int, workers: int, cache: Path, recipe: bool, seeds: tuple[int, ...] = (SEED,), reference: str = name_of(*DEFAULT),
        patches: int | None = extraction.MUSICNN_PATCHES, only: frozenset[str] | None = None) -> dict:
    """Extract (or read the cache), cross-validate and collect every number of the report."""
    wall = time.perf_counter()
    tasks = discover(data)
    if not tasks:
        raise SystemExit(f"no tasks (subfolders with genre folders of audio files) in {data}")
    warm_up()
    extracted = extract_all(tasks, workers, cache, recipe, patches)
    extraction_s = time.perf_counter() - wall
    report: dict = {"data": str(data), "folds": n_folds, "seeds": list(seeds), "workers": workers, "caveat": CAVEAT,
                    "default": reference, "bootstrap": BOOTSTRAP, "musicnn_patches": patches or "all", "tasks": {}}
    for task in tasks:
        errors = {str(task.files[i]): str(extracted[(task.name, i)]["error"]) for i in range(len(task.files)) if "error" in extracted[(task.name, i)]}
        keep = [i for i in range(len(task.files)) if "error" not in extracted[(task.name, i)]]
        y = task.y[keep]
        if np.bincount(y, minlength=len(task.genres)).min() < n_folds:
            raise SystemExit(f"{task.name}: a genre has fewer than {n_folds} usable files; use fewer --folds")
        artists = [audio.read_tags(str(task.files[i])).artist for i in keep]
        groups = np.unique([a or str(task.files[i]) for a, i in zip(artists, keep)], return_inverse=True)[1]
        files = [extracted[(task.name, i)] for i in keep]
        cpu = np.array([e["cpu"] for e in files])
        report["tasks"][task.name] = {
            "genres": task.genres, "n_files": len(keep), "majority_baseline": majority_baseline(y),
            "artists": {"tagged_files": sum(a is not None for a in artists), "distinct": len({a for a in artists if a})},
            "cpu_ms_median": {"decode": 1000 * float(np.median(cpu[:, 0])), "librosa": 1000 * float(np.median(cpu[:, 1])),
                              "musicnn": 1000 * float(np.median(cpu[:, 2]))},
            "errors": errors, "runs": {},
        }
        correct = []
        for seed in seeds:
            methods, right = evaluate(task, files, y, groups, n_folds, recipe, seed, reference, only)
            report["tasks"][task.name]["runs"][str(seed)] = methods
            correct.append(right)
        report["tasks"][task.name]["pooled"] = pooled(correct, reference) if len(seeds) > 1 else None
    report["extraction_wall_s"] = extraction_s
    report["wall_s"] = time.perf_counter() - wall
    return report


def interval(d: dict) -> str:
    """A paired difference and its interval as printed."""
    return f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + ("  clear win" if d["clear_win"] else "")


def print_table(report: dict) -> None:
    """Print the results table of each seed, per-genre F1, the intervals pooled over seeds, errors and caveats."""
    print(f"{'task':<11} {'seed':>4} {'features / classifier':<26} {'files':>5} {'accuracy':>8} {'fold mean ± std':>16} {'macro-F1':>8}"
          f" {'feat':>5}   vs {report['default']} (paired 95 % CI)")
    for name, t in report["tasks"].items():
        for seed, methods in t["runs"].items():
            for m, r in methods.items():
                print(
                    f"{name:<11} {seed:>4} {m:<26} {t['n_files']:>5} {r['accuracy']:>8.3f} {r['accuracy_mean']:>8.3f} ± {r['accuracy_std']:.3f}"
                    f" {r['macro_f1_mean']:>8.3f} {r['n_features']:>5}   {interval(r['vs_default'])}"
                )
        a, c = t["artists"], t["cpu_ms_median"]
        print(f"{name:<11} {'':>4} {'majority':<26} {t['n_files']:>5} {t['majority_baseline']:>8.3f}"
              f"   artists (tags): {a['distinct']} distinct in {a['tagged_files']} tagged files;"
              f" CPU per file (median ms): decode {c['decode']:.0f}, librosa {c['librosa']:.0f}, musicnn {c['musicnn']:.0f}")
        for seed, methods in t["runs"].items():
            print(f"{name:<11} {seed:>4} per-genre F1 ({', '.join(t['genres'])}):")
            for m, r in methods.items():
                print(f"{'':<16} {m:<26} " + " ".join(f"{r['per_genre_f1'][g]:.2f}" for g in t["genres"]))
        if t["pooled"]:
            print(f"{name:<11} pooled over seeds {', '.join(t['runs'])} (a track's correctness averaged over the splits), vs {report['default']}:")
            for m, d in t["pooled"].items():
                print(f"{'':<16} {m:<26} {interval(d)}")
        for where, why in t["errors"].items():
            print(f"  left out: {where}: {why}")
    print(
        f"\n{report['folds']}-fold stratified group CV (shuffle, seeds {', '.join(map(str, report['seeds']))}), the same folds for every "
        "row of a seed; accuracy over all out-of-fold tracks, then mean ± std over folds (ddof 0); the interval is a paired "
        f"bootstrap over tracks ({report['bootstrap']} resamples) of the accuracy difference with the reference; musicnn: "
        f"{report['musicnn_patches']} patches per track, as extracted."
    )
    print(f"Note: {report['caveat']}")
    print(f"Wall time: {report['wall_s']:.0f} s (extraction or cache {report['extraction_wall_s']:.0f} s with {report['workers']} workers)")


def patch_count(text: str) -> int | None:
    """--patches: a positive number, or 'all' (None)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.accuracy [--data DIR] [--folds 5] [--json out.json] [--workers 2] [--cache DIR] [--seeds 0 1]
    [--reference NAME] [--patches N|all] [--only NAME ...] [--recipe]."""
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"folder of tasks (default {DEFAULT_DATA})")
    parser.add_argument("--folds", type=int, default=5, help="stratified k-fold splits (default 5)")
    parser.add_argument("--json", type=Path, help="also write the full report (with per-fold scores) here")
    parser.add_argument("--workers", type=int, default=2, help="extraction processes (default 2)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"extracted features, reused by later runs (default {DEFAULT_CACHE}; never inside the repository)")
    parser.add_argument("--reference", default=name_of(*DEFAULT), choices=[name_of(f, k) for f in FAMILY_SETS for k in CLASSIFIERS],
                        help=f"the configuration the paired intervals compare with (default: genre-batch's default, {name_of(*DEFAULT)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[SEED], help=f"seeds of the folds, one split each (default {SEED}); with several, intervals pooled over them too")
    parser.add_argument("--patches", type=patch_count, default=extraction.MUSICNN_PATCHES,
                        help=f"musicnn patches per track, a number or 'all' (default extraction.MUSICNN_PATCHES = {extraction.MUSICNN_PATCHES})")
    parser.add_argument("--only", nargs="+", choices=[name_of(f, k) for f in FAMILY_SETS for k in CLASSIFIERS],
                        help="evaluate only these configurations (and the reference); default: all")
    parser.add_argument("--recipe", action="store_true", help="also evaluate the seed-article recipe (decodes every file again)")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    if args.cache.resolve().is_relative_to(REPO):
        parser.error(f"--cache {args.cache} is inside the repository: features of the shared data must not be committed")
    report = run(args.data.resolve(), args.folds, args.workers, args.cache.resolve(), args.recipe, tuple(args.seeds), args.reference,
                 args.patches, frozenset(args.only) if args.only else None)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
