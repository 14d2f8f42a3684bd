"""Totals of finished tasks that retention has pruned.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29

Finished tasks older than the retention window are deleted in bounded batches; their counts
move here in the same transaction, so totals and Prometheus counters never go backwards.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_totals",
        sa.Column("kind", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("expiries", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("task_totals")
