"""Query: DuckDB SQL over the published catalog (table `catalog`), its change feed (`changes`), its neighbour lists
(`similar`), current errors (`errors`) and the write-back record (`writes`)."""

from __future__ import annotations

import io
import json
from datetime import date, datetime

import duckdb
import pyarrow as pa

from genre_batch import GenreBatchError
from genre_batch.publishing import catalog
from genre_batch.storage.store import Store

READ_ONLY = ("SELECT", "EXPLAIN")
"""Statement types `run` accepts (DESCRIBE, SUMMARIZE, SHOW and FROM-first queries are SELECTs)."""


def connect(store: Store, sql: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views `catalog` and (when `sql` names them) `changes`, `similar` and
    `errors`, and no file access beyond the published snapshot's own files.

    On disk DuckDB reads the snapshot's Parquet files itself (its fastest path), allowed by `allowed_paths`; on
    object stores they are read through a pyarrow dataset on the store's filesystem. External access is then
    switched off and the configuration locked, which refuses COPY ... TO, EXPORT, ATTACH, INSTALL and read_*() of
    any other path. The errors view is built only when asked for: it reads the feature store's key columns.
    """
    con = duckdb.connect(":memory:")
    # SQL naming the catalog needs one published (files() says so); the errors table is queryable before
    files = catalog.files(store) if "catalog" in sql.lower() or catalog.pointer(store) else []
    current = catalog.pointer(store) or {}
    pieces = [f"{store.catalog}/{f}" for f in (current.get("similar") or {}).get("files", [])] if "similar" in sql.lower() else []
    if store.local and files + pieces:
        con.execute("SET allowed_paths = $files", {"files": files + pieces})
    parquet_view(con, store, "catalog", files, catalog.CATALOG_SCHEMA)
    if "similar" in sql.lower():  # the neighbour lists (no rows before a snapshot has them); SIMILAR is reserved: SQL quotes it
        parquet_view(con, store, "similar", pieces, catalog.SIMILAR_SCHEMA)
    if "changes" in sql.lower():  # the published snapshot's change feed (no rows before the first one that has it)
        feed = store.read_table(f"{store.catalog}/{current['changes']}") if current.get("changes") else catalog.CHANGES_SCHEMA.empty_table()
        con.register("changes_arrow", feed)
        con.execute("CREATE VIEW changes AS SELECT * FROM changes_arrow")
    if "errors" in sql.lower():
        from genre_batch.storage.feature_store import current_errors  # imported here: it loads the feature code (0.7 s per query)

        con.register("errors_arrow", current_errors(store))
        con.execute("CREATE VIEW errors AS SELECT * FROM errors_arrow")
    if "writes" in sql.lower():  # the write-back record (no rows before the first write-tags --apply)
        from genre_batch.library.writeback import read_writes

        con.register("writes_arrow", read_writes(store))
        con.execute("CREATE VIEW writes AS SELECT * FROM writes_arrow")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def parquet_view(con: duckdb.DuckDBPyConnection, store: Store, name: str, files: list[str], schema: pa.Schema) -> None:
    """A view `name` of Parquet files of the store (of no rows with `schema` when there are none)."""
    if not files:
        con.register(f"{name}_files", schema.empty_table())
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {name}_files')
    elif store.local:
        con.read_parquet(files).create_view(name)
    else:
        import pyarrow.dataset as ds  # imported here: it loads pandas where installed (0.4 s of every local query)

        con.register(f"{name}_files", ds.dataset(files, format="parquet", filesystem=store.fs))
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {name}_files')


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse any statement that is not a query (CREATE, INSERT, COPY, SET, ATTACH, ...)."""
    for statement in con.extract_statements(sql):
        kind = statement.type.name
        if kind not in READ_ONLY:
            raise GenreBatchError(f"query refused: genre-batch query is read-only and runs only SELECT statements, not {kind}")


def run(store: Store, sql: str) -> pa.Table:
    """Run read-only SQL (one statement, or several: the last one's result) and return its result as an Arrow table."""
    con = connect(store, sql)
    try:
        check_read_only(con, sql)
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as e:
        raise GenreBatchError(f"query failed: {str(e).splitlines()[0]}") from None  # one line: no caret diagram
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
    import pyarrow.csv as pacsv  # imported here: only --format csv writes CSV

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
