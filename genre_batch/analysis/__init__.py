"""Audio analysis: decoding, the librosa features, the musicnn embedding, extraction of Dask shards."""
