"""Queue semantics through the real protocol: fencing, retries, delays, priorities, dedupe.

Every test here that takes ``hub`` runs twice: on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import base64
import threading
import time

import pytest

from kiri.protocol import Conflict, LeaseLost, NotFound
from tests.conftest import wait_until
from tests.raw import Raw, code, line


@pytest.fixture
def hub(any_hub):
    """The queue's contract holds on both backends."""
    return any_hub


def test_lease_ack_and_repeated_ack(hub):
    c = hub.client()
    tid = c.enqueue("echo", "pulse", {"x": 1})["task_id"]
    got = c.lease(["echo"])
    assert got["task"]["id"] == tid and got["task"]["params"] == {"x": 1}
    assert got["task"]["attempt"] == 1 and got["task"]["checkpoint"] is None
    token = got["lease"]["token"]
    assert c.call("ack", {"task_id": tid, "lease_token": token, "result": {"ok": 1}}) == {"status": "done"}
    assert c.call("ack", {"task_id": tid, "lease_token": token}) == {"status": "already_done"}
    task = c.call("task", {"task_id": tid})["task"]
    assert task["status"] == "done" and task["result"] == {"ok": 1}


def test_lease_filters_by_kind_and_returns_none_without_work(hub):
    c = hub.client()
    c.enqueue("sleep")
    assert c.lease(["echo"]) == {"task": None}
    assert c.lease(["echo", "sleep"])["task"]["kind"] == "sleep"


def test_stale_token_is_fenced_and_changes_nothing(hub):
    c = hub.client()
    tid = c.enqueue("echo", params={"n": 1}, max_attempts=3)["task_id"]
    first = c.lease(["echo"], ttl=0.3)
    old = first["lease"]["token"]
    # let the lease expire; the reaper requeues it and someone else takes it
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "queued", 10)
    second = c.lease(["echo"])
    assert second["task"]["id"] == tid and second["task"]["attempt"] == 2
    before = hub.sql("select * from tasks where id=?", tid)
    for method, extra in [("heartbeat", {}), ("ack", {"result": {"late": True}}),
                          ("checkpoint", {"step": 1, "data": ""}), ("fail", {"error": "x"})]:
        with pytest.raises(LeaseLost):
            c.call(method, {"task_id": tid, "lease_token": old, **extra})
    assert hub.sql("select * from tasks where id=?", tid) == before
    assert hub.sql("select count(*) from checkpoints")[0][0] == 0
    new = second["lease"]["token"]
    assert c.call("ack", {"task_id": tid, "lease_token": new})["status"] == "done"
    row = hub.sql("select expiries, failures, attempts from tasks where id=?", tid)[0]
    assert row == (1, 0, 2)


def test_fail_retries_with_backoff_then_dead_keeping_last_error(hub):
    c = hub.client()
    tid = c.enqueue("fail", max_attempts=3)["task_id"]
    times = []
    for i in range(3):
        got = c.lease(["fail"], wait=5)
        assert got["task"]["id"] == tid and got["task"]["attempt"] == i + 1
        times.append(time.monotonic())
        res = c.call("fail", {"task_id": tid, "lease_token": got["lease"]["token"], "error": f"boom {i}"})
        if i < 2:
            assert res["status"] == "queued" and res["run_after"] > time.time() - 1
        else:
            assert res == {"status": "dead"}
    # backoff: the retries were not immediate (base 0.05 s, equal jitter => >= 0.025 s)
    assert times[1] - times[0] >= 0.02 and times[2] - times[1] >= 0.02
    t = c.call("task", {"task_id": tid})["task"]
    assert t["status"] == "dead" and t["error"] == "boom 2" and t["failures"] == 3
    assert c.lease(["fail"]) == {"task": None}
    assert c.call("retry", {"task_id": tid}) == {"status": "queued"}
    assert c.lease(["fail"])["task"]["attempt"] == 1


def test_fail_without_retry_goes_dead_at_once(hub):
    c = hub.client()
    tid = c.enqueue("fail", max_attempts=5)["task_id"]
    got = c.lease(["fail"])
    res = c.call("fail", {"task_id": tid, "lease_token": got["lease"]["token"], "error": "bad input",
                          "retry": False})
    assert res == {"status": "dead"}
    # the same fail sent again (say after a reconnect) is answered, not applied twice
    again = c.call("fail", {"task_id": tid, "lease_token": got["lease"]["token"], "error": "bad input"})
    assert again == {"status": "dead", "already": True}
    assert hub.sql("select failures from tasks where id=?", tid)[0][0] == 1


def test_expiry_past_max_attempts_is_dead(hub):
    c = hub.client()
    tid = c.enqueue("echo", max_attempts=1)["task_id"]
    c.lease(["echo"], ttl=0.2)
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "dead", 10)
    t = c.call("task", {"task_id": tid})["task"]
    assert t["expiries"] == 1 and t["failures"] == 0 and "lease expired" in t["error"]


def test_delayed_task_waits_and_long_poll_wakes_when_due(hub):
    c = hub.client()
    tid = c.enqueue("echo", delay=0.6)["task_id"]
    assert c.lease(["echo"]) == {"task": None}
    t0 = time.monotonic()
    got = c.lease(["echo"], wait=5)
    waited = time.monotonic() - t0
    assert got["task"]["id"] == tid
    assert 0.3 < waited < 3.0


def test_priorities_then_fifo(hub):
    c = hub.client()
    low = c.enqueue("echo", priority=-1)["task_id"]
    a = c.enqueue("echo")["task_id"]
    b = c.enqueue("echo")["task_id"]
    high = c.enqueue("echo", priority=10)["task_id"]
    order = [c.lease(["echo"])["task"]["id"] for _ in range(4)]
    assert order == [high, a, b, low]


def test_dedupe_key_while_unfinished(hub):
    c = hub.client()
    first = c.enqueue("echo", dedupe_key="retrain:pulse")
    again = c.enqueue("echo", dedupe_key="retrain:pulse")
    assert again == {"task_id": first["task_id"], "deduplicated": True}
    got = c.lease(["echo"])
    assert c.enqueue("echo", dedupe_key="retrain:pulse")["deduplicated"] is True  # leased still counts
    c.call("ack", {"task_id": got["task"]["id"], "lease_token": got["lease"]["token"]})
    later = c.enqueue("echo", dedupe_key="retrain:pulse")
    assert later["deduplicated"] is False and later["task_id"] != first["task_id"]
    assert hub.sql("select count(*) from tasks")[0][0] == 2


def test_cancel_queued_and_leased(hub):
    c = hub.client()
    q = c.enqueue("echo")["task_id"]
    assert c.call("cancel", {"task_id": q}) == {"status": "cancelled"}
    assert c.lease(["echo"]) == {"task": None}
    with pytest.raises(Conflict):
        c.call("cancel", {"task_id": q})
    r = c.enqueue("echo")["task_id"]
    got = c.lease(["echo"])
    assert c.call("cancel", {"task_id": r}) == {"status": "cancelling"}
    hb = c.call("heartbeat", {"task_id": r, "lease_token": got["lease"]["token"]})
    assert hb["cancel"] is True
    res = c.call("fail", {"task_id": r, "lease_token": got["lease"]["token"], "error": "stopped"})
    assert res == {"status": "cancelled"}
    with pytest.raises(NotFound):
        c.call("cancel", {"task_id": 999})
    with pytest.raises(Conflict):
        c.call("retry", {"task_id": c.enqueue("echo")["task_id"]})


def test_checkpoint_is_handed_to_the_next_attempt(hub):
    c = hub.client()
    tid = c.enqueue("count")["task_id"]
    got = c.lease(["count"])
    tok = got["lease"]["token"]
    blob = bytes(range(256)) * 10
    for step in (5, 10):
        res = c.call("checkpoint", {"task_id": tid, "lease_token": tok, "step": step,
                                    "data": base64.b64encode(blob + bytes([step])).decode()})
        assert res["stored"] is True
    c.call("fail", {"task_id": tid, "lease_token": tok, "error": "crash", "delay": 0})
    again = c.lease(["count"])
    assert again["task"]["checkpoint"]["step"] == 10
    assert base64.b64decode(again["task"]["checkpoint"]["data"]) == blob + bytes([10])
    detail = c.call("task", {"task_id": tid})["task"]["checkpoint"]
    assert detail["step"] == 10 and detail["size"] == len(blob) + 1 and detail["attempt"] == 1


def test_release_gives_the_attempt_back(hub):
    c = hub.client()
    tid = c.enqueue("echo", max_attempts=1)["task_id"]
    got = c.lease(["echo"])
    res = c.call("fail", {"task_id": tid, "lease_token": got["lease"]["token"], "release": True})
    assert res["status"] == "queued"
    again = c.lease(["echo"])
    assert again["task"]["attempt"] == 1


def test_long_poll_wakes_on_enqueue(hub):
    waiter = hub.client()
    other = hub.client()
    result = {}

    def wait_for_work() -> None:
        t0 = time.monotonic()
        result["reply"] = waiter.lease(["echo"], wait=20)
        result["took"] = time.monotonic() - t0

    th = threading.Thread(target=wait_for_work)
    th.start()
    wait_until(lambda: other.call("stats")["hub"]["waiting_leases"] == 1, 5)
    t_enq = time.monotonic()
    tid = other.enqueue("echo")["task_id"]
    th.join(10)
    assert result["reply"]["task"]["id"] == tid
    assert time.monotonic() - t_enq < 2.0  # woken by the enqueue, not by the 20 s timeout


def test_long_poll_times_out_with_no_task(hub):
    c = hub.client()
    t0 = time.monotonic()
    assert c.lease(["echo"], wait=0.3) == {"task": None}
    assert time.monotonic() - t0 >= 0.25


def test_long_poll_wakes_on_lease_expiry(hub):
    a, b = hub.client(), hub.client()
    tid = a.enqueue("echo")["task_id"]
    a.lease(["echo"], ttl=0.3)
    got = b.lease(["echo"], wait=10)  # woken when the reaper requeues the expired task
    assert got["task"]["id"] == tid and got["task"]["attempt"] == 2


def test_tasks_listing_and_filters(hub):
    c = hub.client()
    ids = [c.enqueue("echo", "pulse")["task_id"] for _ in range(3)] + [c.enqueue("sleep", "drift")["task_id"]]
    page = c.call("tasks", {"limit": 2})
    assert [t["id"] for t in page["tasks"]] == ids[::-1][:2] and page["next_before_id"] == ids[2]
    rest = c.call("tasks", {"limit": 2, "before_id": page["next_before_id"]})
    assert [t["id"] for t in rest["tasks"]] == ids[::-1][2:]
    assert [t["id"] for t in c.call("tasks", {"kind": "sleep"})["tasks"]] == [ids[3]]
    assert len(c.call("tasks", {"atom": "pulse", "status": "queued"})["tasks"]) == 3
    stats = c.call("stats")
    assert {"kind": "echo", "status": "queued", "count": 3} in stats["tasks"]


def test_parent_lineage_is_checked(hub):
    c = hub.client()
    parent = c.enqueue("echo")["task_id"]
    child = c.enqueue("echo", parent_id=parent)["task_id"]
    assert c.call("task", {"task_id": child})["task"]["parent_id"] == parent
    with pytest.raises(NotFound):
        c.enqueue("echo", parent_id=424242)


def test_ack_and_lease_in_one_round_trip(hub):
    c = hub.client()
    a = c.enqueue("echo")["task_id"]
    b = c.enqueue("echo")["task_id"]
    c.enqueue("sleep")
    got = c.lease(["echo"])
    res = c.call("ack", {"task_id": a, "lease_token": got["lease"]["token"], "next": {"kinds": ["echo"]}})
    assert res["status"] == "done" and res["next"]["task"]["id"] == b
    res2 = c.call("ack", {"task_id": b, "lease_token": res["next"]["lease"]["token"],
                          "next": {"kinds": ["echo"]}})
    assert res2 == {"status": "done", "next": {"task": None}}  # never waits; the sleep task is not ours
    assert hub.sql("select status from tasks where id=?", b)[0][0] == "done"


def test_ack_and_lease_drops_its_checkpoint_hands_on_the_next_ones_and_fences(hub):
    """On PostgreSQL all of this is one statement: the ack, its checkpoint's deletion, the
    next lease and that task's checkpoint; on SQLite, the statements one by one."""
    c = hub.client()
    a = c.enqueue("count")["task_id"]
    b = c.enqueue("count")["task_id"]
    for tid, step in ((a, 3), (b, 7)):  # both get a checkpoint; b's attempt fails and is requeued
        got = c.lease(["count"])
        assert got["task"]["id"] == tid
        c.call("checkpoint", {"task_id": tid, "lease_token": got["lease"]["token"], "step": step,
                              "data": base64.b64encode(bytes([step]) * 3).decode()})
        if tid == b:
            c.call("fail", {"task_id": b, "lease_token": got["lease"]["token"], "error": "crash", "delay": 0})
        else:
            tok_a = got["lease"]["token"]
    with pytest.raises(LeaseLost):  # a wrong token acks nothing and leases nothing
        c.call("ack", {"task_id": a, "lease_token": "f" * 32, "next": {"kinds": ["count"]}})
    assert hub.sql("select status from tasks where id=?", b)[0][0] == "queued"
    res = c.call("ack", {"task_id": a, "lease_token": tok_a, "next": {"kinds": ["count"], "ttl": 120}})
    assert res["status"] == "done"
    nxt = res["next"]
    assert nxt["task"]["id"] == b and nxt["task"]["attempt"] == 2 and nxt["lease"]["ttl"] == 120
    assert nxt["task"]["checkpoint"]["step"] == 7
    assert base64.b64decode(nxt["task"]["checkpoint"]["data"]) == bytes([7]) * 3
    assert hub.sql("select task_id from checkpoints") == [(b,)]  # a's went with its ack
    assert hub.sql("select status, lease_token from tasks where id=?", b) == [("leased", nxt["lease"]["token"])]
    c.call("heartbeat", {"task_id": b, "lease_token": nxt["lease"]["token"]})  # the new lease is live


def test_pipelined_enqueues_each_get_what_they_would_alone(hub):
    """Enqueues sent back to back run together (on PostgreSQL the plain ones are one
    pipelined insert); each still gets its own answer, in order, and its own task."""
    c = hub.client()
    parent = c.enqueue("echo")["task_id"]
    existing = c.enqueue("echo", dedupe_key="d1")["task_id"]
    raw = Raw(hub.address)
    raw.hello()
    params = [
        {"kind": "echo", "params": {"i": 0}},
        {"kind": "echo", "params": {"i": 1}, "priority": 4},
        {"kind": "echo", "params": {"i": 2}, "dedupe_key": "d1"},  # joins the unfinished one
        {"kind": "echo", "params": {"i": 3}, "parent_id": parent},
        {"kind": "echo", "params": {"i": 4}, "parent_id": 424242},  # refused alone
        {"kind": "sleep", "params": {"i": 5}, "delay": 3600},
        {"kind": "echo", "params": {"i": 6}, "atom": "pulse"},
        {"kind": "echo", "params": {"i": 7}, "dedupe_key": "d2"},  # new: a task of its own
        {"kind": "echo", "params": {"i": 8}},
    ]
    raw.send(b"".join(line({"jsonrpc": "2.0", "id": 100 + i, "method": "enqueue", "params": p})
                      for i, p in enumerate(params)))
    replies = [raw.recv() for _ in params]
    assert [r["id"] for r in replies] == [100 + i for i in range(len(params))]
    assert code(replies[4]) == NotFound.code
    assert replies[2]["result"] == {"task_id": existing, "deduplicated": True}
    made = {i: r["result"]["task_id"] for i, r in enumerate(replies) if i not in (2, 4)}
    assert all(not replies[i]["result"]["deduplicated"] for i in made)
    assert list(made.values()) == sorted(made.values()) and min(made.values()) > existing
    for i, tid in made.items():  # every id names the task made from its own request
        task = c.call("task", {"task_id": tid})["task"]
        assert task["params"] == {"i": i} and task["kind"] == params[i]["kind"]
        assert task["priority"] == params[i].get("priority", 0) and task["atom"] == params[i].get("atom")
        assert task["parent_id"] == params[i].get("parent_id")
    assert hub.sql("select count(*) from tasks")[0][0] == 2 + len(made)
    assert c.lease(["echo"])["task"]["id"] == made[1]  # priority 4 first
    assert c.lease(["sleep"]) == {"task": None}  # delayed an hour
    raw.close()


def test_pipelined_acks_each_get_what_they_would_alone(hub):
    """Acks that arrive together run in one batch (on PostgreSQL each is one ack-and-lease
    statement); each still gets its own answer and its own next task, a lost lease its
    error and a resend its already-done answer."""
    ids = [hub.client().enqueue("echo", params={"i": i})["task_id"] for i in range(8)]
    raw = Raw(hub.address)
    assert raw.hello()["result"]["agent_id"]
    held = []
    for k in range(4):
        got = raw.call({"jsonrpc": "2.0", "id": f"l{k}", "method": "lease", "params": {"kinds": ["echo"]}})["result"]
        held.append((got["task"]["id"], got["lease"]["token"]))
    assert [t for t, _ in held] == ids[:4]
    acks = [
        {"task_id": held[0][0], "lease_token": held[0][1], "result": {"n": 0}, "next": {"kinds": ["echo"]}},
        {"task_id": held[1][0], "lease_token": "f" * 32, "next": {"kinds": ["echo"]}},  # not its lease
        {"task_id": held[2][0], "lease_token": held[2][1], "result": {"n": 2}, "next": {"kinds": ["echo"], "ttl": 90}},
        {"task_id": held[0][0], "lease_token": held[0][1], "next": {"kinds": ["echo"]}},  # a resend of the first
        {"task_id": held[3][0], "lease_token": held[3][1], "next": {"kinds": ["echo"]}},
    ]
    raw.send(b"".join(line({"jsonrpc": "2.0", "id": 200 + i, "method": "ack", "params": a})
                      for i, a in enumerate(acks)))
    replies = [raw.recv() for _ in acks]
    assert [r["id"] for r in replies] == [200 + i for i in range(len(acks))]
    assert code(replies[1]) == LeaseLost.code
    assert [replies[i]["result"]["status"] for i in (0, 2, 3, 4)] == ["done", "done", "already_done", "done"]
    nexts = [replies[i]["result"]["next"] for i in (0, 2, 3, 4)]
    assert sorted(n["task"]["id"] for n in nexts) == ids[4:]  # four next tasks, none twice
    assert nexts[1]["lease"]["ttl"] == 90
    for n in nexts:  # each next lease is live and held by this agent
        row = hub.sql("select status, lease_token, lease_owner from tasks where id=?", n["task"]["id"])
        assert row == [("leased", n["lease"]["token"], "raw")]
    assert hub.sql("select status from tasks where id=?", held[1][0]) == [("leased",)]  # untouched
    assert _task_result(hub, held[0][0]) == {"n": 0} and _task_result(hub, held[2][0]) == {"n": 2}
    raw.close()


def _task_result(hub, task_id: int) -> dict:
    return hub.client().call("task", {"task_id": task_id})["task"]["result"]


def test_resent_ack_and_lease_still_hands_out_work(hub):
    c = hub.client()
    a = c.enqueue("echo")["task_id"]
    c.enqueue("echo")
    c.enqueue("echo")
    got = c.lease(["echo"])
    first = c.call("ack", {"task_id": a, "lease_token": got["lease"]["token"], "next": {"kinds": ["echo"]}})
    # pretend the reply was lost: the same ack again
    again = c.call("ack", {"task_id": a, "lease_token": got["lease"]["token"], "next": {"kinds": ["echo"]}})
    assert first["status"] == "done" and again["status"] == "already_done"
    assert again["next"]["task"] is not None and again["next"]["task"]["id"] != first["next"]["task"]["id"]


def test_last_hours_throughput_equals_brute_force(tmp_path):
    import math
    import random

    from kiri.hub.core import queue as Q
    from kiri.hub.store import migrate as mig
    from kiri.hub.store.db import make_engine
    from kiri.hub.store.schema import tasks

    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    mig.upgrade(engine)
    now, rng = 1_000_000.0, random.Random(5)
    rows = []
    for _ in range(3000):
        end = now - rng.uniform(0, 7200)  # half inside the hour, half before it
        start = None if rng.random() < 0.05 else end - rng.expovariate(0.5) + (5 if rng.random() < 0.02 else 0)
        rows.append({"kind": rng.choice(["echo", "train", "score"]), "status": rng.choice(["done"] * 6 + ["dead",
                     "cancelled"]), "run_after": 0.0, "created_at": 0.0, "updated_at": 0.0,
                     "started_at": start, "finished_at": end})
    rows.append({"kind": "idle", "status": "queued", "run_after": 0.0, "created_at": 0.0, "updated_at": 0.0,
                 "started_at": None, "finished_at": None})
    with engine.begin() as c:
        c.execute(tasks.insert(), rows)
    with engine.connect() as c:
        got = {r["kind"]: r for r in Q.throughput(c, now)}
    recent = [r for r in rows if r.get("finished_at") is not None and r["finished_at"] > now - 3600]
    assert set(got) == {r["kind"] for r in recent}
    for kind, g in got.items():
        mine = [r for r in recent if r["kind"] == kind]
        n = {s: sum(r["status"] == s for r in mine) for s in ("done", "dead", "cancelled")}
        d = sorted(max(0.0, r["finished_at"] - r["started_at"]) for r in mine
                   if r["status"] == "done" and r["started_at"] is not None)
        assert {s: g[s] for s in n} == n
        assert g["mean_s"] == pytest.approx(sum(d) / len(d))
        assert g["p95_s"] == pytest.approx(d[math.ceil(0.95 * len(d)) - 1])
        assert g["error_rate"] == pytest.approx(n["dead"] / (n["done"] + n["dead"]))
        assert g["per_minute"] == pytest.approx(n["done"] / 60)
