"""Each agent row names the hub its connection is on.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30

Several hubs may share one PostgreSQL database. An agent's row said `connected` but not
where, so an agent whose hub died stayed listed as connected for ever (no other hub could
tell it was not its own), and a hub that stopped cleanly marked every hub's agents
disconnected. With the hub named, a hub marks only its own agents, and the hub doing the
upkeep marks the agents of hubs that are gone (`peers.forget_gone`). Existing rows have
no hub: the next connection of each agent fills it in.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("agents", sa.Column("hub", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("hub")
