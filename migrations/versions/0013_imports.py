"""Bulk imports tracked from their first chunk; their commits move in bounded steps.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29

A year of ten hosts is millions of staged rows; moving them in one transaction stalled the
queue for over a minute and outlasted the client's timeout. Each import now has a row here:
what it staged and when it last sent (an import idle for an hour is dropped, without a walk
over the staging table), and once committed, how far its rows have moved (the commit's
durable intent: a restarted hub finishes it). Imports staged before this upgrade get their
row from the staging table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "imports",
        sa.Column("import_id", sa.String(64), primary_key=True),
        sa.Column("staged", sa.Integer, nullable=False),
        sa.Column("last_at", sa.Float, nullable=False),
        sa.Column("committed_at", sa.Float, nullable=True),
        sa.Column("stored", sa.Integer, nullable=False),
        sa.Column("first_id", sa.Integer, nullable=True),
        sa.Column("last_id", sa.Integer, nullable=True),
        sa.Column("atoms", sa.Text, nullable=False),
        sa.Column("done_at", sa.Float, nullable=True),
    )
    op.execute("INSERT INTO imports (import_id, staged, last_at, stored, atoms) "
               "SELECT import_id, count(*), max(created_at), 0, '[]' FROM staged_observations GROUP BY import_id")


def downgrade() -> None:
    op.drop_table("imports")
