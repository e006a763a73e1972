"""Tagging: features x model -> one catalog row per track, with every genre's probability; per part, on the workers."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genre_batch import progress
from genre_batch.analysis.columns import FEATURE_NAMES
from genre_batch.library.labels import UNKNOWN, tag_genre
from genre_batch.modelling import registry
from genre_batch.modelling.registry import ModelCard
from genre_batch.modelling.training import columns_of, family_rows, matrix, ordered_families, per_track
from genre_batch.publishing import catalog
from genre_batch.publishing.catalog import CATALOG_SCHEMA, VECTOR_DIM
from genre_batch.publishing.vectors import VectorSpace, track_vectors, window_means
from genre_batch.storage.feature_store import LIBROSA, MUSICNN
from genre_batch.storage.store import Store

if TYPE_CHECKING:  # xgboost and scikit-learn: loaded with the model (registry.load), not by the flow process importing this
    from genre_batch.cluster import Session
    from genre_batch.modelling.model import GenreModel


BATCH_WINDOWS = 120_000
"""Window rows per tagging task (parts are never split): about 300 MB of features in a worker at a time."""
SPREAD_TASKS = 8
"""Fewer windows than SPREAD_TASKS x BATCH_WINDOWS (a nightly's few changed tracks) are dealt into about this many
tasks, so that every worker takes a share."""


def batch_windows(windows: int) -> int:
    """Window rows per tagging task for `windows` to tag: BATCH_WINDOWS, or less to make SPREAD_TASKS tasks."""
    return min(BATCH_WINDOWS, max(1, -(-windows // SPREAD_TASKS)))


_models: dict[tuple[str, str], tuple[GenreModel, ModelCard]] = {}
"""Models loaded in this process, by (store URL, version): each worker loads a model once."""


def worker_model(store: Store, version: str) -> tuple[GenreModel, ModelCard]:
    """A registered model, loaded once per process."""
    key = (store.url, version)
    if key not in _models:
        _models.clear()  # one model at a time: a new version replaces the old
        _models[key] = registry.load(store, version)
    return _models[key]


def calibrated(model: GenreModel, X: np.ndarray, track: np.ndarray, n_tracks: int, card: ModelCard) -> np.ndarray:
    """Track probabilities from feature rows: predictions averaged per track, the model's temperature applied."""
    from genre_batch.modelling.model import calibrate  # with the model's own imports (xgboost): never in the flow process
    return calibrate(per_track(model.predict_proba(X), track, n_tracks), card.temperature)


def families_of(card: ModelCard) -> list[str]:
    """The feature families a model is fed, in FAMILIES order."""
    return ordered_families(list(card.families))


def genres_of(card: ModelCard) -> list[str]:
    """Every genre a model's catalog rows can carry: its genres, then `unknown`."""
    return [*card.genres, UNKNOWN]


def catalog_rows(
    tracks: pa.Table, probabilities: np.ndarray, card: ModelCard, run_id: str, tagged_at: datetime,
    embeddings: np.ndarray, tags: list[list[str] | None],
) -> pa.Table:
    """Catalog rows of tracks (index rows), their probabilities, embeddings [n, VECTOR_DIM] and musicnn tags (None
    without the family); under the abstain threshold the genre is `unknown`."""
    genres, n = card.genres, tracks.num_rows
    confidence = probabilities.max(axis=1) if n else np.zeros(0)
    top = [genres[i] for i in probabilities.argmax(axis=1)] if n else []
    predicted = [g if c >= card.abstain_below else UNKNOWN for g, c in zip(top, confidence)]
    embedded = [tag_genre(g) for g in tracks["tag_genre"].to_pylist()]
    return pa.table(
        {
            "track_id": tracks["track_id"],
            "uri": tracks["uri"],
            "fingerprint": tracks["fingerprint"],
            "genre": pa.array(predicted, pa.string()),
            "confidence": pa.array(confidence, pa.float64()),
            "probabilities": pa.array(
                [list(zip(genres, map(float, row))) for row in probabilities], CATALOG_SCHEMA.field("probabilities").type
            ),
            "embedded_genre": pa.array(embedded, pa.string()),
            "disagrees_with_tag": pa.array([None if e is None else e != p for e, p in zip(embedded, predicted)], pa.bool_()),
            "duration_s": tracks["duration_s"],
            "model_version": pa.array([card.version] * n, pa.string()),
            "feature_version": tracks["feature_version"],
            "run_id": pa.array([run_id] * n, pa.string()),
            "tagged_at": pa.array([tagged_at] * n, CATALOG_SCHEMA.field("tagged_at").type),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).reshape(-1)), VECTOR_DIM),
            "tags": pa.array(tags, CATALOG_SCHEMA.field("tags").type),
        },
        schema=CATALOG_SCHEMA,
    )


def predict_part(store: Store, tracks: pa.Table, model: GenreModel, card: ModelCard) -> tuple[np.ndarray, np.ndarray | None]:
    """Calibrated probabilities of the given index rows of one part (with the locations of the model's other
    families, training.located), fed the families the model was trained on; and, when librosa is among them, each
    track's mean of its windows' librosa features (the librosa space's pooled input) from the same read of the part."""
    families = families_of(card)
    rows = family_rows(store, tracks, families)
    track = pc.index_in(rows["uri"], value_set=tracks["uri"]).to_numpy(zero_copy_only=False).astype(np.int64)
    X = matrix(rows, columns_of(families))
    means = window_means(X[:, : len(FEATURE_NAMES)], tracks["row_count"].to_numpy().astype(np.int64)) if LIBROSA.name in families else None
    return calibrated(model, X, track, tracks.num_rows, card), means


def tag_groups(store: Store, version: str, groups: list[pa.Table], run_id: str, tagged_at: datetime, space: VectorSpace,
               musicnn: pa.Table) -> pa.Table:
    """Catalog rows of the tracks of some parts (index rows grouped by part), with the model loaded once per process;
    `musicnn`: the musicnn index rows of (some of) these tracks, for the embeddings and tags. Each part is read once."""
    model, card = worker_model(store, version)
    tables = []
    for g in groups:
        probabilities, means = predict_part(store, g, model, card)
        tables.append(catalog_rows(g, probabilities, card, run_id, tagged_at, *track_vectors(store, g, musicnn, space, means)))
    return pa.concat_tables(tables) if tables else CATALOG_SCHEMA.empty_table()


def tag_batch(store: Store, version: str, groups: list[pa.Table], run_id: str, tagged_at: datetime, snapshot: str, task: int,
              space: VectorSpace, musicnn: pa.Table) -> dict[str, int]:
    """Tag a batch of parts (runs on a worker) and leave its rows as one piece per genre; returns rows per genre."""
    table = tag_groups(store, version, groups, run_id, tagged_at, space, musicnn)
    genres = genres_of(worker_model(store, version)[1])
    counts = {}
    for genre, rows in catalog.split_by_genre(table).items():
        catalog.write_rows(store, f"{catalog.pieces_folder(store, snapshot)}/{genres.index(genre):03d}/{task:05d}.parquet", rows)
        counts[genre] = rows.num_rows
    return counts


def merge_genre(store: Store, snapshot: str, number: int, carried: str | None, dropped: np.ndarray | None,
                feed: bool = False) -> tuple[int, int]:
    """Write a snapshot's file of one genre (runs on a worker): its new pieces plus the rows of the previous snapshot's
    file `carried` (relative to the catalog), less its rows numbered `dropped`; returns (rows, disagreements). With
    `feed`, also the genre's piece of the change feed against `carried` (the genre's whole previous file; None: it had
    none), from the rows dropped and the new ones (catalog.merge_diff), so that no task reads both files again."""
    tables = [store.read_table(p) for p in store.list(f"{catalog.pieces_folder(store, snapshot)}/{number:03d}", ".parquet")]
    new_rows = sum(t.num_rows for t in tables)
    if carried is not None:
        tables.append(store.read_table(f"{store.catalog}/{carried}").select(CATALOG_SCHEMA.names))
    table = pa.concat_tables(tables) if tables else CATALOG_SCHEMA.empty_table()
    kept = np.ones(table.num_rows, bool)
    if dropped is not None:
        kept[new_rows + dropped] = False  # the carried file's rows follow the new pieces
    rows = catalog.write_genre(store, catalog.genre_file(snapshot, number), table, kept)
    if feed:
        columns = table.select(catalog.DIFF_COLUMNS)
        catalog.write_change_piece(store, snapshot, number, catalog.merge_diff(columns.slice(new_rows), kept[new_rows:], columns.slice(0, new_rows)))
    return rows, int(np.count_nonzero(table["disagrees_with_tag"].fill_null(False).to_numpy(zero_copy_only=False) & kept))


def file_rows(uri: str, families: list[str]) -> np.ndarray:
    """The feature rows of one file for the given families, as the store would hold them joined (one decode):
    librosa windows with the musicnn vector beside each, or the musicnn vector alone (raises audio.AudioError)."""
    from genre_batch.analysis import audio, features  # imported here, as below
    from genre_batch.analysis.extraction import librosa_windows, musicnn_vector

    segments, _, _ = audio.load(uri, features.window_spans)
    parts = [librosa_windows(segments)[1]] if LIBROSA.name in families else []
    if MUSICNN.name in families:
        vector = musicnn_vector(segments)[0][None, :]
        parts.append(np.repeat(vector, len(parts[0]) if parts else 1, axis=0))
    return np.hstack(parts).astype(np.float32)


CLASSIFY_CHUNK = 16
"""Files per classify task (the model is loaded once per task)."""
CLASSIFY_IN_PROCESS = 64
"""Up to this many files `classify` decodes in its own process; more are classified by Dask tasks (a local cluster
unless a scheduler is given)."""

Classified = tuple[str, list[tuple[str, float]] | str]
"""A file and its `top` (genre, probability), most likely first, or the reason it could not be classified."""


def classify_chunk(store: Store, version: str, uris: list[str], top: int) -> list[Classified]:
    """Classify some files with model `version` (one task: the model loaded once)."""
    from genre_batch.analysis.audio import AudioError  # imported here: a tagging worker decodes no audio

    model, card = registry.load(store, version)
    families = families_of(card)
    results: list[Classified] = []
    for uri in uris:
        try:
            rows = file_rows(uri, families)
        except Exception as e:  # any failure of one file's decoding or features fails that file alone, as in extraction
            results.append((uri, f"{e.kind if isinstance(e, AudioError) else type(e).__name__}: {e}"))
            continue
        probabilities = calibrated(model, rows, np.zeros(len(rows), np.int64), 1, card)[0]  # one track
        order = np.argsort(probabilities)[::-1][:top]
        results.append((uri, [(card.genres[i], float(probabilities[i])) for i in order]))
    return results


def classify_files(store: Store, uris: list[str], top: int, cluster: Session | None = None) -> list[Classified]:
    """The `top` genres and probabilities of each file with the current model, or the reason it failed, in `uris`'
    order: in this process, or on `cluster` as tasks of CLASSIFY_CHUNK files (progress reported as stage `classify`,
    task by task)."""
    version = registry.current(store).version  # a clear error when there is no usable model, before any task (they load it)
    calls = [(classify_chunk, store, version, uris[i:i + CLASSIFY_CHUNK], top) for i in range(0, len(uris), CLASSIFY_CHUNK)]
    if cluster is None:
        finished = ((n, classify_chunk(*call[1:])) for n, call in enumerate(calls))
    else:
        finished = ((n, future.result()) for n, future in cluster.completed(calls))  # Dask's unique keys: classify runs may share a scheduler
    done: dict[int, list[Classified]] = {}
    for n, chunk in finished:
        done[n] = chunk
        files = [r for c in done.values() for r in c]
        progress.report(progress.Report("classify", len(files), len(uris), sum(isinstance(r, str) for _, r in files)))
    return [r for n in range(len(calls)) for r in done[n]]
