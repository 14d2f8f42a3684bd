"""Bulk imports are staged a chunk to a row, not a reading to a row.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30

A staged reading was written three times: inserted into `staged_observations` (with its
index), copied into `observations`, and deleted. At a year of history that bookkeeping was
most of an import's time on the hub (about 40% of it, py-spy). A chunk of a few thousand
checked readings is now one row, its columns as one JSON payload, and the commit writes each
reading once. Readings staged before this upgrade are regrouped into chunks of the same
import, in the same order, so they can still be committed or expire.
"""

from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 5_000


def upgrade() -> None:
    op.create_table(
        "staged_chunks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("import_id", sa.String(64), nullable=False),
        sa.Column("atom", sa.String(32), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_staged_chunks_import_id", "staged_chunks", ["import_id", "id"])
    c = op.get_bind()
    chunk: list[sa.Row] = []

    def flush() -> None:
        c.execute(sa.text("INSERT INTO staged_chunks (import_id, atom, n, payload, created_at) "
                          "VALUES (:i, :a, :n, :p, :at)"),
                  {"i": chunk[0].import_id, "a": chunk[0].atom, "n": len(chunk), "at": chunk[-1].created_at,
                   "p": orjson.dumps({"ts": [r.ts for r in chunk], "host": [r.host for r in chunk],
                                      "data": [r.data for r in chunk]})})
        chunk.clear()

    rows = c.execute(sa.text("SELECT import_id, atom, ts, host, data, created_at FROM staged_observations "
                             "ORDER BY import_id, id"))
    for r in rows:
        if chunk and (len(chunk) >= _CHUNK or (r.import_id, r.atom) != (chunk[0].import_id, chunk[0].atom)):
            flush()
        chunk.append(r)
    if chunk:
        flush()
    op.drop_index("ix_staged_observations_import_id", "staged_observations")
    op.drop_table("staged_observations")


def downgrade() -> None:
    op.create_table(
        "staged_observations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("import_id", sa.String(64), nullable=False),
        sa.Column("atom", sa.String(32), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_staged_observations_import_id", "staged_observations", ["import_id", "id"])
    c = op.get_bind()
    for r in c.execute(sa.text("SELECT import_id, atom, payload, created_at FROM staged_chunks ORDER BY id")).all():
        cols = orjson.loads(r.payload)
        hosts = cols["host"] or [None] * len(cols["ts"])
        c.execute(sa.text("INSERT INTO staged_observations (import_id, atom, ts, host, data, created_at) "
                          "VALUES (:i, :a, :t, :h, :d, :at)"),
                  [{"i": r.import_id, "a": r.atom, "t": t, "h": h, "d": d, "at": r.created_at}
                   for t, h, d in zip(cols["ts"], hosts, cols["data"], strict=True)])
    op.drop_index("ix_staged_chunks_import_id", "staged_chunks")
    op.drop_table("staged_chunks")
