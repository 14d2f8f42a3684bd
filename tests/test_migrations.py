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


def test_db_takes_a_plain_path_and_refuses_what_is_neither_path_nor_url(tmp_path):
    run = [sys.executable, "-m", "kiri.hub.cli"]
    out = subprocess.run([*run, "migrate", "--db", "plain.db"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "plain.db").exists() and f"sqlite:///{tmp_path / 'plain.db'}" in out.stdout
    out = subprocess.run([*run, "check", "--db", str(tmp_path / "plain.db")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "no drift" in out.stdout
    for bad, says in ((str(tmp_path / "missing" / "x.db"), "does not exist"), (str(tmp_path), "is a folder"),
                      ("postgresql+psycopg://u:secret@:::x", "not a database URL"),
                      ("nosuchdb://a@b/c", "no database driver")):
        out = subprocess.run([*run, "check", "--db", bad], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert "secret" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.db", "plain.db.lock"]


def _brute_streams(c: sa.Connection) -> set[tuple]:
    """Streams computed from scratch: per atom and host, count, first and last time, latest id."""
    rows = c.exec_driver_sql("SELECT atom, coalesce(host, ''), count(*), min(ts), max(ts) FROM observations "
                             "GROUP BY atom, coalesce(host, '')").all()
    out = set()
    for atom, host, n, first, last in rows:
        (latest,) = c.exec_driver_sql(
            "SELECT id FROM observations WHERE atom = ? AND coalesce(host, '') = ? ORDER BY ts DESC, id DESC LIMIT 1",
            (atom, host)).one()
        out.add((atom, host, n, first, last, latest))
    return out


def test_streams_are_filled_from_an_existing_database_and_kept_equal_to_brute_force(tmp_path):
    import random

    from kiri.hub.watch import observations as obs

    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    migrate.upgrade(engine, "0008")  # a database from before streams, with data
    rng = random.Random(4)

    def rows(n: int, newest: int = 50) -> list[dict]:
        return [{"atom": rng.choice(["pulse", "rhythm"]), "ts": float(rng.randint(0, newest)),
                 "host": rng.choice([None, "a", "b"]), "data": "{}", "created_at": 1.0} for _ in range(n)]

    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO observations (atom, ts, host, data, created_at) "
                          "VALUES (:atom, :ts, :host, :data, :created_at)"), rows(300))
    migrate.upgrade(engine)
    with engine.connect() as c:
        stored = {tuple(r) for r in c.exec_driver_sql("SELECT atom, host, n, first_ts, last_ts, last_id FROM streams")}
        assert stored == _brute_streams(c) and len(stored) == 6
    # then new readings, late and out of order, in batches stored as observe and imports store
    # them (one atom at a time, several in one transaction): still equal to brute force
    for k in range(20):
        batch = rows(rng.randint(1, 40), 50 + k)  # newer ones too, often tied within the batch
        with engine.begin() as c:
            for atom in sorted({r["atom"] for r in batch}):
                mine = [r for r in batch if r["atom"] == atom]
                obs._store(c, atom, [r["ts"] for r in mine], [r["host"] for r in mine], ["{}"] * len(mine), 1.0)
        with engine.connect() as c:
            got = {tuple(r) for r in c.exec_driver_sql("SELECT atom, host, n, first_ts, last_ts, last_id FROM streams")}
            assert got == _brute_streams(c)
    engine.dispose()


def test_rollups_are_computed_for_an_existing_history_after_the_upgrade(tmp_path):
    import random

    import orjson

    from kiri.hub.watch import rollups as R

    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    migrate.upgrade(engine, "0010")  # a database from before rollups, with readings and scores
    rng = random.Random(5)
    fields = ("added", "completed", "switched", "hour", "weekday")
    obs = [{"atom": "drift", "ts": 1_700_000_000.0 + rng.uniform(0, 3 * 86400), "host": rng.choice([None, "a"]),
            "data": orjson.dumps({f: rng.randint(0, 6) for f in fields}).decode(), "created_at": 1.0}
           for _ in range(2000)]
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO observations (atom, ts, host, data, created_at) "
                          "VALUES (:atom, :ts, :host, :data, :created_at)"), obs)
        c.execute(sa.text("INSERT INTO weights (id, atom, version, hash, blob, info, status, created_at) "
                          "VALUES (1, 'drift', 1, 'h', x'00', '{}', 'active', 0)"))
        c.execute(sa.text("INSERT INTO scores (observation_id, atom, weights_id, score, threshold, anomalous, "
                          "surprise, created_at) SELECT id, 'drift', 1, id % 7, 3.0, id % 7 > 5, '[]', 0 "
                          "FROM observations"))
        before = {t: c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in ("observations", "scores")}
    migrate.upgrade(engine)
    with engine.begin() as c:
        assert {t: c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in before} == before
        buckets = {(h or "", R.bucket_of(o["ts"])) for o, h in ((o, o["host"]) for o in obs)}
        assert c.exec_driver_sql("SELECT count(*) FROM rollup_dirty").scalar() == len(buckets)
        while R.refresh(c, {"drift": fields}, limit=100):
            pass
        days = R.stored(c, "drift", None, 86400, 0, 10**6, len(fields))
    assert sum(v[R.N] for v in days.values()) == 2000
    assert sum(v[R.SCORED] for v in days.values()) == 2000
    assert sum(v[R.ANOM] for v in days.values()) == sum(1 for i in range(1, 2001) if i % 7 > 5)
    engine.dispose()


def test_imports_staged_before_the_upgrade_can_still_be_committed_or_expire(tmp_path):
    from kiri.hub.core.queue import Env, QueueSettings
    from kiri.hub.watch import observations as O
    from kiri.protocol import params as P

    engine = make_engine(f"sqlite:///{tmp_path / 'i.db'}")
    migrate.upgrade(engine, "0012")  # two imports staged, never committed, before imports were tracked
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO staged_observations (import_id, atom, ts, host, data, created_at) "
                          "VALUES (:i, 'drift', :t, NULL, :d, :at)"),
                  [{"i": i, "t": 1000.0 + k, "at": at, "d": '{"added": 1, "completed": 1, "switched": 1, '
                                                        '"hour": 3, "weekday": 2}'}
                   for i, at, n in (("fresh-import", 5000.0, 3), ("old-import", 10.0, 2)) for k in range(n)])
    migrate.upgrade(engine)
    env = Env(now=5001.0, settings=QueueSettings())
    with engine.begin() as c:
        assert O.expire_staged(c, env.now) == 2  # the old one had sent nothing for an hour
        got = O.commit_import(c, P.ImportRef(import_id="fresh-import"), env)
        assert (got["stored"], got["remaining"], got["atoms"]) == (3, 0, ["drift"])
        assert c.exec_driver_sql("SELECT count(*) FROM observations").scalar() == 3
        assert c.exec_driver_sql("SELECT count(*) FROM staged_chunks").scalar() == 0
    engine.dispose()


def test_on_postgresql_the_migrations_build_the_same_schema_and_take_it_down_again(pg):
    engine = make_engine(pg.new_database())
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert migrate.drift(engine) == []
    assert set(metadata.tables) <= set(sa.inspect(engine).get_table_names())
    migrate.downgrade(engine, "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(engine)
    assert migrate.drift(engine) == []
    engine.dispose()
