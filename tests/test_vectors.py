"""Vector spaces: per-track pooling of librosa windows."""

from __future__ import annotations

import numpy as np

from genre_batch.publishing.vectors import window_means


def test_window_means_are_each_tracks_float64_sum_in_row_order_over_its_windows() -> None:
    """window_means equals, bit for bit, the float64 sum of each track's windows added one row after another (what
    np.add.at gave before), divided by its count; a track without windows gets zeros."""
    rng = np.random.default_rng(3)
    counts = np.array([0, 6, 1, 3, 0, 6, 2, 0])
    matrix = (rng.standard_normal((int(counts.sum()), 603)) * 10.0 ** rng.uniform(-2, 3, 603)).astype(np.float32)
    expected = np.zeros((len(counts), 603))
    row = 0
    for track, count in enumerate(counts):
        total = np.zeros(603)
        for _ in range(count):
            total += matrix[row].astype(np.float64)
            row += 1
        expected[track] = total / max(count, 1)
    means = window_means(matrix, counts)
    assert means.dtype == np.float64 and np.array_equal(means, expected)
    assert window_means(matrix[:0], np.zeros(0, np.int64)).shape == (0, 603)
