"""Reference outputs of the ORIGINAL musicnn MSD network (TensorFlow) on a generated signal -> tests/data/musicnn_reference.npz.

Runs musicnn 0.1.0's own graph code (musicnn/models.py) and checkpoint through tf.compat.v1, exactly as
musicnn/extractor.py does, with two changes: the audio is the generated signal of
tests/musicnn_signals.py instead of a decoded file, and the log-mel is computed in float32 instead of
float16 (float16 overflows to inf on loud bins). TensorFlow is needed here only, in a scratch venv:

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu tf-keras 'librosa==0.11.*' 'numpy<2.3'
    pip download musicnn==0.1.0 --no-deps -d /tmp/musicnn && unzip -q /tmp/musicnn/musicnn-0.1.0-*.whl -d /tmp/musicnn
    /tmp/tfvenv/bin/python scripts/musicnn_reference.py /tmp/musicnn

(tf-keras with TF_USE_LEGACY_KERAS=1, set below, brings back the tf.compat.v1.layers musicnn uses.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import librosa
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from musicnn_signals import SAMPLE_RATE, tones_and_noise  # noqa: E402

MODEL = "MSD_musicnn"
N_FRAMES = 187
LOGMEL_ROWS = np.array([0, 1, 2, 93, 185, 186, 187, 188, 373, 374, 559, 560])  # frames of the patched input


def musicnn_mel(audio: np.ndarray) -> np.ndarray:
    """musicnn's batch_data mel power spectrogram of 16 kHz audio, [frames, 96]."""
    return librosa.feature.melspectrogram(y=audio, sr=SAMPLE_RATE, hop_length=256, n_fft=512, n_mels=96).T


def log_compress(audio_rep: np.ndarray, dtype: type) -> np.ndarray:
    """musicnn's log10(10000 x + 1), computed in dtype (musicnn itself uses float16)."""
    with np.errstate(over="ignore"):
        return np.log10(10000 * audio_rep.astype(dtype) + 1)


def musicnn_batch(audio_rep: np.ndarray) -> np.ndarray:
    """musicnn's batch_data patching: non-overlapping 187-frame patches from frame 0, [n, 187, 96]."""
    last_frame = audio_rep.shape[0] - N_FRAMES + 1
    return np.stack([audio_rep[t : t + N_FRAMES] for t in range(0, last_frame, N_FRAMES)])


def run_original(musicnn_root: Path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """musicnn's MSD graph and checkpoint on batch: (penultimate [n, 200], sigmoid tag scores [n, 50])."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    sys.path.insert(0, str(musicnn_root))
    import tensorflow as tf
    from musicnn import configuration as config
    from musicnn import models

    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.reset_default_graph()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FRAMES, config.N_MELS])
        is_training = tf.compat.v1.placeholder(tf.bool)
        outputs = models.define_model(x, is_training, MODEL, len(config.MSD_LABELS))
        normalized_y = tf.nn.sigmoid(outputs[0])
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.train.Saver().restore(sess, str(musicnn_root / "musicnn" / MODEL) + "/")
        tags, penultimate = sess.run([normalized_y, outputs[-1]], feed_dict={x: batch, is_training: False})
    return penultimate, tags


def main() -> None:
    """Compute and save the reference outputs; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("musicnn_root", type=Path, help="folder holding the unpacked musicnn wheel (musicnn/MSD_musicnn/...)")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "musicnn_reference.npz")
    args = parser.parse_args()
    mel = musicnn_mel(tones_and_noise())
    audio_rep = log_compress(mel, np.float32)
    batch = musicnn_batch(audio_rep)
    penultimate, tags = run_original(args.musicnn_root, batch)
    frames = batch.reshape(-1, batch.shape[2])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        penultimate=penultimate,
        tags=tags,
        logmel_shape=np.array(batch.shape),
        logmel_rows_index=LOGMEL_ROWS,
        logmel_rows=frames[LOGMEL_ROWS],
        logmel_frame_mean=frames.mean(axis=1),
        logmel_band_mean=frames.mean(axis=0),
    )
    print(f"wrote {args.out}: {batch.shape[0]} patches, log-mel {audio_rep.shape}, max {audio_rep.max():.3f}")
    f16 = log_compress(mel, np.float16)
    print(f"float16 log-mel as musicnn computes it: {np.isinf(f16).sum()} inf bins of {f16.size}")


if __name__ == "__main__":
    main()
