"""The chart columns stay exact as data arrives late, out of order, and is rescored."""

from __future__ import annotations

import random

import orjson
import pytest
import sqlalchemy as sa

from kiri.hub.store import migrate as mig
from kiri.hub.store.db import make_engine, make_read_engine
from kiri.hub.store.schema import observations, scores, tasks, weights
from kiri.hub.watch.observations import AtomRegistry
from kiri.hub.watch.series import SeriesCache, downsample

FIELDS = ("added", "completed", "switched", "hour", "weekday")


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    engine = make_engine(url)
    mig.upgrade(engine)
    with engine.begin() as c:
        c.execute(tasks.insert().values(id=1, kind="train", status="done", run_after=0, created_at=0, updated_at=0))
        for wid in (1, 2):
            c.execute(weights.insert().values(id=wid, atom="drift", version=wid, hash="h", blob=b"", info="{}",
                                              status="inactive", created_at=0))
    reader = make_read_engine(url)
    yield engine, reader
    reader.dispose()
    engine.dispose()


def _truth(engine, since=None, until=None):
    """Brute force: every observation in time order with its newest weights' score."""
    with engine.connect() as c:
        obs = c.execute(sa.select(observations.c.id, observations.c.ts, observations.c.data)).all()
        best: dict[int, tuple] = {}
        for r in c.execute(sa.select(scores.c.observation_id, scores.c.weights_id, scores.c.score, scores.c.tail_p)):
            if r.observation_id not in best or r.weights_id >= best[r.observation_id][0]:
                best[r.observation_id] = (r.weights_id, r.score, r.tail_p)
    rows = sorted(((r.ts, r.id, orjson.loads(r.data), *best.get(r.id, (0, None, None))[1:]) for r in obs),
                  key=lambda x: (x[0], x[1]))
    return [x for x in rows if (since is None or x[0] >= since) and (until is None or x[0] <= until)]


def test_columns_follow_late_observations_and_rescoring(db):
    engine, reader = db
    rng = random.Random(0)
    cache, reg = SeriesCache(), AtomRegistry()
    schema = reg.get("drift")
    next_id = 1
    for round_ in range(4):
        with engine.begin() as c:
            obs = []
            for _ in range(300):
                t = rng.uniform(0, 10_000) if round_ % 2 else 10_000 + round_ * 1000 + rng.uniform(0, 1000)
                obs.append({"id": next_id, "atom": "drift", "ts": t, "created_at": 0,
                            "data": orjson.dumps({f: rng.randint(0, 6) for f in FIELDS}).decode()})
                next_id += 1
            c.execute(observations.insert(), obs)
            # score some of everything so far, sometimes again with newer weights
            for oid in rng.sample(range(1, next_id), 200):
                wid = rng.choice((1, 2))
                if c.execute(sa.select(scores.c.id).where(scores.c.observation_id == oid,
                                                          scores.c.weights_id == wid)).first() is None:
                    tail = rng.choice((None, rng.uniform(0, 1)))  # uncalibrated weights give none
                    c.execute(scores.insert().values(observation_id=oid, atom="drift", weights_id=wid,
                                                     score=rng.uniform(0, 10), threshold=5.0, anomalous=False,
                                                     tail_p=tail, surprise="[]", created_at=0))
        with reader.connect() as c, c.begin():
            cols = cache.columns(c, schema)
        got = downsample(cols, None, None, 10_000)
        want = _truth(engine)
        assert got["t"] == [w[0] for w in want] and got["id"] == [w[1] for w in want]
        assert got["score"] == [w[3] for w in want]
        assert got["tail_p"] == [w[4] for w in want]
        assert got["values"]["added"] == [float(w[2]["added"]) for w in want]
        # a window, at full resolution and downsampled
        part = downsample(cols, 2_000.0, 11_500.0, 10_000)
        assert part["id"] == [w[1] for w in _truth(engine, 2_000.0, 11_500.0)]
        small = downsample(cols, None, None, 50)
        assert len(small["t"]) <= 50 and sum(small["n"]) == len(want)
        best = max((w for w in want if w[3] is not None), key=lambda w: w[3])
        assert best[1] in small["id"] and max(s for s in small["score"] if s is not None) == best[3]
