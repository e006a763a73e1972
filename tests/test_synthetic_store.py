"""The bench's synthetic store (bench/synthetic_store.py) is a store the pipeline reads as one it extracted itself."""

import numpy as np
import pyarrow as pa
import pytest

from bench import synthetic_store
from genre_batch.modelling import registry
from genre_batch.storage import feature_store as fs
from genre_batch.storage.store import Store


def test_a_synthetic_store_has_both_families_for_every_track_and_changes_rewrite_both(tmp_path):
    built = synthetic_store.build(tmp_path / "base", 300, processes=1)
    assert built["params"]["families"] == ["librosa", "musicnn"] and built["parts"] == 2
    store = Store.at(str(tmp_path / "base" / "store"))
    card = registry.current(store)  # a card the tag stage reads, as train writes them
    assert card.version == built["model"] and card.gate_passed and card.families == {"librosa": fs.LIBROSA.version}
    inventory = fs.read_inventory(store)
    current = {f.name: fs.current_tracks(store, inventory, f) for f in (fs.LIBROSA, fs.MUSICNN)}
    assert {name: rows.num_rows for name, rows in current.items()} == {"librosa": 300, "musicnn": 300}
    assert set(current["librosa"]["row_count"].to_pylist()) == {synthetic_store.WINDOWS}
    assert set(current["musicnn"]["row_count"].to_pylist()) == {1}
    assert set(current["musicnn"]["feature_version"].to_pylist()) == {fs.MUSICNN.version}

    with pytest.raises(ValueError, match="got index rows of 2 parts"):  # one part at a time, else it would take wrong rows
        fs.read_windows(store, current["musicnn"], None, fs.MUSICNN)
    rows = pa.concat_tables([fs.read_windows(store, group, None, fs.MUSICNN) for group in fs.by_part(current["musicnn"])])
    assert rows.num_rows == 300 and sorted(rows["uri"].to_pylist()) == sorted(current["musicnn"]["uri"].to_pylist())
    tags = np.column_stack([rows[c].to_numpy() for c in fs.TAG_COLUMNS])
    embedding = np.column_stack([rows[c].to_numpy() for c in fs.EMBEDDING_COLUMNS])
    assert tags.min() > 0 and tags.max() < 1 and np.median(tags) < 0.3  # scores in 0..1, mostly low, as musicnn's
    assert len(np.unique(embedding[:, 0])) == 300  # distinct per track
    genre = synthetic_store.genre_of(np.array([int(u.rsplit("t", 1)[1][:7]) for u in rows["uri"].to_pylist()]), 0)
    centroids = np.stack([embedding[genre == g].mean(axis=0) for g in np.unique(genre)])
    assert np.linalg.norm(centroids - centroids.mean(axis=0), axis=1).min() > 1  # genres apart in the embedding

    changed = synthetic_store.simulate_changes(store, 300, 0.01, processes=1)
    inventory = fs.read_inventory(store)
    for family in (fs.LIBROSA, fs.MUSICNN):
        now = fs.current_tracks(store, inventory, family)
        assert now.num_rows == 300
        assert now["run_id"].to_pylist().count(synthetic_store.CHANGE_RUN) == changed == 3
