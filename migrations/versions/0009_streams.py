"""Streams: per atom and host, how many readings, over what span, and the latest one.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

Filled from the observations already stored; from then on the hub keeps it up to date in
the transaction that stores readings (``observations.note_stored``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "streams",
        sa.Column("atom", sa.String(32), primary_key=True),
        sa.Column("host", sa.String(200), primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("first_ts", sa.Float, nullable=False),
        sa.Column("last_ts", sa.Float, nullable=False),
        sa.Column("last_id", sa.Integer, nullable=False),
    )
    op.execute("INSERT INTO streams (atom, host, n, first_ts, last_ts, last_id) "
               "SELECT atom, coalesce(host, ''), count(*), min(ts), max(ts), 0 FROM observations "
               "GROUP BY atom, coalesce(host, '')")
    op.execute("UPDATE streams SET last_id = (SELECT o.id FROM observations o WHERE o.atom = streams.atom "
               "AND (o.host = streams.host OR (streams.host = '' AND o.host IS NULL)) "
               "ORDER BY o.ts DESC, o.id DESC LIMIT 1)")


def downgrade() -> None:
    op.drop_table("streams")
