"""Observations, staged bulk imports, and user-defined atoms.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "atoms",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("schema", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_atoms")),
    )
    op.create_table(
        "observations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("atom", sa.String(32), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_observations")),
    )
    op.create_index("ix_observations_atom_id", "observations", ["atom", "id"])
    op.create_index("ix_observations_atom_ts", "observations", ["atom", "ts"])
    op.create_table(
        "staged_observations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("import_id", sa.String(64), nullable=False),
        sa.Column("atom", sa.String(32), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staged_observations")),
    )
    op.create_index("ix_staged_observations_import_id", "staged_observations", ["import_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_staged_observations_import_id", table_name="staged_observations")
    op.drop_table("staged_observations")
    op.drop_index("ix_observations_atom_ts", table_name="observations")
    op.drop_index("ix_observations_atom_id", table_name="observations")
    op.drop_table("observations")
    op.drop_table("atoms")
