"""Query: DuckDB SQL over the published catalog (table `catalog`), its change feed (`changes`), its neighbour lists
(`similar`), current errors (`errors`) and the write-back record (`writes`).

On a local store with a published catalog, a query answered as Python values (`fetch`: the CLI's json and table
formats) loads neither pyarrow (with numpy 0.2 s CPU of a start) nor the catalog module: DuckDB reads the snapshot's
files itself. Arrow (`run`: CSV, object stores, the tables registered from Arrow) is imported where it is used.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import duckdb

from genre_batch import GenreBatchError
from genre_batch.publishing.pointer import published, required
from genre_batch.storage.store import Store

if TYPE_CHECKING:
    import pyarrow as pa

READ_ONLY = ("SELECT", "EXPLAIN")
"""Statement types `run` accepts (DESCRIBE, SUMMARIZE, SHOW and FROM-first queries are SELECTs)."""


@dataclass(frozen=True)
class Result:
    """A query's answer as Python values: its column names and its rows (DuckDB's values: maps as dicts, arrays as
    tuples)."""

    columns: list[str]
    rows: list[tuple]


def connect(store: Store, sql: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views (those `sql` names) `catalog`, `changes`, `similar`, `errors` and
    `writes`, and no file access beyond the published snapshot's own files.

    On disk DuckDB reads the snapshot's Parquet files itself (its fastest path), allowed by `allowed_paths`; on
    object stores they are read through a pyarrow dataset on the store's filesystem. External access is then
    switched off and the configuration locked, which refuses COPY ... TO, EXPORT, ATTACH, INSTALL and read_*() of
    any other path. The errors view is built only when asked for: it reads the feature store's key columns.
    """
    con = duckdb.connect(":memory:")
    named = set(re.findall(r"[a-z_][a-z0-9_]*", sql.lower()))  # words of the SQL: a table is built only when named
    # errors and writes need no snapshot; SQL naming the catalog needs one published (errors are queryable before)
    current = required(store) if "catalog" in named else published(store) if named & {"similar", "changes"} else None
    files = [f"{store.catalog}/{name}" for name in current.files] if current and "catalog" in named else []
    pieces = [f"{store.catalog}/{f}" for f in (current.similar.files if current and current.similar else [])] if "similar" in named else []
    if store.local and files + pieces:
        con.execute("SET allowed_paths = $files", {"files": files + pieces})
    if "catalog" in named:  # built only when asked for, as the others: a query of errors reads no catalog file
        parquet_view(con, store, "catalog", files)
    if "similar" in named:  # the neighbour lists (no rows before a snapshot has them); SIMILAR is reserved: SQL quotes it
        parquet_view(con, store, "similar", pieces)
    if "changes" in named:  # the published snapshot's change feed (no rows before the first one that has it)
        from genre_batch.publishing.catalog import CHANGES_SCHEMA

        feed = store.read_table(f"{store.catalog}/{current.changes}") if current and current.changes else CHANGES_SCHEMA.empty_table()
        con.register("changes_arrow", feed)
        con.execute("CREATE VIEW changes AS SELECT * FROM changes_arrow")
    if "errors" in named:
        from genre_batch.storage.feature_store import current_errors  # imported here: it loads the feature code (0.7 s per query)

        con.register("errors_arrow", current_errors(store))
        con.execute("CREATE VIEW errors AS SELECT * FROM errors_arrow")
    if "writes" in named:  # the write-back record (no rows before the first write-tags --apply)
        from genre_batch.library.writeback import read_writes

        con.register("writes_arrow", read_writes(store))
        con.execute("CREATE VIEW writes AS SELECT * FROM writes_arrow")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def parquet_view(con: duckdb.DuckDBPyConnection, store: Store, name: str, files: list[str]) -> None:
    """A view `name` (catalog or similar) of Parquet files of the store (of no rows, with the table's schema, when
    there are none)."""
    if store.local and files:
        con.read_parquet(files).create_view(name)
        return
    if not files:
        from genre_batch.publishing.catalog import CATALOG_SCHEMA, SIMILAR_SCHEMA

        table = {"catalog": CATALOG_SCHEMA, "similar": SIMILAR_SCHEMA}[name].empty_table()
    else:
        import pyarrow.dataset as ds  # imported here: it loads pandas where installed (0.4 s of every local query)

        table = ds.dataset(files, format="parquet", filesystem=store.fs)
    con.register(f"{name}_files", table)
    con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {name}_files')


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse any statement that is not a query (CREATE, INSERT, COPY, SET, ATTACH, INSTALL, ...), and more than one
    (only the last one's result would be printed)."""
    statements = con.extract_statements(sql)
    for statement in statements:
        kind = "INSTALL or LOAD" if statement.type.name == "LOAD" else statement.type.name
        if statement.type.name not in READ_ONLY:
            raise GenreBatchError(f"query refused: genre-batch query is read-only and runs only SELECT statements, not {kind}")
    if len(statements) > 1:
        raise GenreBatchError(f"query refused: give one statement, not {len(statements)} (run each with its own genre-batch query)")


def reserved_hint(error: duckdb.Error) -> str:
    """A hint for SQL that names the similar table unquoted (SIMILAR is a reserved word of DuckDB's grammar), else ''."""
    if isinstance(error, duckdb.ParserException) and 'near "similar"' in str(error).lower():
        return ' (SIMILAR is a reserved word in DuckDB: name the table as "similar", in double quotes)'
    return ""


def answer(store: Store, sql: str, collect: Callable[[duckdb.DuckDBPyRelation], Any]) -> Any:
    """Run one read-only SQL statement and `collect` its result."""
    try:
        con = connect(store, sql)
    except duckdb.Error as e:  # a damaged file of the snapshot (DuckDB's message names it)
        raise GenreBatchError(f"cannot read the published catalog: {str(e).splitlines()[0]}; see the README, Reliability") from None
    try:
        check_read_only(con, sql)
        return collect(con.sql(sql))
    except duckdb.Error as e:
        raise GenreBatchError(f"query failed: {str(e).splitlines()[0]}{reserved_hint(e)}") from None  # one line: no caret diagram
    finally:
        con.close()


def run(store: Store, sql: str) -> pa.Table:
    """Run read-only SQL and return its result as an Arrow table."""
    return answer(store, sql, lambda relation: relation.to_arrow_table())


def fetch(store: Store, sql: str) -> Result:
    """Run read-only SQL and return its result as Python values."""
    return answer(store, sql, lambda relation: Result(relation.columns, relation.fetchall()))


def plain(value: object) -> object:
    """A JSON-ready version of one DuckDB value: maps become objects, arrays lists, times ISO strings, NaN and infinities
    null (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def rows(result: Result) -> list[dict]:
    """Rows of a result as plain dicts."""
    return [dict(zip(result.columns, map(plain, row))) for row in result.rows]


def to_json(result: Result) -> str:
    """One JSON array of row objects (values JSON has no type for, such as decimals, as strings)."""
    return json.dumps(rows(result), ensure_ascii=False, default=str)


def arrow_plain(value: object) -> object:
    """A JSON-ready version of one cell of an Arrow result (its maps are lists of key-value pairs)."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return {k: arrow_plain(v) for k, v in value}
    if isinstance(value, list):
        return [arrow_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: arrow_plain(v) for k, v in value.items()}
    return plain(value)


def to_csv(table: pa.Table) -> str:
    """CSV with a header line; maps and lists are written as JSON."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    flat = pa.table(
        {
            name: pa.array([json.dumps(arrow_plain(v)) for v in col.to_pylist()])
            if pa.types.is_nested(col.type)
            else col
            for name, col in zip(table.column_names, table.columns)
        }
    )
    buf = io.BytesIO()
    pacsv.write_csv(flat, buf)
    return buf.getvalue().decode()
