"""Vector spaces of the catalog: per track, a float32, L2-normalised `embedding` of VECTOR_DIM and the musicnn `tags`.

A space is a feature family pooled per track (librosa: the mean of its windows' 603 features; musicnn: the family's
200-dim embedding, already the mean of its patches), standardised by a z-score and projected on the first
VECTOR_DIM principal axes, then L2-normalised (so inner product = cosine). Its arrays (mean, scale, components) are
fitted once on a deterministic sample of the store's parts and stored as plain arrays (`catalog/spaces/<name>.npz`,
read with allow_pickle=False); the name ends in a digest of the arrays, so a refit that changes them is a new space.
The musicnn family is the space when every current track has it; otherwise the librosa family is.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from genre_batch import GenreBatchError
from genre_batch.analysis.columns import FEATURE_NAMES, TAG_NAMES
from genre_batch.publishing.catalog import VECTOR_DIM
from genre_batch.publishing.pointer import CatalogPointer, SpaceRecord
from genre_batch.storage.feature_store import (
    EMBEDDING_COLUMNS,
    KEYS,
    LIBROSA,
    MUSICNN,
    TAG_COLUMNS,
    Family,
    by_part,
    keys_of,
    read_windows,
)
from genre_batch.storage.store import Store

SAMPLE_TRACKS = 20_000
"""Tracks of the fitting sample: whole parts, evenly spread over the store's sorted parts, until this many."""
TAG_COUNT = 5
"""`tags`: the TAG_COUNT MSD tags with the highest mean scores (MSD scores are low and uncalibrated: no threshold)."""
POOLING = {LIBROSA.name: "mean of the track's 10 s windows (603 features)", MUSICNN.name: "mean of the track's 3 s patches (200-dim penultimate layer), as extracted"}
SCALER = f"z-score (mean, std of the sample's pooled tracks), then projection on the first {VECTOR_DIM} principal axes of the z-scored sample, then L2 norm"


@dataclass(frozen=True)
class VectorSpace:
    """A fitted vector space: family, its version, and the arrays that map a pooled track to its embedding."""

    family: str
    family_version: int
    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    """[input dim, VECTOR_DIM] float32 (zero columns past the sample's rank)."""
    sample_tracks: int

    @property
    def name(self) -> str:
        """`<family>-v<version>-zpca<dim>-<digest of the arrays>`."""
        digest = hashlib.sha256(b"".join(a.astype(np.float32).tobytes() for a in (self.mean, self.scale, self.components))).hexdigest()
        return f"{self.family}-v{self.family_version}-zpca{VECTOR_DIM}-{digest[:12]}"

    def describe(self) -> dict:
        """What CURRENT.json records of the space."""
        return {"name": self.name, "family": self.family, "family_version": self.family_version, "dim": VECTOR_DIM,
                "pooling": POOLING[self.family], "scaler": SCALER, "sample_tracks": self.sample_tracks, "file": space_file(self.name)}


def space_file(name: str) -> str:
    """Where a space's arrays live, relative to the catalog folder."""
    return f"spaces/{name}.npz"


def input_columns(family: str) -> list[str]:
    """The columns a family's space reads."""
    return list(FEATURE_NAMES) if family == LIBROSA.name else list(EMBEDDING_COLUMNS)


def save(store: Store, space: VectorSpace) -> None:
    """Write a space's arrays (plain .npz, no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, mean=space.mean, scale=space.scale, components=space.components,
             family_version=np.array(space.family_version), sample_tracks=np.array(space.sample_tracks))
    store.write_bytes(f"{store.catalog}/{space_file(space.name)}", buf.getvalue())


class MissingSpace(GenreBatchError):
    """A pointer's vector space whose arrays are not in the store."""


def load(store: Store, described: SpaceRecord) -> VectorSpace:
    """The space a pointer's `vector_space` describes; MissingSpace when its arrays are not in the store."""
    path = f"{store.catalog}/{described.file}"
    if not store.exists(path):
        raise MissingSpace(f"the arrays of vector space {described.name} are not in the store ({store.uri(path)} is missing): "
                           "run 'genre-batch tag' to fit and store one")
    with store.open(path) as f:
        arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return VectorSpace(described.family, int(arrays["family_version"]), arrays["mean"], arrays["scale"],
                           arrays["components"], int(arrays["sample_tracks"]))


def fit(family: Family, pooled: np.ndarray) -> VectorSpace:
    """Fit a space on pooled sample tracks [n, input dim]: z-score, then the first VECTOR_DIM principal axes."""
    x = pooled.astype(np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    std = x.std(axis=0) if len(x) else np.ones(x.shape[1])
    scale = np.where(std > 1e-12, std, 1.0)
    z = (x - mean) / scale
    components = np.zeros((x.shape[1], VECTOR_DIM))
    if len(x) > 1:
        _, singular, vt = np.linalg.svd(z, full_matrices=False)
        rank = min(VECTOR_DIM, int((singular > 1e-9 * singular[0]).sum()) if singular[0] > 0 else 0)
        axes = vt[:rank].T
        signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(rank)])  # deterministic sign per axis
        components[:, :rank] = axes * signs
    return VectorSpace(family.name, family.version, mean.astype(np.float32), scale.astype(np.float32),
                       components.astype(np.float32), len(x))


def project(space: VectorSpace, pooled: np.ndarray) -> np.ndarray:
    """Embeddings [n, VECTOR_DIM] float32, L2-normalised, of pooled tracks [n, input dim] (a zero vector stays zero)."""
    y = ((pooled.astype(np.float32) - space.mean) / space.scale) @ space.components
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return (y / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def window_means(matrix: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-track means of consecutive window rows (`counts` rows per track), summed in float64 row after row: one
    reduceat over the tracks' first rows (np.add.at, which gave the same sums, took ~35 % of a tagging task's CPU)."""
    sums = np.zeros((len(counts), matrix.shape[1]), np.float64)
    some = counts > 0
    if some.any():
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[some]
        sums[some] = np.add.reduceat(matrix[: int(counts.sum())], starts, axis=0, dtype=np.float64)
    return sums / np.maximum(counts, 1)[:, None]


def pooled(store: Store, tracks: pa.Table, family: Family) -> np.ndarray:
    """Pooled inputs [n, input dim] of index rows of one part of a family, in row order."""
    table = read_windows(store, tracks, input_columns(family.name), family)
    matrix = np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in input_columns(family.name)]).astype(np.float32)
    return window_means(matrix, tracks["row_count"].to_numpy().astype(np.int64)) if family == LIBROSA else matrix


def sample_groups(tracks: pa.Table, limit: int = SAMPLE_TRACKS) -> list[pa.Table]:
    """Index rows of whole parts, evenly spread over the parts in name order, until `limit` tracks (deterministic)."""
    groups = sorted(by_part(tracks), key=lambda g: g["part"][0].as_py())
    if not groups:
        return []
    per_part = max(1, tracks.num_rows // len(groups))
    wanted = min(len(groups), max(1, -(-limit // per_part)))
    return [groups[i * len(groups) // wanted] for i in range(wanted)]


def pooled_sample(store: Store, groups: list[pa.Table], family: Family) -> np.ndarray:
    """Pooled inputs of the sample's groups (runs on a worker)."""
    return np.vstack([pooled(store, g, family) for g in groups]) if groups else np.zeros((0, len(input_columns(family.name))), np.float32)


def musicnn_values(store: Store, rows: pa.Table) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """musicnn rows of the given index rows: key (uri, fingerprint) -> row, embeddings [n, 200] and tag scores [n, 50]."""
    groups = by_part(rows)
    if not groups:
        return {}, np.zeros((0, len(EMBEDDING_COLUMNS)), np.float32), np.zeros((0, len(TAG_COLUMNS)), np.float32)
    tables = [read_windows(store, g, EMBEDDING_COLUMNS + TAG_COLUMNS, MUSICNN) for g in groups]
    ordered = pa.concat_tables(groups)
    table = pa.concat_tables(tables)
    keys = {k: i for i, k in enumerate(keys_of(ordered).to_pylist())}
    as_matrix = lambda cols: np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in cols]).astype(np.float32)  # noqa: E731
    return keys, as_matrix(EMBEDDING_COLUMNS), as_matrix(TAG_COLUMNS)


def top_tags(scores: np.ndarray) -> list[str]:
    """The TAG_COUNT MSD tags (lower-cased) with the highest scores, best first."""
    return [TAG_NAMES[i].lower() for i in np.argsort(-scores, kind="stable")[:TAG_COUNT]]


def track_vectors(store: Store, tracks: pa.Table, musicnn: pa.Table, space: VectorSpace,
                  means: np.ndarray | None = None) -> tuple[np.ndarray, list[list[str] | None]]:
    """Embeddings [n, VECTOR_DIM] and tags (None without musicnn) of index rows of one librosa part, in row order;
    `musicnn`: the musicnn index rows of (some of) these tracks; `means`: the tracks' librosa window means, which a
    librosa space projects (the caller read the part's windows for its predictions: no second read)."""
    wanted = musicnn.join(tracks.select(KEYS), keys=KEYS, join_type="left semi") if musicnn.num_rows else musicnn
    keys, embeddings, scores = musicnn_values(store, wanted)
    rows = [keys.get(k) for k in keys_of(tracks).to_pylist()]
    tags = [None if r is None else top_tags(scores[r]) for r in rows]
    if space.family == MUSICNN.name:
        missing = [k for k, r in zip(keys_of(tracks).to_pylist(), rows) if r is None]
        if missing:
            raise ValueError(f"{len(missing)} tracks lack the musicnn family of vector space {space.name}")
        inputs = embeddings[np.array(rows, np.int64)]
    else:
        if means is None:
            raise ValueError(f"vector space {space.name} needs the librosa window means of the tracks")
        inputs = means
    return project(space, inputs), tags


def space_family(tracks: int, lacking_musicnn: int) -> Family:
    """The family of the space: musicnn when every one of the `tracks` current tracks has it, else librosa."""
    return MUSICNN if tracks > 0 and lacking_musicnn == 0 else LIBROSA


def reusable(store: Store, previous: CatalogPointer | None, family: Family, available: int) -> VectorSpace | None:
    """The previous snapshot's space while its family (and version) is still `family` and its sample is at least half
    what the store offers now (`available`: current tracks of the family; a space fitted on a small first library is
    refitted as the library grows, until SAMPLE_TRACKS), else None: a space must be fitted."""
    described = previous.vector_space if previous else None
    same = described is not None and (described.family, described.family_version) == (family.name, family.version)
    if same and 2 * described.sample_tracks >= min(SAMPLE_TRACKS, available) and store.exists(f"{store.catalog}/{described.file}"):
        return load(store, described)
    return None


def fitted(store: Store, family: Family, source: pa.Table, run: Callable[[list[tuple]], list]) -> VectorSpace:
    """A space fitted now on a sample of `source` (the family's current index rows) pooled on the workers (`run`), saved."""
    blocks = run([(pooled_sample, store, [g], family) for g in sample_groups(source)])
    space = fit(family, np.vstack(blocks) if blocks else np.zeros((0, len(input_columns(family.name))), np.float32))
    save(store, space)
    return space


def musicnn_rows(musicnn: pa.Table, groups: list[pa.Table]) -> pa.Table:
    """The musicnn index rows of the tracks of a batch of groups (what its tagging task reads for tags and vectors)."""
    if not groups or musicnn.num_rows == 0:
        return musicnn.slice(0, 0)
    return musicnn.join(pa.concat_tables(groups).select(KEYS), keys=KEYS, join_type="left semi")


def file_vector(space: VectorSpace, uri: str) -> tuple[np.ndarray, list[str] | None]:
    """Embedding [VECTOR_DIM] of an audio file outside the catalog, extracted now (nothing stored), and its tags when
    the space is musicnn's (raises audio.AudioError)."""
    from genre_batch.analysis import audio, features
    from genre_batch.analysis.extraction import librosa_windows, musicnn_vector

    segments, _, _ = audio.load(uri, features.window_spans)
    if space.family == MUSICNN.name:
        values, _ = musicnn_vector(segments)
        return project(space, values[None, : len(EMBEDDING_COLUMNS)])[0], top_tags(values[len(EMBEDDING_COLUMNS):])
    _, windows = librosa_windows(segments)
    return project(space, windows.mean(axis=0, keepdims=True))[0], None
