"""The schema comes only from migrations, and they reproduce the code's metadata exactly."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import sqlalchemy as sa

from kiri.hub.store import migrate
from kiri.hub.store.db import make_engine
from kiri.hub.store.schema import metadata


def _tables(path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    finally:
        con.close()


def test_upgrade_from_empty_matches_metadata_and_downgrade_empties(tmp_path):
    path = tmp_path / "m.db"
    engine = make_engine(f"sqlite:///{path}")
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert migrate.drift(engine) == []
    assert set(metadata.tables) <= _tables(path)
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None
    assert _tables(path) <= {"alembic_version"}
    migrate.upgrade(engine)  # and back up again
    assert migrate.drift(engine) == []
    engine.dispose()


def test_drift_is_detected(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    migrate.upgrade(engine)
    with engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE tasks ADD COLUMN rogue INTEGER")
    diffs = migrate.drift(engine)
    assert any("rogue" in str(d) for d in diffs)
    engine.dispose()


def test_database_is_wal(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    migrate.upgrade(engine)
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_cli_migrate_and_check(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run = [sys.executable, "-m", "kiri.hub.cli"]
    out = subprocess.run([*run, "check", "--db", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "kiri-hub migrate" in out.stdout
    out = subprocess.run([*run, "migrate", "--db", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*run, "check", "--db", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "no drift" in out.stdout
    out = subprocess.run([*run, "migrate", "--db", url, "--revision", "base"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    engine = sa.create_engine(url)
    assert sa.inspect(engine).get_table_names() == ["alembic_version"]
