"""Retention: finished tasks past the window are deleted in bounded transactions, their counts
kept, so totals and Prometheus counters never go backwards; a kill mid-way loses nothing."""

from __future__ import annotations

import time
import urllib.request

import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from kiri.hub.core import retention as RT
from kiri.hub.store import migrate as mig
from kiri.hub.store.db import make_engine
from tests.conftest import wait_until
from tests.test_cli import kiri

DAY = 86400.0


def _seed(path, old: int, recent: int) -> None:
    """A database holding ``old`` tasks finished ten days ago, ``recent`` finished now, and
    work that must stay whatever its age: a queued task, a leased one, one that made weights."""
    engine = make_engine(f"sqlite:///{path}")
    mig.upgrade(engine)
    now = time.time()
    rows = []
    for i in range(old + recent):
        finished = now - 10 * DAY if i < old else now
        status = "dead" if i % 10 == 0 else "done"
        rows.append({"kind": "collect" if i % 2 else "score", "status": status, "run_after": finished,
                     "failures": 1 if status == "dead" else 0, "expiries": i % 3 == 0, "created_at": finished,
                     "updated_at": finished, "finished_at": finished})
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO tasks (kind, status, run_after, failures, expiries, created_at, updated_at, "
                          "finished_at) VALUES (:kind, :status, :run_after, :failures, :expiries, :created_at, "
                          ":updated_at, :finished_at)"), rows)
        old_time = now - 20 * DAY
        for status in ("queued", "leased"):
            c.execute(sa.text("INSERT INTO tasks (kind, status, run_after, created_at, updated_at, lease_expires_at) "
                              "VALUES ('train', :s, :t, :t, :t, :e)"), {"s": status, "t": old_time, "e": now + 3600})
        tid = c.execute(sa.text("INSERT INTO tasks (kind, atom, status, run_after, created_at, updated_at, finished_at)"
                                " VALUES ('train', 'pulse', 'done', :t, :t, :t, :t) RETURNING id"),
                        {"t": old_time}).scalar_one()
        c.execute(sa.text("INSERT INTO weights (atom, version, hash, blob, info, task_id, status, created_at) "
                          "VALUES ('pulse', 1, 'h', x'00', '{}', :tid, 'inactive', :t)"), {"tid": tid, "t": old_time})
    engine.dispose()


def _ledger(path) -> dict[tuple[str, str], tuple[int, int, int]]:
    """Per kind and status: tasks, failures, expiries, counting the live rows and the pruned totals."""
    engine = make_engine(f"sqlite:///{path}")
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    with engine.connect() as c:
        for kind, status, n, f, e in c.execute(sa.text(
                "SELECT kind, status, count(*), sum(failures), sum(expiries) FROM tasks GROUP BY kind, status")):
            out[(kind, status)] = (n, f, e)
        for t in RT.totals(c):
            n, f, e = out.get((t["kind"], t["status"]), (0, 0, 0))
            out[(t["kind"], t["status"])] = (n + t["n"], f + t["failures"], e + t["expiries"])
    engine.dispose()
    return out


def _live(path, where: str) -> int:
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as c:
        n = c.execute(sa.text(f"SELECT count(*) FROM tasks WHERE {where}")).scalar_one()
    engine.dispose()
    return n


def test_a_killed_prune_loses_nothing_and_counts_nothing_twice(hub_factory):
    hub = hub_factory("--keep-finished-tasks", "7d", start=False, http=True)
    hub.data_dir.mkdir(parents=True, exist_ok=True)
    _seed(hub.db_path, old=30_000, recent=500)
    before = _ledger(hub.db_path)
    hub.start()
    # killed as soon as retention has begun (each batch is one transaction)
    wait_until(lambda: _live(hub.db_path, "1=1") < 30_503, 60, 0.01, what="retention under way")
    hub.kill()
    assert _ledger(hub.db_path) == before
    hub.start()
    wait_until(lambda: _live(hub.db_path, "finished_at < strftime('%s','now') - 86400 AND status != 'queued'") == 1,
               120, what="every old finished task pruned")
    assert _ledger(hub.db_path) == before  # the same totals, however many restarts
    assert _live(hub.db_path, "status IN ('queued', 'leased')") == 2  # unfinished work stays, whatever its age
    assert _live(hub.db_path, "id IN (SELECT task_id FROM weights)") == 1  # so does a weights version's lineage
    assert _live(hub.db_path, "status IN ('done', 'dead')") == 501  # the recent ones, and the lineage
    # the counters Prometheus reads include what was pruned
    with urllib.request.urlopen(hub.url + "/metrics", timeout=10) as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    got = {(s.labels["kind"], s.labels["outcome"]): s.value for s in fams["kiri_task_outcomes"].samples
           if s.name.endswith("_total")}
    for (kind, status), (n, _, _) in before.items():
        if status in ("done", "dead"):
            assert got[(kind, status)] == n
    assert got[("collect", "failed_attempt")] == sum(v[1] for k, v in before.items() if k[0] == "collect")
    assert "finished tasks kept 7 days" in kiri(hub, "status").stdout


def test_retention_can_be_switched_off_and_refuses_nonsense(hub_factory, tmp_path):
    hub = hub_factory("--keep-finished-tasks", "forever", start=False)
    hub.data_dir.mkdir(parents=True, exist_ok=True)
    _seed(hub.db_path, old=50, recent=0)
    hub.start()
    assert "finished tasks kept forever" in kiri(hub, "status").stdout
    assert _live(hub.db_path, "1=1") == 53
    import subprocess
    import sys

    for bad in ("soon", "10s", "-1d"):
        out = subprocess.run([sys.executable, "-m", "kiri.hub.cli", "serve", "--data-dir", str(tmp_path / "x"),
                              "--keep-finished-tasks", bad], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "--keep-finished-tasks" in out.stderr


# --- raw readings, decisions, weights, checkpoints ----------------------------------------

FIELDS = ("added", "completed", "switched", "hour", "weekday")
EVERY = 10.0  # seconds between readings: enough of them that a retention pass can be caught mid-way
PER_HOST = int(4 * DAY / EVERY)
SPAN = 4 * DAY  # of history per host


def _seed_watch(path, now: float) -> dict:
    """Two hosts' drift readings over four days, all scored, stored ten days ago; decisions
    (one labelled, one alert, fifty plain old oks); ten weights versions; checkpoints."""
    import random

    import orjson

    from kiri.hub.watch import rollups as R
    from kiri.hub.watch.observations import _store

    rng = random.Random(3)
    engine = make_engine(f"sqlite:///{path}")
    mig.upgrade(engine)
    old = now - 10 * DAY
    truth: dict[tuple[str, int], list[dict]] = {}  # (host, day bucket) -> values
    with engine.begin() as c:
        for v in range(1, 11):  # v1 <- v2 <- v3 (active); v4..v10 stand alone
            c.execute(sa.text("INSERT INTO weights (id, atom, version, hash, blob, info, parent_id, status, created_at)"
                              " VALUES (:v, 'drift', :v, 'h', x'00', '{}', :p, :s, :t)"),
                      {"v": v, "p": v - 1 if 2 <= v <= 3 else None, "t": old + v,
                       "s": "active" if v == 3 else "rejected" if v % 2 else "inactive"})
        rows = []
        for host in ("a", "b"):
            for i in range(PER_HOST):
                ts = now - SPAN + i * EVERY
                vals = {f: rng.randint(0, 6) for f in FIELDS}
                truth.setdefault((host, R.bucket_of(ts, 86400)), []).append(vals)
                rows.append({"atom": "drift", "ts": ts, "host": host, "data": orjson.dumps(vals).decode(),
                             "created_at": old})
        _store(c, "drift", [r["ts"] for r in rows], [r["host"] for r in rows], [r["data"] for r in rows], old)
        ids = [r[0] for r in c.execute(sa.text("SELECT id FROM observations ORDER BY id"))]
        # every reading scored by v4; some of the first day's also by v5 (so v5 goes once they do)
        c.execute(sa.text("INSERT INTO scores (observation_id, atom, weights_id, score, threshold, anomalous, surprise,"
                          " created_at) VALUES (:o, 'drift', :w, 1.0, 5.0, 0, '[]', :t)"),
                  [{"o": i, "w": 4, "t": old} for i in ids] + [{"o": i, "w": 5, "t": old} for i in ids[1000:2440]])
        c.execute(sa.text("INSERT INTO tasks (id, kind, atom, status, run_after, created_at, updated_at, finished_at) "
                          "VALUES (1, 'score', 'drift', 'done', :t, :t, :t, :t), "
                          "(2, 'train', 'drift', 'queued', :t, :t, :t, NULL)"), {"t": now})
        for tid in (1, 2):
            c.execute(sa.text("INSERT INTO checkpoints (task_id, step, data, size, attempt, created_at) "
                              "VALUES (:t, 1, x'00', 1, 1, 0)"), {"t": tid})
        protect = {"labelled": ids[100], "alert": ids[PER_HOST + 20_000]}  # a's first day, b's third
        for k, oid in enumerate([*protect.values(), *ids[200:250]]):
            action = "alert" if oid == protect["alert"] else "ok"
            c.execute(sa.text("INSERT INTO decisions (id, atom, observation_id, task_id, inputs, action, probs, "
                              "policy, created_at) VALUES (:id, 'drift', :o, 1, '{}', :a, '{}', 'rule', :t)"),
                      {"id": k + 1, "o": oid, "a": action, "t": old})
        c.execute(sa.text("INSERT INTO labels (decision_id, verdict, action, created_at) "
                          "VALUES (1, 'approve', 'ok', 0)"))
        c.execute(sa.text("INSERT INTO alerts (decision_id, atom, status, created_at) VALUES (2, 'drift', 'sent', 0)"))
    engine.dispose()
    return {"truth": truth, "protect": protect, "n": len(ids)}


def _day_rollups(path) -> dict[tuple[str, int], tuple[int, list[float], list[float]]]:
    """Per host and day: readings, and each field's min and max, from the rollups (exact now)."""
    from kiri.hub.watch import rollups as R

    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as c:
        view = R.view(c, "drift", None, FIELDS, 86400, 0, 10**6)
    engine.dispose()
    return {k: (int(v[R.N]), [v[R.HEAD + 4 * j + 2] for j in range(5)], [v[R.HEAD + 4 * j + 3] for j in range(5)])
            for k, v in view.items()}


def _count(path, sql: str) -> int:
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as c:
        n = c.execute(sa.text(sql)).scalar_one()
    engine.dispose()
    return n


def test_old_raw_readings_fold_into_rollups_and_a_killed_pass_loses_nothing(hub_factory):
    import json
    import os

    from kiri.hub.watch import rollups as R

    hub = hub_factory("--keep-raw", "1d", "--keep-weights", "5", start=False, http=True)
    hub.data_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    seed = _seed_watch(hub.db_path, now)
    want = {k: (len(v), [min(x[f] for x in v) for f in FIELDS], [max(x[f] for x in v) for f in FIELDS])
            for k, v in seed["truth"].items()}
    assert _day_rollups(hub.db_path) == want  # computed from raw rows on the fly: nothing stored yet
    size_before = os.stat(hub.db_path).st_size
    last = now - SPAN + (PER_HOST - 1) * EVERY
    edge = R.bucket_of(last - DAY) * R.BASE  # whole 5-minute buckets before the window go

    def old_left() -> int:
        return _count(hub.db_path, f"SELECT count(*) FROM observations WHERE ts < {edge}")

    hub.start()
    kills = 0
    for _ in range(3):  # killed mid-way, up to three times: each batch is whole or absent
        total = _count(hub.db_path, "SELECT count(*) FROM observations")
        wait_until(lambda total=total: _count(hub.db_path, "SELECT count(*) FROM observations") < total
                   or old_left() <= 2 * R.BASE / EVERY, 60, 0.01, what="retention under way")
        if old_left() <= 2 * R.BASE / EVERY:
            break
        hub.kill()
        kills += 1
        assert _day_rollups(hub.db_path) == want
        hub.start()
    assert kills >= 1

    # what stays raw: the window, and the two 5-minute buckets (of one host each) that a kept
    # decision points into
    wait_until(lambda: old_left() == 2 * R.BASE / EVERY, 120, what="old raw readings folded")
    wait_until(lambda: _count(hub.db_path, "SELECT count(*) FROM weights") == 9, 60, what="weights pruned")
    assert _day_rollups(hub.db_path) == want  # every reading still counted, its extremes kept
    protected = _count(hub.db_path, f"SELECT count(*) FROM observations WHERE id IN "
                                    f"({seed['protect']['labelled']}, {seed['protect']['alert']})")
    assert protected == 2
    in_window = _count(hub.db_path, f"SELECT count(*) FROM observations WHERE ts >= {edge}")
    assert in_window == 2 * sum(1 for i in range(PER_HOST) if now - SPAN + i * EVERY >= edge)
    # the kept decisions stay, the plain old oks go; v5's scores went with its readings, so v5 did too
    assert _count(hub.db_path, "SELECT group_concat(id) FROM decisions") == "1,2"
    assert _count(hub.db_path, "SELECT group_concat(version) FROM (SELECT version FROM weights ORDER BY version)") \
        == "1,2,3,4,6,7,8,9,10"
    assert _count(hub.db_path, "SELECT group_concat(task_id) FROM checkpoints") == "2"  # a finished task's went
    # the space came back to the file system
    wait_until(lambda: _count(hub.db_path, "PRAGMA freelist_count") == 0, 60, what="free pages returned")
    assert os.stat(hub.db_path).st_size < size_before
    # the year chart reads the rollups; a short range still reads raw readings
    with urllib.request.urlopen(hub.url + "/api/v1/series?atom=drift&points=100", timeout=10) as r:
        s = json.loads(r.read())
    assert s["count"] == seed["n"] and s["tier"] != "raw" and max(s["max"]["added"]) == 6
    since = last - 3600
    with urllib.request.urlopen(hub.url + f"/api/v1/series?atom=drift&points=1000&host=a&since={since}",
                                timeout=10) as r:
        s = json.loads(r.read())
    assert s["tier"] == "raw" and s["count"] == 361 and set(s["n"]) == {1}
    out = kiri(hub, "status").stdout
    assert "raw readings 1 day per stream" in out and "newest 5" in out


def test_a_reading_waiting_for_its_score_keeps_the_day_before_it_raw_even_after_earlier_passes(tmp_path):
    """Scoring reads the readings before a reading as its context, so retention keeps every
    5-minute bucket in the day before a reading still waiting for its score. The pruner
    remembers which stretch of a stream it found all scored; a reading added since (a late
    import into the past) must still hold its day raw, and the stretches past it fold."""
    from kiri.hub.core.retention import Retention
    from kiri.hub.store.schema import observations, scores, streams, weights
    from kiri.hub.watch import rollups as R
    from kiri.hub.watch.keep import CONTEXT_MARGIN, RawPruner

    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    mig.upgrade(engine)
    now = time.time()
    day, step = 86400.0, 300.0
    t0 = R.bucket_of(now - 6 * day) * R.BASE  # six days of readings, one per 5-minute bucket
    policy = Retention(raw=day, raw_batch=100)
    with engine.begin() as c:
        wid = c.execute(weights.insert().values(atom="pulse", version=1, hash="h", blob=b"", info="{}",
                                                status="active", created_at=now)).inserted_primary_key[0]
        ids = [c.execute(observations.insert().values(atom="pulse", ts=t0 + k * step, host="h", data="{}",
                                                      created_at=now)).inserted_primary_key[0]
               for k in range(int(6 * day / step))]
        for oid in ids:
            c.execute(scores.insert().values(observation_id=oid, atom="pulse", weights_id=wid, score=0.1,
                                             threshold=1.0, anomalous=False, surprise="[]", created_at=now))
        last = t0 + (len(ids) - 1) * step
        c.execute(streams.insert().values(atom="pulse", host="h", n=len(ids), first_ts=t0, last_ts=last,
                                          last_id=ids[-1]))
    pruner = RawPruner()
    with engine.begin() as c:  # one pass: the first buckets fold, and the stretch after them is known scored
        assert pruner.prune(c, policy, now) > 0
    assert pruner.scored
    late = t0 + day + 0.5 * step  # a late import into the past, inside the stretch known to be scored
    with engine.begin() as c:
        c.execute(observations.insert().values(atom="pulse", ts=late, host="h", data="{}", created_at=now))
        c.execute(streams.update().values(n=streams.c.n + 1))
    for _ in range(500):
        with engine.begin() as c:
            if not pruner.prune(c, policy, now):
                break
    edge = R.bucket_of(last - day) * R.BASE
    with engine.connect() as c:
        left = sorted(c.execute(sa.select(observations.c.ts).where(observations.c.ts < edge)).scalars())
    held = [ts for ts in left if ts != late]
    assert held, "the day before the unscored reading was folded"
    assert min(held) >= late - CONTEXT_MARGIN - R.BASE and max(held) <= late + R.BASE  # that day, no more
    assert late in left
    engine.dispose()


def test_retention_waits_while_an_import_streams_in(hub_factory):
    """Deleting old tasks holds the hub's loop; while a bulk import is staging its chunks,
    retention waits (``server.BULK_QUIET``), and picks up where it was once the import is done."""
    hub = hub_factory("--keep-finished-tasks", "7d", start=False)
    hub.data_dir.mkdir(parents=True, exist_ok=True)
    _seed(hub.db_path, old=30_000, recent=10)
    hub.start()
    c = hub.client()
    imp = "f" * 16
    row = {"values": {"cpu": 12.0, "mem": 40.0, "disk": 50.0, "swap": 1.0, "load": 0.5, "net": 1.0}}
    c.call("observe", {"atom": "pulse", "observations": [row] * 100, "import_id": imp})
    time.sleep(0.5)  # a retention pass queued before the chunk has run by now
    during = _live(hub.db_path, "1=1")
    for _ in range(8):  # an import that keeps streaming: a chunk every quarter second
        c.call("observe", {"atom": "pulse", "observations": [row] * 100, "import_id": imp})
        time.sleep(0.25)
    assert _live(hub.db_path, "1=1") == during  # nothing pruned while it streamed
    assert c.call("commit_import", {"import_id": imp})["stored"] == 900
    c.close()
    wait_until(lambda: _live(hub.db_path, "status IN ('done', 'dead')") == 11, 120,
               what="retention resumed after the import")


def test_retention_waits_while_a_backfill_records_its_scores(hub_factory):
    """A backfill's big batches of scores (``methods.BULK_SCORES`` or more a call) hold
    retention off as an import's chunks do; everyday scoring's small batches do not."""
    from tests.test_contract import _weights_blob

    hub = hub_factory("--keep-finished-tasks", "7d", start=False)
    hub.data_dir.mkdir(parents=True, exist_ok=True)
    _seed(hub.db_path, old=30_000, recent=10)
    hub.start()
    c = hub.client()
    values = {"cpu": 12.0, "mem": 40.0, "disk": 50.0, "swap": 1.0, "load": 0.5, "net": 1.0}
    n = 10_000
    first = c.call("observe", {"atom": "pulse", "observations": [
        {"time": 1_000_000.0 + 30 * i, "values": values} for i in range(n)]})["first_id"]
    wid = c.call("import_weights", {"atom": "pulse", "blob": _weights_blob("pulse"), "activate": True})["weights"]["id"]
    lease = c.lease(["score"], ttl=600)
    assert lease["task"]["atom"] == "pulse"
    base = {"task_id": lease["task"]["id"], "lease_token": lease["lease"]["token"], "atom": "pulse",
            "weights_id": wid, "threshold": 3.0}

    def record(lo: int, k: int) -> None:
        ids = list(range(first + lo, first + lo + k))
        c.call("record_scores", {**base, "columns": {"observation_id": ids, "score": [1.0] * k, "width": 6,
                                                     "surprise": [0.5] * (6 * k)}})

    record(0, 1000)
    time.sleep(0.5)  # a retention pass queued before the batch has run by now
    during = _live(hub.db_path, "1=1")
    for b in range(1, 9):  # a backfill: a batch of 1,000 every quarter second
        record(1000 * b, 1000)
        time.sleep(0.25)
    assert _live(hub.db_path, "1=1") == during  # nothing pruned while it streamed
    record(9000, 10)  # everyday scoring: small batches hold nothing off
    wait_until(lambda: _live(hub.db_path, "status IN ('done', 'dead')") == 11, 120,
               what="retention resumed after the backfill")
    c.call("ack", {"task_id": base["task_id"], "lease_token": base["lease_token"]})
    c.close()
