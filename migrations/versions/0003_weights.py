"""Weights versions with lineage and one active version per atom.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "weights",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("atom", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("info", sa.Text, nullable=False),
        sa.Column("task_id", sa.Integer, nullable=True),
        sa.Column("parent_id", sa.Integer, nullable=True),
        sa.Column("obs_from", sa.Integer, nullable=True),
        sa.Column("obs_to", sa.Integer, nullable=True),
        sa.Column("loss", sa.Float, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("activated_at", sa.Float, nullable=True),
        sa.CheckConstraint("status IN ('active', 'inactive', 'rejected')", name=op.f("ck_weights_status")),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_weights_task_id_tasks"),
                                ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["parent_id"], ["weights.id"], name=op.f("fk_weights_parent_id_weights"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_weights")),
        sa.UniqueConstraint("atom", "version", name=op.f("uq_weights_atom_version")),
        sa.UniqueConstraint("task_id", name=op.f("uq_weights_task_id")),
    )
    op.create_index("ix_weights_active", "weights", ["atom"], unique=True,
                    sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))


def downgrade() -> None:
    op.drop_index("ix_weights_active", table_name="weights")
    op.drop_table("weights")
