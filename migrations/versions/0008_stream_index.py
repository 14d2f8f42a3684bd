"""An index for streams: an atom's observations per host, in time order.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

A stream is (atom, host). Scoring reads each host's readings before and between the ones it
scores (``scoring.stream_context``), and the learning period counts a host's readings;
without this index both walk every host's rows of the atom.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_observations_atom_host_ts", "observations", ["atom", "host", "ts"])


def downgrade() -> None:
    op.drop_index("ix_observations_atom_host_ts", table_name="observations")
