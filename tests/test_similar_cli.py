"""The read verbs' start-up and errors on a small published catalog: `query`, `similar` and `status` on a local store
load neither fsspec nor the extraction stack (nor pydantic, rich, or for a json query pyarrow), parameters keep
typer's coercion and messages without its pydantic adapters, a query's Python values print as its Arrow table did,
and a vector space whose arrays are missing is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import cli
from test_catalog import SPACE, rows
from typer._click.exceptions import BadParameter
from typer._coercion import build_runtime_param

from genre_batch import cli as command_line
from genre_batch.publishing import catalog, query
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
        ["--help"],
        ["query", "--store", store, "SELECT uri FROM catalog WHERE genre = 'rock' ORDER BY confidence DESC LIMIT 3", "--format", "json"],
        ["similar", "--store", store, "t7", "--top", "3"],
        ["status", "--store", store, "--format", "json"],
    ]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(verbs)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (help_code, after_help), (query_code, after_query), (similar_code, after_similar), (status_code, after_status) = json.loads(done.stdout.splitlines()[-1])
    assert (help_code, query_code, similar_code, status_code) == (0, 0, 0, 0), done.stderr
    assert "/music/7.mp3 (rock, from the table):" in done.stdout  # similar printed its text answer
    unneeded = {"fsspec", "pandas", "faiss", "prefect", "distributed", "pydantic", "rich"} | EXTRACTION
    assert unneeded & set(after_help) == set()
    assert "duckdb" in after_query and (unneeded | {"pyarrow", "numpy"}) & set(after_query) == set()
    assert unneeded & set(after_similar) == set()  # the stored list: no index, no feature code
    assert {"librosa", "numba", "onnxruntime", "pydantic", "rich"} & set(after_status) == set()


def typer_coercion(param: typer.core.TyperOption | typer.core.TyperArgument, coercion: object, value: object) -> tuple[str, object]:
    """What typer's own coercion of a parameter (its pydantic adapter) makes of a value: ("value", v) or ("error", message)."""
    try:
        return "value", coercion.coerce(value, param=param, ctx=None)  # type: ignore[attr-defined]
    except BadParameter as e:
        return "error", e.format_message()


def plain_first(param: typer.core.TyperOption | typer.core.TyperArgument, value: object) -> tuple[str, object]:
    """What the CLI's PlainFirst coercion makes of a value: ("value", v) or ("error", message)."""
    try:
        return "value", command_line.plain_first([param])[0]._runtime_param.coerce(value, param=param, ctx=None)
    except BadParameter as e:
        return "error", e.format_message()


def every_parameter() -> list:
    """Every parameter of every genre-batch command and group (their --help options included)."""
    group = typer.main.get_command(command_line.app)
    commands = [group, *group.commands.values(), *group.commands["models"].commands.values()]
    return [p for c in commands for p in c.get_params(typer.Context(c))]


SAMPLES = [None, "", "x", "rock", "0", "1", "7", "007", "1000", "1001", "5000", "-1", "+3", " 4", "1.5", "0.5", ".5", "5.", "1e3",
           "1_0", "nan", "inf", "١", "true", True, False, 0, 3, 0.25, 2.0, ("a", "b"), ["t7"], ()]


def test_plain_first_coerces_every_parameter_as_typer_does() -> None:
    """For every parameter of the CLI and values of each kind (plain, odd, out of range, wrong type), PlainFirst
    returns what typer's pydantic coercion returns, or raises its error message."""
    checked = 0
    for param in every_parameter():
        coercion = build_runtime_param(param.type_descriptor)
        for value in SAMPLES:
            multi = param.multiple or param.nargs == -1
            if multi != isinstance(value, tuple | list) and value is not None:
                continue  # click hands a list parameter a tuple, and others a single value
            expected = typer_coercion(param, coercion, value)
            assert plain_first(param, value) == expected, (param.name, value, expected)
            checked += 1
    assert checked > 1000


def test_a_query_answer_prints_as_its_arrow_table_did(published: Path) -> None:
    """fetch (DuckDB's Python values) gives the rows and JSON that the Arrow table of the same query gives, for every
    catalog column (maps, fixed-size arrays, lists, timestamps, nulls) and computed values."""
    s = Store(str(published))
    for sql in ["SELECT * FROM catalog ORDER BY uri LIMIT 5", "SELECT genre, count(*) AS n, max(tagged_at) AS t FROM catalog GROUP BY genre",
                "SELECT probabilities['rock'] AS p, embedding[1] AS e, [1, 2] AS l, {'a': 1} AS st, NULL AS nothing FROM catalog LIMIT 2"]:
        arrow, result = query.run(s, sql), query.fetch(s, sql)
        assert result.columns == arrow.column_names and len(result.rows) == arrow.num_rows
        assert query.rows(result) == [{k: query.arrow_plain(v) for k, v in row.items()} for row in arrow.to_pylist()], sql
    assert json.loads(query.to_json(query.fetch(s, "SELECT 1.5 AS d, 2::HUGEINT AS h"))) == [{"d": "1.5", "h": 2}]  # no TypeError


def test_a_missing_vector_space_is_a_one_line_error(published: Path, tmp_path: Path) -> None:
    outside = str(tmp_path / "elsewhere.wav")  # not in the catalog: it would be embedded in the snapshot's space
    code, out, err = cli("similar", "--store", str(published), outside)
    assert (code, out) == (1, "") and err.count("\n") == 1, err
    s = Store(str(published))
    assert err.startswith(f"error: {outside}: not a track_id or uri of the published catalog, and files outside it cannot be embedded: "
                          f"the arrays of vector space test-space are not in the store ({s.catalog}/spaces/test-space.npz is missing): "
                          "run 'genre-batch tag'"), err
