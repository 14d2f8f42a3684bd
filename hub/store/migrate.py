"""Schema management through Alembic: upgrade to head, downgrade, and drift checks."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import kiri.migrations
from kiri.hub.store.db import MIGRATION_LOCK
from kiri.hub.store.schema import metadata


def alembic_config(url: str, connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(kiri.migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    with engine.connect() as conn:
        shared = conn.dialect.name == "postgresql"
        if shared:  # the second hub waits, then finds the schema at head and does nothing
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
        try:
            command.upgrade(alembic_config(str(engine.url), conn), revision)
            conn.commit()
        finally:
            if shared:
                conn.rollback()
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                conn.commit()


def downgrade(engine: sa.Engine, revision: str) -> None:
    with engine.connect() as conn:
        command.downgrade(alembic_config(str(engine.url), conn), revision)
        conn.commit()


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None, "no migration versions found"
    return head


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        conn.rollback()
    return rev


def drift(engine: sa.Engine) -> list:
    """Differences between the live schema and the code's metadata (empty = no drift)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(ctx, metadata)
        conn.rollback()
    return diffs
