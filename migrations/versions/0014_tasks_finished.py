"""Tasks by when they finished: throughput over the last hour without a walk over history.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29

`kiri stats`, the status API and /metrics report, per kind, the tasks completed in the last
hour, their mean and 95th-percentile duration and the error rate. A year of 30 s collection
and scoring holds millions of finished tasks; this index reads only the last hour's.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_tasks_finished", "tasks", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_finished", table_name="tasks")
