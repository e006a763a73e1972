"""Generated 16 kHz test signals for the musicnn embedding, shared by tests/test_musicnn.py and scripts/musicnn_reference.py."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000


def tones_and_noise(seconds: float = 10.0, seed: int = 20190901) -> np.ndarray:
    """A loud A-minor chord whose notes swell in turn, a 120 bpm noise-burst beat and a noise floor; float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    y = np.zeros_like(t)
    for i, hz in enumerate((220.0, 261.63, 329.63, 440.0)):
        y += 0.2 * (1.0 + np.sin(2 * np.pi * (0.25 * t + i / 4))) / 2 * np.sin(2 * np.pi * hz * t)
    beat = np.exp(-30.0 * (t % 0.5)) * rng.standard_normal(t.size)
    y += 0.3 * beat + 0.01 * rng.standard_normal(t.size)
    return y.astype(np.float32)
