"""Synthetic feature stores of the real schema, written through the project's own writers, for the scale checks.

Track i of a store is a pure function of (seed, i): its genre, artist, album, size, mtime, duration and the values of its
windows, so that worker processes write parts of ~250 tracks in parallel and the parent writes the matching inventory
without ever holding window rows. Values are distinct in every row and float32: per feature a location and scale, plus
a per-genre mean on a tenth of the features, a per-track offset and per-window noise (Parquet cannot dictionary-encode
them, as it would cloned rows). With the musicnn family (the default, as extraction's), each shard also has its musicnn
part: one row per track, 200 embedding values (a per-genre mean plus a per-track offset) and 50 tag scores in 0..1.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import xgboost as xgb

from genre_batch.analysis.columns import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.library.discovery import INVENTORY_SCHEMA, fingerprint, track_id
from genre_batch.modelling import evaluation, registry, training
from genre_batch.modelling.model import PARAMS, XGBoostModel
from genre_batch.storage.feature_store import (
    EMBEDDING_COLUMNS,
    LIBROSA,
    MUSICNN,
    TAG_COLUMNS,
    feature_table,
    index_table,
    musicnn_table,
    write_inventory,
    write_parts,
)
from genre_batch.storage.store import Store

GENRES: tuple[str, ...] = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
LIBRARY = "/music/library"
WINDOWS = 6
SHARD_TRACKS = 250
TRACKS_PER_ARTIST = 10
TRACKS_PER_ALBUM = 5
SIGNAL_SHARE = 0.1
"""Share of the features whose mean depends on the genre."""
SIGNAL = 0.3
"""Genre effect on those features, in units of the feature's scale (the per-track offset has 1, per-window noise 0.5)."""
BUILD_RUN = "20250101T000000Z-synthbld"
CHANGE_RUN = "20250102T000000Z-synthchg"
BASE_MTIME = 1_700_000_000.0
MODEL_SAMPLE_PER_GENRE = 60
MODEL_ROUNDS = 30
LAYOUT_VERSION = 3
"""Bumped whenever the generator changes: a cached store of another layout is rebuilt (2: the musicnn family, 3: a
model card with the scores and gate every card has)."""
N = len(FEATURE_NAMES)
FAMILIES: tuple[str, ...] = (LIBROSA.name, MUSICNN.name)
"""The families a store is built with by default: extraction's default."""
EMBEDDING_SIGNAL = 0.5
"""Genre effect on every embedding value, in units of the per-track offset's scale."""
MUSICNN_PATCHES = 3


def feature_scales(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature location and scale (magnitudes from 0.01 to 1000), and the genre means (genres x features)."""
    rng = np.random.default_rng([seed, 0])
    scale = 10.0 ** rng.uniform(-2, 3, N)
    location = rng.normal(0, 3, N) * scale
    means = np.zeros((len(GENRES), N))
    signal = rng.random(N) < SIGNAL_SHARE
    means[:, signal] = rng.normal(0, SIGNAL, (len(GENRES), int(signal.sum())))
    return location, scale, means


def genre_of(i: np.ndarray, seed: int) -> np.ndarray:
    """Genre number of tracks: one genre per artist, drawn from a hash of the artist."""
    artist = i // TRACKS_PER_ARTIST
    return ((artist * 2654435761 + seed * 97) % 2**32) % len(GENRES)


def uri_of(i: int) -> str:
    """The URI of track i: folders of 1,000 files."""
    return f"{LIBRARY}/a{i // 1000:05d}/t{i:07d}.mp3"


def file_facts(i: np.ndarray, changed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Size in bytes and mtime of tracks (a changed file is rewritten: one more KB and a later mtime)."""
    size = 2_000_000 + (i * 7919) % 10_000_000 + (1024 if changed else 0)
    mtime = BASE_MTIME + i * 3.7 + (86_400.0 if changed else 0.0)
    return size.astype(np.int64), mtime


def listing_rows(i: np.ndarray, changed: np.ndarray) -> dict[str, list]:
    """Inventory columns of tracks (`changed`: which of them have new content)."""
    size_old, mtime_old = file_facts(i, False)
    size_new, mtime_new = file_facts(i, True)
    sizes = np.where(changed, size_new, size_old).tolist()
    versions = [repr(float(m)) for m in np.where(changed, mtime_new, mtime_old)]
    uris = [uri_of(k) for k in i.tolist()]
    return {
        "uri": uris, "track_id": [track_id(u) for u in uris],
        "fingerprint": [fingerprint(s, v) for s, v in zip(sizes, versions)], "size": sizes, "version": versions,
    }


def window_values(i: np.ndarray, seed: int, changed: bool) -> np.ndarray:
    """Feature values of the windows of tracks (tracks x WINDOWS rows, float32)."""
    location, scale, means = feature_scales(seed)
    rng = np.random.default_rng([seed, 1 + int(changed), int(i[0]), len(i)])
    offsets = means[genre_of(i, seed)] + rng.standard_normal((len(i), N))
    values = np.repeat(offsets, WINDOWS, axis=0) + 0.5 * rng.standard_normal((len(i) * WINDOWS, N))
    return (location + scale * values).astype(np.float32)


def musicnn_values(i: np.ndarray, seed: int, changed: bool) -> np.ndarray:
    """musicnn values of tracks (tracks x 250, float32): embedding (genre mean + track offset), then tag scores."""
    means = np.random.default_rng([seed, 3]).normal(0, EMBEDDING_SIGNAL, (len(GENRES), len(EMBEDDING_COLUMNS) + len(TAG_COLUMNS)))
    rng = np.random.default_rng([seed, 4 + int(changed), int(i[0]), len(i)])
    values = means[genre_of(i, seed)] + rng.standard_normal((len(i), means.shape[1]))
    values[:, len(EMBEDDING_COLUMNS):] = 1 / (1 + np.exp(2 - values[:, len(EMBEDDING_COLUMNS):]))  # scores in 0..1, mostly low
    return values.astype(np.float32)


def track_rows(i: np.ndarray, seed: int, run_id: str, changed: bool) -> list[dict]:
    """Per-track provenance of tracks (listing facts, duration, tags, extraction), as extraction records it."""
    listing = listing_rows(i, np.full(len(i), changed))
    genres = genre_of(i, seed)
    duration = 120.0 + (i * 37) % 300
    extracted_at = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(days=int(changed))
    return [
        {
            **{f: listing[f][k] for f in INVENTORY_SCHEMA.names},
            "duration_s": float(duration[k]), "sample_rate": 44100, "channels": 2, "offset_s": float(duration[k] - 60.0) / 2,
            "analysed_s": 60.0, "tag_genre": GENRES[genres[k]], "tag_artist": f"artist {int(i[k]) // TRACKS_PER_ARTIST}",
            "tag_album": f"album {int(i[k]) // TRACKS_PER_ALBUM}",
            "feature_version": LIBROSA.version, "run_id": run_id, "extracted_at": extracted_at,
        }
        for k in range(len(i))
    ]


def index_rows(tracks: list[dict], name: str, families: tuple[str, ...]) -> pa.Table:
    """The index rows of a shard's tracks in part `name`: WINDOWS consecutive window rows each, and with musicnn in
    `families` one musicnn row each."""
    rows = [{**t, "family": LIBROSA.name, "part": name, "row_start": WINDOWS * k, "row_count": WINDOWS} for k, t in enumerate(tracks)]
    if MUSICNN.name in families:
        rows += [{**t, "family": MUSICNN.name, "feature_version": MUSICNN.version, "part": name, "row_start": k, "row_count": 1}
                 for k, t in enumerate(tracks)]
    return index_table(rows)


def shard_tables(i: np.ndarray, seed: int, run_id: str, name: str, changed: bool, families: tuple[str, ...]) -> tuple[dict, pa.Table]:
    """The parts (by family) and index rows of one shard of tracks, as extraction builds them."""
    tracks = track_rows(i, seed, run_id, changed)
    rows = [{**t, "window": w, "window_offset_s": t["offset_s"] + 10.0 * w} for t in tracks for w in range(WINDOWS)]
    parts = {LIBROSA: feature_table(rows, [window_values(i, seed, changed)])}
    if MUSICNN.name in families:
        stamp = {"feature_version": MUSICNN.version}
        parts[MUSICNN] = musicnn_table([{**t, **stamp} for t in tracks], [musicnn_values(i, seed, changed)], [MUSICNN_PATCHES] * len(i))
    return parts, index_rows(tracks, name, families)


def write_part(job: tuple[str, list[int], int, str, int, bool, tuple[str, ...]]) -> None:
    """Write one shard's parts and index file (runs in a builder process)."""
    url, tracks, seed, run_id, shard, changed, families = job
    store, name = Store(url), f"{run_id}-{shard:05d}.parquet"
    parts, index = shard_tables(np.array(tracks, np.int64), seed, run_id, name, changed, families)
    write_parts(store, name, parts, index)


def write_shards(store: Store, shards: dict[int, list[int]], seed: int, run_id: str, changed: bool, processes: int,
                 families: tuple[str, ...] = FAMILIES) -> None:
    """Write shards of tracks (by shard number) in `processes` builder processes (one shard in memory each); `build`
    measures the bytes on disk."""
    jobs = [(store.url, s, seed, run_id, n, changed, families) for n, s in shards.items()]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(write_part, jobs, chunksize=4))  # raises a builder's error


def chunks(tracks: np.ndarray, size: int = SHARD_TRACKS) -> dict[int, list[int]]:
    """Tracks cut into shards of `size`, by shard number."""
    return {n: tracks[k:k + size].tolist() for n, k in enumerate(range(0, len(tracks), size))}


def unwritten(store: Store, shards: dict[int, list[int]], run_id: str) -> dict[int, list[int]]:
    """The shards whose index file (written after the part) is not in the store yet."""
    written = {p.rsplit("/", 1)[-1] for p in store.list(store.index, ".parquet")}
    return {n: s for n, s in shards.items() if f"{run_id}-{n:05d}.parquet" not in written}


def inventory(n: int, changed: np.ndarray | None = None) -> pa.Table:
    """The library listing of n tracks, sorted by URI (`changed`: a boolean mask of tracks with new content)."""
    i = np.arange(n)
    mask = np.zeros(n, bool) if changed is None else changed
    tables = [pa.table(listing_rows(i[k:k + 50_000], mask[k:k + 50_000]), schema=INVENTORY_SCHEMA) for k in range(0, n, 50_000)]
    return pa.concat_tables(tables).sort_by("uri").replace_schema_metadata({"library": LIBRARY})


def model_sample(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window features, window genres and window tracks of about MODEL_SAMPLE_PER_GENRE tracks per genre."""
    i = np.arange(len(GENRES) * MODEL_SAMPLE_PER_GENRE)
    X = window_values(i, seed, False)
    return X, np.repeat(genre_of(i, seed), WINDOWS).astype(np.int32), np.repeat(np.arange(len(i)), WINDOWS)


def register_model(store: Store, n: int, seed: int) -> str:
    """Train a small real XGBoost model on a synthetic sample with the real FEATURE_NAMES, register and promote it."""
    X, y, track = model_sample(seed)
    params = {**PARAMS, "num_class": len(GENRES)}
    model = XGBoostModel(xgb.train(params, XGBoostModel.dmatrix(X, FEATURE_NAMES, y, training.balanced_weights(y, track)), num_boost_round=MODEL_ROUNDS), MODEL_ROUNDS)
    predicted = training.per_track(model.predict_proba(X), track, track.max() + 1).argmax(axis=1)
    y_track = y[::WINDOWS]
    scores = evaluation.scores(y_track, predicted, list(GENRES))
    version = registry.new_version()
    listing = inventory(n)
    labelled = pa.table({"uri": listing["uri"], "fingerprint": listing["fingerprint"],
                         "genre": pa.array([GENRES[g] for g in genre_of(np.arange(n), seed)], pa.string())}).sort_by("uri")
    metadata = {
        "created_at": datetime.now(timezone.utc).isoformat(), "run_id": BUILD_RUN, "genres": list(GENRES),
        "label_source": "tags", "feature_version": FEATURE_VERSION, "feature_families": {"librosa": FEATURE_VERSION},
        "training_fingerprint": hashlib.sha1(f"synthetic {seed} {n}".encode()).hexdigest()[:16],
        "labelled_tracks": n, "tracks": len(y_track), "windows": len(y), "temperature": 1.0, "abstain_below": 0.0,
        "params": {**params, "num_boost_round": MODEL_ROUNDS}, "training_accuracy": scores["accuracy"],
        "cross_validation": {"accuracy": scores["accuracy"], "on": "the training set (synthetic)"}, "holdout": scores,
        "gate": {"passed": True, "reason": "synthetic store: no gate", "min_accuracy": None},
        "xgboost_version": xgb.__version__, "synthetic": True,
    }
    png = evaluation.confusion_png(scores["confusion"], list(GENRES), f"{version} (synthetic, training set)")
    registry.register(store, version, model, metadata, png, labelled)
    registry.promote(store, version)
    return version


def build_params(n: int, seed: int, families: tuple[str, ...] = FAMILIES) -> dict:
    """What a cached store was built from."""
    return {"tracks": n, "seed": seed, "windows": WINDOWS, "shard_tracks": SHARD_TRACKS, "layout": LAYOUT_VERSION, "families": list(families)}


MARK = "built.json"
PENDING = "building.json"
"""Written when a build starts: a build killed midway resumes with the shards it had not written."""


def build(base: Path, n: int, seed: int = 0, processes: int = 2, families: tuple[str, ...] = FAMILIES) -> dict:
    """Build (or reuse) the store of n tracks at `base/store` with `families`: parts, index files, inventory, current
    model (XGBoost on librosa, as a store extracted before the musicnn default has)."""
    marker, pending, params = base / MARK, base / PENDING, build_params(n, seed, families)
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return {**json.loads(marker.read_text()), "cached": True}
    if not (pending.exists() and json.loads(pending.read_text()) == params):  # else resume a killed build
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        pending.write_text(json.dumps(params))
    store = Store.at(str(base / "store"))
    started = datetime.now(timezone.utc)
    write_shards(store, unwritten(store, chunks(np.arange(n)), BUILD_RUN), seed, BUILD_RUN, False, processes, families)
    part_bytes = disk_usage(Path(store.feature_parts)) + (disk_usage(Path(f"{store.features}/{MUSICNN.folder}")) if MUSICNN.name in families else 0)
    write_inventory(store, inventory(n))
    version = register_model(store, n, seed)
    info = {"params": params, "parts": -(-n // SHARD_TRACKS), "part_bytes": part_bytes,
            "store_bytes": disk_usage(base / "store"), "index_bytes": disk_usage(Path(store.index)),
            "model": version, "build_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1)}
    marker.write_text(json.dumps(info, indent=2))
    pending.unlink()
    return {**info, "cached": False}


def build_index_only(base: Path, n: int, seed: int = 0) -> dict:
    """A store of n tracks with the index files and inventory of a built store but no parts or model (cheap: what the
    plan and the flow process's per-track tables read, without features); rebuilt unless already there."""
    marker = base / MARK
    params = {**build_params(n, seed), "index_only": True}
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return {**json.loads(marker.read_text()), "cached": True}
    shutil.rmtree(base, ignore_errors=True)
    store = Store.at(str(base / "store"))
    started = datetime.now(timezone.utc)
    for number, tracks in chunks(np.arange(n)).items():
        name = f"{BUILD_RUN}-{number:05d}.parquet"
        store.write_table(f"{store.index}/{name}", index_rows(track_rows(np.array(tracks, np.int64), seed, BUILD_RUN, False), name, FAMILIES))
    write_inventory(store, inventory(n))
    info = {"params": params, "index_files": len(chunks(np.arange(n))), "index_bytes": disk_usage(Path(store.index)),
            "build_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1)}
    marker.write_text(json.dumps(info, indent=2))
    return {**info, "cached": False}


def changed_tracks(n: int, share: float) -> np.ndarray:
    """A boolean mask of the tracks a nightly run finds changed: every (1/share)-th track."""
    mask = np.zeros(n, bool)
    mask[:: max(1, round(1 / share))] = True
    return mask


def simulate_changes(store: Store, n: int, share: float, seed: int = 0, processes: int = 2, families: tuple[str, ...] = FAMILIES) -> int:
    """Write what extraction of the changed files would write (new fingerprints and values of `families`, shards of
    SHARD_TRACKS) and the new library listing; returns how many tracks changed."""
    mask = changed_tracks(n, share)
    write_shards(store, chunks(np.flatnonzero(mask)), seed, CHANGE_RUN, True, processes, families)
    write_inventory(store, inventory(n, mask))
    return int(mask.sum())


def linked_copy(base: Path, run: Path) -> None:
    """A hard-linked copy of a built store (parts are immutable and replaced by rename, never rewritten in place)."""
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(["cp", "-al", str(base), str(run)], check=True)


def disk_usage(path: Path) -> int:
    """Bytes of the files under a folder (apparent sizes)."""
    return sum(p.stat().st_size for p in walk(path))


def walk(path: Path) -> Iterator[Path]:
    """Every file under a folder."""
    return (p for p in path.rglob("*") if p.is_file())
