"""The readings a hub handed to scorers, remembered for their record: only what a committed
transaction read, never across a fold, never another atom's or a batch it did not hand out."""

from __future__ import annotations

import time

from kiri.hub.watch.handed import HandedOut


def _rows(ids: list[int], host: str | None = "a") -> list[tuple[int, float, str | None, str]]:
    return [(i, 1000.0 + 30 * i, host, "{}") for i in ids]


def test_a_batch_is_found_only_after_its_transaction_commits_and_never_after_a_rollback() -> None:
    h = HandedOut()
    h.remember("pulse", _rows([3, 4, 5]))
    assert h.find("pulse", [3, 4, 5]) is None  # still staged
    h.commit()
    found, places = h.find("pulse", [4, 5])
    assert places.tolist() == [1, 2] and found.ts[places].tolist() == [1120.0, 1150.0]
    assert found.host_of(places) == ["a", "a"]
    h.remember("pulse", _rows([6, 7]))
    h.rollback()
    h.commit()
    assert h.find("pulse", [6, 7]) is None


def test_ids_outside_one_batch_or_of_another_atom_are_not_found() -> None:
    h = HandedOut()
    h.remember("pulse", _rows([3, 5, 7]))
    h.remember("pulse", [(9, 1.0, "a", "{}"), (10, 2.0, "b", "{}")])
    h.commit()
    assert h.find("rhythm", [3]) is None
    assert h.find("pulse", [4]) is None  # inside the batch's range, not in it
    assert h.find("pulse", [7, 9]) is None  # in two batches: read from the database
    assert h.find("pulse", []) is None
    found, places = h.find("pulse", [10, 9])
    assert found.host_of(places) == ["b", "a"]


def test_a_fold_forgets_everything_and_only_the_newest_batches_are_kept() -> None:
    h = HandedOut(kept=2)
    for start in (1, 11, 21):
        h.remember("pulse", _rows(list(range(start, start + 5))))
    h.commit()
    assert h.find("pulse", [1]) is None and h.find("pulse", [11]) is not None and h.find("pulse", [21]) is not None
    h.forget()
    assert h.find("pulse", [21]) is None


def test_readings_handed_out_then_folded_are_refused_by_name_not_stored(tmp_path) -> None:
    """The hub takes a scored batch's time and host from what it handed out. Retention may
    fold those readings once they are scored (here: a late import into the past, scored,
    then folded with its old day); a resend of their scores must then be refused as the
    database says, not stored against readings that are gone."""
    import pytest
    import sqlalchemy as sa

    from kiri.hub.core import queue as Q
    from kiri.hub.core.retention import Retention
    from kiri.hub.store import migrate as mig
    from kiri.hub.store.db import make_engine
    from kiri.hub.store.schema import observations, scores, streams, tasks, weights
    from kiri.hub.watch import rollups as R
    from kiri.hub.watch import scoring as SC
    from kiri.hub.watch.keep import RawPruner
    from kiri.hub.watch.observations import AtomRegistry
    from kiri.protocol import InvalidParams
    from kiri.protocol import params as P

    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    mig.upgrade(engine)
    now = time.time()
    day, step = 86400.0, 300.0
    t0 = R.bucket_of(now - 4 * day) * R.BASE
    data = '{"cpu": 1.0, "mem": 1.0, "disk": 1.0, "swap": 0.0, "load": 0.1, "net": 0.0}'
    env = Q.Env(now=now, settings=Q.QueueSettings())
    with engine.begin() as c:
        wid = c.execute(weights.insert().values(atom="pulse", version=1, hash="h", blob=b"", info="{}",
                                                status="active", created_at=now)).inserted_primary_key[0]
        ids = [c.execute(observations.insert().values(atom="pulse", ts=t0 + k * step, host="h", data=data,
                                                      created_at=now)).inserted_primary_key[0]
               for k in range(int(4 * day / step))]
        c.execute(scores.insert(), [{"observation_id": i, "atom": "pulse", "weights_id": wid, "score": 0.1,
                                     "threshold": 1.0, "anomalous": False, "surprise": "[]", "created_at": now}
                                    for i in ids])
        late = [c.execute(observations.insert().values(atom="pulse", ts=t0 + 60 + k * step, host="h", data=data,
                                                       created_at=now)).inserted_primary_key[0] for k in range(5)]
        c.execute(streams.insert().values(atom="pulse", host="h", n=len(ids) + len(late), first_ts=t0,
                                          last_ts=t0 + (len(ids) - 1) * step, last_id=late[-1]))
        task = c.execute(tasks.insert().values(kind="score", atom="pulse", status="leased", lease_token="tok",
                                               lease_expires_at=now + 3600, run_after=now, created_at=now,
                                               updated_at=now)).inserted_primary_key[0]
    handed = HandedOut()
    with engine.begin() as c:
        work = SC.work(AtomRegistry(), c, P.ScoringWork(atom="pulse", limit=100, context=0, columns=True), env,
                       handed)
    handed.commit()
    assert work["observations"]["id"] == late
    record = P.RecordScores(task_id=task, lease_token="tok", atom="pulse", weights_id=wid, threshold=3.0,
                            columns={"observation_id": late, "score": [1.0] * 5, "width": 6, "surprise": [0.5] * 30})
    assert handed.find("pulse", late) is not None
    with engine.begin() as c:
        assert SC.record(c, record, env, handed)["stored"] == 5
    pruner = RawPruner(handed=handed)
    fields = {"pulse": [f.name for f in AtomRegistry().get("pulse").fields]}
    with engine.begin() as c:  # the aggregates first: retention folds only buckets whose rollups are stored
        while R.refresh(c, fields):
            pass
    for _ in range(100):
        with engine.begin() as c:
            if not pruner.prune(c, Retention(raw=day, raw_batch=200), now):
                break
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).where(observations.c.id.in_(late))).scalar() == 0
    assert handed.find("pulse", late) is None
    with engine.begin() as c, pytest.raises(InvalidParams, match="are not 'pulse' observations"):
        SC.record(c, record, env, handed)
    engine.dispose()
