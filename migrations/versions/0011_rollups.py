"""Rollups: 5-minute, hourly and daily aggregates per stream, and the buckets to recompute.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29

Every 5-minute bucket that already holds readings is marked dirty, so the hub computes the
rollups of an existing history in the background after the upgrade (charts are exact
meanwhile: they compute dirty buckets on the fly). Also the indexes retention walks: scores
by weights version, finished tasks by finish time, decisions by reading.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollups",
        sa.Column("atom", sa.String(32), primary_key=True),
        sa.Column("host", sa.String(200), primary_key=True),
        sa.Column("tier", sa.Integer, primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("stats", sa.LargeBinary, nullable=False),
        sa.Column("folded", sa.LargeBinary, nullable=True),
    )
    op.create_table(
        "rollup_dirty",
        sa.Column("atom", sa.String(32), primary_key=True),
        sa.Column("host", sa.String(200), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
    )
    op.execute("INSERT INTO rollup_dirty (atom, host, bucket) "
               "SELECT DISTINCT atom, coalesce(host, ''), CAST(floor(ts / 300) AS BIGINT) FROM observations")
    op.create_index("ix_scores_weights_id", "scores", ["weights_id"])
    op.create_index("ix_tasks_finished_at", "tasks", ["finished_at"], sqlite_where=sa.text("finished_at IS NOT NULL"),
                    postgresql_where=sa.text("finished_at IS NOT NULL"))
    op.create_index("ix_decisions_observation_id", "decisions", ["observation_id"])


def downgrade() -> None:
    op.drop_index("ix_decisions_observation_id", "decisions")
    op.drop_index("ix_tasks_finished_at", "tasks")
    op.drop_index("ix_scores_weights_id", "scores")
    op.drop_table("rollup_dirty")
    op.drop_table("rollups")
