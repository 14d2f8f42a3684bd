"""Moving a whole store to another database: SQLite to PostgreSQL (or back), ids and blobs kept.

``kiri-hub migrate-store`` brings both sides to the same schema (the source must already be at
head, the target is migrated to it and must hold nothing yet), copies every table in
foreign-key order in batches, primary keys included, in one transaction on the target, so a
failed copy leaves the target empty. PostgreSQL's id sequences are then moved past the copied
ids. Last, both sides are read again table by table in key order and compared by row count
and by a SHA-256 digest of every value, so the move is proven, not assumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kiri.hub.store import migrate as mig
from kiri.hub.store.schema import metadata

BATCH = 5_000


class MoveError(Exception):
    """The store cannot be moved as asked (the message says why and what to do)."""


@dataclass
class TableReport:
    table: str
    rows: int
    digest: str


def tables() -> list[sa.Table]:
    """Every table of the schema, parents before children."""
    return list(metadata.sorted_tables)


def _key(table: sa.Table) -> list[sa.Column[Any]]:
    return list(table.primary_key.columns)


def _batches(c: sa.Connection, table: sa.Table, size: int) -> Iterator[list[sa.Row]]:
    """The table's rows in primary-key order, ``size`` at a time (keyset paging, not OFFSET)."""
    key = _key(table)
    q = sa.select(table).order_by(*key)
    last: sa.Row | None = None
    while True:
        page = q
        if last is not None:
            page = q.where(sa.tuple_(*key) > sa.tuple_(*[last._mapping[k.name] for k in key]))
        rows = c.execute(page.limit(size)).all()
        if not rows:
            return
        yield rows
        last = rows[-1]


def _value(v: Any) -> bytes:
    """A value as the digest sees it: the same on either backend for what kiri stores."""
    if v is None:
        return b"\x00"
    if isinstance(v, bool):
        return b"b1" if v else b"b0"
    if isinstance(v, float):
        return b"f" + float.hex(v).encode()
    if isinstance(v, int):
        return b"i" + str(v).encode()
    if isinstance(v, bytes | memoryview):
        return b"x" + bytes(v)
    return b"s" + str(v).encode()


def digest(c: sa.Connection, table: sa.Table) -> TableReport:
    """Rows and a SHA-256 over every value of the table, in primary-key order."""
    h = hashlib.sha256()
    n = 0
    for rows in _batches(c, table, BATCH):
        for r in rows:
            for v in r:
                b = _value(v)
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
            n += 1
    return TableReport(table.name, n, h.hexdigest())


def _reset_sequences(c: sa.Connection) -> None:
    """After explicit ids, PostgreSQL's sequences must start past them."""
    if c.dialect.name != "postgresql":
        return
    for table in tables():
        key = _key(table)
        if len(key) != 1 or not isinstance(key[0].type, sa.Integer) or key[0].autoincrement not in (True, "auto"):
            continue
        col = key[0]
        seq = c.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": col.name}).scalar()
        if seq:
            c.execute(sa.text(f"SELECT setval('{seq}', (SELECT coalesce(max({col.name}), 0) + 1 "
                              f"FROM {table.name}), false)"))


def move(source: Engine, target: Engine, progress: Callable[[str, int], None] | None = None,
         batch: int = BATCH) -> list[TableReport]:
    """Copy every row of ``source`` into the empty ``target`` and verify; the per-table report."""
    head = mig.head_revision()
    if mig.current_revision(source) != head:
        raise MoveError(f"the source is at {mig.current_revision(source) or 'no schema'}, not at head {head}; "
                        "run `kiri-hub migrate --db SOURCE` first")
    mig.upgrade(target)
    with target.connect() as t:
        full = [tb.name for tb in tables() if t.execute(sa.select(sa.literal(1)).select_from(tb).limit(1)).first()]
    if full:
        raise MoveError(f"the target already holds data (in {', '.join(full)}); move into an empty database")
    with source.connect() as s, target.begin() as t:
        for table in tables():
            copied = 0
            for rows in _batches(s, table, batch):
                t.execute(table.insert(), [dict(r._mapping) for r in rows])
                copied += len(rows)
                if progress:
                    progress(table.name, copied)
        _reset_sequences(t)
    reports = []
    with source.connect() as s, target.connect() as t:
        for table in tables():
            a, b = digest(s, table), digest(t, table)
            if (a.rows, a.digest) != (b.rows, b.digest):
                raise MoveError(f"{table.name}: the copy differs from the source ({a.rows} rows, {a.digest[:12]} "
                                f"against {b.rows} rows, {b.digest[:12]}); the target is not to be used")
            reports.append(a)
    return reports
