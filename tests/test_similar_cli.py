"""The read verbs' start-up and errors on a small published catalog: `query`, `similar` and `status` on a local store
load neither fsspec nor the extraction stack, and a vector space whose arrays are missing is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli
from test_catalog import SPACE, rows

from genre_batch.publishing import catalog
from genre_batch.storage.store import Store

PROBE = """
import json, sys
from genre_batch.cli import run_app
seen = []
for argv in json.loads(sys.argv[1]):
    seen.append([run_app(argv), sorted({m.split('.')[0] for m in sys.modules})])
print(json.dumps(seen))
"""
EXTRACTION = {"librosa", "numba", "onnxruntime", "av", "soundfile"}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store with one published catalog of 60 tracks (their lists and index) and no vector space arrays."""
    root = tmp_path_factory.mktemp("published") / "store"
    catalog.publish(Store(str(root)), rows(60, "rock", "run-a"), "run-a", "m-1", SPACE)
    return root


def test_read_verbs_on_a_local_store_load_only_what_they_need(published: Path) -> None:
    store = str(published)
    verbs = [
        ["query", "--store", store, "SELECT uri FROM catalog WHERE genre = 'rock' ORDER BY confidence DESC LIMIT 3", "--format", "json"],
        ["similar", "--store", store, "t7", "--top", "3", "--format", "json"],
        ["status", "--store", store, "--format", "json"],
    ]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(verbs)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (query_code, after_query), (similar_code, after_similar), (status_code, after_status) = json.loads(done.stdout.splitlines()[-1])
    assert (query_code, similar_code, status_code) == (0, 0, 0), done.stderr
    unneeded = {"fsspec", "pandas", "faiss", "prefect", "distributed"} | EXTRACTION
    assert "duckdb" in after_query and unneeded & set(after_query) == set()
    assert unneeded & set(after_similar) == set()  # the stored list: no index, no feature code
    assert {"librosa", "numba", "onnxruntime"} & set(after_status) == set()


def test_a_missing_vector_space_is_a_one_line_error(published: Path, tmp_path: Path) -> None:
    outside = str(tmp_path / "elsewhere.wav")  # not in the catalog: it would be embedded in the snapshot's space
    code, out, err = cli("similar", "--store", str(published), outside)
    assert (code, out) == (1, "") and err.count("\n") == 1, err
    assert err.startswith(f"error: {outside}: not a track_id or uri of the published catalog, and files outside it cannot be embedded: "
                          "the arrays of vector space test-space are not in the store (none recorded): run 'genre-batch tag'")

    s = Store(str(tmp_path / "store"))  # a space whose file was recorded, then lost
    catalog.publish(s, rows(20, "rock", "run-a"), "run-a", "m-1", {**SPACE, "file": "spaces/test-space.npz"})
    code, _, err = cli("similar", "--store", s.root, outside)
    assert code == 1 and err.count("\n") == 1 and f"({s.catalog}/spaces/test-space.npz is missing)" in err, err
