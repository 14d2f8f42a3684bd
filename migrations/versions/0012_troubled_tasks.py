"""An index of the tasks that stumbled (a failure or an expired lease), for /metrics.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29

/metrics sums failures and expiries per kind; with a week of finished tasks kept that was a
scan of every task row on each scrape. Tasks that never stumbled are the great majority,
and this partial index leaves them out.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_tasks_troubled", "tasks", ["kind", "failures", "expiries"],
                    sqlite_where=sa.text("failures > 0 OR expiries > 0"),
                    postgresql_where=sa.text("failures > 0 OR expiries > 0"))


def downgrade() -> None:
    op.drop_index("ix_tasks_troubled", "tasks")
