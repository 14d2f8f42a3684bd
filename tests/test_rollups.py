"""Rollups equal brute-force aggregates over every reading ever stored, at every tier:
after late and out-of-order readings, several hosts, re-scoring with newer weights, imports,
and retention folding raw rows away (then late readings landing in folded buckets)."""

from __future__ import annotations

import math
import random
import uuid

import numpy as np
import orjson
import pytest
import sqlalchemy as sa

from kiri.hub.core.queue import Env, QueueSettings
from kiri.hub.store import migrate as mig
from kiri.hub.store.db import make_engine
from kiri.hub.store.schema import observations, rollup_dirty, rollups, scores, tasks, weights
from kiri.hub.watch import observations as O
from kiri.hub.watch import rollups as R
from kiri.protocol import params as P

FIELDS = ("added", "completed", "switched", "hour", "weekday")
HOSTS = ("a", "b", None)


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    mig.upgrade(engine)
    with engine.begin() as c:
        c.execute(tasks.insert().values(id=1, kind="train", status="done", run_after=0, created_at=0, updated_at=0))
        for wid in (1, 2, 3):
            c.execute(weights.insert().values(id=wid, atom="drift", version=wid, hash="h", blob=b"", info="{}",
                                              status="inactive", created_at=0))
    yield engine
    engine.dispose()


class Mirror:
    """Every reading ever stored and its newest score, kept in plain Python."""

    def __init__(self) -> None:
        self.readings: dict[int, tuple[str, float, dict[str, float]]] = {}  # id -> (host, ts, values)
        self.best: dict[int, tuple[int, float, float, float | None, bool]] = {}  # id -> (wid, score, thr, tail, anom)

    def truth(self, tier: int) -> dict[tuple[str, int], dict]:
        out: dict[tuple[str, int], dict] = {}
        for oid, (host, ts, vals) in self.readings.items():
            key = (host, math.floor(ts / R.BASE) // (tier // R.BASE))
            a = out.setdefault(key, {"n": 0, "scored": 0, "sum": 0.0, "best": None, "tail": math.inf, "anom": 0,
                                     "fields": {f: [] for f in FIELDS}})
            a["n"] += 1
            for f in FIELDS:
                if f in vals:
                    a["fields"][f].append(vals[f])
            if oid in self.best:
                _wid, sc, thr, tail, anom = self.best[oid]
                a["scored"] += 1
                a["sum"] += sc
                if a["best"] is None or (-sc, oid) < (-a["best"][0], a["best"][1]):
                    a["best"] = (sc, oid, ts, thr)
                if tail is not None:
                    a["tail"] = min(a["tail"], tail)
                a["anom"] += anom
        return out


def _check(got: dict[tuple[str, int], np.ndarray], want: dict[tuple[str, int], dict]) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g[R.N] == w["n"] and g[R.SCORED] == w["scored"] and g[R.ANOM] == w["anom"], key
        assert g[R.SCORE_SUM] == pytest.approx(w["sum"], rel=1e-12, abs=1e-9)
        assert g[R.TAIL_MIN] == w["tail"]
        if w["best"] is None:
            assert g[R.SCORE_MAX] == -math.inf and math.isnan(g[R.MAX_ID])
        else:
            assert (g[R.SCORE_MAX], g[R.MAX_ID], g[R.MAX_TS], g[R.MAX_THR]) == w["best"], key
        for j, f in enumerate(FIELDS):
            xs = w["fields"][f]
            cnt, total, lo, hi = g[R.HEAD + 4 * j: R.HEAD + 4 * j + 4]
            assert cnt == len(xs)
            assert total == pytest.approx(sum(xs), rel=1e-12, abs=1e-9)
            assert (lo, hi) == ((min(xs), max(xs)) if xs else (math.inf, -math.inf))


def _fold_some(c: sa.Connection, rng: random.Random) -> int:
    """Retention's folding step on a few random clean buckets: raw rows out, aggregate kept."""
    r = rollups.c
    clean = c.execute(sa.select(r.host, r.bucket).where(r.atom == "drift", r.tier == R.BASE, r.bucket.not_in(
        sa.select(rollup_dirty.c.bucket).where(rollup_dirty.c.atom == "drift", rollup_dirty.c.host == r.host)))).all()
    picked = rng.sample(clean, min(len(clean), 6))
    for host, bucket in picked:
        R.fold(c, "drift", host, [bucket])
    return len(picked)


def test_rollups_match_brute_force(engine):
    rng = random.Random(7)
    reg = O.AtomRegistry()
    mirror = Mirror()
    env = Env(now=1e6, settings=QueueSettings())
    folded = 0
    for round_ in range(8):
        with engine.begin() as c:
            batch = []
            for _ in range(250):
                late = round_ % 2 == 1
                ts = rng.uniform(0, 40_000) if late else 40_000 + round_ * 6000 + rng.uniform(0, 6000)
                if rng.random() < 0.1:
                    ts = float(math.floor(ts / 300) * 300)  # exactly on a bucket edge
                vals = {f: float(rng.randint(0, 6)) for f in FIELDS}
                batch.append({"time": ts, "host": rng.choice(HOSTS), "values": vals})
            p = P.Observe(atom="drift", observations=batch)
            if round_ % 3 == 2:  # as an import: staged, then committed
                p = P.Observe(atom="drift", observations=batch, import_id=uuid.uuid4().hex)
                O.observe(reg, c, p, env)
                O.commit_import(c, P.ImportRef(import_id=p.import_id), env)
            else:
                O.observe(reg, c, p, env)
            known = {r.id for r in c.execute(sa.select(observations.c.id))}
            for row in c.execute(sa.select(observations).where(observations.c.id.not_in(list(mirror.readings)))):
                values = {k: float(v) for k, v in orjson.loads(row.data).items()}
                mirror.readings[row.id] = (row.host or "", row.ts, values)
            # score some raw readings, sometimes again with newer weights
            keys, scored, first = set(), [], {1: [], 2: [], 3: []}
            for oid in rng.sample(sorted(known), min(len(known), 300)):
                wid = rng.choice((1, 2, 3))
                if c.execute(sa.select(scores.c.id).where(scores.c.observation_id == oid,
                                                          scores.c.weights_id == wid)).first() is not None:
                    continue
                sc = float(rng.randint(0, 40)) / 4  # ties are common: quantized scores
                tail = rng.choice((None, rng.uniform(0, 1)))
                anom = rng.random() < 0.2
                c.execute(scores.insert().values(observation_id=oid, atom="drift", weights_id=wid, score=sc,
                                                 threshold=5.0 + wid, anomalous=anom, tail_p=tail, surprise="[]",
                                                 created_at=0))
                host, ts, _ = mirror.readings[oid]
                if oid not in mirror.best and rng.random() < 0.7:
                    first[wid].append((oid, host, ts, sc, tail, anom))  # a first score: added, as recorded
                else:
                    keys.add(("drift", host, R.bucket_of(ts)))
                    scored.append(oid)
                if oid not in mirror.best or wid >= mirror.best[oid][0]:
                    mirror.best[oid] = (wid, sc, 5.0 + wid, tail, anom)
            # by key, as an import marks; or by reading id, as a record of scores does
            R.mark(c, keys) if rng.random() < 0.5 else R.mark_readings(c, scored)
            for wid, got in first.items():
                if got:
                    oid, host, ts, sc, tail, anom = (list(x) for x in zip(*got, strict=True))
                    R.add_first_scores(c, "drift", [h or None for h in host], oid, ts, sc, 5.0 + wid, tail, anom)
        # exact before any refresh: reads compute dirty buckets on the fly
        with engine.connect() as c:
            for tier in R.TIERS:
                _check(R.view(c, "drift", None, FIELDS, tier, -10, 10**6), mirror.truth(tier))
        # a partial refresh leaves a mix of stored and dirty buckets; still exact
        with engine.begin() as c:
            R.refresh(c, {"drift": FIELDS}, limit=rng.randint(1, 40))
        with engine.connect() as c:
            for tier in R.TIERS:
                _check(R.view(c, "drift", None, FIELDS, tier, -10, 10**6), mirror.truth(tier))
                _check(R.view(c, "drift", ["a"], FIELDS, tier, -10, 10**6),
                       {k: v for k, v in mirror.truth(tier).items() if k[0] == "a"})
        with engine.begin() as c:
            while R.refresh(c, {"drift": FIELDS}, limit=37):
                pass
            folded += _fold_some(c, rng)
        with engine.connect() as c:
            assert c.execute(sa.select(sa.func.count()).select_from(rollup_dirty)).scalar() == 0
            for tier in R.TIERS:
                stored = R.stored(c, "drift", None, tier, -10, 10**6, len(FIELDS))
                _check(stored, mirror.truth(tier))
    assert folded > 20
    with engine.connect() as c:  # folding really deleted raw rows that the rollups still count
        assert c.execute(sa.select(sa.func.count()).select_from(observations)).scalar() < len(mirror.readings)


def test_a_chart_of_many_hosts_over_a_long_range_reads_a_coarser_tier_than_one_host(engine):
    from kiri.hub.watch import series as SR

    reg = O.AtomRegistry()
    year = 365 * 86400.0
    hosts = [f"h{i}" for i in range(3)]
    with engine.begin() as c:
        reg.load(c)
        for h in hosts:  # a reading at each end of a year, for each host
            O.observe(reg, c, P.Observe(atom="drift", observations=[
                P.ObservationIn(time=t, host=h, values={"added": 1.0, "completed": 1.0, "switched": 1.0,
                                                            "hour": 3.0, "weekday": 2.0})
                for t in (1000.0, 1000.0 + year)]), Env(now=1.0, settings=QueueSettings()))
        R.refresh(c, {"drift": list(FIELDS)}, 10_000)
    with engine.connect() as c:
        one = SR.series(c, "drift", FIELDS, "h0", None, None, 1000)
        every = SR.series(c, "drift", FIELDS, None, None, None, 1000)
    # one host's year: about 8,760 hourly rows; three hosts' would be 26,280, over ROLLUP_MAX
    assert year / 3600 <= SR.ROLLUP_MAX < len(hosts) * year / 3600
    assert one["tier"] == 3600 and every["tier"] == 86400
    assert one["count"] == 2 and every["count"] == 6  # every reading still in the chart


def test_stored_values_parse_whole_and_a_missing_field_is_nan():
    full = ['{"a":1.0,"b":2.5}', '{"b":-1,"a":3}']
    assert R._values(full, ["a", "b"]).tolist() == [[1.0, 2.5], [3.0, -1.0]]
    assert R._values(full, ["b"]).tolist() == [[2.5], [-1.0]]
    got = R._values(['{"a":1.0}', '{"a":2.0,"b":4.0}'], ["a", "b"])
    assert got[0, 0] == 1.0 and math.isnan(got[0, 1]) and got[1].tolist() == [2.0, 4.0]
    assert R._values([], ["a", "b"]).shape == (0, 2)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_raw_reads_give_each_reading_its_newest_score_on_both_backends(tmp_path, request, backend):
    """read_raw on the driver's cursor, per host (NULL included), with scores read as one id
    range (a host's dense ids) or as id lists (a host whose ids are scattered), against
    the rows written."""
    if backend == "postgresql":
        eng = make_engine(request.getfixturevalue("pg").new_database())
    else:
        eng = make_engine(f"sqlite:///{tmp_path / 'raw.db'}")
    mig.upgrade(eng)
    rng = random.Random(7)
    with eng.begin() as c:
        c.execute(tasks.insert().values(id=1, kind="train", status="done", run_after=0, created_at=0, updated_at=0))
        for wid in (1, 2):
            c.execute(weights.insert().values(id=wid, atom="drift", version=wid, hash="h", blob=b"", info="{}",
                                              status="inactive", created_at=0))
        # host "a" gets a dense run of ids; "b" one reading in ten among them; no host the rest
        hosts = ["a"] * 300 + [("b" if k % 10 == 0 else None) for k in range(400)]
        want: dict[str, dict[int, tuple]] = {"a": {}, "b": {}, "": {}}
        for k, h in enumerate(hosts):
            vals = {"added": float(k), "completed": 1.0, "switched": 2.0, "hour": 3.0, "weekday": 4.0}
            ts = 1000.0 + k * 7
            oid = c.execute(observations.insert().values(atom="drift", ts=ts, host=h, data=orjson.dumps(vals).decode(),
                                                         created_at=0).returning(observations.c.id)).scalar_one()
            newest = None
            for wid in (1, 2):
                if rng.random() < 0.6:
                    sc, tp = rng.random(), (None if rng.random() < 0.3 else rng.random())
                    c.execute(scores.insert().values(observation_id=oid, atom="drift", weights_id=wid, score=sc,
                                                     threshold=1.5, anomalous=sc > 0.9, surprise="[]", tail_p=tp,
                                                     created_at=0))
                    newest = (sc, tp, sc > 0.9)
            want[h or ""][oid] = (ts, float(k), newest)
    with eng.connect() as c:
        for host, rows in want.items():
            raw = R.read_raw(c, "drift", host, ["added", "completed"], 0.0, 1e9)
            assert raw.ids.tolist() == sorted(rows, key=lambda i: (rows[i][0], i))
            for k, oid in enumerate(raw.ids.tolist()):
                ts, added, newest = rows[oid]
                assert raw.ts[k] == ts and raw.vals[k].tolist() == [added, 1.0]
                if newest is None:
                    assert math.isnan(raw.score[k]) and raw.anom[k] == 0
                else:
                    sc, tp, an = newest
                    assert raw.score[k] == sc and raw.thr[k] == 1.5 and raw.anom[k] == float(an)
                    assert math.isnan(raw.tail[k]) if tp is None else raw.tail[k] == tp
    eng.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_marking_readings_by_id_marks_exactly_their_buckets_on_both_backends(tmp_path, request, backend):
    """mark_readings works out each reading's bucket in SQL: the buckets bucket_of gives,
    at and around bucket edges and before 1970 too, a NULL host as "", and nothing else."""
    if backend == "postgresql":
        eng = make_engine(request.getfixturevalue("pg").new_database())
    else:
        eng = make_engine(f"sqlite:///{tmp_path / 'marks.db'}")
    mig.upgrade(eng)
    times = [0.0, 299.99999999999994, 300.0, -1e-9, -300.0, -300.0000001, -299.5, 1_700_000_123.25, 86_400 * 365.0,
             -5e8 - 0.5, 1e-300, 599.9999]
    with eng.begin() as c:
        ids, want = [], set()
        for k, ts in enumerate(times):
            host = (None, "a", "b")[k % 3]
            oid = c.execute(observations.insert().values(atom="drift", ts=ts, host=host, data="{}", created_at=0)
                            .returning(observations.c.id)).scalar_one()
            if k != 5:  # one reading not marked
                ids.append(oid)
                want.add(("drift", host or "", R.bucket_of(ts)))
        R.mark_readings(c, ids)
        R.mark_readings(c, ids[:3])  # again: already marked, nothing new
        got = {tuple(r) for r in c.execute(sa.select(rollup_dirty.c.atom, rollup_dirty.c.host, rollup_dirty.c.bucket))}
    assert got == want and len(want) == 8
    eng.dispose()
