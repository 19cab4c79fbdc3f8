"""A Core `select` run straight on the driver's connection: the API's polled reads
(core/job_reads.py), where SQLAlchemy's per-statement machinery cost more than the query.

Measured in process on one job row (BENCHMARKS.md, "API hot path"): SQLAlchemy's `execute`
re-reads the cursor's description on every statement (psycopg builds 26 column objects each
time) and sets up a result object; on SQLite that is two thirds of a primary-key lookup, on
PostgreSQL about 120 us of 320. Here the statement is compiled once per dialect by
SQLAlchemy, its bound values and result values go through SQLAlchemy's own type processors
(the same conversions `execute` applies: SQLite's datetime strings and JSON text), and rows
come back as named tuples with the columns as attributes. (NULL is None without a call: as
every SQLAlchemy processor maps it.)

Errors: a driver error is never answered from here. The statement runs again through
`Connection.execute`, which raises SQLAlchemy's wrapped error and invalidates a connection
the server dropped, exactly as before (a read, so running it twice is harmless).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from sqlalchemy import Connection, Select
from sqlalchemy.engine import Dialect

Processor = Callable[[Any], Any] | None


class _Compiled(NamedTuple):
    sql: str
    order: tuple[str, ...] | None  # the bound names in order (positional drivers), else None
    binds: dict[str, Processor]
    row: type


class LeanSelect:
    """`rows(conn, params)` / `first(...)` / `scalar(...)` of one statement, as
    `conn.execute(statement, params)` would give them, for a fraction of the cost."""

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, str], _Compiled] = {}
        self._results: dict[tuple[str, str], list[Processor]] = {}

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self.statement.compile(dialect=dialect)
        binds: dict[str, Processor] = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in compiled.binds.items()
        }
        order = tuple(compiled.positiontup or ()) if compiled.positional else None
        names = [str(c.key) for c in self.statement.selected_columns]
        row = namedtuple("LeanRow", names, rename=True)  # type: ignore[misc]
        return _Compiled(str(compiled), order, binds, row)

    def _processors(self, dialect: Dialect, description: Any) -> list[Processor]:
        return [
            column.type.dialect_impl(dialect).result_processor(dialect, desc[1])
            for column, desc in zip(self.statement.selected_columns, description, strict=True)
        ]

    def _bind(self, dialect: Dialect, params: Mapping[str, Any]) -> tuple[_Compiled, Any]:
        key = (dialect.name, dialect.driver)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(dialect)
        values = {
            name: (process(params[name]) if process else params[name])
            for name, process in compiled.binds.items()
        }
        return compiled, values if compiled.order is None else [values[n] for n in compiled.order]

    def _make(self, dialect: Dialect, compiled: _Compiled, fetched: Any, cursor: Any) -> list[Any]:
        key = (dialect.name, dialect.driver)
        processors = self._results.get(key)
        if processors is None:
            processors = self._results[key] = self._processors(dialect, cursor.description)
        make = compiled.row
        if not any(processors):
            return [make(*values) for values in fetched]
        return [
            make(
                *[
                    (v if p is None or v is None else p(v))
                    for p, v in zip(processors, values, strict=True)
                ]
            )
            for values in fetched
        ]

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        dialect = conn.dialect
        compiled, bound = self._bind(dialect, params)
        dbapi = conn.connection.driver_connection
        try:
            cursor = dbapi.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(compiled.sql, bound)
                return self._make(dialect, compiled, cursor.fetchall(), cursor)
            finally:
                cursor.close()
        except dialect.loaded_dbapi.Error:
            # SQLAlchemy's own path: its wrapped error, a dropped connection invalidated.
            return list(conn.execute(self.statement, dict(params)).all())

    async def rows_async(self, conn: Any, dialect: Dialect, params: Mapping[str, Any]) -> list[Any]:
        """The same on an async driver connection (psycopg's `AsyncConnection`) of the
        dialect's driver; its errors are the caller's (core/async_reads.py)."""
        compiled, bound = self._bind(dialect, params)
        async with conn.cursor() as cursor:
            await cursor.execute(compiled.sql, bound)
            return self._make(dialect, compiled, await cursor.fetchall(), cursor)

    def first(self, conn: Connection, params: Mapping[str, Any]) -> Any | None:
        rows = self.rows(conn, params)
        return rows[0] if rows else None

    def scalar(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        row = self.first(conn, params)
        return None if row is None else row[0]
