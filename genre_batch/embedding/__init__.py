"""Pretrained music embeddings: converted models run with numpy, no TensorFlow at runtime."""
