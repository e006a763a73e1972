"""Linear probe of musicnn MSD embeddings on real labelled music: which patches per track, how accurate.

    python -m bench.embedding_probe                          # ../shared/data, task emotify
    python -m bench.embedding_probe --task gtzan-mini --workers 2
    python -m bench.embedding_probe --vgg /tmp/msd_vgg.onnx  # also the MSD VGG variant (scripts/convert_musicnn.py)

Every patch of every file is embedded once (mono 16 kHz, soundfile + soxr); each patch choice then
averages the `penultimate` vectors of its patches per track. Scores: accuracy of a standardised L2
logistic regression (C from --C, default 1), mean +- std over the folds of --repeats shuffled
stratified k-fold runs (fold-to-fold spread is large on 200 tracks), plain and grouped by the embedded
artist tag (as bench/accuracy.py splits). With --vgg, the MSD VGG variant's `pool5` (256 dims) of the same patches is
scored alone and beside the musicnn embedding, and every row also gets the genre precision@K of its pooled vectors
(cosine of z-scored means, K as bench/similar.py's --quality).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.accuracy import DEFAULT_DATA, SEED, discover
from bench.similar import QUALITY_DEFAULT_K, QUALITY_K, precision_at_k, zscored
from genre_batch.analysis import audio, musicnn
from genre_batch.analysis.columns import EMBEDDING_DIM

CHOICES: dict[str, Callable[[int], list[int]]] = {
    "spread 4 (track_embedding)": lambda n: musicnn.spread_patches(n, 4),
    "spread 8 (track_embedding)": lambda n: musicnn.spread_patches(n, 8),
    "all patches": lambda n: musicnn.spread_patches(n, None),
    "middle 4 (consecutive)": lambda n: list(range(max(0, (n - 4) // 2), min(n, (n - 4) // 2 + 4))),
}


def patch_embeddings(path: Path, vgg: Path | None = None) -> np.ndarray:
    """Penultimate embeddings of every patch of the file at path, [n, 200], followed by the VGG model's `pool5`
    [n, 256] when vgg (its ONNX file) is given."""
    y, rate = sf.read(path, dtype="float32", always_2d=True)
    y16 = soxr.resample(y.mean(axis=1), rate, musicnn.SAMPLE_RATE).astype(np.float32)
    patches = musicnn.log_mel(y16)
    if vgg is None:
        return musicnn.embed(patches)[0]
    network = musicnn.load_session(vgg, hashlib.sha256(vgg.read_bytes()).hexdigest())
    pool5 = np.concatenate([network.run(["pool5"], {"logmel": patches[i : i + 1]})[0] for i in range(len(patches))])
    return np.hstack([musicnn.embed(patches)[0], pool5])


def cv_accuracy(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, folds: int, repeats: int, c: float
) -> tuple[float, float]:
    """Mean and std over all folds of `repeats` shuffled k-fold runs of a standardised logistic regression."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    scores = []
    for seed in range(SEED, SEED + repeats):
        if groups is None:
            splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y)
        else:
            splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(X, y, groups)
        scores.extend(cross_val_score(model, X, y, cv=list(splits)))
    return float(np.mean(scores)), float(np.std(scores))


def main() -> None:
    """Embed one task's files and print the probe's accuracy for each patch choice."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--task", default="emotify")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="k-fold runs with different shuffles (default 10)")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (default 1, scikit-learn's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vgg", type=Path, default=None, help="the MSD VGG variant as ONNX (scripts/convert_musicnn.py MSD_vgg --out FILE)")
    args = parser.parse_args()
    task = next(t for t in discover(args.data) if t.name == args.task)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        per_file = list(pool.map(partial(patch_embeddings, vgg=args.vgg), task.files, chunksize=4))
    artists = [audio.read_tags(str(f)).artist or str(f) for f in task.files]
    groups = np.unique(artists, return_inverse=True)[1]
    counts = [len(e) for e in per_file]
    print(f"{task.name}: {len(task.files)} files, {len(set(artists))} artists, patches per file {min(counts)}-{max(counts)}")
    models = {"musicnn": slice(0, EMBEDDING_DIM)}
    if args.vgg is not None:
        models |= {"vgg pool5": slice(EMBEDDING_DIM, None), "musicnn + vgg pool5": slice(None)}
    k = QUALITY_K.get(task.name, QUALITY_DEFAULT_K)
    for name, choose in CHOICES.items():
        pooled = np.stack([e[choose(len(e))].mean(axis=0) for e in per_file])
        for model, columns in models.items():
            X = pooled[:, columns]
            plain = cv_accuracy(X, task.y, None, args.folds, args.repeats, args.C)
            grouped = cv_accuracy(X, task.y, groups, args.folds, args.repeats, args.C)
            precision = f"   precision@{k} {precision_at_k(zscored(X, X), task.y, k):.3f}" if args.vgg is not None else ""
            print(f"{name:28s} {model:19s} stratified {plain[0]:.3f} +- {plain[1]:.3f}   grouped by artist {grouped[0]:.3f} +- {grouped[1]:.3f}{precision}")


if __name__ == "__main__":
    main()
