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
