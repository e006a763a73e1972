"""The held-out check's scoring (bench/heldout.py): files of genres the model lacks are left out, a file that could not
be classified counts as wrong, F1 is over the genres the test set has, and a labelled folder lists its genre folders'
audio files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import heldout


def test_scores_count_the_known_genres_and_unclassified_files_as_wrong() -> None:
    truth = ["rock", "rock", "pop", "pop", "jazz"]
    predicted = ["rock", "pop", "pop", None, "rock"]
    got = heldout.score(truth, predicted, ["classical", "pop", "rock"])
    assert got["files"] == 4 and got["genres_unknown_to_model"] == ["jazz"]
    assert got["accuracy"] == pytest.approx(0.5) and got["unclassified"] == 1
    assert got["per_genre_f1"] == pytest.approx({"pop": 0.5, "rock": 2 / 3})  # classical: absent from the test set
    assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert got["confusion"] == [[0, 0, 0], [0, 1, 0], [0, 1, 1]]  # the unclassified pop file is in no column
    low, high = got["interval"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0 and low < high


def test_a_labelled_folder_is_its_genre_folders_audio_files(tmp_path: Path) -> None:
    for name in ("Rock/a.mp3", "Rock/live/b.flac", "pop/c.ogg", "pop/notes.txt", "pop/.hidden.mp3", "loose.mp3", "Unknown/d.mp3"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert heldout.labelled(tmp_path) == [(str(tmp_path / "Rock/a.mp3"), "rock"), (str(tmp_path / "Rock/live/b.flac"), "rock"),
                                          (str(tmp_path / "pop/c.ogg"), "pop")]
