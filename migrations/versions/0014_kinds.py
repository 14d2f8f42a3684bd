"""Per-kind settings (pause, concurrency limit, default deadline) and a task's own deadline.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30

Users of Faktory, Celery and Oban expect to pause a kind of job, cap how many of it run at
once, and stop a job that runs past its time. The lease reads `kinds` for the kinds it is
asked for; a task's `deadline` (seconds per attempt) overrides its kind's default.
Existing tasks get no deadline and existing kinds no settings: nothing changes until set.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "kinds",
        sa.Column("kind", sa.String(64), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("concurrency", sa.Integer, nullable=True),
        sa.Column("deadline", sa.Float, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.add_column("tasks", sa.Column("deadline", sa.Float, nullable=True))  # no table rewrite


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("deadline")
    op.drop_table("kinds")
