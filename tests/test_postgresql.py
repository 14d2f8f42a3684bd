"""kiri on PostgreSQL: a real server started by the tests (``tests/pg.py``), hubs in real processes."""

from __future__ import annotations

import threading

from kiri.agents.client import HubClient, HubUnreachable
from tests.conftest import wait_until
from tests.test_cli import kiri


def _at_once(work, calls: list[tuple], timeout: float = 120.0) -> None:
    """Run ``work(*args)`` for every args in ``calls``, each in a thread of its own, all at
    once; an error in any of them fails the test here."""
    errors: list[BaseException] = []

    def run(*args) -> None:
        try:
            work(*args)
        except BaseException as e:  # noqa: BLE001 (raised again in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=args) for args in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a worker did not finish in time"


def _drain(hub, name: str, got: dict[int, list[str]]) -> None:
    """Lease and ack through ``hub`` until it has nothing more to give."""
    c = HubClient(hub.address, agent=name)
    c.connect()
    while True:
        res = c.lease(["echo"], ttl=60)
        if res["task"] is None:
            return
        tid = res["task"]["id"]
        got.setdefault(tid, []).append(name)
        assert c.call("ack", {"task_id": tid, "lease_token": res["lease"]["token"]})["status"] == "done"


def test_two_hubs_over_one_database_never_hand_out_a_task_twice(hub_factory, pg):
    url = pg.new_database()
    a = hub_factory("--db", url, start=False)
    b = hub_factory("--db", url, start=False)
    a.start(wait=False)
    b.start(wait=False)  # both at once on an empty database: they migrate one after the other
    a.wait_ready()
    b.wait_ready()
    ids = [a.client().enqueue("echo")["task_id"] for _ in range(150)]
    ids += [b.client().enqueue("echo")["task_id"] for _ in range(150)]
    got: dict[int, list[str]] = {}
    _at_once(_drain, [(h, f"{tag}{k}", got) for tag, h in (("a", a), ("b", b)) for k in range(3)])
    assert sorted(got) == sorted(ids)
    assert all(len(names) == 1 for names in got.values()), {t: n for t, n in got.items() if len(n) > 1}
    assert {n[0][0] for n in got.values()} == {"a", "b"}  # both hubs handed work out
    assert a.sql("SELECT status, max(attempts), count(*) FROM tasks GROUP BY status") == [("done", 1, 300)]


def test_the_hub_says_which_database_it_runs_on(hub_factory, pg, tmp_path):
    url = pg.new_database()
    kiri_hub = ["-m", "kiri.hub.cli"]
    import subprocess
    import sys

    out = subprocess.run([sys.executable, *kiri_hub, "migrate", "--db", url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, *kiri_hub, "check", "--db", url], capture_output=True, text=True)
    assert out.returncode == 0 and "PostgreSQL 15" in out.stdout and "no drift" in out.stdout, out.stdout
    out = subprocess.run([sys.executable, *kiri_hub, "check", "--db", str(tmp_path / "k.db")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "SQLite 3." in out.stdout, out.stdout  # empty: not at head
    hub = hub_factory("--db", url.replace("postgresql+psycopg://", "postgresql://"))  # the plain URL works
    assert "postgresql" in hub.client().call("stats", {})["hub"]["db"]
    assert kiri(hub, "enqueue", "echo").stdout.strip() == "1"


def test_an_agent_waiting_on_one_hub_gets_a_task_enqueued_through_another(hub_factory, pg):
    url = pg.new_database()
    # a tick far beyond the wait: only the other hub's notification can wake the waiter in time
    a = hub_factory("--db", url, "--tick", "60")
    b = hub_factory("--db", url, "--tick", "60")
    got: list[dict] = []
    waiter = threading.Thread(target=lambda: got.append(a.client().lease(["echo"], wait=20.0, ttl=30)))
    waiter.start()
    wait_until(lambda: a.client().call("stats", {})["hub"]["waiting_leases"] == 1, what="the lease to wait")
    tid = b.client().enqueue("echo", params={"n": 1})["task_id"]
    delayed = b.client().enqueue("echo", delay=1.0)["task_id"]  # due later: a's timer is armed from b's word
    waiter.join(30)
    assert got and got[0]["task"] is not None and got[0]["task"]["id"] == tid
    second = a.client().lease(["echo"], wait=20.0, ttl=30)
    assert second["task"] is not None and second["task"]["id"] == delayed


def test_an_agent_moves_to_the_other_hub_when_its_hub_dies_and_keeps_its_lease(hub_factory, pg, tmp_path):
    import subprocess
    import sys

    url = pg.new_database()
    a = hub_factory("--db", url, "--lease-ttl", "3")
    b = hub_factory("--db", url, "--lease-ttl", "3")
    log = (tmp_path / "agent.log").open("ab")
    agent = subprocess.Popen([sys.executable, "-m", "kiri.agents.cli", "--role", "trainer", "--kinds", "sleep",
                              "--hub", f"127.0.0.1:{a.port},127.0.0.1:{b.port}", "--name", "mover",
                              "--log-level", "info"], stdout=log, stderr=log)
    try:
        wait_until(lambda: a.client().call("stats", {})["hub"]["waiting_leases"] == 1, 30,
                   what="the agent waiting on the first hub of its list")
        tid = b.client().enqueue("sleep", params={"seconds": 5})["task_id"]
        wait_until(lambda: b.sql("SELECT status FROM tasks WHERE id = ?", tid) == [("leased",)], 30,
                   what="the task leased through the first hub")
        a.kill()  # the agent's hub dies mid-task
        wait_until(lambda: b.sql("SELECT status FROM tasks WHERE id = ?", tid) == [("done",)], 60,
                   what="the task done through the second hub")
        # one attempt, never expired: the agent kept its lease through the other hub and acked there
        assert b.sql("SELECT attempts, expiries, failures FROM tasks WHERE id = ?", tid) == [(1, 0, 0)]
        assert "trying the next hub" in (tmp_path / "agent.log").read_text()
    finally:
        agent.terminate()
        agent.wait(20)


def test_one_hub_does_the_upkeep_and_another_takes_it_over_when_it_dies(hub_factory, pg):
    url = pg.new_database()
    a = hub_factory("--db", url)
    b = hub_factory("--db", url)

    def upkeep(h) -> bool:
        return h.client().call("stats", {})["hub"]["upkeep"]

    wait_until(lambda: upkeep(a) or upkeep(b), 20, what="a hub to take the upkeep")
    leader, other = (a, b) if upkeep(a) else (b, a)
    assert not upkeep(other)  # one at a time
    leader.kill()
    wait_until(lambda: upkeep(other), 20, what="the other hub to take the upkeep over")


def test_a_schedule_fires_once_per_interval_across_hubs(hub_factory, pg, agents_factory):
    url = pg.new_database()
    a = hub_factory("--db", url, "--tick", "0.05")
    b = hub_factory("--db", url, "--tick", "0.05")
    agents = [agents_factory(h, "echo") for h in (a, b)]  # the tasks are worked, so every slot enqueues
    a.client().call("schedule_add", {"kind": "echo", "every": 1.0})
    wait_until(lambda: a.sql("SELECT fired FROM schedules")[0][0] >= 4, 30, what="four firings")
    for ag in agents:
        ag.stop()
    fired = a.sql("SELECT fired FROM schedules")[0][0]
    made = [t for (t,) in a.sql("SELECT created_at FROM tasks WHERE dedupe_key = 'schedule:1' ORDER BY id")]
    assert len(made) == fired  # every firing made one task, none twice
    (start,) = a.sql("SELECT created_at FROM schedules")[0]  # the grid: the first run, then every second
    slots = [int((t - start) // 1.0) for t in made]
    assert len(set(slots)) == len(slots), slots  # never two in one interval


def test_killing_either_hub_again_and_again_loses_no_task_and_acks_none_twice(hub_factory, pg, agents_factory,
                                                                                tmp_path):
    import collections
    import json
    import subprocess
    import sys
    import time

    url = pg.new_database()
    hubs = [hub_factory("--db", url, "--lease-ttl", "2"), hub_factory("--db", url, "--lease-ttl", "2")]
    both = [f"127.0.0.1:{h.port}" for h in hubs]
    agents = []
    for i in range(2):
        journal = tmp_path / f"agent{i}.jsonl"
        agents.append((journal, subprocess.Popen(
            [sys.executable, "-m", "kiri.agents.cli", "--role", "trainer", "--kinds", "echo", "--name", f"ha{i}",
             "--hub", ",".join(both if i == 0 else both[::-1]), "--journal", str(journal), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    client = HubClient([h.address for h in hubs], reconnect_for=30.0)
    accepted: list[int] = []

    def enqueue(key: str) -> int:
        try:
            return client.enqueue("echo", dedupe_key=key)["task_id"]
        except HubUnreachable:  # its hub died under the call: resent, as the error says, with its dedupe key
            return client.enqueue("echo", dedupe_key=key)["task_id"]

    try:
        for k in range(4):  # each hub killed twice, a batch of tasks enqueued around each kill
            accepted += [enqueue(f"{k}-{i}") for i in range(40)]
            victim = hubs[k % 2]
            victim.kill()
            accepted += [enqueue(f"{k}-{i}") for i in range(40, 80)]
            victim.start()
            time.sleep(0.5)
        wait_until(lambda: hubs[0].sql("SELECT count(*) FROM tasks WHERE status <> 'done'") == [(0,)], 90,
                   what="every task done")
    finally:
        for _, proc in agents:
            proc.terminate()
            proc.wait(20)
    done = dict(hubs[0].sql("SELECT id, status FROM tasks"))
    assert len(accepted) == 320 and all(done[t] == "done" for t in accepted)
    acks = collections.Counter(e["task_id"] for journal, _ in agents if journal.exists()
                               for e in map(json.loads, journal.read_text().splitlines()) if e["call"] == "ack")
    assert set(acks) == set(done) and max(acks.values()) == 1  # each task acked once, by one agent


def test_a_sqlite_store_moves_to_postgresql_whole_and_a_hub_carries_on_there(hub_factory, pg, tmp_path):
    import base64
    import subprocess
    import sys

    from kiri.model import schema as S
    from kiri.model.gpt import Atom
    from kiri.model.weights import save_weights
    from tests.conftest import push

    old = hub_factory()
    c = old.client()
    parent = c.enqueue("echo")["task_id"]
    c.enqueue("echo", params={"child": True}, parent_id=parent)
    lease = c.lease(["echo"], ttl=30)
    c.call("checkpoint", {"task_id": lease["task"]["id"], "lease_token": lease["lease"]["token"], "step": 3,
                          "data": base64.b64encode(b"\x00\xffstate").decode()})
    c.call("schedule_add", {"kind": "echo", "every": 3600.0, "first_in": 3600.0})
    push(old, "pulse", [{"cpu": float(i % 7), "mem": 1.0, "disk": 2.0, "swap": 0.0, "load": 0.5, "net": 1.0}
                        for i in range(300)], [1.7e9 + 30 * i for i in range(300)], host="h1")
    blob = save_weights(S.PULSE, Atom.for_schema(S.PULSE))
    c.call("import_weights", {"atom": "pulse", "blob": base64.b64encode(blob).decode(), "activate": True})
    old.terminate()
    url = pg.new_database()

    def kiri_hub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kiri.hub.cli", *args], capture_output=True, text=True,
                              timeout=120)

    out = kiri_hub("migrate-store", "--from", str(old.db_path), "--to", url)
    assert out.returncode == 0, out.stderr
    assert "every table verified" in out.stdout and "observations" in out.stdout
    again = kiri_hub("migrate-store", "--from", str(old.db_path), "--to", url)  # never over data
    assert again.returncode == 1 and "already holds data" in again.stderr
    # the same rows, ids and bytes on the other side
    new = hub_factory("--db", url)
    for q in ("SELECT id, kind, status, parent_id, params FROM tasks ORDER BY id",
              "SELECT count(*), min(id), max(id), sum(ts) FROM observations",
              "SELECT atom, host, n, last_id FROM streams", "SELECT id, kind, every, next_run FROM schedules"):
        assert new.sql(q) == old.sql(q), q
    assert bytes(new.sql("SELECT data FROM checkpoints")[0][0]) == b"\x00\xffstate"
    assert bytes(new.sql("SELECT blob FROM weights")[0][0]) == blob
    c = new.client()  # and the hub carries on: new ids follow the copied ones
    assert c.enqueue("echo")["task_id"] == old.sql("SELECT max(id) FROM tasks")[0][0] + 1
    got = c.call("observe", {"atom": "pulse", "observations": [
        {"values": {"cpu": 1.0, "mem": 1.0, "disk": 2.0, "swap": 0.0, "load": 0.5, "net": 1.0}, "time": 1.8e9}]})
    assert got["first_id"] == 301


def test_an_atom_defined_through_one_hub_is_known_to_the_other(hub_factory, pg):
    url = pg.new_database()
    a = hub_factory("--db", url)
    b = hub_factory("--db", url)  # started before the atom exists: its registry has not seen it
    a.client().call("define_atom", {"schema": {"name": "fans", "fields": [
        {"letter": "R", "name": "rpm", "low": 0, "high": 5000, "buckets": 8}]}})
    got = b.client().call("observe", {"atom": "fans", "observations": [{"values": {"rpm": 1200.0}}]})
    assert got["stored"] == 1
    assert b.sql("SELECT atom FROM observations") == [("fans",)]


def test_a_kinds_concurrency_limit_holds_across_hubs(hub_factory, pg):
    """Two hubs leasing one limited kind at once: at no moment more leased than the limit.

    Each worker counts the tasks it holds between the lease's reply and the ack it sends,
    a span inside the task's time as leased in the database: two at once is two leased."""
    import time

    url = pg.new_database()
    a = hub_factory("--db", url)
    b = hub_factory("--db", url)
    a.client().call("set_kind", {"kind": "echo", "concurrency": 1})
    for _ in range(300):
        a.client().enqueue("echo")
    lock = threading.Lock()
    held = [0, 0]  # now, most at once

    def work(hub, name: str) -> None:
        c = HubClient(hub.address, agent=name)
        c.connect()
        while True:
            res = c.lease(["echo"], wait=1.0, ttl=60)
            if res["task"] is None:
                return
            with lock:
                held[0] += 1
                held[1] = max(held[1], held[0])
            time.sleep(0.002)  # the task's work
            with lock:
                held[0] -= 1
            c.call("ack", {"task_id": res["task"]["id"], "lease_token": res["lease"]["token"]})

    _at_once(work, [(h, f"{tag}{k}") for tag, h in (("a", a), ("b", b)) for k in range(3)])
    assert a.sql("SELECT status, count(*) FROM tasks GROUP BY status") == [("done", 300)]
    assert held[1] == 1, f"{held[1]} tasks of a kind limited to 1 were leased at once"


def test_the_agents_of_a_hub_that_died_are_no_longer_listed_as_connected(hub_factory, pg):
    url = pg.new_database()
    a = hub_factory("--db", url, "--tick", "0.1")
    b = hub_factory("--db", url, "--tick", "0.1")
    clients = [HubClient(h.address, agent=f"on-{tag}", role="trainer") for tag, h in (("a", a), ("b", b))]
    for c in clients:
        c.connect()

    def connected() -> dict[str, bool]:
        return dict(b.sql("SELECT name, connected FROM agents"))

    wait_until(lambda: connected() == {"on-a": True, "on-b": True}, what="both agents listed")
    a.kill()  # no goodbye: the hub doing the upkeep finds its session gone
    wait_until(lambda: connected() == {"on-a": False, "on-b": True}, 20, what="the dead hub's agent marked gone")
    a.start()
    clients[0].close()
    again = HubClient(a.address, agent="on-a", role="trainer")
    again.connect()
    wait_until(lambda: connected() == {"on-a": True, "on-b": True}, what="the agent back")
    assert a.terminate() == 0  # a clean stop marks its own agents only
    assert connected() == {"on-a": False, "on-b": True}
    again.close()
    clients[1].close()


def test_an_alert_cool_down_holds_across_hubs(hub_factory, pg):
    """Alert decisions on one atom recorded through two hubs at once: one alert is delivered,
    the rest fall under its cool-down (each hub's check alone cannot see the other's
    uncommitted alert)."""
    url = pg.new_database()
    a = hub_factory("--db", url)
    b = hub_factory("--db", url)
    leases = []
    for i in range(8):
        a.client().enqueue("decide", params={"i": i})
    for i in range(8):
        hub = (a, b)[i % 2]
        c = hub.client()
        leases.append((c, c.lease(["decide"], ttl=60)))
    barrier = threading.Barrier(len(leases))
    results: list[dict] = []

    def decide(c: HubClient, lease: dict) -> None:
        barrier.wait(10)
        results.append(c.call("record_decision", {
            "task_id": lease["task"]["id"], "lease_token": lease["lease"]["token"], "atom": "pulse",
            "inputs": {}, "action": "alert", "probs": {"alert": 1.0}, "policy": "test", "cooldown": 600}))

    for _round in range(3):  # three rounds of eight at once: a race has three chances to show
        a.sql("DELETE FROM decisions RETURNING id")  # their alerts go with them
        results.clear()
        _at_once(decide, leases, timeout=30)
        assert len(results) == len(leases)
        delivered = [r for r in results if r["alert"]["deliver"]]
        assert len(delivered) == 1, f"{len(delivered)} alerts delivered within one cool-down"
        assert sorted(s for (s,) in a.sql("SELECT status FROM alerts")) == ["cooled"] * 7 + ["pending"]


def test_the_upkeep_hub_vacuums_the_tasks_table_once_enough_rows_are_dead(hub_factory, pg):
    """Each lease and ack leaves a dead row; past --vacuum-tasks-after of them, the hub doing
    the upkeep vacuums the table (autovacuum would wait up to a minute) and the queue goes on."""
    url = pg.new_database()
    a = hub_factory("--db", url, "--vacuum-tasks-after", "200")
    c = a.client()
    for _ in range(300):
        c.enqueue("echo")
    wait_until(lambda: c.call("stats")["hub"]["upkeep"], 10)
    got: dict[int, list[str]] = {}
    _drain(a, "w", got)
    assert len(got) == 300 and all(len(v) == 1 for v in got.values())
    wait_until(lambda: c.call("stats")["hub"]["task_vacuums"] >= 1, 15)
    vacuumed = a.sql("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks'")[0][0]
    assert vacuumed >= 1
    assert a.sql("SELECT status, count(*) FROM tasks GROUP BY status") == [("done", 300)]
