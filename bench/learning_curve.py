"""What the training cap costs: track accuracy against the per-genre sample cap, trained as genre-batch trains.

Each point fits `training.fit` (balanced weights, the validation fold's choice, then the refit) with a classifier
(`--curve-classifier`: XGBoost by default, the kind `train` picks for librosa features; or linear, the kind of a store
with musicnn beside librosa) on a sample capped per genre the way `train` caps (`training.sample`: tracks ordered by a
hash of their artist, then of their URI; `training.thinned`: windows cut to the cap's rows, at least 2 per track) and
scores whole tracks (every window).
- synthetic: the scale stores' generator, at the caps of memory budgets bracketing the one `train` takes on such a store
  (`default_cap`: a quarter to 4 times its rows); train and test tracks of disjoint artists, every point scored on the
  same test tracks, so the cost of the cap is a paired difference (with its standard error). Points run smallest
  first; a point whose projected CPU time exceeds what is left of the budget is skipped and reported with its projection.
- real: emotify (../shared/data, read in place, never copied) in grouped 5-fold CV by artist; the capped sample is
  drawn from each fold's training tracks, every window kept. Extracted features (not audio) are cached in the work
  folder. Its 4 genres of ~50 tracks sit far below the cap `train` would take for them (`real_curve` records it): it
  shows the slope at small samples, not the cost of the cap.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from sklearn.model_selection import StratifiedGroupKFold

from bench import synthetic_store
from bench.accuracy import warm_up
from genre_batch.analysis import extraction
from genre_batch.library.discovery import AUDIO_EXTENSIONS
from genre_batch.modelling import training
from genre_batch.storage.feature_store import run_rows

REAL_CAPS = (10, 20, 30, 40, 50)
CAP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Synthetic points, as multiples of the default cap's memory budget."""
SYNTHETIC_TEST_PER_GENRE = 1_000
"""Test tracks per genre (10,000 in all): a paired accuracy difference of 1 point is then resolved (standard error ~0.3)."""
CURVE_BUDGET_S = 3_600.0
"""CPU seconds the synthetic curve may spend on its fits (the default; `--curve-budget`)."""
FOLDS = 5


@dataclass(frozen=True)
class Windows:
    """Feature rows of some tracks and the position (among those tracks) of each row's track."""

    X: np.ndarray
    track: np.ndarray


@dataclass(frozen=True)
class Picked:
    """Tracks (positions in a population) and the windows each keeps: `count` consecutive ones from its `start`."""

    tracks: np.ndarray
    start: np.ndarray
    count: np.ndarray


def whole(tracks: np.ndarray, windows: np.ndarray) -> Picked:
    """Tracks with every window (`windows`: how many each track of the population has)."""
    return Picked(tracks, np.zeros(len(tracks), np.int64), windows[tracks])


def stacked(X: list[np.ndarray], picked: Picked) -> Windows:
    """The kept rows of some tracks of a list of per-track window matrices."""
    return Windows(np.vstack([X[t][s : s + c] for t, s, c in zip(picked.tracks, picked.start, picked.count)]),
                   np.repeat(np.arange(len(picked.tracks)), picked.count))


def synthetic_windows(picked: Picked, seed: int = 0) -> Windows:
    """The generator's kept rows of some tracks, each track generated within its store shard (SHARD_TRACKS
    consecutive tracks, as the scale stores write them), so that a track has the same values at every point of the
    curve; one shard's rows at a time."""
    size, rows = synthetic_store.SHARD_TRACKS, synthetic_store.WINDOWS
    X = np.empty((int(picked.count.sum()), synthetic_store.N), np.float32)
    ends = np.cumsum(picked.count)
    shards = picked.tracks // size
    for shard in np.unique(shards):
        mine = np.flatnonzero(shards == shard)
        values = synthetic_store.window_values(np.arange(shard * size, (shard + 1) * size), seed, False)
        at = run_rows((picked.tracks[mine] - shard * size) * rows + picked.start[mine], picked.count[mine])
        X[run_rows(ends[mine] - picked.count[mine], picked.count[mine])] = values[at]
    return Windows(X, np.repeat(np.arange(len(picked.tracks)), picked.count))


def is_test_artist(i: np.ndarray) -> np.ndarray:
    """Whether tracks belong to the test half of the artists (pairs of artists alternate: not the artist's parity,
    which genre_of keeps)."""
    return (i // synthetic_store.TRACKS_PER_ARTIST // 2) % 2 == 1


def population(train_per_genre: int, test_per_genre: int, seed: int = 0) -> int:
    """The fewest generator tracks (a power-of-two multiple of a first guess) with enough train and test tracks in
    every genre (genre_of spreads artists over genres unevenly)."""
    n = len(synthetic_store.GENRES) * (train_per_genre + test_per_genre) * 2
    while True:
        i = np.arange(n)
        y, test = synthetic_store.genre_of(i, seed), is_test_artist(i)
        counts = [np.bincount(y[side], minlength=len(synthetic_store.GENRES)).min() for side in (~test, test)]
        if counts[0] >= train_per_genre and counts[1] >= test_per_genre:
            return n
        n *= 2


def default_cap() -> training.Cap:
    """The cap `train` takes on a synthetic store (its genres, windows per track and librosa columns)."""
    return training.cap_per_genre(len(synthetic_store.GENRES), synthetic_store.WINDOWS)


def bracket(cap: training.Cap, factors: tuple[float, ...] = CAP_FACTORS) -> tuple[training.Cap, ...]:
    """Caps of budgets at the given multiples of a cap's, smallest first, each once."""
    return tuple(sorted({cap.scaled(f) for f in factors}, key=lambda c: (c.rows, c.tracks)))


def projected_cpu(points: list[dict], cap: training.Cap) -> float | None:
    """CPU seconds a point at `cap` should take, from the largest measured point: its time scaled by the rows and by
    the growth of rounds between the last two points (rounds grow with the sample); None before any."""
    if not points:
        return None
    last = points[-1]
    growth = max(1.0, last["rounds"] / points[-2]["rounds"]) if len(points) > 1 and last["rounds"] else 1.0
    return last["cpu_s"] * cap.rows / last["rows_per_genre"] * growth


def extract(path: str) -> tuple[np.ndarray, str | None]:
    """Windows x features and artist tag of one file (runs in a pool process)."""
    meta, windows = extraction.extract_file(path)
    return windows, meta["tag_artist"]


def real_features(task: Path, cache: Path, workers: int) -> tuple[list[np.ndarray], np.ndarray, list[str], list[str], list[str]]:
    """Window features, genre numbers, genres, artists and file names of a task, extracted once and cached."""
    genres = sorted(p.name for p in task.iterdir() if p.is_dir())
    files = [f for g in genres for f in sorted((task / g).iterdir()) if f.suffix.lower() in AUDIO_EXTENSIONS]
    y = np.array([genres.index(f.parent.name) for f in files], np.int32)
    names = [f"{f.parent.name}/{f.name}" for f in files]
    if cache.exists():
        saved = np.load(cache, allow_pickle=False)
        if saved["names"].tolist() == names:
            counts = saved["counts"]
            return np.split(saved["X"], np.cumsum(counts)[:-1]), y, genres, saved["artists"].tolist(), names
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=warm_up) as pool:
        results = list(pool.map(extract, [str(f) for f in files]))
    X = [w for w, _ in results]
    artists = [a or n for (_, a), n in zip(results, names)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, X=np.vstack(X), counts=np.array([len(w) for w in X]), artists=np.array(artists), names=np.array(names))
    return X, y, genres, artists, names


def capped(tracks: np.ndarray, y: np.ndarray, artists: list[str], names: list[str], genres: list[str], cap: training.Cap,
           windows: np.ndarray) -> Picked:
    """The given tracks capped per genre as `train` caps them (`training.sample` grouped by artist, then
    `training.thinned`); `windows`: how many each track of the population has."""
    table = pa.table({"uri": [names[t] for t in tracks], "genre": [genres[y[t]] for t in tracks],
                      "tag_artist": [artists[t] for t in tracks], "row": tracks,
                      "row_start": np.zeros(len(tracks), np.int64), "row_count": windows[tracks].astype(np.int32)})
    picked = training.thinned(training.sample(table, cap, "artist"), cap.rows)
    return Picked(*(picked[c].to_numpy().astype(np.int64) for c in ("row", "row_start", "row_count")))


def fit_predict(train: Windows, y: np.ndarray, groups: np.ndarray, test: Windows, n_test: int, n_classes: int,
                kind: str = "xgboost") -> tuple[np.ndarray, dict]:
    """Genre predicted for each test track by a model of a kind fitted as genre-batch fits on the train rows (`y`,
    `groups`: per train track), and the setting the fit chose (`rounds` for XGBoost, `C` for linear; the other None)."""
    model = training.fit(train.X, y[train.track], n_classes, train.track, groups, kind)
    predicted = training.per_track(model.predict_proba(test.X), test.track, n_test).argmax(axis=1)
    params = model.params()
    return predicted, {"rounds": params.get("num_boost_round"), "C": params.get("C")}


def real_curve(task: Path, cache: Path, caps: tuple[int, ...] = REAL_CAPS, workers: int = 2, kind: str = "xgboost") -> dict:
    """Mean grouped-CV track accuracy per cap on a real task (caps at or above the genre size mean no cap), with the
    cap `train` would take for the task and whether any of its genres reaches it."""
    X, y, genres, artists, names = real_features(task, cache, workers)
    groups, windows = training.codes(artists), np.array([len(w) for w in X], np.int64)
    splits = list(StratifiedGroupKFold(FOLDS, shuffle=True, random_state=0).split(y, y, groups))
    points = []
    for cap in caps:
        accuracy = []
        for tr, te in splits:
            train = capped(tr, y, artists, names, genres, training.Cap(cap, cap * int(windows.max())), windows)  # every window
            predicted, _ = fit_predict(stacked(X, train), y[train.tracks], groups[train.tracks], stacked(X, whole(te, windows)), len(te),
                                       len(genres), kind)
            accuracy.append(float((predicted == y[te]).mean()))
        points.append({"cap_per_genre": cap, "accuracy_mean": round(float(np.mean(accuracy)), 4),
                       "accuracy_std": round(float(np.std(accuracy)), 4)})
    cap = training.cap_per_genre(len(genres), float(windows.mean())).tracks
    return {"task": task.name, "classifier": kind, "tracks": len(y), "genres": genres, "artists": len(set(artists)), "folds": FOLDS, "points": points,
            "default_cap": cap, "largest_genre": int(np.bincount(y).max()), "cap_binds": bool(np.bincount(y).max() > cap)}


def cap_cost(correct: dict[training.Cap, np.ndarray], cap: training.Cap) -> dict:
    """Accuracy of the largest measured sample minus that of the cap, in points, with the paired standard error (the
    same test tracks); None values when no point above the cap was measured."""
    largest = max(correct, key=lambda c: (c.rows, c.tracks)) if correct else cap
    head = {"cap_per_genre": cap.tracks, "rows_per_genre": cap.rows, "largest_cap": largest.tracks, "largest_rows": largest.rows}
    if cap not in correct or largest.rows <= cap.rows:
        return {**head, "gain_points": None, "se_points": None}
    d = correct[largest].astype(np.float64) - correct[cap]
    return {**head, "gain_points": round(100 * float(d.mean()), 2), "se_points": round(100 * float(d.std(ddof=1) / np.sqrt(len(d))), 2)}


def synthetic_curve(factors: tuple[float, ...] = CAP_FACTORS, seed: int = 0, budget_s: float = CURVE_BUDGET_S,
                    test_per_genre: int = SYNTHETIC_TEST_PER_GENRE, cap: training.Cap | None = None, kind: str = "xgboost") -> dict:
    """Track accuracy per cap on the synthetic generator (the caps of budgets `factors` times the one of `cap`,
    default `default_cap()`), test tracks from artists never trained on (scored by all their windows), each point's
    fit CPU time, and what the cap costs against the largest sample measured; points projected beyond what is left of
    `budget_s` CPU seconds are skipped."""
    cap = default_cap() if cap is None else cap
    caps = bracket(cap, factors)
    genres = list(synthetic_store.GENRES)
    i = np.arange(population(max(c.tracks for c in caps), test_per_genre, seed))
    y = synthetic_store.genre_of(i, seed).astype(np.int32)
    windows = np.full(len(i), synthetic_store.WINDOWS, np.int64)
    artists = (i // synthetic_store.TRACKS_PER_ARTIST).astype(str).tolist()
    names = [synthetic_store.uri_of(k) for k in i.tolist()]
    test_artist = is_test_artist(i)
    test = np.concatenate([np.flatnonzero(test_artist & (y == g))[:test_per_genre] for g in range(len(genres))])
    pool = np.flatnonzero(~test_artist)
    test_rows, groups = synthetic_windows(whole(test, windows), seed), training.codes(artists)
    points: list[dict] = []
    skipped: list[dict] = []
    correct: dict[training.Cap, np.ndarray] = {}
    for c in caps:
        projected, spent = projected_cpu(points, c), sum(p["cpu_s"] for p in points)
        if projected is not None and spent + projected > budget_s:
            skipped.append({"cap_per_genre": c.tracks, "rows_per_genre": c.rows, "projected_cpu_s": round(projected),
                            "budget_left_s": round(budget_s - spent)})
            continue
        train = capped(pool, y, artists, names, genres, c, windows)
        rows = synthetic_windows(train, seed)
        started = time.process_time()
        predicted, setting = fit_predict(rows, y[train.tracks], groups[train.tracks], test_rows, len(test), len(genres), kind)
        correct[c] = predicted == y[test]
        points.append({"cap_per_genre": c.tracks, "rows_per_genre": c.rows, "train_tracks": len(train.tracks), "train_windows": len(rows.X),
                       "accuracy": round(float(correct[c].mean()), 4), **setting, "cpu_s": round(time.process_time() - started, 1)})
        print(f"learning curve, synthetic: {points[-1]}", flush=True)
    return {"classifier": kind, "test_tracks": len(test), "default_cap": cap.tracks, "default_rows": cap.rows, "budget_s": budget_s,
            "points": points, "skipped": skipped, "cap_cost": cap_cost(correct, cap)}
