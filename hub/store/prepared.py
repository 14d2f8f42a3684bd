"""Hot-path statements: built with SQLAlchemy Core, compiled once, run on the driver cursor.

SQLAlchemy's per-execute machinery (context set-up, result proxies, events) costs ~40-60 µs
on this machine against ~5 µs for sqlite3 itself, and the lease/ack/enqueue path runs
several statements per task. The SQL text and parameter order still come from Core, so
the schema stays in one place; only the execution skips the middle layer. On PostgreSQL
the same holds against psycopg (about 50 µs of SQLAlchemy on a 30 µs round trip), so its
statements take the driver's cursor too; other backends take SQLAlchemy's normal path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.compiler import SQLCompiler

from kiri.hub.store.db import as_dict


def compile_for_driver(stmt: sa.Executable, dialect: sa.Dialect) -> tuple[str, list[str], dict[str, Any], list[str]]:
    """SQL text, positional parameter names, constant parameters and result column names.

    The one adapter over SQLAlchemy's compiler internals (``positiontup``, ``binds``,
    ``_result_columns``): if an upgrade changes them, ``tests/test_prepared.py`` fails here
    and nowhere else, by comparing every hot-path statement with SQLAlchemy's own execution.
    """
    compiled = stmt.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler) and compiled.positiontup is not None
    names = list(compiled.positiontup)
    consts = {n: b.effective_value for n, b in compiled.binds.items() if n in names and not b.required}
    result_columns = getattr(compiled, "_result_columns", None)
    columns = [str(c[0]) for c in result_columns] if result_columns else []
    return compiled.string, names, consts, columns


def compile_for_pyformat(stmt: sa.Executable, dialect: sa.Dialect) -> tuple[str, dict[str, Any], list[str]] | None:
    """For a named-parameter driver (psycopg): SQL text, constant parameters and result column
    names; None when the statement needs SQLAlchemy at run time (an expanding IN list)."""
    compiled = stmt.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    if "POSTCOMPILE" in compiled.string:
        return None
    consts = {n: b.effective_value for n, b in compiled.binds.items() if not b.required}
    result_columns = getattr(compiled, "_result_columns", None)
    columns = [str(c[0]) for c in result_columns] if result_columns else []
    return compiled.string, consts, columns


_NOT_COMPILED: Any = object()


def _run_on(cur: Any, sql: str, args: Any, columns: list[str]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Execute on a driver cursor; the column names and every row. A statement whose result
    columns the compiler knew is fetched at once: psycopg builds ``description`` anew on each
    read (~10% of a PostgreSQL hub's time on the ack path)."""
    cur.execute(sql, args)
    if columns:
        return columns, cur.fetchall()
    if cur.description is None:
        return [], []
    return [d[0] for d in cur.description], cur.fetchall()


def _pg_cursor(conn: sa.Connection) -> Any:
    """psycopg: one cursor per connection, kept (a new one costs ~5 µs a statement)."""
    cur = conn.info.get("kiri.cursor")
    if cur is None:
        cur = conn.info["kiri.cursor"] = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    return cur


class Prepared:
    def __init__(self, stmt: sa.Executable) -> None:
        self.stmt = stmt
        self._sqlite: tuple[str, list[str], dict[str, Any], list[str]] | None = None
        self._pg: tuple[str, dict[str, Any], list[str]] | None = _NOT_COMPILED

    def _compile_sqlite(self, conn: sa.Connection) -> tuple[str, list[str], dict[str, Any], list[str]]:
        self._sqlite = compile_for_driver(self.stmt, conn.dialect)
        return self._sqlite

    def _pg_parts(self, conn: sa.Connection) -> tuple[str, dict[str, Any], list[str]] | None:
        """The statement compiled for psycopg (on first use); None where SQLAlchemy must run it."""
        if self._pg is _NOT_COMPILED:
            self._pg = compile_for_pyformat(self.stmt, conn.dialect)
        return self._pg

    def _driver(self, conn: sa.Connection, params: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]] | None:
        """Column names and rows straight from the driver's cursor (sqlite3 or psycopg); None
        where SQLAlchemy must run the statement (another backend, an expanding IN list)."""
        backend = conn.dialect.name
        if backend == "postgresql":
            parts = self._pg_parts(conn)
            if parts is None:
                return None
            sql, consts, columns = parts
            return _run_on(_pg_cursor(conn), sql, {**consts, **params}, columns)
        if backend != "sqlite":
            return None
        sql, names, consts, columns = self._sqlite or self._compile_sqlite(conn)
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            return _run_on(cur, sql, [params[n] if n in params else consts[n] for n in names], columns)
        finally:
            cur.close()

    def rows(self, conn: sa.Connection, params: dict[str, Any]) -> list[dict[str, Any]]:
        got = self._driver(conn, params)
        if got is None:
            res = conn.execute(self.stmt, params)  # an UPDATE without RETURNING has no rows to iterate
            return [as_dict(r) for r in res] if res.returns_rows else []
        cols, rows = got
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def tuples(self, conn: sa.Connection, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Rows as plain tuples in the statement's column order: the cheapest way to read many."""
        got = self._driver(conn, params)
        if got is None:
            res = conn.execute(self.stmt, params)
            return [tuple(r) for r in res] if res.returns_rows else []
        return got[1]

    def each(self, conn: sa.Connection, params: list[dict[str, Any]]) -> list[list[tuple[Any, ...]]]:
        """Run the statement once per parameter set, in order; each run's rows. On psycopg
        this is ``executemany(returning=True)``, which pipelines the runs: one round trip
        for all of them instead of one each (about 25 against 130 µs a row here). Elsewhere,
        one run after another."""
        parts = self._pg_parts(conn) if conn.dialect.name == "postgresql" and len(params) > 1 else None
        if parts is None:
            return [self.tuples(conn, p) for p in params]
        sql, consts, _columns = parts
        cur = _pg_cursor(conn)
        cur.executemany(sql, [{**consts, **p} for p in params], returning=True)
        out: list[list[tuple[Any, ...]]] = []
        while True:
            out.append(cur.fetchall() if cur.description is not None else [])
            if not cur.nextset():
                return out

    def first(self, conn: sa.Connection, params: dict[str, Any]) -> dict[str, Any] | None:
        rows = self.rows(conn, params)
        return rows[0] if rows else None

    def run(self, conn: sa.Connection, params: dict[str, Any]) -> None:
        self.rows(conn, params)


def one_range(ids: Sequence[int]) -> bool:
    """Whether ``ids`` are close enough to read as one range (a batch's ids are usually a
    run); scattered ones go as lists, as a range over them could read far more rows than
    asked for."""
    return max(ids) - min(ids) < 4 * len(ids)


def by_ids(c: sa.Connection, in_range: Prepared, cols: list[sa.ColumnElement[Any]], key: sa.ColumnElement[int],
           ids: list[int], **where: Any) -> list[tuple[Any, ...]]:
    """Rows whose ``key`` is one of ``ids`` (others may come too: the caller filters): as one
    range (``in_range``, bound by lo and hi, on the driver's cursor) or as lists, as
    ``one_range`` decides. ``where``: further equalities, bound in ``in_range`` by name."""
    if one_range(ids):
        return in_range.tuples(c, {"lo": min(ids), "hi": max(ids), **where})
    out: list[tuple[Any, ...]] = []
    # "+ 0": not an index of its own, so the key's range stays the index SQLite uses
    extra = [getattr(key.table.c, k) + sa.literal_column("0") == v  # type: ignore[attr-defined]
             for k, v in where.items()]
    for k in range(0, len(ids), 900):
        out.extend(tuple(r) for r in c.execute(sa.select(*cols).where(key.in_(ids[k:k + 900]), *extra)))
    return out


class ListStatement:
    """A hot statement with one list parameter (``:ids``, matched by ``member(col)``) bound
    as a single value, whatever the list's length: a JSON array read by ``json_each`` on
    SQLite, an array on PostgreSQL. SQLAlchemy's own ``in_(list)`` renders one placeholder
    per item and builds the expression, a cache key and the SQL again for every list, which
    was most of the hub's time in retention's folds (a 900-id delete per chunk). The
    statement is built once per backend (``build(member)``) and runs on the driver cursor."""

    def __init__(self, build: Callable[[Callable[[sa.ColumnElement[Any]], sa.ColumnElement[bool]]], sa.Executable]
                 ) -> None:
        self.build = build
        self._by_backend: dict[str, Prepared] = {}

    @staticmethod
    def _member(backend: str) -> Callable[[sa.ColumnElement[Any]], sa.ColumnElement[bool]]:
        if backend == "postgresql":
            return lambda col: col == sa.any_(sa.bindparam("ids", type_=ARRAY(col.type)))
        return lambda col: col.in_(sa.select(sa.literal_column("value")).select_from(
            sa.func.json_each(sa.bindparam("ids", type_=sa.String))).scalar_subquery())

    def _prepared(self, conn: sa.Connection) -> Prepared:
        backend = conn.dialect.name
        got = self._by_backend.get(backend)
        if got is None:
            got = self._by_backend[backend] = Prepared(self.build(self._member(backend)))
        return got

    def _args(self, conn: sa.Connection, ids: Sequence[Any], params: dict[str, Any]) -> dict[str, Any]:
        bound = list(ids) if conn.dialect.name == "postgresql" else orjson.dumps(list(ids)).decode()
        return {**params, "ids": bound}

    def tuples(self, conn: sa.Connection, ids: Sequence[Any], **params: Any) -> list[tuple[Any, ...]]:
        return self._prepared(conn).tuples(conn, self._args(conn, ids, params))

    def run(self, conn: sa.Connection, ids: Sequence[Any], **params: Any) -> None:
        self._prepared(conn).run(conn, self._args(conn, ids, params))
