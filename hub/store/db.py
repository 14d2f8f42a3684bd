"""Engine set-up: SQLite in WAL mode with writer transactions that take the lock up front.

pysqlite's default "deferred" transactions upgrade from a read to a write lock mid-way,
which is where "database is locked" comes from; BEGIN IMMEDIATE takes the write lock at
the start instead, so the only wait is the busy timeout and never a deadlock.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

# PostgreSQL advisory lock keys, all in one place so that no two ever share a number
# ("kiri" in hex, then a count). Hubs sharing a database coordinate through them.
LEADER_LOCK = 0x6B697269  # held (per session) by the hub doing the background upkeep (``peers.Listener``)
MIGRATION_LOCK = 0x6B697269_0001  # hubs starting together migrate one after another (``migrate``)
LIMITS_LOCK = 0x6B697269_0002  # leases of kinds with a concurrency limit, one hub at a time (``queue.lease``)
ALERTS_LOCK = 0x6B697269_0003  # one alert decision at a time: the cool-down holds (``decisions.insert``)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def is_sqlite(url: str | sa.URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def driver_url(url: str) -> str:
    """The URL with kiri's driver for its backend: a plain ``postgresql://`` (or Heroku-style
    ``postgres://``) means psycopg 3, which kiri installs, not SQLAlchemy's default psycopg2."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def backend(engine: Engine) -> str:
    """The database server and its version, as ``kiri-hub check`` and ``stats`` report it."""
    with engine.connect() as c:
        if engine.dialect.name == "sqlite":
            return f"SQLite {c.exec_driver_sql('SELECT sqlite_version()').scalar()}"
        if engine.dialect.name == "postgresql":
            return f"PostgreSQL {c.exec_driver_sql('SHOW server_version').scalar()}"
        return engine.dialect.name


def sqlite_path(url: str | sa.URL) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def make_engine(url: str, synchronous: Synchronous = "NORMAL", busy_timeout_ms: int = 10_000) -> Engine:
    """Create an engine; for SQLite, create the file's folder and configure WAL."""
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return _sqlite_engine(url, "BEGIN IMMEDIATE", [
            # First, while a new file is still empty: it then gives deleted pages back (retention
            # runs incremental_vacuum); an older file is converted once by ensure_incremental_vacuum.
            "PRAGMA auto_vacuum=INCREMENTAL",
            "PRAGMA journal_mode=WAL",
            f"PRAGMA synchronous={synchronous}",
            f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
            "PRAGMA foreign_keys=ON",
            # Keep the WAL file from staying huge after a burst; it is reset on checkpoint.
            "PRAGMA journal_size_limit=67108864",
        ])
    return sa.create_engine(url, pool_pre_ping=True)


def make_read_engine(url: str, busy_timeout_ms: int = 10_000) -> Engine:
    """An engine for readers: deferred transactions (a snapshot, no write lock) that cannot write."""
    if not is_sqlite(url):
        return sa.create_engine(url, pool_pre_ping=True, execution_options={"postgresql_readonly": True})
    return _sqlite_engine(url, "BEGIN", [f"PRAGMA busy_timeout={int(busy_timeout_ms)}", "PRAGMA query_only=1"])


def _sqlite_engine(url: str, begin: str, pragmas: list[str]) -> Engine:
    """A SQLite engine whose connections run ``pragmas`` and whose transactions start with ``begin``."""
    engine = sa.create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Take transaction control away from pysqlite so the BEGIN is ours.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in pragmas:
            cur.execute(pragma)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql(begin)

    return engine


def as_dict(row: sa.Row) -> dict[str, Any]:
    """A row as a plain dict (SQLAlchemy's key type is a str subclass orjson refuses)."""
    return {str(k): v for k, v in row._mapping.items()}


def redact(url: str) -> str:
    """The URL with any password hidden, for logs and ``stats``."""
    return make_url(url).render_as_string(hide_password=True)


def wal_checkpoint(conn: sa.Connection, mode: str = "TRUNCATE", busy_timeout_ms: int | None = None
                   ) -> tuple[int, int, int] | None:
    """Run a WAL checkpoint outside any transaction: (busy, wal pages, checkpointed pages).

    None on non-SQLite backends.
    """
    if conn.dialect.name != "sqlite" or conn.in_transaction():
        return None
    # Straight to the driver: SQLAlchemy would open a transaction first, and a
    # checkpoint inside a transaction cannot reset the WAL.
    raw = conn.connection.dbapi_connection
    if busy_timeout_ms is None:
        row = raw.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    else:
        old = raw.execute("PRAGMA busy_timeout").fetchone()[0]
        raw.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        try:
            row = raw.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            raw.execute(f"PRAGMA busy_timeout={int(old)}")
    return (int(row[0]), int(row[1]), int(row[2])) if row else None


def file_sizes(url: str) -> dict[str, int]:
    """Sizes of the database file and its WAL, for stats and metrics."""
    path = sqlite_path(url)
    if path is None:
        return {}
    out = {}
    for name, p in (("db_bytes", path), ("wal_bytes", Path(str(path) + "-wal"))):
        try:
            out[name] = os.stat(p).st_size
        except FileNotFoundError:
            out[name] = 0
    return out


def ensure_incremental_vacuum(engine: Engine) -> bool:
    """Switch an older SQLite file to incremental auto-vacuum (one full VACUUM, logged);
    True if it converted. Without it, space freed by retention is reused but never returned."""
    if engine.dialect.name != "sqlite":
        return False
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        if raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            conn.rollback()
            return False
        path = sqlite_path(engine.url)
        size = os.stat(path).st_size if path is not None and path.exists() else 0
        log.warning("converting the database to incremental vacuum, once (%.0f MiB; a minute per few GiB)",
                    size / (1 << 20))
        raw.execute("PRAGMA auto_vacuum=INCREMENTAL")
        raw.execute("VACUUM")
        conn.rollback()
    return True


def incremental_vacuum(conn: sa.Connection, pages: int) -> int:
    """Give up to ``pages`` free pages back to the file system, in a transaction of its own
    (call it between transactions); returns how many pages remain free.

    Through ``executescript``: a plain ``execute`` steps the pragma once, and so frees one page.
    """
    if conn.dialect.name != "sqlite" or conn.in_transaction():
        return 0
    raw = conn.connection.dbapi_connection
    if raw.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # type: ignore[union-attr]
        return 0
    raw.executescript(f"PRAGMA incremental_vacuum({int(pages)});")  # type: ignore[union-attr]
    return int(raw.execute("PRAGMA freelist_count").fetchone()[0])  # type: ignore[union-attr]
