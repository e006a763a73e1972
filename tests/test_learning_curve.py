"""The learning curve of the training cap (bench/learning_curve.py): points bracketing the cap `train` takes, the same
generator rows as the scale stores, a CPU budget that skips points projected past it, and the paired cost of the cap."""

from __future__ import annotations

import numpy as np

from bench import learning_curve, synthetic_store
from genre_batch.modelling import training


def test_the_bracket_spans_a_quarter_to_four_times_the_cap_train_takes() -> None:
    cap = learning_curve.default_cap()
    assert cap == training.cap_per_genre(len(synthetic_store.GENRES), synthetic_store.WINDOWS, n_columns=synthetic_store.N)
    caps = learning_curve.bracket(cap)
    assert caps == (round(cap / 4), round(cap / 2), cap, 2 * cap, 4 * cap)
    assert learning_curve.bracket(3) == (2, 3, 6, 12)  # never under MIN_PER_GENRE, each cap once


def test_a_track_has_its_store_rows_whichever_tracks_are_read_with_it() -> None:
    size, rows = synthetic_store.SHARD_TRACKS, synthetic_store.WINDOWS
    shard = synthetic_store.window_values(np.arange(size, 2 * size), 0, False)  # the store's second part
    tracks = np.array([size + 7, 3, size + 1])
    got = learning_curve.synthetic_windows(tracks, 0)
    assert got.X.shape == (3 * rows, synthetic_store.N) and got.track.tolist() == [0] * rows + [1] * rows + [2] * rows
    np.testing.assert_array_equal(got.X[:rows], shard[7 * rows : 8 * rows])
    np.testing.assert_array_equal(got.X[2 * rows :], shard[rows : 2 * rows])
    np.testing.assert_array_equal(learning_curve.synthetic_windows(np.array([3]), 0).X, got.X[rows : 2 * rows])


def test_a_point_is_projected_from_the_largest_measured_one_with_the_growth_of_its_rounds() -> None:
    assert learning_curve.projected_cpu([], 100) is None
    one = [{"cap_per_genre": 100, "cpu_s": 10.0, "rounds": 50}]
    assert learning_curve.projected_cpu(one, 400) == 40.0
    two = [*one, {"cap_per_genre": 200, "cpu_s": 30.0, "rounds": 100}]
    assert learning_curve.projected_cpu(two, 400) == 120.0  # 2x the rows, rounds doubled last time


def test_the_cost_of_the_cap_is_a_paired_difference_against_the_largest_sample() -> None:
    correct = {10: np.array([True, False, False, True]), 40: np.array([True, True, False, True])}
    points = [{"cap_per_genre": 10}, {"cap_per_genre": 40}]
    cost = learning_curve.cap_cost(points, correct, 10)
    assert cost["largest_cap"] == 40 and cost["gain_points"] == 25.0 and cost["se_points"] == 25.0
    assert learning_curve.cap_cost(points[:1], {10: correct[10]}, 10)["gain_points"] is None


def test_the_synthetic_curve_fits_as_train_and_skips_what_the_budget_cannot_pay() -> None:
    curve = learning_curve.synthetic_curve((3, 6), test_per_genre=4, cap=3, budget_s=0.0)
    assert curve["test_tracks"] == 40 and curve["default_cap"] == 3
    (point,) = curve["points"]  # the first point has nothing to be projected from: it runs
    assert point["cap_per_genre"] == 3 and point["train_tracks"] == 30 and point["rounds"] >= 1 and point["cpu_s"] >= 0
    assert 0 <= point["accuracy"] <= 1
    (skipped,) = curve["skipped"]
    assert skipped["cap_per_genre"] == 6 and skipped["projected_cpu_s"] >= 0 and skipped["budget_left_s"] <= 0
    assert curve["cap_cost"] == {"cap_per_genre": 3, "largest_cap": 3, "gain_points": None, "se_points": None}
    assert curve["classifier"] == "xgboost" and point["C"] is None


def test_the_synthetic_curve_fits_the_linear_model_with_its_chosen_c() -> None:
    curve = learning_curve.synthetic_curve((3, 6), test_per_genre=4, cap=3, kind="linear")
    assert curve["classifier"] == "linear" and [p["cap_per_genre"] for p in curve["points"]] == [3, 6] and not curve["skipped"]
    assert all(p["rounds"] is None and p["C"] > 0 and 0 <= p["accuracy"] <= 1 for p in curve["points"])
    assert curve["cap_cost"]["largest_cap"] == 6 and curve["cap_cost"]["gain_points"] is not None  # paired: same test tracks


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
    assert curve["default_cap"] == training.cap_per_genre(2, windows) and curve["largest_genre"] == 8 and not curve["cap_binds"]
