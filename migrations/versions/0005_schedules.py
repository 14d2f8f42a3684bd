"""Schedules: periodic tasks fired by the hub.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("atom", sa.String(64), nullable=True),
        sa.Column("params", sa.Text, nullable=False, server_default="{}"),
        sa.Column("every", sa.Float, nullable=False),
        sa.Column("next_run", sa.Float, nullable=False),
        sa.Column("last_run", sa.Float, nullable=True),
        sa.Column("last_task_id", sa.Integer, nullable=True),
        sa.Column("fired", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint("kind", "atom", name=op.f("uq_schedules_kind_atom")),
    )
    op.create_index("ix_schedules_next_run", "schedules", ["next_run"])


def downgrade() -> None:
    op.drop_index("ix_schedules_next_run", table_name="schedules")
    op.drop_table("schedules")
