"""What the training cap costs: track accuracy against the per-genre sample cap, trained as genre-batch trains.

Each point fits `training.fit` (balanced weights, early stopping) on a sample capped per genre the way
`training.sample` caps (tracks ordered by a hash of their artist, then of their URI) and scores whole tracks.
- real: emotify (../shared/data, read in place, never copied) in grouped 5-fold CV by artist; the capped sample is
  drawn from each fold's training tracks. Extracted features (not audio) are cached in the work folder.
- synthetic: the scale stores' generator; train tracks and test tracks of disjoint artists.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from sklearn.model_selection import StratifiedGroupKFold

from bench import synthetic_store
from bench.accuracy import warm_up
from genre_batch.analysis import extraction
from genre_batch.library.discovery import AUDIO_EXTENSIONS
from genre_batch.modelling import training

REAL_CAPS = (10, 20, 30, 40, 50)
SYNTHETIC_CAPS = (100, 250, 500)
SYNTHETIC_TEST_PER_GENRE = 300
FOLDS = 5


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


def capped(tracks: np.ndarray, y: np.ndarray, artists: list[str], names: list[str], genres: list[str], cap: int) -> np.ndarray:
    """The given tracks capped per genre with `training.sample` (grouped by artist)."""
    table = pa.table({"uri": [names[t] for t in tracks], "genre": [genres[y[t]] for t in tracks],
                      "tag_artist": [artists[t] for t in tracks], "row": tracks})
    return np.array(training.sample(table, cap, "artist")["row"].to_pylist(), np.int64)


def fit_score(X: list[np.ndarray], y: np.ndarray, groups: np.ndarray, train: np.ndarray, test: np.ndarray, n_classes: int) -> float:
    """Track accuracy on `test` of a model fitted on `train` as genre-batch fits."""
    X_train = np.vstack([X[t] for t in train])
    track = np.repeat(np.arange(len(train)), [len(X[t]) for t in train])
    model = training.fit(X_train, y[train][track], n_classes, track, groups[train])
    X_test = np.vstack([X[t] for t in test])
    test_track = np.repeat(np.arange(len(test)), [len(X[t]) for t in test])
    predicted = training.per_track(model.predict_proba(X_test), test_track, len(test)).argmax(axis=1)
    return float((predicted == y[test]).mean())


def real_curve(task: Path, cache: Path, caps: tuple[int, ...] = REAL_CAPS, workers: int = 2) -> dict:
    """Mean grouped-CV track accuracy per cap on a real task (caps at or above the genre size mean no cap)."""
    X, y, genres, artists, names = real_features(task, cache, workers)
    groups = training.codes(artists)
    splits = list(StratifiedGroupKFold(FOLDS, shuffle=True, random_state=0).split(y, y, groups))
    points = []
    for cap in caps:
        accuracy = [fit_score(X, y, groups, capped(tr, y, artists, names, genres, cap), te, len(genres)) for tr, te in splits]
        points.append({"cap_per_genre": cap, "accuracy_mean": round(float(np.mean(accuracy)), 4),
                       "accuracy_std": round(float(np.std(accuracy)), 4)})
    return {"task": task.name, "tracks": len(y), "genres": genres, "artists": len(set(artists)), "folds": FOLDS, "points": points}


def synthetic_curve(caps: tuple[int, ...] = SYNTHETIC_CAPS, seed: int = 0) -> dict:
    """Track accuracy per cap on the synthetic generator, test tracks from artists never trained on."""
    per_genre = max(caps)
    n = len(synthetic_store.GENRES) * (per_genre + SYNTHETIC_TEST_PER_GENRE) * 2
    i = np.arange(n)
    y = synthetic_store.genre_of(i, seed).astype(np.int32)
    artists = (i // synthetic_store.TRACKS_PER_ARTIST).astype(str).tolist()
    names = [synthetic_store.uri_of(k) for k in i.tolist()]
    test_artist = (i // synthetic_store.TRACKS_PER_ARTIST // 2) % 2 == 1  # not the artist's parity: genre_of keeps it
    test = np.concatenate([np.flatnonzero(test_artist & (y == g))[:SYNTHETIC_TEST_PER_GENRE] for g in range(len(synthetic_store.GENRES))])
    genres = list(synthetic_store.GENRES)
    pool = capped(np.flatnonzero(~test_artist), y, artists, names, genres, per_genre)
    used = np.concatenate([pool, test])
    X: list[np.ndarray] = [np.zeros((0, synthetic_store.N), np.float32)] * n
    for k, windows in zip(used.tolist(), np.split(synthetic_store.window_values(used, seed, False), len(used))):
        X[k] = windows
    groups = training.codes(artists)
    points = [{"cap_per_genre": cap, "accuracy": round(fit_score(X, y, groups, capped(pool, y, artists, names, genres, cap), test, len(genres)), 4)}
              for cap in caps]
    return {"test_tracks": len(test), "points": points}
