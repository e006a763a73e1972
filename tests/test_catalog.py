"""Catalog publishing: atomic pointer switch, crash safety, pruning; atomic store writes."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from genre_batch import GenreBatchError, catalog, store as store_mod
from genre_batch.store import Store


def rows(n: int, genre: str, run: str) -> pa.Table:
    """A catalog table of n tracks all tagged `genre`."""
    return pa.table(
        {
            "track_id": [f"t{i}" for i in range(n)],
            "uri": [f"/music/{i}.mp3" for i in range(n)],
            "genre": [genre] * n,
            "confidence": [0.9] * n,
            "probabilities": [[(genre, 0.9), ("other", 0.1)]] * n,
            "embedded_genre": [None] * n,
            "disagrees_with_tag": [None] * n,
            "duration_s": [30.0] * n,
            "model_version": ["m-1"] * n,
            "feature_version": [1] * n,
            "run_id": [run] * n,
            "tagged_at": [datetime.now(timezone.utc)] * n,
        },
        schema=catalog.CATALOG_SCHEMA,
    )


def test_read_before_first_publish_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GenreBatchError, match="no published catalog"):
        catalog.read(Store(str(tmp_path)))


def test_publish_switches_readers_to_the_new_snapshot(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    catalog.publish(s, rows(3, "rock", "run-a"), "run-a", "m-1")
    pointer = catalog.publish(s, rows(5, "jazz", "run-b"), "run-b", "m-1")
    table = catalog.read(s)
    assert table.num_rows == 5 and set(table["genre"].to_pylist()) == {"jazz"}
    assert pointer["rows"] == 5 and pointer["catalog_version"] == catalog.CATALOG_VERSION
    assert table.schema.metadata[b"genre_batch.catalog_version"] == b"1"


def test_crash_before_pointer_switch_leaves_previous_catalog_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(str(tmp_path))
    catalog.publish(s, rows(4, "rock", "run-a"), "run-a", "m-1")
    before = catalog.pointer(s)

    def crash(*args: object) -> None:
        raise KeyboardInterrupt("killed during publish")

    monkeypatch.setattr(catalog, "promote", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.publish(s, rows(9, "jazz", "run-b"), "run-b", "m-1")
    assert catalog.pointer(s) == before
    table = catalog.read(s)
    assert table.num_rows == 4 and set(table["genre"].to_pylist()) == {"rock"}
    monkeypatch.undo()
    catalog.publish(s, rows(9, "jazz", "run-c"), "run-c", "m-1")  # the next run publishes
    assert catalog.read(s).num_rows == 9


def test_crash_while_writing_the_pointer_leaves_the_old_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(str(tmp_path))
    catalog.publish(s, rows(2, "rock", "run-a"), "run-a", "m-1")
    real_replace = os.replace

    def die(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store_mod.os, "replace", die)
    with pytest.raises(OSError):
        catalog.publish(s, rows(7, "jazz", "run-b"), "run-b", "m-1")
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert catalog.read(s).num_rows == 2
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # no temp files left behind


def test_old_snapshots_are_pruned_keeping_the_last_n(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    for i in range(7):
        catalog.publish(s, rows(1, "rock", f"run-{i}"), f"run-{i}", "m-1", keep=3)
    kept = sorted(p.name for p in (tmp_path / "catalog" / "snapshots").iterdir())
    assert len(kept) == 3
    assert catalog.pointer(s)["snapshot"] == kept[-1]


def test_write_bytes_is_all_or_nothing(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    path = s.path("x", "file.bin")
    store_mod.write_bytes(s.fs, path, b"old")
    store_mod.write_bytes(s.fs, path, b"new")
    assert Path(path).read_bytes() == b"new"
    assert [p.name for p in Path(path).parent.iterdir()] == ["file.bin"]
