"""The hot path's private-API adapters give exactly what the public APIs give.

``hub/store/prepared.py`` reads SQLAlchemy's compiler internals to run statements on the
driver cursor; ``model/train_step.py`` calls torch's fused Adam kernel directly (that one is
held to ``torch.optim.Adam`` in ``test_forward.py``). If an upgrade of either library
changes what they rely on, these tests fail here, loudly, and not somewhere downstream.
"""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.store import migrate as mig
from kiri.hub.store.db import as_dict, make_engine
from kiri.hub.store.prepared import Prepared, compile_for_driver
from kiri.hub.store.schema import checkpoints, tasks


def _db(path) -> sa.Engine:
    engine = make_engine(f"sqlite:///{path}")
    mig.upgrade(engine)
    return engine


def _steps(lease: Prepared) -> list[tuple[Prepared, dict]]:
    """A task's life on the hot path: insert, lease, heartbeat, ack, and reads between."""
    now = 1000.0
    insert = {"v_kind": "echo", "v_atom": None, "v_params": "{}", "v_priority": 3, "v_run_after": now,
              "v_max": 5, "v_dedupe": None, "v_parent": None, "v_now": now, "v_deadline": None}
    return [
        (Q._insert_task, insert),
        (Q._insert_task, {**insert, "v_priority": 9, "v_atom": "pulse", "v_deadline": 7.5}),
        (lease, {"k0": "echo", "now": now + 1, "owner": "a", "tok": "t1", "ttl": 30.0, "expires": now + 31}),
        (Q._get_checkpoint, {"tid": 2}),
        (Q._heartbeat_stmt, {"tid": 2, "tok": "t1", "now": now + 2, "prog": '{"step": 1}'}),
        (Q._heartbeat_stmt, {"tid": 2, "tok": "wrong", "now": now + 2, "prog": None}),
        (Q._ack_stmt, {"tid": 2, "tok": "t1", "res": '{"ok": true}', "now": now + 3}),
        (Q._drop_checkpoint, {"tid": 2}),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_driver_path_equals_sqlalchemy_path(tmp_path, request, backend):
    if backend == "postgresql":  # psycopg's cursor, against SQLAlchemy's own path on PostgreSQL
        pg = request.getfixturevalue("pg")
        fast, slow = make_engine(pg.new_database()), make_engine(pg.new_database())
        mig.upgrade(fast)
        mig.upgrade(slow)
    else:
        fast, slow = _db(tmp_path / "fast.db"), _db(tmp_path / "slow.db")
    lease = Prepared(Q._lease_stmt(1))
    got_fast, got_slow = [], []
    with fast.begin() as c:
        for stmt, params in _steps(lease):
            got_fast.append(stmt.rows(c, params))  # the driver path
    with slow.begin() as c:
        for stmt, params in _steps(lease):
            result = c.execute(stmt.stmt, params)  # SQLAlchemy's own path
            got_slow.append([as_dict(r) for r in result] if result.returns_rows else [])
    assert got_fast == got_slow
    assert got_fast[2][0]["id"] == 2 and got_fast[2][0]["priority"] == 9  # the best task was leased
    assert got_fast[2][0]["deadline"] == 7.5
    for table in (tasks, checkpoints):
        with fast.connect() as a, slow.connect() as b:
            rows_a = [tuple(r) for r in a.execute(sa.select(table).order_by(*table.primary_key.columns))]
            rows_b = [tuple(r) for r in b.execute(sa.select(table).order_by(*table.primary_key.columns))]
        assert rows_a == rows_b
    fast.dispose()
    slow.dispose()


def test_compiled_parts_name_every_parameter_and_column():
    engine = sa.create_engine("sqlite://")
    sql, names, consts, columns = compile_for_driver(Q._lease_stmt(2), engine.dialect)
    assert sql.count("?") == len(names)
    assert {"k0", "k1", "now", "owner", "tok", "ttl", "expires"} <= set(names) | set(consts)
    assert columns == ["id", "kind", "atom", "params", "attempts", "max_attempts", "priority", "parent_id",
                       "run_after", "deadline"]


def test_bulk_inserts_through_the_buffer_equal_sqlalchemys(tmp_path):
    from kiri.hub.store.schema import observations, scores, weights
    from kiri.hub.watch import observations as obs
    from kiri.hub.watch import scoring as SC

    fast, slow = _db(tmp_path / "fast.db"), _db(tmp_path / "slow.db")
    rows = [{"atom": "pulse", "ts": 1000.0 + i, "host": None if i % 2 else f"h{i}", "data": '{"cpu": 1.0}',
             "created_at": 5.0} for i in range(50)]
    weights_row = {"atom": "pulse", "version": 1, "hash": "h", "blob": b"\0", "info": "{}", "status": "active",
                   "created_at": 1.0}
    scored = [{"observation_id": i + 1, "atom": "pulse", "weights_id": 1, "score": 0.5 * i, "threshold": 2.0,
               "tail_p": None if i % 3 else 0.25, "surprise": "[0.1]", "anomalous": i % 7 == 0, "created_at": 2.0}
              for i in range(50)]

    def columns(bulk, batch):
        return ({k: [r[k] for r in batch] for k in bulk.varying},
                {k: v for k, v in batch[0].items() if k not in bulk.varying})

    with fast.begin() as c:
        obs._BULK.run(c, *columns(obs._BULK, rows))
        c.execute(weights.insert(), weights_row)
        SC._BULK_SCORES.run(c, *columns(SC._BULK_SCORES, scored))
    with slow.begin() as c:
        c.execute(observations.insert(), rows)
        c.execute(weights.insert(), weights_row)
        c.execute(scores.insert(), scored)
    for table in (observations, scores):
        with fast.connect() as a, slow.connect() as b:
            got = [tuple(r) for r in a.execute(sa.select(table).order_by(table.c.id))]
            assert got == [tuple(r) for r in b.execute(sa.select(table).order_by(table.c.id))]
            assert len(got) == 50


def test_a_bulk_insert_through_the_buffer_equals_executemany_and_rolls_back_whole(tmp_path):
    from kiri.hub.store.bulk import ROWS, BulkInsert
    from kiri.hub.store.schema import observations

    fast, slow = _db(tmp_path / "fast.db"), _db(tmp_path / "slow.db")
    n = 30 + 2 * ROWS + 40  # a short batch, then two whole multi-row statements and the rest one by one
    ts = [1000.0 + i / 3 for i in range(n)]
    hosts = [None if i % 3 else f"h{i % 5}" for i in range(n)]
    data = [f'{{"cpu": {i}.5}}' for i in range(n)]
    bulk = BulkInsert(observations, ["ts", "host", "data"])
    with fast.begin() as c:
        for part in (slice(0, 30), slice(30, n)):  # twice on one connection: the buffer is emptied each time
            assert bulk.run(c, {"ts": ts[part], "host": hosts[part], "data": data[part]},
                            {"atom": "pulse", "created_at": 5.0}) == len(ts[part])
    with slow.begin() as c:
        c.execute(observations.insert(), [{"atom": "pulse", "ts": t, "host": h, "data": d, "created_at": 5.0}
                                          for t, h, d in zip(ts, hosts, data, strict=True)])
    with fast.connect() as a, slow.connect() as b:
        got = a.execute(sa.select(observations).order_by(observations.c.id)).all()
        assert got == b.execute(sa.select(observations).order_by(observations.c.id)).all() and len(got) == n
    with pytest.raises(sqlite3.IntegrityError), fast.begin() as c:  # a NULL data: nothing of the batch stays
        bulk.run(c, {"ts": [1.0, 2.0], "host": [None, None], "data": ["{}", None]},
                 {"atom": "pulse", "created_at": 1.0})
    with fast.begin() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(observations)).scalar() == n
        assert c.exec_driver_sql("SELECT count(*) FROM temp.kiri_bulk_observations").scalar() == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_list_statement_matches_what_sqlalchemys_in_matches(tmp_path, request, backend):
    """``ListStatement`` binds a list as one value (json_each on SQLite, an array on
    PostgreSQL); it selects, updates and deletes exactly the rows ``in_(list)`` does."""
    from kiri.hub.store.prepared import ListStatement

    if backend == "postgresql":
        engine = make_engine(request.getfixturevalue("pg").new_database())
        mig.upgrade(engine)
    else:
        engine = _db(tmp_path / "k.db")
    now = 1000.0
    with engine.begin() as c:
        for i in range(1, 41):
            c.execute(tasks.insert().values(kind="echo", status="queued", run_after=now, created_at=now,
                                            updated_at=now, priority=i % 3))
    pick = ListStatement(lambda member: sa.select(tasks.c.id).where(member(tasks.c.id), tasks.c.priority == 1))
    bump = ListStatement(lambda member: tasks.update().where(member(tasks.c.id)).values(priority=9))
    drop = ListStatement(lambda member: tasks.delete().where(member(tasks.c.id)))
    wanted = [3, 4, 7, 10, 13, 38, 999]
    with engine.begin() as c:
        got = sorted(i for (i,) in pick.tuples(c, wanted))
        want = sorted(c.execute(sa.select(tasks.c.id).where(tasks.c.id.in_(wanted), tasks.c.priority == 1)).scalars())
        assert got == want == [4, 7, 10, 13]
        assert pick.tuples(c, []) == []
        bump.run(c, [1, 2, 40])
        drop.run(c, list(range(20, 30)))
    with engine.connect() as c:
        assert sorted(c.execute(sa.select(tasks.c.id).where(tasks.c.priority == 9)).scalars()) == [1, 2, 40]
        left = set(c.execute(sa.select(tasks.c.id)).scalars())
    assert left == set(range(1, 41)) - set(range(20, 30))
    engine.dispose()
