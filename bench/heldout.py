"""Held-out genre accuracy through genre-batch's own commands (issue #14's held-out check): `extract` and `train` a
store on one labelled folder, `classify` the files of another folder with its model, and score each file's top genre
against its folder. With --folds instead of --test: the same for each artist-grouped fold of one folder (the folds of
bench.accuracy), from one extraction: a product-path counterpart of its cross-validation."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score
from sklearn.model_selection import StratifiedGroupKFold

from bench.accuracy import SEED, paired_interval
from genre_batch.analysis import audio
from genre_batch.library.discovery import is_audio_path
from genre_batch.library.labels import normalise

BOOTSTRAP = 2000
CLASSIFY_FILES = 1000
"""Files per `classify` command (a command line holds only so many paths)."""
DEFAULT_WORK = Path(tempfile.gettempdir()) / "genre-batch-heldout"


def labelled(folder: Path) -> list[tuple[str, str]]:
    """The audio files under `folder`'s genre subfolders (absolute paths, sorted), each with its folder's genre."""
    return sorted(
        (str(f), normalise(genre_dir.name))
        for genre_dir in folder.resolve().iterdir() if genre_dir.is_dir() and normalise(genre_dir.name)
        for f in genre_dir.rglob("*") if f.is_file() and is_audio_path(str(f))
    )


def genre_batch(work: Path, *args: str, failing: bool = False) -> object:
    """Run one genre-batch command with `--format json` and return its JSON; an exit status other than 0 (or 1 when
    `failing` is allowed: classify with files that could not be decoded) stops the bench with its stderr."""
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home")}
    done = subprocess.run([sys.executable, "-m", "genre_batch.cli", *args, "--format", "json"], capture_output=True, text=True, env=env, check=False)
    if done.returncode not in ((0, 1) if failing else (0,)) or not done.stdout.strip():
        raise SystemExit(f"genre-batch {' '.join(args[:1])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def train(work: Path, store: Path, labels: str) -> dict:
    """Train the store's default model on a labels file with the promotion gate open; its summary."""
    summary = genre_batch(work, "train", "--store", str(store), "--labels", labels)["train"]
    if not summary["promoted"]:
        raise SystemExit(f"the model was not made current: {summary['reason']}")
    return summary


def classify(work: Path, store: Path, files: list[str]) -> dict[str, str | None]:
    """Each file's top genre by the store's current model (None where it could not be classified), CLASSIFY_FILES
    files per command."""
    top: dict[str, str | None] = {}
    for start in range(0, len(files), CLASSIFY_FILES):
        results = genre_batch(work, "classify", "--store", str(store), "--top", "1", *files[start:start + CLASSIFY_FILES], failing=True)
        top |= {r["uri"]: r["genres"][0]["genre"] if "genres" in r else None for r in results}
    return top


def labels_file(path: Path, files: list[tuple[str, str]]) -> str:
    """A labels file (file, genre) of labelled files: training reads the genres exactly as they are scored."""
    with path.open("w", newline="") as out:
        csv.writer(out).writerows([("file", "genre"), *files])
    return str(path)


def score(truth: list[str], predicted: list[str | None], genres: list[str], seed: int = SEED) -> dict:
    """Accuracy (with a 95 % bootstrap interval over files), macro-F1, per-genre F1 and the confusion matrix of the
    files whose genre the model knows; files it could not classify count as wrong."""
    known = [i for i, g in enumerate(truth) if g in genres]
    if not known:
        raise SystemExit(f"no test file has a genre the model was trained on ({', '.join(genres)}); the test folders: {', '.join(sorted(set(truth)))}")
    y = np.array([genres.index(truth[i]) for i in known])
    p = np.array([genres.index(predicted[i]) if predicted[i] in genres else -1 for i in known])
    correct = p == y
    interval = paired_interval(correct, np.zeros_like(correct), BOOTSTRAP, seed)
    present = sorted(set(y.tolist()))  # F1 of the genres the test set has
    return {
        "files": len(known), "accuracy": float(correct.mean()), "interval": [interval["low"], interval["high"]],
        "macro_f1": float(f1_score(y, p, labels=present, average="macro", zero_division=0)),
        "per_genre_f1": dict(zip([genres[i] for i in present], map(float, f1_score(y, p, labels=present, average=None, zero_division=0)))),
        "genres": genres, "confusion": confusion_matrix(y, p, labels=list(range(len(genres)))).tolist(), "unclassified": int((p == -1).sum()),
        "genres_unknown_to_model": sorted({truth[i] for i in range(len(truth))} - set(genres)),
    }


def held_out(train_dir: Path, test_dir: Path, work: Path) -> dict:
    """Train on one folder, classify and score the other."""
    store = work / "store"
    genre_batch(work, "extract", str(train_dir.resolve()), "--store", str(store))
    model = train(work, store, labels_file(work / "train-labels.csv", labelled(train_dir)))
    test = labelled(test_dir)
    predicted = classify(work, store, [f for f, _ in test])
    return {"model": model, "test": str(test_dir), **score([g for _, g in test], [predicted.get(f) for f, _ in test], model["genres"])}


def folds(data: Path, n_folds: int, seed: int, work: Path) -> dict:
    """One extraction of `data`, then per artist-grouped fold (stratified by genre, bench.accuracy's split of this
    seed) a copy of that store trained on the other folds' files (a labels file) and used to classify the fold."""
    files = labelled(data)
    genres = sorted({g for _, g in files})
    y = np.array([genres.index(g) for _, g in files])
    artists = [audio.read_tags(f).artist or f for f, _ in files]
    groups = np.unique(artists, return_inverse=True)[1]
    base = work / "base"
    genre_batch(work, "extract", str(data.resolve()), "--store", str(base))
    predicted: dict[str, str | None] = {}
    models = []
    for k, (train_rows, test_rows) in enumerate(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(y, y, groups)):
        store = work / f"fold-{k}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(base, store)
        models.append(train(work, store, labels_file(work / f"fold-{k}-labels.csv", [files[i] for i in train_rows])))
        predicted |= classify(work, store, [files[i][0] for i in test_rows])
        print(f"fold {k + 1}/{n_folds}: {len(test_rows)} files classified", file=sys.stderr)
    return {"models": models, "folds": n_folds, "seed": seed, "data": str(data), "artists": len(set(artists)),
            **score([g for _, g in files], [predicted.get(f) for f, _ in files], genres, seed)}


def print_report(report: dict, goal: float | None) -> None:
    """The scores as a few lines of text."""
    model = report["model"] if "model" in report else report["models"][0]
    how = (f"trained on {model['tracks']} tracks, tested on {report['test']}" if "model" in report
           else f"{report['folds']} artist-grouped folds of {report['data']} ({report['artists']} artists, seed {report['seed']}), one model per fold")
    print(f"model: {model['classifier']} on {'+'.join(model['features'])}; {how}")
    low, high = report["interval"]
    unclassified = f", {report['unclassified']} not classified" if report["unclassified"] else ""
    print(f"accuracy {report['accuracy']:.3f} [{low:.3f}, {high:.3f}] over {report['files']} files, macro-F1 {report['macro_f1']:.3f}{unclassified}")
    print("per-genre F1: " + ", ".join(f"{g} {v:.2f}" for g, v in report["per_genre_f1"].items()))
    print(f"confusion (rows: folder genre, columns: predicted {' '.join(report['genres'])}): " + "; ".join(
        f"{g}: {' '.join(map(str, row))}" for g, row in zip(report["genres"], report["confusion"]) if g in report["per_genre_f1"]))
    if report["genres_unknown_to_model"]:
        print(f"left out (genres the model was not trained on): {', '.join(report['genres_unknown_to_model'])}")
    if goal is not None:
        print(f"goal {goal:.2f}: {'reached' if report['accuracy'] >= goal else 'not reached'}"
              f"{' (its interval excludes it)' if high < goal or low > goal else ' (within the interval)'}")
    print(f"wall time {report['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.heldout --train DIR (--test DIR | --folds N) [--seed S] [--goal A] [--work DIR] [--json F]."""
    parser = argparse.ArgumentParser(prog="python -m bench.heldout", description=__doc__)
    parser.add_argument("--train", type=Path, required=True, help="labelled folder (one subfolder per genre) to extract and train on")
    parser.add_argument("--test", type=Path, help="labelled folder to classify and score (genres the model lacks are left out)")
    parser.add_argument("--folds", type=int, help="instead of --test: artist-grouped folds of --train, one model per fold")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the folds and the bootstrap (default {SEED}, as bench.accuracy)")
    parser.add_argument("--goal", type=float, help="accuracy to compare with (issue #14: emotify 0.80, gtzan 0.90)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"stores and Prefect home, emptied first (default {DEFAULT_WORK})")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if (args.test is None) == (args.folds is None):
        parser.error("give exactly one of --test and --folds")
    if args.folds is not None and args.folds < 2:
        parser.error("--folds must be at least 2")
    for folder in (args.train, args.test):
        if folder is not None and not (folder.is_dir() and labelled(folder)):
            parser.error(f"{folder}: no audio files in genre subfolders")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    start = time.perf_counter()
    report = held_out(args.train, args.test, args.work) if args.test else folds(args.train, args.folds, args.seed, args.work)
    report["wall_s"] = time.perf_counter() - start
    print_report(report, args.goal)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
