"""Query: DuckDB SQL over the published catalog (table `catalog`) and current errors (table `errors`)."""

from __future__ import annotations

import io
import json
from datetime import date, datetime

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv

from genre_batch import GenreBatchError, catalog
from genre_batch.feature_store import current_errors
from genre_batch.store import Store, is_local

FORMATS = ("table", "csv", "json")


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views `catalog` and `errors` over the store."""
    con = duckdb.connect(":memory:")
    paths = catalog.files(store)
    if not is_local(store.fs):
        con.register_filesystem(store.fs)
        paths = [store.fs.unstrip_protocol(p) for p in paths]
    con.execute(f"CREATE VIEW catalog AS SELECT * FROM read_parquet({paths!r})")
    con.register("errors_arrow", current_errors(store))
    con.execute("CREATE VIEW errors AS SELECT * FROM errors_arrow")
    return con


def run(store: Store, sql: str) -> pa.Table:
    """Run one SQL statement and return its result as an Arrow table."""
    con = connect(store)
    try:
        result = con.sql(sql)
        return result.to_arrow_table() if result is not None else pa.table({})
    except duckdb.Error as e:
        raise GenreBatchError(f"query failed: {e}") from None
    finally:
        con.close()


def plain(value: object) -> object:
    """A JSON-ready version of one cell: maps become objects, times ISO strings."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return {k: plain(v) for k, v in value}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def rows(table: pa.Table) -> list[dict]:
    """Rows of a result as plain dicts."""
    return [{k: plain(v) for k, v in row.items()} for row in table.to_pylist()]


def to_json(table: pa.Table) -> str:
    """One JSON array of row objects."""
    return json.dumps(rows(table), ensure_ascii=False)


def to_csv(table: pa.Table) -> str:
    """CSV with a header line; maps and lists are written as JSON."""
    flat = pa.table(
        {
            name: pa.array([json.dumps(plain(v)) for v in col.to_pylist()])
            if pa.types.is_nested(col.type)
            else col
            for name, col in zip(table.column_names, table.columns)
        }
    )
    buf = io.BytesIO()
    pacsv.write_csv(flat, buf)
    return buf.getvalue().decode()
