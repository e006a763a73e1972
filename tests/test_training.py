"""Grouped splits, calibration and abstention on synthetic tables (no audio needed)."""

from __future__ import annotations

import gc
import re
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import FIRST_CARD
from test_feature_store import T0, files, set_inventory, write_shard

from genre_batch import GenreBatchError
from genre_batch.analysis.columns import FEATURE_NAMES
from genre_batch.cluster import session
from genre_batch.modelling import evaluation, training
from genre_batch.modelling.model import DEFAULT_C, DEFAULT_ROUNDS, PREDICT_CHUNK, LinearModel, XGBoostModel
from genre_batch.modelling.registry import ModelCard
from genre_batch.publishing.tagging import UNKNOWN, catalog_rows
from genre_batch.stages import train as train_stage
from genre_batch.storage import feature_store as fstore
from genre_batch.storage.store import Store

GENRES = ["ambient", "chiptune", "electronic", "percussion"]


def windows_table(n_tracks: int = 40, n_windows: int = 3, artists: int = 10, seed: int = 0, informative: int = 1) -> tuple[pa.Table, pa.Table]:
    """A feature table of n_tracks x n_windows rows (genre signal in the first `informative` features) and its labels."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for t in range(n_tracks):
        genre = t % len(GENRES)
        uri = f"/lib/{GENRES[genre]}/{t:03d}.mp3"
        labels.append({"uri": uri, "genre": GENRES[genre]})
        for w in range(n_windows):
            values = rng.normal(size=len(FEATURE_NAMES)).astype(np.float32)
            values[:informative] += 3.0 * genre
            rows.append(
                {"uri": uri, "fingerprint": f"f{t}", "window": w, "tag_artist": f"artist {t % artists}", "tag_album": None}
                | dict(zip(FEATURE_NAMES, values.tolist()))
            )
    table = pa.Table.from_pylist(rows)
    table = table.set_column(table.schema.get_field_index("tag_album"), "tag_album", pa.nulls(len(table), pa.string()))
    return table, pa.Table.from_pylist(labels)


def training_set(windows: pa.Table, labels: pa.Table, grouping: str = "auto") -> training.TrainingSet:
    """The training set of a window table and its labels, as the train stage builds it (no cap)."""
    tracks = windows.filter(pc.equal(windows["window"], 0))
    kept, genres, dropped, fingerprint = training.labelled_tracks(tracks, labels, "folders")
    found = pc.index_in(windows["uri"], value_set=kept["uri"])
    ours = windows.filter(pc.is_valid(found))
    track = found.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
    return training.training_set(training.matrix(ours), track, kept, genres, training.resolve_grouping(kept, grouping), fingerprint, dropped)


@pytest.fixture(scope="module")
def out_of_fold_once() -> Callable[[int, str], training.OutOfFold]:
    """The out-of-fold result of `training_set(*windows_table(artists=artists, informative=100), "artist")` for a
    model kind, computed once per module (out_of_fold is deterministic: the workers' equals this process's). Tests
    only read it; each builds its own training set."""
    done: dict[tuple[int, str], training.OutOfFold] = {}

    def get(artists: int, kind: str) -> training.OutOfFold:
        if (artists, kind) not in done:
            done[artists, kind] = training.out_of_fold(training_set(*windows_table(artists=artists, informative=100), "artist"), kind)
        return done[artists, kind]

    return get


@pytest.mark.parametrize("grouping", ["track", "artist"])
def test_windows_and_groups_never_straddle_a_split(grouping: str) -> None:
    data = training_set(*windows_table(), grouping)
    assert data.grouping == grouping and len(data.y) == 3 * len(data.y_track)
    for train, test in training.splits(data, training.folds(data)):
        assert not set(train) & set(test)
        train_windows, test_windows = training.windows_of(data, train), training.windows_of(data, test)
        assert not set(data.track[train_windows]) & set(data.track[test_windows])
        assert len(train_windows) + len(test_windows) == len(data.y)
        assert not set(data.groups[train]) & set(data.groups[test])


def test_auto_grouping_uses_artist_tags_when_present() -> None:
    windows, labels = windows_table()
    assert training_set(windows, labels).grouping == "artist"
    untagged = windows.set_column(windows.schema.get_field_index("tag_artist"), "tag_artist", pa.nulls(len(windows), pa.string()))
    assert training_set(untagged, labels).grouping == "track"


@pytest.mark.parametrize("kind", ["xgboost", "linear"])
def test_out_of_fold_track_predictions_are_learned(kind: str, out_of_fold_once: Callable[[int, str], training.OutOfFold]) -> None:
    # a linear model on 120 rows of 603 columns needs the signal in many of them (real features carry it broadly)
    data = training_set(*windows_table(informative=100), "artist")
    oof = out_of_fold_once(10, kind)
    probabilities = oof.probabilities
    assert probabilities.shape == (40, 4)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == data.y_track).mean() >= 0.9
    k = training.folds(data)  # each fold's fit cost: every track is trained on in k-1 folds, 3 windows each
    assert len(oof.fits) == k and sum(f["tracks"] for f in oof.fits) == (k - 1) * 40
    assert all(f["windows"] == 3 * f["tracks"] and f["cpu_s"] >= 0 for f in oof.fits)
    setting = "num_boost_round" if kind == "xgboost" else "C"
    assert all(f[setting] == training.fit_tracks(data, train, kind).model.params()[setting]
               for f, (train, _) in zip(oof.fits[:1], training.splits(data, k)))


@pytest.mark.parametrize("kind", ["xgboost", "linear"])
def test_fits_on_the_workers_equal_fits_in_this_process(
    kind: str, dask_scheduler: str, out_of_fold_once: Callable[[int, str], training.OutOfFold]
) -> None:
    """The folds and the final fit run as tasks on the workers (the training set scattered once): the same out-of-fold
    probabilities, settings and final model (same bytes) as in this process; then the workers hold nothing of it."""
    data = training_set(*windows_table(artists=40, informative=100), "artist")  # 8 groups per genre in a fold: no refit
    here, final_here, X = out_of_fold_once(40, kind), training.final_fit(data, kind), data.X.copy()
    with session(dask_scheduler) as cluster:
        fits = train_stage.submit_fits(cluster, data, kind, partial(training.final_fit, kind=kind))
        sent = weakref.ref(data.X)
        data = training.without_rows(data)  # as train and evaluate do: this process keeps no matrix
        gc.collect()
        assert sent() is None  # nothing of the client's scatter holds on to it
        keys = {f.key for f in [fits.rows, *fits.folds, fits.final]}
        heard: list[tuple[int, int, str]] = []
        oof, packed = fits.results(lambda news: heard.append((news.done, news.total, news.note)) if news.stage == "fit" else None)
        again = training_set(*windows_table(artists=40, informative=100), "artist")
        evaluated, nothing = train_stage.submit_fits(cluster, again, kind).results()  # evaluate's: folds only
        held = lambda: keys & {key for key, workers in cluster.client.who_has().items() if workers}  # noqa: E731
        deadline = time.monotonic() + 10
        while held() and time.monotonic() < deadline:  # the workers drop released keys asynchronously
            time.sleep(0.1)
        assert not held()  # the rows and the results are released
    assert np.array_equal(oof.probabilities, here.probabilities) and np.array_equal(evaluated.probabilities, here.probabilities)
    setting = "num_boost_round" if kind == "xgboost" else "C"
    assert [f[setting] for f in oof.fits] == [f[setting] for f in here.fits] and all(f["refit"] is False for f in oof.fits)
    assert [(f["tracks"], f["windows"]) for f in oof.fits] == [(f["tracks"], f["windows"]) for f in here.fits]
    assert packed.files == final_here.files and packed.refit and nothing is None
    model = packed.unpacked().model
    assert type(model).kind == kind and np.array_equal(model.predict_proba(X), final_here.unpacked().model.predict_proba(X))
    k = len(oof.fits)  # progress: the start, each fit's end once, and the steps the workers sent (each fit's first is never held back)
    fits_done = [(done, note) for done, total, note in heard if note.endswith(" done")]
    assert heard[0] == (0, k + 1, f"{k + 1} fits started on the workers") and all(total == k + 1 for _, total, _ in heard)
    assert [done for done, _ in fits_done] == list(range(1, k + 2))
    assert sorted(note for _, note in fits_done) == sorted([*(f"fold {i}/{k} done" for i in range(1, k + 1)), "final fit done"])
    steps = [note for _, _, note in heard[1:] if not note.endswith(" done")]
    step = r"(refit )?round \d+.*" if kind == "xgboost" else r"C [\d.]+ \(\d of 4\)|refit with C [\d.]+"
    assert steps and all(note.split(": ", 1)[0] in {*(f"fold {i}/{k}" for i in range(1, k + 1)), "final fit"} for note in steps)
    assert all(re.fullmatch(step, note.split(": ", 1)[1]) for note in steps)


@pytest.mark.parametrize("kind", ["xgboost", "linear"])
def test_a_fit_tells_each_step(kind: str) -> None:
    """A fit tells its listener each step: XGBoost each early-stopping round with its validation log-loss, then each
    refit round out of the chosen number; the linear model each C of its grid, then the refit with the chosen C."""
    data = training_set(*windows_table(artists=40, informative=100), "artist")
    steps: list[str] = []
    fitted = training.fit_tracks(data, np.arange(len(data.y_track)), kind, on_step=steps.append)
    if kind == "xgboost":
        rounds = fitted.model.rounds
        stopping = [s for s in steps if not s.startswith("refit")]
        assert stopping[0].startswith("round 1, validation log-loss ") and len(stopping) >= rounds
        assert steps[len(stopping):] == [f"refit round {r} of {rounds}" for r in range(1, rounds + 1)]
    else:
        assert steps == [f"C {c} ({i} of 4)" for i, c in enumerate((0.001, 0.01, 0.1, 1.0), 1)] + [f"refit with C {fitted.model.C}"]


@pytest.mark.parametrize("artists", [40, 10])
def test_folds_skip_the_refit_unless_their_validation_fold_would_take_more_than_a_fifth(
    artists: int, out_of_fold_once: Callable[[int, str], training.OutOfFold]
) -> None:
    """With MAX_FOLDS+ groups per genre among a fold's training tracks, the fold keeps the model its validation fold
    chose (no refit); with fewer (10 artists: 4 per genre in a fold), the validation fold would take a quarter or more
    of them and the fold is refitted, as the small set's fits cost little. The card's `fits` say which."""
    data = training_set(*windows_table(artists=artists, informative=100), "artist")
    oof = out_of_fold_once(artists, "xgboost")
    assert [f["refit"] for f in oof.fits] == [artists == 10] * training.folds(data)
    for f, (train, _) in zip(oof.fits, training.splits(data, training.folds(data))):
        assert f["num_boost_round"] == training.fit_tracks(data, train, "xgboost", refit=f["refit"]).model.rounds
    assert (oof.probabilities.argmax(axis=1) == data.y_track).mean() >= 0.9


def test_the_flow_process_keeps_no_matrix_once_the_workers_hold_it() -> None:
    data = training_set(*windows_table())
    kept = training.without_rows(data)
    assert kept.X.shape == (0, data.X.shape[1]) and kept.X.base is None and kept.X.dtype == np.float32
    assert np.array_equal(kept.y, data.y) and np.array_equal(kept.groups, data.groups) and kept.genres == data.genres
    assert [t.tolist() for s in training.splits(kept, training.folds(kept)) for t in s] == \
        [t.tolist() for s in training.splits(data, training.folds(data)) for t in s]  # cross-validation's scores need no rows


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a 60%-accurate model that claims ~95% confidence."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    guess = np.where(rng.random(n) < 0.6, y, rng.integers(0, 4, n))
    logits = rng.normal(0, 0.3, (n, 4))
    logits[np.arange(n), guess] += 4.0
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


def test_calibration_sums_to_one_and_lowers_error_on_a_held_out_part() -> None:
    fit_p, fit_y = overconfident(400, seed=1)
    held_p, held_y = overconfident(400, seed=2)
    temperature = evaluation.fit_temperature(fit_p, fit_y)
    assert temperature > 1.0  # overconfident: probabilities get flattened
    calibrated = evaluation.calibrate(held_p, temperature)
    assert np.allclose(calibrated.sum(axis=1), 1.0)
    assert (calibrated.argmax(axis=1) == held_p.argmax(axis=1)).all()  # ranking unchanged
    before, after = evaluation.expected_calibration_error(held_p, held_y), evaluation.expected_calibration_error(calibrated, held_y)
    assert before > 0.25 and after < before / 3


def test_expected_calibration_error_of_a_perfectly_calibrated_model_is_small() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 20000)
    correct = rng.random(20000) < confidence
    p = np.column_stack([confidence, 1 - confidence])
    y = np.where(correct, 0, 1)
    assert evaluation.expected_calibration_error(p, y) < 0.02


def test_abstain_threshold_gives_unknown_rows_that_keep_their_probabilities() -> None:
    first = pa.table(
        {
            "track_id": ["a", "b"],
            "uri": ["/l/a.mp3", "/l/b.mp3"],
            "fingerprint": ["fa", "fb"],
            "tag_genre": [None, "Chiptune"],
            "duration_s": pa.array([30.0, 30.0], pa.float32()),
            "feature_version": pa.array([2, 2], pa.int32()),
        }
    )
    probabilities = np.array([[0.4, 0.3, 0.2, 0.1], [0.05, 0.9, 0.03, 0.02]])
    card = ModelCard.parse({**FIRST_CARD, "genres": GENRES, "abstain_below": 0.5})
    rows = catalog_rows(first, probabilities, card, "run-1", datetime.now(timezone.utc), np.zeros((2, 128)), [None, None]).to_pylist()
    assert [r["genre"] for r in rows] == [UNKNOWN, "chiptune"]
    assert dict(rows[0]["probabilities"]) == pytest.approx(dict(zip(GENRES, probabilities[0])))
    assert rows[0]["confidence"] == pytest.approx(0.4)
    assert rows[1]["disagrees_with_tag"] is False and rows[0]["disagrees_with_tag"] is None


def test_balanced_weights_give_each_genre_and_each_track_of_a_genre_the_same_weight() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    track = np.array([0, 0, 0, 1, 2, 3, 4])  # genre 0: a 3-window and a 1-window track; genre 1: three 1-window tracks
    w = training.balanced_weights(y, track)
    assert w.mean() == pytest.approx(1.0)
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum())
    assert w[track == 0].sum() == pytest.approx(w[track == 1].sum())
    assert w[track == 2].sum() == pytest.approx(w[track == 4].sum())


def test_early_stopping_and_the_choice_of_C_need_two_groups_per_genre_else_defaults() -> None:
    X = np.random.default_rng(0).normal(size=(4, len(FEATURE_NAMES))).astype(np.float32)
    y, groups = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])  # one group per genre: nothing to validate on
    assert XGBoostModel.rounds_for(X, y, np.ones(4), groups, 2, list(FEATURE_NAMES)) == DEFAULT_ROUNDS
    assert LinearModel.fit(X, y, np.ones(4), groups, 2, list(FEATURE_NAMES)).C == DEFAULT_C


def test_the_workers_read_the_sample_into_one_matrix_in_a_fixed_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dask_scheduler: str) -> None:
    """Several reading tasks (a batch per part, parts out of URI order) fill one matrix: each track's rows are its
    windows as stored, the same on every run; labels by file, genres with fewer than 2 tracks left out."""
    store = Store(str(tmp_path / "store"))
    library = files([f"t{i:02d}" for i in range(13)])
    write_shard(store, "run1-00000.parquet", library[6:], "run1", T0)
    write_shard(store, "run1-00001.parquet", library[:6], "run1", T0)
    set_inventory(store, library)
    genres = ["a", "b", "c"] * 4 + ["lonely"]
    labels = tmp_path / "labels.csv"
    labels.write_text("file,genre\n" + "".join(f"{f['uri']},{g}\n" for f, g in zip(library, genres)))
    monkeypatch.setattr(train_stage, "READ_BATCH_WINDOWS", 6)  # two tracks per task: parts split over several tasks
    with session(dask_scheduler) as cluster:
        data, labelled, cap = train_stage.training_data(store, str(labels), cluster, grouping="track")
        heard: list = []
        again, _, _ = train_stage.training_data(store, str(labels), cluster, grouping="track", on_progress=heard.append)
        on_worker = train_stage.on_worker(cluster, train_stage.labelled_sample, store, str(labels), "artist", True, ["librosa"])
        one_genre = tmp_path / "one-genre.csv"
        one_genre.write_text("file,genre\n" + "".join(f"{f['uri']},a\n" for f in library))
        with pytest.raises(GenreBatchError, match="at least 2 genres"):  # a user error on the worker reaches the flow as such
            train_stage.training_data(store, str(one_genre), cluster)
    here = train_stage.labelled_sample(store, str(labels), "artist", True, ["librosa"])  # what this process chose before
    assert on_worker[0].equals(here[0]) and on_worker[1] == here[1] and on_worker[2:] == here[2:]
    assert data.genres == ["a", "b", "c"] and data.dropped == {"lonely": 1} and labelled.tracks.num_rows == 12
    assert cap == training.cap_per_genre(3, 3.0) and data.X.dtype == np.float32 and data.X.shape == (36, len(FEATURE_NAMES))
    assert labelled.tracks.column_names == ["uri", "fingerprint", "genre"]  # the flow process keeps the labelled set's keys only
    windows = pa.concat_tables([fstore.read_windows(store, g, ["uri", *FEATURE_NAMES]) for g in fstore.by_part(fstore.current_tracks(store))])
    uris = labelled.tracks["uri"].to_pylist()  # the sample is every labelled track, in URI order
    for t, uri in enumerate(uris):
        mine = windows.filter(pc.equal(windows["uri"], uri))
        assert np.array_equal(data.X[data.track == t], training.matrix(mine)) and data.y_track[t] == "abc".index(genres[t])
    assert np.array_equal(data.X, again.X) and np.array_equal(data.track, again.track) and data.fingerprint == again.fingerprint
    batches = len(heard) - 1  # progress: the start, then each batch as it arrives, counting up to all of them
    assert batches >= 2 and [(r.stage, r.done, r.total) for r in heard] == [("read", k, batches) for k in range(batches + 1)]
    assert {r.note for r in heard} == {"36 windows of 12 sampled tracks"}


def test_fits_on_row_numbers_equal_fits_on_copied_rows() -> None:
    """Models fitted on some rows of a matrix (read a chunk at a time) equal models fitted on a copy of those rows."""
    rng = np.random.default_rng(1)
    n = PREDICT_CHUNK + 500  # more than one chunk
    y = rng.integers(0, 3, n).astype(np.int32)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X[:, 0] += y
    groups, weight, columns = np.arange(n) % 40, rng.uniform(0.5, 2.0, n), [f"c{i}" for i in range(8)]
    rows = np.flatnonzero(np.arange(n) % 3 != 0)
    for kind in (LinearModel, XGBoostModel):
        on_rows = kind.fit(X, y, weight, groups, 3, columns, rows)
        copied = kind.fit(X[rows], y[rows], weight[rows], groups[rows], 3, columns)
        assert np.allclose(on_rows.predict_rows(X, rows[:700]), copied.predict_proba(X[rows[:700]]), atol=1e-5)
        assert on_rows.params() == copied.params()


def test_a_sample_past_its_rows_keeps_fewer_consecutive_windows_of_more_tracks() -> None:
    """`thinned`: each track of a genre of n keeps max(MIN_WINDOWS, rows // n) consecutive windows of its own, from an
    offset hashed from its URI (the same whatever the rows' order); a genre within its rows keeps every window."""
    counts = [6, 6, 6, 6, 6, 6, 6, 1]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    tracks = pa.table({"uri": [f"/m/t{i}.mp3" for i in range(8)], "genre": ["a"] * 6 + ["b"] * 2,
                       "part": ["p0"] * 8, "row_start": pa.array(starts, pa.int64()), "row_count": pa.array(counts, pa.int32())})
    thin = training.thinned(tracks, 13)
    assert thin.schema == tracks.schema and thin["uri"].equals(tracks["uri"])
    new_start, new_count = thin["row_start"].to_numpy(), thin["row_count"].to_numpy()
    assert new_count.tolist() == [training.MIN_WINDOWS] * 6 + [6, 1]  # a: 13 // 6 = 2 each; b: 13 // 2 = 6, all it has
    assert sum(new_count[:6]) <= 13 and sum(new_count[6:]) <= 13
    assert np.all(new_start >= starts) and np.all(new_start + new_count <= starts + np.array(counts))  # a track's own windows
    assert len(set((new_start - starts)[:6].tolist())) > 1  # not always the same position in the track
    reordered = training.thinned(tracks.take(pa.array([7, 3, 0, 5, 1, 6, 2, 4])), 13).sort_by("uri")
    assert reordered.equals(thin.sort_by("uri"))
    assert training.thinned(tracks, 36).equals(tracks)  # 36 // 6 = 6 windows: every track keeps all
    assert training.thinned(tracks, 24)["row_count"].to_pylist()[:6] == [4] * 6


def test_the_fingerprint_and_the_sample_do_not_depend_on_row_order_or_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing and sampling CHUNK_ROWS tracks at a time gives what one chunk gives, whatever the rows' order."""
    rng = np.random.default_rng(2)
    uris = [f"/lib/f{i % 7}/t{i:04d}.mp3" for i in range(300)]
    tracks = pa.table({"uri": uris, "fingerprint": [f"x{i}" for i in range(300)], "genre": [f"g{i % 4}" for i in range(300)],
                       "tag_artist": [None if i % 5 == 0 else f"ar{i % 30}" for i in range(300)]})
    shuffled = tracks.take(pa.array(rng.permutation(300)))
    whole = (training.training_fingerprint(tracks, "tags"), training.sample(tracks, training.Cap(20, 20), "artist"), training.sample(tracks, training.Cap(9, 9), "folder"))
    monkeypatch.setattr(training, "CHUNK_ROWS", 7)
    assert training.training_fingerprint(shuffled, "tags") == whole[0]
    assert training.sample(shuffled, training.Cap(20, 20), "artist").equals(whole[1]) and training.sample(shuffled, training.Cap(9, 9), "folder").equals(whole[2])
    picked = whole[1]
    assert sorted(pc.value_counts(picked["genre"]).field("counts").to_pylist()) == [20] * 4
    keys = training.group_keys(tracks, "artist").to_pylist()
    assert keys[0] == uris[0] and keys[1] == "tag_artist=ar1"  # no artist: a group of its own
    assert training.codes(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]
