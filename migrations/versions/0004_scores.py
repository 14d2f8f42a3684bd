"""Scores: one per observation and weights version, naming the weights.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scores",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("observation_id", sa.Integer, nullable=False),
        sa.Column("atom", sa.String(32), nullable=False),
        sa.Column("weights_id", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("anomalous", sa.Boolean, nullable=False),
        sa.Column("surprise", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.ForeignKeyConstraint(["observation_id"], ["observations.id"],
                                name=op.f("fk_scores_observation_id_observations"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["weights_id"], ["weights.id"], name=op.f("fk_scores_weights_id_weights")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scores")),
        sa.UniqueConstraint("observation_id", "weights_id", name=op.f("uq_scores_observation_id_weights_id")),
    )
    op.create_index("ix_scores_atom_observation_id", "scores", ["atom", "observation_id"])


def downgrade() -> None:
    op.drop_index("ix_scores_atom_observation_id", table_name="scores")
    op.drop_table("scores")
