"""The columns each feature family writes and its version: what the feature store and the catalog need to know of
the extractors without loading them (features.py and musicnn.py import librosa, numba and onnxruntime: about 2 s of
CPU that `status`, `query` and `similar` do not pay)."""

from __future__ import annotations

FEATURE_VERSION = 3
"""Bumped whenever the vector's meaning changes; rows of other versions are re-extracted."""

N_MFCC = 20

STATISTICS: tuple[str, ...] = ("mean", "std", "min", "max", "median", "skew", "kurtosis")

SERIES: tuple[tuple[str, int], ...] = (
    ("mfcc", N_MFCC),
    ("mfcc_delta", N_MFCC),
    ("mfcc_delta2", N_MFCC),
    ("contrast", 7),
    ("chroma", 12),
    ("centroid", 1),
    ("bandwidth", 1),
    ("rolloff", 1),
    ("flatness", 1),
    ("zcr", 1),
    ("rms", 1),
    ("onset", 1),
)
"""Frame-level series (family, number of coefficients), in vector order."""

SCALARS: tuple[str, ...] = ("tempo_bpm",)
"""Track-level values appended after the pooled series."""


def series_names(family: str, n: int) -> list[str]:
    """Names of a family's coefficient rows."""
    return [family] if n == 1 else [f"{family}_{i:02d}" for i in range(1, n + 1)]


FEATURE_NAMES: tuple[str, ...] = tuple(
    [f"{name}_{stat}" for family, n in SERIES for name in series_names(family, n) for stat in STATISTICS]
    + list(SCALARS)
)
"""Column names of the feature vector, in order."""

EMBEDDING_VERSION = 1
"""Version of the musicnn family (genre_batch.analysis.musicnn)."""
EMBEDDING_DIM = 200
TAG_NAMES: tuple[str, ...] = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul",
    "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill", "instrumental", "punk", "oldies",
    "blues", "hard rock", "ambient", "acoustic", "experimental", "female vocalist", "guitar", "Hip-Hop", "70s",
    "party", "country", "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal",
    "Progressive rock", "60s", "rnb", "indie pop", "sad", "House", "happy",
)  # fmt: skip
