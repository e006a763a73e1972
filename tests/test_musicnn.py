"""musicnn MSD embedding: converted model vs the original TensorFlow network, determinism, patches, checksum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from musicnn_signals import tones_and_noise

from genre_batch.analysis import columns, musicnn
from genre_batch.library.synth import render

REFERENCE = Path(__file__).with_name("data") / "musicnn_reference.npz"  # made by scripts/musicnn_reference.py
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """Outputs of musicnn's own TensorFlow graph and checkpoint on tones_and_noise()."""
    with np.load(REFERENCE, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.fixture(scope="module")
def signal() -> np.ndarray:
    """The 10 s generated signal the reference was computed on."""
    return tones_and_noise()


def test_log_mel_matches_musicnn_input(reference: dict[str, np.ndarray], signal: np.ndarray) -> None:
    patches = musicnn.log_mel(signal)
    assert patches.dtype == np.float32
    assert patches.shape == tuple(reference["logmel_shape"]) == (3, 187, 96)
    frames = patches.reshape(-1, musicnn.N_MELS)
    assert np.isfinite(frames).all() and frames.max() > 5.0  # loud bins: float16 would have overflowed here
    np.testing.assert_allclose(frames[reference["logmel_rows_index"]], reference["logmel_rows"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(frames.mean(axis=1), reference["logmel_frame_mean"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(frames.mean(axis=0), reference["logmel_band_mean"], rtol=0, atol=TOLERANCE)


def test_converted_model_matches_original_network(reference: dict[str, np.ndarray], signal: np.ndarray) -> None:
    penultimate, tags = musicnn.embed(musicnn.log_mel(signal))
    assert penultimate.shape == (3, columns.EMBEDDING_DIM) and tags.shape == (3, len(columns.TAG_NAMES))
    assert np.abs(reference["penultimate"]).max() > 1.0 and reference["tags"].max() > 0.3  # a non-trivial reference
    np.testing.assert_allclose(penultimate, reference["penultimate"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(tags, reference["tags"], rtol=0, atol=TOLERANCE)


def test_patches_computed_alone_equal_the_full_computation(signal: np.ndarray) -> None:
    full = musicnn.log_mel(signal)
    np.testing.assert_allclose(musicnn.log_mel_patches(signal, [2, 0]), full[[2, 0]], rtol=1e-6, atol=1e-6)  # float32 rounding


def test_embedding_is_deterministic_and_batch_independent(signal: np.ndarray) -> None:
    first = musicnn.track_embedding(signal, None)
    second = musicnn.track_embedding(signal.copy(), None)
    for a, b in zip(first[:2], second[:2]):
        np.testing.assert_array_equal(a, b)
    assert first[2] == second[2] == 3
    penultimate, tags = musicnn.embed(musicnn.log_mel(signal))
    np.testing.assert_allclose(first[0], penultimate.mean(axis=0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(first[1], tags.mean(axis=0), rtol=0, atol=1e-6)
    one_by_one = [musicnn.embed(musicnn.log_mel_patches(signal, [i]))[0][0] for i in range(3)]
    np.testing.assert_allclose(np.stack(one_by_one), penultimate, rtol=0, atol=1e-5)


def test_track_embedding_shapes_and_patch_counts(signal: np.ndarray) -> None:
    embedding, tags, used = musicnn.track_embedding(signal, 2)
    assert embedding.shape == (columns.EMBEDDING_DIM,) and embedding.dtype == np.float32
    assert tags.shape == (50,) and ((tags > 0) & (tags < 1)).all()
    assert used == 2
    assert musicnn.track_embedding(signal[: musicnn.SAMPLE_RATE], 4)[2] == 1  # 1 s: one zero-padded patch
    with pytest.raises(ValueError, match="empty"):
        musicnn.track_embedding(np.zeros(0, np.float32), 4)


@pytest.mark.parametrize(
    ("n_samples", "expected"),
    [(1, 1), (48000, 1), (373 * 256 - 1, 1), (373 * 256, 2), (960000, 20)],  # centred frames: 1 + n // 256
)
def test_n_patches_follows_musicnn_grid(n_samples: int, expected: int) -> None:
    assert musicnn.n_patches(n_samples) == expected


@pytest.mark.parametrize(
    ("n_available", "max_patches", "expected"),
    [(20, 4, [2, 7, 12, 17]), (20, 1, [10]), (20, None, list(range(20))), (3, 8, [0, 1, 2]), (5, 2, [1, 3])],
)
def test_spread_patches_centres_equal_slices(n_available: int, max_patches: int | None, expected: list[int]) -> None:
    assert musicnn.spread_patches(n_available, max_patches) == expected


def test_spread_patches_rejects_non_positive_cap() -> None:
    with pytest.raises(ValueError, match="max_patches"):
        musicnn.spread_patches(10, 0)


def test_embed_rejects_wrong_input_shape() -> None:
    with pytest.raises(ValueError, match="187, 96"):
        musicnn.embed(np.zeros((2, 96, 187), np.float32))


def test_different_music_gives_different_tag_profiles() -> None:
    ambient_embedding, ambient_tags, _ = musicnn.track_embedding(render("ambient", 9.0, 1, sr=musicnn.SAMPLE_RATE), None)
    beat_embedding, beat_tags, _ = musicnn.track_embedding(render("electronic", 9.0, 1, sr=musicnn.SAMPLE_RATE), None)
    tag = {name: i for i, name in enumerate(columns.TAG_NAMES)}
    assert columns.TAG_NAMES[int(np.argmax(ambient_tags))] == "ambient"
    assert columns.TAG_NAMES[int(np.argmax(beat_tags))] == "electronic"
    assert ambient_tags[tag["ambient"]] > 5 * beat_tags[tag["ambient"]]
    assert beat_tags[tag["dance"]] > 5 * ambient_tags[tag["dance"]]
    cosine = ambient_embedding @ beat_embedding / np.linalg.norm(ambient_embedding) / np.linalg.norm(beat_embedding)
    assert cosine < 0.6


def test_tag_names_are_musicnn_msd_labels() -> None:
    assert len(columns.TAG_NAMES) == 50 and len(set(columns.TAG_NAMES)) == 50
    assert columns.TAG_NAMES[:3] == ("rock", "pop", "alternative") and columns.TAG_NAMES[-1] == "happy"
    assert columns.EMBEDDING_VERSION == 1 and columns.EMBEDDING_DIM == 200


def test_shipped_model_checksum_is_recorded_with_its_licence() -> None:
    licence = musicnn.MODEL_PATH.with_name("LICENSE-musicnn.md").read_text()
    assert musicnn.MODEL_SHA256 in licence and "ISC" in licence and "Pons" in licence
    assert musicnn.session() is musicnn.session()  # loaded once per process


def test_corrupt_model_file_fails_with_a_clear_error(tmp_path: Path) -> None:
    data = bytearray(musicnn.MODEL_PATH.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "musicnn_msd.onnx"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(musicnn.ModelFileError, match=r"SHA-256 [0-9a-f]{64}, expected " + musicnn.MODEL_SHA256):
        musicnn.load_session(corrupt, musicnn.MODEL_SHA256)
    with pytest.raises(musicnn.ModelFileError, match="not readable"):
        musicnn.load_session(tmp_path / "missing.onnx", musicnn.MODEL_SHA256)
