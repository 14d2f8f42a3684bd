"""Scores carry a calibrated tail probability.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

``tail_p`` is P(normal data looks at least this unusual) under the calibration of the
weights that scored it; NULL for scores made by weights from before calibration (their
verdict stays ``score > threshold``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        batch.add_column(sa.Column("tail_p", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        batch.drop_column("tail_p")
