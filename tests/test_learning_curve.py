"""The learning curve of the training cap (bench/learning_curve.py): points bracketing the cap `train` takes, the same
generator rows as the scale stores, a CPU budget that skips points projected past it, and the paired cost of the cap."""

from __future__ import annotations

import numpy as np

from bench import learning_curve, synthetic_store
from genre_batch.modelling import training


def test_the_bracket_spans_a_quarter_to_four_times_the_budget_of_the_cap_train_takes() -> None:
    cap = learning_curve.default_cap()
    assert cap == training.cap_per_genre(len(synthetic_store.GENRES), synthetic_store.WINDOWS, n_columns=synthetic_store.N)
    assert cap.tracks == cap.rows // training.MIN_WINDOWS  # the generator's genres hold more tracks than that: thinned
    caps = learning_curve.bracket(cap)
    assert [c.rows for c in caps] == [round(cap.rows / 4), round(cap.rows / 2), cap.rows, 2 * cap.rows, 4 * cap.rows]
    assert [c.tracks for c in caps] == [round(cap.tracks / 4), round(cap.tracks / 2), cap.tracks, 2 * cap.tracks, 4 * cap.tracks]
    Cap = training.Cap
    assert learning_curve.bracket(Cap(3, 6)) == (Cap(2, 2), Cap(2, 3), Cap(3, 6), Cap(6, 12), Cap(12, 24))  # never under MIN_PER_GENRE


def test_a_track_has_its_store_rows_whichever_tracks_are_read_with_it() -> None:
    size, rows = synthetic_store.SHARD_TRACKS, synthetic_store.WINDOWS
    shard = synthetic_store.window_values(np.arange(size, 2 * size), 0, False)  # the store's second part
    tracks = np.array([size + 7, 3, size + 1])
    every = np.full(2 * size, rows, np.int64)
    got = learning_curve.synthetic_windows(learning_curve.whole(tracks, every), 0)
    assert got.X.shape == (3 * rows, synthetic_store.N) and got.track.tolist() == [0] * rows + [1] * rows + [2] * rows
    np.testing.assert_array_equal(got.X[:rows], shard[7 * rows : 8 * rows])
    np.testing.assert_array_equal(got.X[2 * rows :], shard[rows : 2 * rows])
    np.testing.assert_array_equal(learning_curve.synthetic_windows(learning_curve.whole(np.array([3]), every), 0).X, got.X[rows : 2 * rows])
    picked = learning_curve.Picked(tracks, np.array([2, 0, 4]), np.array([3, 1, 2]))  # thinned: some windows of each
    thin = learning_curve.synthetic_windows(picked, 0)
    assert thin.track.tolist() == [0, 0, 0, 1, 2, 2]
    np.testing.assert_array_equal(thin.X, np.vstack([got.X[2:5], got.X[rows : rows + 1], got.X[2 * rows + 4 : 2 * rows + 6]]))


def test_a_point_is_projected_from_the_largest_measured_one_with_the_growth_of_its_rounds() -> None:
    assert learning_curve.projected_cpu([], training.Cap(100, 200)) is None
    one = [{"rows_per_genre": 200, "cpu_s": 10.0, "rounds": 50}]
    assert learning_curve.projected_cpu(one, training.Cap(400, 800)) == 40.0
    two = [*one, {"rows_per_genre": 400, "cpu_s": 30.0, "rounds": 100}]
    assert learning_curve.projected_cpu(two, training.Cap(400, 800)) == 120.0  # 2x the rows, rounds doubled last time


def test_the_cost_of_the_cap_is_a_paired_difference_against_the_largest_sample() -> None:
    small, large = training.Cap(10, 20), training.Cap(40, 80)
    correct = {small: np.array([True, False, False, True]), large: np.array([True, True, False, True])}
    cost = learning_curve.cap_cost(correct, small)
    assert cost["largest_cap"] == 40 and cost["largest_rows"] == 80 and cost["gain_points"] == 25.0 and cost["se_points"] == 25.0
    assert learning_curve.cap_cost({small: correct[small]}, small)["gain_points"] is None


def test_the_synthetic_curve_fits_as_train_and_skips_what_the_budget_cannot_pay() -> None:
    curve = learning_curve.synthetic_curve((1.0, 2.0), test_per_genre=4, cap=training.Cap(3, 18), budget_s=0.0)
    assert curve["test_tracks"] == 40 and curve["default_cap"] == 3 and curve["default_rows"] == 18
    (point,) = curve["points"]  # the first point has nothing to be projected from: it runs
    assert point["cap_per_genre"] == 3 and point["train_tracks"] == 30 and point["train_windows"] == 180  # 18 // 3: every window
    assert point["rounds"] >= 1 and point["cpu_s"] >= 0 and 0 <= point["accuracy"] <= 1
    (skipped,) = curve["skipped"]
    assert skipped["cap_per_genre"] == 6 and skipped["rows_per_genre"] == 36 and skipped["projected_cpu_s"] >= 0 and skipped["budget_left_s"] <= 0
    assert curve["cap_cost"]["largest_cap"] == 3 and curve["cap_cost"]["gain_points"] is None
    assert curve["classifier"] == "xgboost" and point["C"] is None


def test_the_synthetic_curve_fits_the_linear_model_on_thinned_windows_with_its_chosen_c() -> None:
    curve = learning_curve.synthetic_curve((1.0, 2.0), test_per_genre=4, cap=training.Cap(6, 12), kind="linear")
    assert curve["classifier"] == "linear" and [p["cap_per_genre"] for p in curve["points"]] == [6, 12] and not curve["skipped"]
    assert [p["train_windows"] for p in curve["points"]] == [2 * 60, 2 * 120]  # 2 windows of each track, as train thins
    assert all(p["rounds"] is None and p["C"] > 0 and 0 <= p["accuracy"] <= 1 for p in curve["points"])
    assert curve["cap_cost"]["largest_cap"] == 12 and curve["cap_cost"]["gain_points"] is not None  # paired: same test tracks


def test_the_real_curve_reads_its_cached_features_and_says_whether_the_cap_binds(tmp_path) -> None:
    rng = np.random.default_rng(0)
    genres, per_genre, windows = ["folk", "noise"], 8, 2
    names = [f"{g}/{k:02d}.wav" for g in genres for k in range(per_genre)]
    for name in names:  # the cache stands for the audio: these files are never decoded
        (tmp_path / "task" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "task" / name).write_bytes(b"")
    X = rng.normal(size=(len(names) * windows, synthetic_store.N)).astype(np.float32)
    X[len(X) // 2 :, :20] += 3.0  # the second genre's windows
    cache = tmp_path / "features.npz"
    np.savez(cache, X=X, counts=np.full(len(names), windows), artists=np.array([f"a{k // 2}" for k in range(len(names))]), names=np.array(names))
    curve = learning_curve.real_curve(tmp_path / "task", cache, caps=(4,))
    assert curve["tracks"] == 16 and curve["genres"] == genres and curve["artists"] == 8 and curve["folds"] == learning_curve.FOLDS
    (point,) = curve["points"]
    assert point["cap_per_genre"] == 4 and point["accuracy_mean"] == 1.0  # separable genres, capped training sample
    assert curve["default_cap"] == training.cap_per_genre(2, windows).tracks and curve["largest_genre"] == 8 and not curve["cap_binds"]
