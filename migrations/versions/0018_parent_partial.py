"""The tasks' parent index holds only tasks that have a parent.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01

Children (``--parent``) are rare; every other task's row put a NULL entry in
``ix_tasks_parent_id``. On PostgreSQL a task's row is written three times (enqueued, leased,
finished) and none of these updates can be HOT (each changes an indexed column), so each
write added an entry to every index: three dead NULL entries per task in an index nobody
reads them from. Lookups by parent (``parent_id = ?``) imply a parent and use the partial
index as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_tasks_parent_id", table_name="tasks")
    op.create_index("ix_tasks_parent_id", "tasks", ["parent_id"],
                    sqlite_where=sa.text("parent_id IS NOT NULL"), postgresql_where=sa.text("parent_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_tasks_parent_id", table_name="tasks")
    op.create_index("ix_tasks_parent_id", "tasks", ["parent_id"])
