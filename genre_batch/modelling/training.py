"""Training: a model (genre_batch.modelling.model: any kind) on the feature rows of labelled tracks, joined across feature
families per track, evaluated on whole tracks in grouped splits."""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genre_batch import GenreBatchError
from genre_batch.analysis.columns import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.storage.feature_store import (
    CHOICE_COLUMNS,
    FAMILIES,
    INDEX_SCHEMA,
    KEYS,
    LIBROSA,
    MUSICNN_COLUMNS,
    by_part,
    current_tracks,
    read_windows,
)
from genre_batch.storage.store import Store

if TYPE_CHECKING:  # the model module imports xgboost and scikit-learn (1.5 s of CPU): imported where a model is fitted
    from genre_batch.modelling.model import GenreModel, Step

MIN_PER_GENRE = 2
GROUPINGS = ("auto", "track", "artist", "album", "folder")
"""Ways to group tracks in splits; any other value names a column of the feature store."""


DEFAULT_FAMILIES: tuple[str, ...] = ("librosa", "musicnn")
"""The feature families of `train` when neither --features nor a current model says, provided every current track of
the store has them: librosa + musicnn with the linear classifier won the paired comparison of #14 on both tasks
(bench/accuracy; README, Accuracy)."""
FALLBACK_FAMILIES: tuple[str, ...] = ("librosa",)
"""The default families when some current track lacks musicnn (extraction's own default is librosa alone)."""


@dataclass(frozen=True)
class TrainingSet:
    """Feature rows with labels, the track of each row, and the split group of each track; `columns` names the
    matrix's columns (the chosen families' value columns, in FAMILIES order)."""

    X: np.ndarray
    y: np.ndarray
    track: np.ndarray
    y_track: np.ndarray
    groups: np.ndarray
    genres: list[str]
    grouping: str
    fingerprint: str
    dropped: dict[str, int]
    columns: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))


def ordered_families(names: list[str] | tuple[str, ...]) -> list[str]:
    """Family names in FAMILIES order (librosa first), each once; an unknown name is a clear error."""
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown or not names:
        raise GenreBatchError(f"unknown feature family {', '.join(unknown) or '(none given)'}: choose from {', '.join(FAMILIES)}")
    return [n for n in FAMILIES if n in names]


def family_columns(name: str) -> list[str]:
    """The value columns of a feature family."""
    return list(FEATURE_NAMES) if name == LIBROSA.name else list(MUSICNN_COLUMNS)


def columns_of(families: list[str] | tuple[str, ...]) -> list[str]:
    """The feature columns of a model trained on these families, in FAMILIES order."""
    return [c for name in ordered_families(families) for c in family_columns(name)]


def versions_of(families: list[str] | tuple[str, ...]) -> dict[str, int]:
    """{family: version} of the families as this genre-batch extracts them (what a model card records)."""
    return {name: FAMILIES[name].version for name in ordered_families(families)}


LOCATION = ("part", "row_start", "row_count")
"""Index columns that say where a track's rows of a family are; another family's are carried as `<family>.<column>`."""
LABELLED_COLUMNS = [*CHOICE_COLUMNS, *LOCATION, "tag_genre", "tag_artist", "tag_album"]
"""What training reads of the track index: the choice, the location, the label and grouping tags (the rest, e.g.
error messages, stays on disk: at 1M tracks the whole index would cost the flow process several hundred MB)."""


def index_columns(grouping: str) -> list[str]:
    """The index columns training reads, with the column a custom grouping names (when the index has it)."""
    extra = grouping not in GROUPINGS and grouping in INDEX_SCHEMA.names and grouping not in LABELLED_COLUMNS
    return [*LABELLED_COLUMNS, grouping] if extra else list(LABELLED_COLUMNS)


def located(store: Store, tracks: pa.Table, inventory: pa.Table, families: list[str] | tuple[str, ...],
            current: dict[str, pa.Table] | None = None) -> pa.Table:
    """Librosa index rows (sorted by URI) with the location of each other chosen family's current rows of the same
    (uri, fingerprint) as `<family>.part`, ...; tracks lacking one of those families are left out. `current`: those
    families' current index rows (with LOCATION) when already read, else they are read."""
    others = [name for name in ordered_families(families) if name != LIBROSA.name]
    for name in others:
        rows = current[name] if current is not None else current_tracks(store, inventory, FAMILIES[name], [*CHOICE_COLUMNS, *LOCATION])
        rows = rows.select([*KEYS, *LOCATION])
        rows = rows.rename_columns([*KEYS, *(f"{name}.{c}" for c in LOCATION)])
        tracks = tracks.join(rows, keys=KEYS, join_type="inner")
    return tracks.sort_by("uri") if others else tracks


def family_rows(store: Store, tracks: pa.Table, families: list[str] | tuple[str, ...]) -> pa.Table:
    """`uri` and the chosen families' value columns of some index rows of one librosa part (as `located` gives them;
    runs on a worker): one row per librosa window with the track's rows of the other families repeated beside it, or
    one row per track when librosa is not among the families."""
    names = ordered_families(families)
    if LIBROSA.name in names:
        table = read_windows(store, tracks, ["uri", *FEATURE_NAMES])
        repeat = np.repeat(np.arange(tracks.num_rows), tracks["row_count"].to_numpy().astype(np.int64))
    else:
        table, repeat = pa.table({"uri": tracks["uri"]}), np.arange(tracks.num_rows)
    for name in names:
        if name == LIBROSA.name:
            continue
        where = tracks.select([*KEYS, *(f"{name}.{c}" for c in LOCATION)]).rename_columns([*KEYS, *LOCATION])
        rows = pa.concat_tables([read_windows(store, g, ["uri", *family_columns(name)], FAMILIES[name]) for g in by_part(where)])
        order = pc.index_in(tracks["uri"], value_set=rows["uri"]).to_numpy(zero_copy_only=False)
        own = rows.take(pa.array(order[repeat]))
        for column in family_columns(name):
            table = table.append_column(column, own[column])
    return table


def matrix(windows: pa.Table, columns: list[str] | None = None) -> np.ndarray:
    """The float32 feature matrix of a feature table, in the order of `columns` (default FEATURE_NAMES)."""
    names = FEATURE_NAMES if columns is None else columns
    return np.column_stack([windows[name].to_numpy(zero_copy_only=False) for name in names]).astype(np.float32, copy=False)


CHUNK_ROWS = 100_000
"""Rows of a per-track table turned into Python values at a time (hashing): memory stays bounded at any library size."""


def training_fingerprint(rows: pa.Table, source: str) -> str:
    """Hash of the (uri, fingerprint, genre) rows in sorted order, label source and feature version (Arrow's byte
    order of UTF-8 strings is Python's order of str), read CHUNK_ROWS at a time."""
    digest = hashlib.sha1(f"{source}|{FEATURE_VERSION}".encode())
    names = ["uri", "fingerprint", "genre"]
    ordered = rows.select(names).sort_by([(name, "ascending") for name in names])
    for batch in ordered.to_batches(max_chunksize=CHUNK_ROWS):
        for row in zip(*(batch.column(name).to_pylist() for name in names)):
            digest.update("\x00".join(row).encode())
    return digest.hexdigest()[:16]


def mapped(values: pa.Array | pa.ChunkedArray, function: Callable[[str], str]) -> pa.ChunkedArray:
    """A Python function of strings applied to an Arrow string column, CHUNK_ROWS values at a time."""
    values = pa.chunked_array([values]) if isinstance(values, pa.Array) else values
    pieces = [pa.array([function(v) for v in values.slice(start, CHUNK_ROWS).to_pylist()], pa.string())
              for start in range(0, len(values), CHUNK_ROWS)]
    return pa.chunked_array(pieces, pa.string())


def resolve_grouping(tracks: pa.Table, grouping: str) -> str:
    """The grouping to use: `auto` is artist tags when tracks have them, else album tags, else tracks."""
    if grouping != "auto":
        return grouping
    for name, column in (("artist", "tag_artist"), ("album", "tag_album")):
        if pc.sum(pc.is_valid(tracks[column])).as_py():
            return name
    return "track"


def group_keys(tracks: pa.Table, grouping: str) -> pa.ChunkedArray:
    """The split group of each track (`<column>=<value>`, the folder or the URI); a track without a value is a group
    of its own. Computed column-wise: no Python string per track."""
    uris = tracks["uri"]
    if grouping == "track":
        return uris
    if grouping == "folder":
        return mapped(uris, posixpath.dirname)
    column = {"artist": "tag_artist", "album": "tag_album"}.get(grouping, grouping)
    if column not in tracks.column_names:
        raise GenreBatchError(f"cannot group by {grouping!r}: use one of {', '.join(GROUPINGS)} or a feature-store column")
    values = tracks[column].cast(pa.string())
    present = pc.fill_null(pc.not_equal(values, ""), False)
    return pc.if_else(present, pc.binary_join_element_wise(f"{column}=", values, ""), uris)


def codes(values: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Integer codes of values, in order of first appearance."""
    array = pa.array(values, pa.string()) if isinstance(values, list) else values
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    return pc.dictionary_encode(array).indices.to_numpy(zero_copy_only=False).astype(np.int64)


def labelled_tracks(tracks: pa.Table, labels: pa.Table, source: str) -> tuple[pa.Table, list[str], dict[str, int], str]:
    """Tracks kept for training (genres with MIN_PER_GENRE+ tracks) with their genre, the genres, the dropped ones, and their fingerprint."""
    joined = tracks.join(labels, keys="uri", join_type="inner").sort_by("uri")
    tally = pc.value_counts(joined["genre"])
    counts = dict(zip(tally.field("values").to_pylist(), tally.field("counts").to_pylist()))
    dropped = {g: n for g, n in counts.items() if n < MIN_PER_GENRE}
    genres = sorted(g for g in counts if g not in dropped)
    if len(genres) < 2:
        raise GenreBatchError(
            f"training needs at least 2 genres with {MIN_PER_GENRE}+ labelled tracks each; "
            f"found {dict(counts) or 'no labelled tracks'} (label source: {source})"
        )
    kept = joined.filter(pc.is_in(joined["genre"], value_set=pa.array(genres)))
    return kept, genres, dropped, training_fingerprint(kept, source)


PROCESS_LIMIT_BYTES = 2 * 10**9
"""Peak RSS allowed to any process of a training run (issue #12: 1M labelled tracks on a 24 GB, 2-core machine)."""
FLOW_BASE_BYTES = 10**9
"""The flow process before the sample is read, at 1M labelled tracks: interpreter and libraries (~350 MB) and what the
labelled index left behind once freed (measured 881 MB at 1M, load ~30, when the flow process read it). The labelled
index is now read on a worker (`stages.train.labelled_sample`) and the flow process keeps only the labelled set's keys
(~85 MB at 1M); the value is kept so that the cap, and with it every store's sample and model, stay as they were."""
FIT_WORKING_SET = 2.25
"""The fit's peak above the sample matrix, in matrix sizes: measured for one CV fold on a 403 MB sample, xgboost
+898 MB (2.23), linear +367 MB (0.91); the larger one sets the budget, so both kinds stay within it."""
TRAINING_BUDGET_BYTES = int((PROCESS_LIMIT_BYTES - FLOW_BASE_BYTES) / (1 + FIT_WORKING_SET))
"""Memory for the float32 feature matrix of a training sample (rows x columns x 4 bytes; columns: 603 librosa, + 250
musicnn): what is left of the process limit after the flow's base, over the matrix and the fit's working set
(~308 MB). The cap per genre follows from it (`cap_per_genre`)."""


MIN_WINDOWS = 2
"""The fewest windows per track a capped sample keeps. A genre with more labelled tracks than its share of the budget
holds at every window gives the sample more tracks with fewer windows each, down to this: a track's windows are alike
(emotify: half of a window's variance is its track's) and new tracks are not, so at the same matrix size more tracks
learn more (synthetic generator, linear, the same 127,560 rows: 0.770 with 2,126 tracks per genre of 6 windows, 0.783
with 6,378 of 2).
Not 1: on emotify, training on 1 window of each track cost ~4.5 points against all 6, on 2 about none."""


@dataclass(frozen=True)
class Cap:
    """How much of each genre a training sample takes: at most `tracks` tracks, and at most `rows` feature rows, their
    windows thinned to fit (to no fewer than MIN_WINDOWS per track)."""

    tracks: int
    rows: int

    def scaled(self, factor: float) -> Cap:
        """The cap of a budget `factor` times as large (at least MIN_PER_GENRE tracks)."""
        return Cap(max(MIN_PER_GENRE, round(self.tracks * factor)), max(MIN_PER_GENRE, round(self.rows * factor)))


def cap_per_genre(n_genres: int, windows_per_track: float, budget: int = TRAINING_BUDGET_BYTES, n_columns: int = len(FEATURE_NAMES)) -> Cap:
    """The cap per genre that fits the memory budget: rows = budget / (genres x feature columns x 4 bytes), tracks =
    rows / the windows a track keeps when thinned (MIN_WINDOWS, or fewer when tracks have fewer)."""
    rows = max(MIN_PER_GENRE, int(budget // (max(1, n_genres) * n_columns * 4)))
    return Cap(max(MIN_PER_GENRE, int(rows // min(max(1.0, windows_per_track), MIN_WINDOWS))), rows)


def digest(value: str) -> str:
    """A short stable hash, for deterministic ordering."""
    return hashlib.sha1(value.encode()).hexdigest()[:12]


def order_keys(groups: pa.ChunkedArray, uris: pa.ChunkedArray) -> pa.ChunkedArray:
    """digest(group) + digest(uri) of each track, CHUNK_ROWS tracks at a time."""
    pieces = []
    for start in range(0, len(uris), CHUNK_ROWS):
        pairs = zip(groups.slice(start, CHUNK_ROWS).to_pylist(), uris.slice(start, CHUNK_ROWS).to_pylist())
        pieces.append(pa.array([digest(g) + digest(u) for g, u in pairs], pa.string()))
    return pa.chunked_array(pieces, pa.string())


def ranks(runs: np.ndarray) -> np.ndarray:
    """The position of each value within its run of equal consecutive values (0, 1, 2, ... then 0 again)."""
    if len(runs) == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, runs[1:] != runs[:-1]])
    return np.arange(len(runs)) - np.repeat(starts, np.diff(np.r_[starts, len(runs)]))


def sample(tracks: pa.Table, cap: Cap | None, grouping: str) -> pa.Table:
    """At most `cap.tracks` tracks per genre, chosen deterministically: tracks ordered by a hash of their split group,
    then of their URI, so that whole groups (artists, albums) are kept together (`thinned` then fits their windows to
    `cap.rows`); all tracks when `cap` is None."""
    if cap is None:
        return tracks
    keys = order_keys(group_keys(tracks, grouping), tracks["uri"])
    ordered = tracks.append_column("_order", keys).sort_by([("genre", "ascending"), ("_order", "ascending")])
    return ordered.filter(pa.array(ranks(codes(ordered["genre"])) < cap.tracks)).drop_columns("_order").sort_by("uri")


def thinned(tracks: pa.Table, rows: int) -> pa.Table:
    """Librosa index rows (with `genre`) whose windows are cut to fit `rows` windows per genre: each track of a genre of
    n tracks keeps at most max(MIN_WINDOWS, rows // n) consecutive windows, starting at an offset chosen by a hash of
    its URI (so that every position in a track is trained on across tracks)."""
    genre = codes(tracks["genre"])
    n = np.bincount(genre)
    keep = np.maximum(MIN_WINDOWS, rows // n)[genre]
    count = tracks["row_count"].to_numpy().astype(np.int64)
    new = np.minimum(count, keep)
    spare = count - new
    if not spare.any():
        return tracks
    offset = np.array([int(digest(u), 16) for u in tracks["uri"].to_pylist()], np.int64) % (spare + 1)
    start = tracks["row_start"].to_numpy().astype(np.int64) + offset
    out = tracks.set_column(tracks.schema.get_field_index("row_start"), "row_start", pa.array(start, tracks.schema.field("row_start").type))
    return out.set_column(out.schema.get_field_index("row_count"), "row_count", pa.array(new, tracks.schema.field("row_count").type))


def windows_in(tracks: pa.Table, families: list[str] | tuple[str, ...]) -> int:
    """How many feature rows `family_rows` gives for some index rows (librosa windows, else one per track)."""
    return int(pc.sum(tracks["row_count"]).as_py() or 0) if LIBROSA.name in families else tracks.num_rows


def training_set(X: np.ndarray, track: np.ndarray, tracks: pa.Table, genres: list[str], grouping: str, fingerprint: str,
                 dropped: dict[str, int], columns: list[str] | None = None) -> TrainingSet:
    """The training set of labelled tracks (with a `genre` column, sorted by URI) from their feature rows `X` and the
    position in `tracks` of each row's track (the matrix is kept as given: no copy)."""
    index = {g: i for i, g in enumerate(genres)}
    y_track = np.array([index[g] for g in tracks["genre"].to_pylist()], dtype=np.int32)
    return TrainingSet(
        X=X,
        y=y_track[track],
        track=track,
        y_track=y_track,
        groups=codes(group_keys(tracks, grouping)),
        genres=genres,
        grouping=grouping,
        fingerprint=fingerprint,
        dropped=dropped,
        columns=list(FEATURE_NAMES) if columns is None else columns,
    )


def balanced_weights(y: np.ndarray, track: np.ndarray) -> np.ndarray:
    """Window weights giving every genre the same total weight and every track of a genre the same share (mean 1)."""
    windows_per_track = np.bincount(track)[track]
    genre_of_track = np.zeros(track.max() + 1, dtype=np.int64)
    genre_of_track[track] = y
    present = np.unique(track)
    tracks_per_genre = np.bincount(genre_of_track[present], minlength=int(y.max()) + 1)
    weights = 1.0 / (windows_per_track * tracks_per_genre[y])
    return weights * len(weights) / weights.sum()


def per_track(probabilities: np.ndarray, track: np.ndarray, n_tracks: int) -> np.ndarray:
    """Average row probabilities into track probabilities (rows sum to 1)."""
    sums = np.zeros((n_tracks, probabilities.shape[1]))
    np.add.at(sums, track, probabilities)
    return sums / np.maximum(np.bincount(track, minlength=n_tracks), 1)[:, None]


def folds(data: TrainingSet) -> int:
    """Number of folds: up to MAX_FOLDS, at most the number of groups of the smallest genre."""
    from genre_batch.modelling.model import MAX_FOLDS, groups_per_genre

    return int(min(MAX_FOLDS, groups_per_genre(data.y_track, data.groups)))


def splits(data: TrainingSet, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold over tracks: (train tracks, test tracks); a group is never on both sides."""
    if n_splits < 2:
        raise GenreBatchError(
            f"grouped evaluation needs 2+ {data.grouping} groups per genre; "
            f"use --group-by track or add labelled tracks"
        )
    from sklearn.model_selection import StratifiedGroupKFold  # 1.3 s of CPU that `tag` does not need

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(data.y_track)), data.y_track, data.groups))


def windows_of(data: TrainingSet, tracks: np.ndarray) -> np.ndarray:
    """Indices of the windows of the given tracks."""
    return np.flatnonzero(np.isin(data.track, tracks))


def fit(X: np.ndarray, y: np.ndarray, n_classes: int, track: np.ndarray, groups: np.ndarray, kind: str = "xgboost",
        columns: list[str] | None = None, rows: np.ndarray | None = None, refit: bool = True, on_step: Step | None = None) -> GenreModel:
    """Fit a model of a kind on feature rows (`rows` of X, default all: never copied as a whole) with genre- and
    track-balanced weights (`groups`: per track); `refit`: as `GenreModel.fit` (False for most cross-validation folds:
    `refits`); `on_step` hears the fit's steps (`GenreModel.fit`)."""
    from genre_batch.modelling.model import everything, model_class, quiet

    rows = everything(rows, len(y))
    weight = np.zeros(len(y))
    weight[rows] = balanced_weights(y[rows], track[rows])
    return model_class(kind).fit(X, y, weight, groups[track], n_classes, list(FEATURE_NAMES) if columns is None else columns, rows, refit,
                                 on_step or quiet)


@dataclass(frozen=True)
class Fitted:
    """A fitted model with what its fit cost: the tracks and windows it was fitted on, whether it was refitted on all of
    them after the validation fold's choice (`GenreModel.fit`), CPU seconds of the process that fitted it."""

    model: GenreModel
    tracks: int
    windows: int
    refit: bool
    cpu_s: float

    def cost(self) -> dict:
        """What a model card records of a fit: tracks, windows, the setting the fit chose (boosting rounds or C), whether
        it was refitted, CPU s."""
        settings = self.model.params()
        chosen = {k: settings[k] for k in ("num_boost_round", "C") if k in settings}
        return {"tracks": self.tracks, "windows": self.windows, **chosen, "refit": self.refit, "cpu_s": round(self.cpu_s, 1)}

    def packed(self) -> Packed:
        """The fit with its model as files (`GenreModel.to_files`): what a worker sends back, never a pickle of a model."""
        return Packed(self.model.kind, self.model.to_files(), self.tracks, self.windows, self.refit, self.cpu_s)


@dataclass(frozen=True)
class Packed:
    """A `Fitted` whose model travels as its files (name -> bytes, as the registry stores them)."""

    kind: str
    files: dict[str, bytes]
    tracks: int
    windows: int
    refit: bool
    cpu_s: float

    def unpacked(self) -> Fitted:
        """The fit with its model loaded from its files."""
        from genre_batch.modelling.model import model_class

        return Fitted(model_class(self.kind).from_files(self.files), self.tracks, self.windows, self.refit, self.cpu_s)


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold's result: its test tracks, their probabilities by the model of its training tracks,
    and that fit's cost (`Fitted.cost`)."""

    test: np.ndarray
    probabilities: np.ndarray
    cost: dict


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold track probabilities of a cross-validation and what each fold's fit cost (`Fitted.cost`)."""

    probabilities: np.ndarray
    fits: list[dict]


def fit_tracks(data: TrainingSet, tracks: np.ndarray, kind: str = "xgboost", refit: bool = True, on_step: Step | None = None) -> Fitted:
    """Fit a model of a kind on the rows of the given tracks of a training set, timed (`refit`, `on_step`: as `fit`)."""
    started, rows = time.process_time(), windows_of(data, tracks)
    model = fit(data.X, data.y, len(data.genres), data.track, data.groups, kind, data.columns, rows, refit, on_step)
    return Fitted(model, len(tracks), len(rows), refit, time.process_time() - started)


def final_fit(data: TrainingSet, kind: str, on_step: Step | None = None) -> Packed:
    """The model of a training set: every track, refitted after the validation fold's choice, packed (runs on a worker;
    `on_step` hears its steps)."""
    return fit_tracks(data, np.arange(len(data.y_track)), kind, on_step=on_step).packed()


def predict_tracks(model: GenreModel, data: TrainingSet, tracks: np.ndarray) -> np.ndarray:
    """Probabilities of the given tracks of a training set: their rows' predictions averaged."""
    rows = windows_of(data, tracks)
    return per_track(model.predict_rows(data.X, rows), data.track[rows], len(data.y_track))[tracks]


def refits(data: TrainingSet, tracks: np.ndarray) -> bool:
    """Whether a cross-validation fold on these training tracks is refitted: only when some genre has fewer than
    MAX_FOLDS groups among them, so that their validation fold would hold more than 1/MAX_FOLDS of them (a half to a
    quarter). Such sets are small, the refit costs little there, and a model of half the tracks misjudges the final
    model (3 tracks per genre: chance accuracy without the refit)."""
    from genre_batch.modelling.model import MAX_FOLDS, groups_per_genre

    return bool(groups_per_genre(data.y_track[tracks], data.groups[tracks]) < MAX_FOLDS)


def fold(data: TrainingSet, train: np.ndarray, test: np.ndarray, kind: str, on_step: Step | None = None) -> Fold:
    """A cross-validation fold: a model fitted on the training tracks, as a rule without the refit (the early-stopped
    booster, or the chosen C's model, fitted on the training tracks outside their validation fold; see `refits`), and
    its probabilities of the test tracks (runs on a worker, or in this process for `out_of_fold`; `on_step` hears the
    fit's steps)."""
    fitted = fit_tracks(data, train, kind, refit=refits(data, train), on_step=on_step)
    return Fold(test, predict_tracks(fitted.model, data, test), fitted.cost())


def out_of_fold_of(results: list[Fold], n_tracks: int, n_genres: int) -> OutOfFold:
    """The out-of-fold probabilities of a cross-validation's folds (each test track's row from its fold), with their costs."""
    result = np.zeros((n_tracks, n_genres))
    for done in results:
        result[done.test] = done.probabilities
    return OutOfFold(result, [done.cost for done in results])


def out_of_fold(data: TrainingSet, kind: str = "xgboost", seed: int = 0) -> OutOfFold:
    """Out-of-fold track probabilities of grouped, stratified k-fold cross-validation of a model kind, with each fold's
    fit cost, the folds fitted one after another in this process (the stages run the same `fold`s on the workers)."""
    done = [fold(data, train, test, kind) for train, test in splits(data, folds(data), seed)]
    return out_of_fold_of(done, len(data.y_track), len(data.genres))


def without_rows(data: TrainingSet) -> TrainingSet:
    """The training set with an empty feature matrix (its columns kept): what the flow process keeps of it once the
    workers hold the rows (labels, tracks and groups stay; the matrix's memory is freed when no one else refers to it)."""
    return replace(data, X=np.empty((0, data.X.shape[1]), data.X.dtype))
