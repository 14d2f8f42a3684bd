"""Agents and hubs as real processes, killed for real: no task lost, none done twice."""

from __future__ import annotations

import collections
import signal
import threading
import time

import pytest

from kiri.agents.handlers import TaskContext
from kiri.agents.runner import Heartbeater
from kiri.protocol import LeaseLost
from tests.conftest import wait_until


def _enqueue_many(hub, n: int, kind: str = "echo") -> list[int]:
    c = hub.client()
    ids = [c.enqueue(kind, params={"i": i})["task_id"] for i in range(n)]
    c.close()
    return ids


def _assert_each_done_exactly_once(hub, agents, ids) -> None:
    # "already_done" answers an ack resent after a lost reply (the hub committed, then died before
    # replying): same lease token, so the same holder; its first ack was the one applied.
    acks = collections.Counter(
        e["task_id"] for a in agents for e in a.entries()
        if e["call"] == "ack" and e["status"] in ("done", "already_done")
    )
    assert set(acks) == set(ids), f"missing acks for {sorted(set(ids) - set(acks))[:10]}"
    twice = [t for t, n in acks.items() if n != 1]
    assert not twice, f"tasks acked as done more than once: {twice[:10]}"
    rows = dict(hub.sql("select status, count(*) from tasks group by status"))
    assert rows == {"done": len(ids)}


@pytest.mark.parametrize("n_agents", [2, 8])
def test_agents_drain_2000_tasks_exactly_once(hub, agents_factory, n_agents):
    agents = [agents_factory(hub, "echo") for _ in range(n_agents)]
    ids = _enqueue_many(hub, 2000)
    wait_until(lambda: hub.sql("select count(*) from tasks where status='done'")[0][0] == 2000, 120,
               what="all tasks done")
    for a in agents:
        assert a.stop() == 0
    _assert_each_done_exactly_once(hub, agents, ids)
    workers = {e["agent"] for a in agents for e in a.entries()}
    assert len(workers) >= 2  # the work really was shared


def test_sigkilled_agent_loses_its_lease_and_its_late_ack_is_refused(hub, agents_factory):
    c = hub.client()
    tid = c.enqueue("sleep", params={"seconds": 60})["task_id"]
    victim = agents_factory(hub, "sleep", "--lease-ttl", "1")
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "leased", 20)
    token = hub.sql("select lease_token from tasks where id=?", tid)[0][0]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    rescuer = agents_factory(hub, "sleep", "--lease-ttl", "1")
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "leased"
               and hub.sql("select lease_token from tasks where id=?", tid)[0][0] != token, 20,
               what="task re-leased to the rescuer")
    with pytest.raises(LeaseLost):
        c.call("ack", {"task_id": tid, "lease_token": token, "result": {"from": "the dead"}})
    row = hub.sql("select status, expiries, result from tasks where id=?", tid)[0]
    assert row[0] == "leased" and row[1] == 1 and row[2] is None
    c.call("cancel", {"task_id": tid})
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "cancelled", 20)
    rescuer.stop()


def test_an_agent_whose_hub_is_gone_still_stops_on_sigterm(hub, agents_factory):
    agent = agents_factory(hub, "sleep")
    tid = hub.client().enqueue("sleep", params={"seconds": 60})["task_id"]
    wait_until(lambda: hub.sql("SELECT status FROM tasks WHERE id = ?", tid) == [("leased",)], 30,
               what="the task leased")
    hub.kill()  # gone for good: the agent's calls would retry forever
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(30) == 0  # it gives the reconnecting up and exits; the lease will expire
    hub.start()  # the task is not lost: its lease expires and it waits for another agent
    wait_until(lambda: hub.sql("SELECT status, expiries FROM tasks WHERE id = ?", tid) == [("queued", 1)], 30,
               what="the lease to expire")


def test_hub_killed_and_restarted_while_agents_work(hub, agents_factory):
    agents = [agents_factory(hub, "sleep") for _ in range(3)]
    c = hub.client()
    ids = [c.enqueue("sleep", params={"seconds": 0.02})["task_id"] for _ in range(300)]
    c.close()
    for _ in range(4):
        time.sleep(0.6)
        hub.kill()
        time.sleep(0.2)
        hub.start()
    wait_until(lambda: hub.sql("select count(*) from tasks where status='done'")[0][0] == len(ids), 120,
               what="all tasks done after hub restarts")
    for a in agents:
        assert a.proc.poll() is None, "agents must survive hub restarts by themselves"
        a.stop()
    _assert_each_done_exactly_once(hub, agents, ids)


def _kill_after_checkpoint(hub, agents_factory, tid: int, *agent_args: str):
    """Start an agent, SIGKILL it once the task has checkpointed step 20 or later, and start
    another: returns the step saved when it died and the second agent."""
    first = agents_factory(hub, *agent_args)

    def checkpointed_step() -> int:
        rows = hub.sql("select step from checkpoints where task_id=?", tid)
        return rows[0][0] if rows else 0

    wait_until(lambda: checkpointed_step() >= 20, 30, what="a checkpoint at step >= 20")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    saved = checkpointed_step()
    return saved, agents_factory(hub, *agent_args)


def test_killed_checkpointing_task_resumes_from_its_checkpoint(hub, agents_factory):
    c = hub.client()
    tid = c.enqueue("count", params={"n": 60, "interval": 0.05, "every": 5})["task_id"]
    saved, second = _kill_after_checkpoint(hub, agents_factory, tid, "count", "--lease-ttl", "1")
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 60)
    result = c.call("task", {"task_id": tid})["task"]["result"]
    assert result["resumed_from"] >= saved >= 20
    assert result["steps_run"] == 60 - result["resumed_from"]
    assert result["sum"] == sum(range(1, 61))  # the state carried across is correct
    second.stop()


def test_sigterm_releases_the_task_for_another_agent_at_once(hub, agents_factory):
    c = hub.client()
    tid = c.enqueue("count", params={"n": 400, "interval": 0.05, "every": 10}, max_attempts=1)["task_id"]
    first = agents_factory(hub, "count")  # default 30 s lease: only a release frees it quickly
    wait_until(lambda: (hub.sql("select step from checkpoints where task_id=?", tid) or [(0,)])[0][0] >= 10, 30)
    t0 = time.monotonic()
    assert first.stop(signal.SIGTERM) == 0
    row = hub.sql("select status, attempts, failures from tasks where id=?", tid)[0]
    assert row == ("queued", 0, 0)  # handed back, attempt returned, not a failure
    assert time.monotonic() - t0 < 10
    saved = hub.sql("select step from checkpoints where task_id=?", tid)[0][0]
    second = agents_factory(hub, "count")
    # running it, not only leased: a lease reply still on its way when SIGINT lands is lost
    # with the process, and the task then waits out its 30 s lease (one run in five here)
    wait_until(lambda: hub.sql("select step from checkpoints where task_id=?", tid)[0][0] > saved, 30,
               what="the second agent to checkpoint past the first")
    second.stop(signal.SIGINT)
    lease = c.lease(["count"])
    assert lease["task"]["checkpoint"]["step"] > saved >= 10


def test_cancel_reaches_a_running_handler(hub, agents_factory):
    c = hub.client()
    tid = c.enqueue("sleep", params={"seconds": 120})["task_id"]
    agent = agents_factory(hub, "sleep")
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "leased", 20)
    assert c.call("cancel", {"task_id": tid})["status"] == "cancelling"
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "cancelled", 20)
    assert agent.proc.poll() is None
    agent.stop()


def test_a_hub_told_to_stop_while_it_starts_stops_cleanly(hub_factory):
    # the hub accepts connections before its start-up is over (its read workers warm up
    # before the HTTP face opens); a SIGTERM in that time killed it outright (exit -15)
    import socket

    hub = hub_factory("--read-processes", "2", http=True, start=False)
    hub.start(wait=False)
    wait_until(lambda: _accepts(hub.port), 30, interval=0.001, what="the hub to accept connections")
    hub.proc.send_signal(signal.SIGTERM)
    assert hub.proc.wait(30) == 0, hub.log()
    assert "hub stopped cleanly" in hub.log()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", hub.port), timeout=0.5)


def test_a_hub_stops_at_once_whatever_its_read_workers_are_doing(hub_factory):
    # read workers start at a low priority; on a busy machine their start-up took tens of
    # seconds, and a hub told to stop meanwhile waited for it. Stopped outright here (as
    # good as starved): the hub must still stop cleanly, and take them with it.
    import psutil

    hub = hub_factory("--read-processes", "2", http=True)  # (not the default on two cores)
    me = psutil.Process(hub.proc.pid)

    def read_workers() -> list[psutil.Process]:  # (not multiprocessing's resource tracker)
        return [p for p in me.children() if "spawn_main" in " ".join(p.cmdline())]

    wait_until(lambda: len(read_workers()) >= 2, 60, what="the read workers to start")
    workers = read_workers()
    for w in workers:
        w.suspend()
    hub.proc.send_signal(signal.SIGTERM)
    assert hub.proc.wait(30) == 0, hub.log()
    assert "hub stopped cleanly" in hub.log()
    for w in workers:
        with pytest.raises(psutil.NoSuchProcess):
            w.status()


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_hub_sigterm_is_graceful_and_agents_wait_for_it(hub, agents_factory):
    agent = agents_factory(hub, "echo")
    c = hub.client()
    wait_until(lambda: c.call("stats")["hub"]["waiting_leases"] >= 1, 20)
    c.close()
    assert hub.terminate() == 0
    assert "hub stopped cleanly" in hub.log()
    assert not (hub.data_dir / "kiri.db-wal").exists() or (hub.data_dir / "kiri.db-wal").stat().st_size == 0
    hub.start()
    c = hub.client()
    tid = c.enqueue("echo")["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 30)
    agent.stop()


def test_failing_handler_retries_then_dies_with_its_error(hub, agents_factory):
    c = hub.client()
    tid = c.enqueue("fail", params={"message": "disk on fire"}, max_attempts=3)["task_id"]
    agent = agents_factory(hub, "fail")
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "dead", 30)
    t = c.call("task", {"task_id": tid})["task"]
    assert t["attempts"] == 3 and t["failures"] == 3 and t["error"] == "disk on fire"
    agent.stop()


def test_a_failure_with_a_huge_message_still_fails_its_task(hub, agents_factory):
    # the hub takes at most 64 KiB of error text; a longer message had its fail refused,
    # and the task sat leased until its lease expired
    c = hub.client()
    message = "start " + "x" * 100_000 + " end"
    tid = c.enqueue("fail", params={"message": message}, max_attempts=1)["task_id"]
    agent = agents_factory(hub, "fail", "--lease-ttl", "60")
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "dead", 20,
               what="the task to fail at once (not when its lease expires)")
    error = c.call("task", {"task_id": tid})["task"]["error"]
    assert len(error) <= 8000 and error.startswith("start x") and error.endswith("x end") and "cut" in error
    agent.stop()
    c.close()


def test_max_tasks_counts_a_failed_task_and_the_agent_exits(hub, agents_factory):
    c = hub.client()
    failing = c.enqueue("fail", params={"message": "no"}, max_attempts=2)["task_id"]
    agent = agents_factory(hub, "fail,echo", "--max-tasks", "1")
    assert agent.proc.wait(30) == 0  # it worked its one task (which failed) and left
    t = c.call("task", {"task_id": failing})["task"]
    assert t["attempts"] == 1 and t["status"] == "queued"  # failed once, waiting for its retry
    later = c.enqueue("echo", params={"x": 1})["task_id"]
    assert c.call("task", {"task_id": later})["task"]["status"] == "queued"  # nobody took it
    c.close()


def test_a_users_own_functions_run_as_tasks_like_the_built_in_ones(hub, agents_factory, tmp_path, monkeypatch):
    (tmp_path / "userjobs.py").write_text(
        "from kiri.agents.handlers import TaskError\n"
        "def resize(ctx):\n"
        "    ctx.progress(step=1, steps=1)\n"
        "    return {'w': ctx.params['w'] * 2, 'attempt': ctx.attempt}\n"
        "def explode(ctx):\n"
        "    raise RuntimeError('disk on fire')\n"
        "def refuse(ctx):\n"
        "    raise TaskError('bad input', retry=False)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    c = hub.client()
    ok = c.enqueue("resize", params={"w": 21})["task_id"]
    boom = c.enqueue("boom", max_attempts=2)["task_id"]
    no = c.enqueue("refuse", max_attempts=5)["task_id"]
    agent = agents_factory(hub, "resize,boom,refuse", "--handler", "userjobs:resize",
                           "--handler", "boom=userjobs:explode", "--handler", "userjobs:refuse")
    wait_until(lambda: {r[0] for r in hub.sql("select status from tasks")} == {"done", "dead"}, 60,
               what="every task ended")
    t = c.call("task", {"task_id": ok})["task"]
    assert t["status"] == "done" and t["result"] == {"w": 42, "attempt": 1}
    t = c.call("task", {"task_id": boom})["task"]  # an exception is retried, then the task dies with it
    assert t["status"] == "dead" and t["attempts"] == 2 and "RuntimeError: disk on fire" in t["error"]
    t = c.call("task", {"task_id": no})["task"]  # TaskError(retry=False) ends it at once
    assert t["status"] == "dead" and t["attempts"] == 1 and t["error"] == "bad input"
    agent.stop()
    c.close()


def test_a_handler_that_cannot_be_imported_stops_the_agent_at_start(hub, agents_factory, tmp_path, monkeypatch):
    (tmp_path / "brokenjobs.py").write_text("import no_such_dependency\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    for spec, says in (("brokenjobs:f", "cannot import brokenjobs: ModuleNotFoundError"),
                       ("json:no_such_function", "json has no no_such_function"), ("nonsense", "expected [KIND=]")):
        agent = agents_factory(hub, "echo", "--handler", spec)
        assert agent.proc.wait(30) == 2
        assert says in agent.log_path.read_text()


def test_python_client_enqueues_waits_and_gathers_children(hub, agents_factory):
    import kiri

    agent = agents_factory(hub, "echo,fail")
    with kiri.Client(f"127.0.0.1:{hub.port}", token=hub.token) as c:
        parent = c.enqueue("echo", {"n": 1})
        assert c.wait(parent, timeout=30) == {"echo": {"n": 1}}
        kids = [c.enqueue("echo", {"i": i}, parent=parent) for i in range(5)]
        assert c.wait_all(kids, timeout=30) == [{"echo": {"i": i}} for i in range(5)]
        assert {c.task(k)["parent_id"] for k in kids} == {parent}
        bad = c.enqueue("fail", {"message": "nope", "retry": False})
        with pytest.raises(kiri.TaskFailed, match="nope") as err:
            c.wait(bad, timeout=30)
        assert err.value.task["status"] == "dead"
        idle = c.enqueue("nobody_serves_this")
        with pytest.raises(TimeoutError, match="still queued"):
            c.wait(idle, timeout=0.3)
        states = [t["status"] for t in c.updates(c.enqueue("echo", {"x": 2}), timeout=30)]
        assert states[-1] == "done"
        assert c.pause("echo")["paused"] is True
        held = c.enqueue("echo", {"held": 1}, deadline=30)
        with pytest.raises(TimeoutError, match="still queued"):
            c.wait(held, timeout=0.5)
        assert c.limit("echo", 1)["concurrency"] == 1
        assert {k["kind"]: k["queued"] for k in c.kinds()}["echo"] == 1
        c.resume("echo")
        assert c.wait(held, timeout=30) == {"echo": {"held": 1}}
        assert c.task(held)["deadline"] == 30.0
    agent.stop()


def test_concurrent_clients_never_double_lease(hub):
    """Many raw clients leasing at once from one queue: each task goes to exactly one."""
    ids = set(_enqueue_many(hub, 400))
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        c = hub.client()
        while True:
            r = c.lease(["echo"], ttl=60)
            if r["task"] is None:
                break
            c.call("ack", {"task_id": r["task"]["id"], "lease_token": r["lease"]["token"]})
            with lock:
                got.append(r["task"]["id"])
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(ids)


HANGING_JOBS = (
    "import time\n"
    "def hang(ctx):\n"
    "    time.sleep(3600)\n"
    "def spin(ctx):\n"
    "    while True:\n"
    "        pass\n"
    "def stubborn(ctx):\n"
    "    while True:\n"
    "        try:\n"
    "            time.sleep(3600)\n"
    "        except BaseException:\n"
    "            pass\n"
    "def quick(ctx):\n"
    "    return {'ok': True}\n"
)


def test_a_handler_past_its_deadline_is_stopped_and_its_task_fails_like_any_failure(
        hub, agents_factory, tmp_path, monkeypatch):
    (tmp_path / "hangjobs.py").write_text(HANGING_JOBS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    c = hub.client()
    hang = c.enqueue("hang", deadline=0.5, max_attempts=2)["task_id"]
    c.call("set_kind", {"kind": "spin", "deadline": 0.5})  # the kind's default deadline
    spin = c.enqueue("spin", max_attempts=1)["task_id"]
    agent = agents_factory(hub, "hang,spin,quick", "--handler", "hangjobs:hang", "--handler", "hangjobs:spin",
                           "--handler", "hangjobs:quick")
    wait_until(lambda: {r[0] for r in hub.sql("select status from tasks")} == {"dead"}, 60,
               what="both hanging tasks to die")
    for tid, attempts in ((hang, 2), (spin, 1)):
        t = c.call("task", {"task_id": tid})["task"]
        assert t["attempts"] == attempts and t["failures"] == attempts
        assert "deadline passed: the attempt ran longer than 0.5 s" in t["error"]
    # the agent stopped the handlers and lives on: it runs the next task
    quick = c.enqueue("quick")["task_id"]
    wait_until(lambda: c.call("task", {"task_id": quick})["task"]["status"] == "done", 30, what="the next task")
    assert agent.proc.poll() is None
    agent.stop()
    c.close()


def test_a_handler_that_will_not_stop_at_its_deadline_is_failed_and_its_agent_exits(
        hub, agents_factory, tmp_path, monkeypatch):
    (tmp_path / "hangjobs.py").write_text(HANGING_JOBS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    c = hub.client()
    tid = c.enqueue("stubborn", deadline=0.3, max_attempts=3)["task_id"]
    agent = agents_factory(hub, "stubborn", "--handler", "hangjobs:stubborn")
    assert agent.proc.wait(60) == 3
    t = c.call("task", {"task_id": tid})["task"]
    assert t["status"] == "queued" and t["failures"] == 1  # retried like any failure, not lost
    assert "did not stop when interrupted" in t["error"]
    assert "ran past its deadline" in agent.log_path.read_text()
    c.close()


def test_a_users_handler_killed_midway_resumes_from_its_checkpoint_like_a_built_in_one(
        hub, agents_factory, tmp_path, monkeypatch):
    (tmp_path / "stepjobs.py").write_text(
        "import struct\n"
        "def tally(ctx):\n"
        "    step, total = 0, 0\n"
        "    if ctx.checkpoint_in is not None:\n"
        "        step = ctx.checkpoint_in.step\n"
        "        (total,) = struct.unpack('<q', ctx.checkpoint_in.data)\n"
        "    start = step\n"
        "    while step < 60:\n"
        "        step += 1\n"
        "        total += step\n"
        "        ctx.sleep(0.05)\n"
        "        if step % 5 == 0:\n"
        "            ctx.checkpoint(step, struct.pack('<q', total))\n"
        "    return {'sum': total, 'resumed_from': start, 'attempt': ctx.attempt}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    c = hub.client()
    tid = c.enqueue("tally")["task_id"]
    saved, second = _kill_after_checkpoint(hub, agents_factory, tid, "tally", "--handler", "stepjobs:tally",
                                           "--lease-ttl", "1")
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 60, what="done")
    t = c.call("task", {"task_id": tid})["task"]
    assert t["result"]["resumed_from"] >= saved >= 20 and t["result"]["attempt"] == 2
    assert t["result"]["sum"] == sum(range(1, 61)) and t["expiries"] == 1  # the killed lease expired, once
    second.stop()


def test_the_heartbeat_thread_beats_each_lease_at_its_own_interval(hub):
    """The heartbeat thread is not woken for every task, only when a lease's first beat is due
    before the thread would wake anyway: here a short lease right after a long one, whose
    first beat the thread would otherwise send 2 s later, long after the short one expired."""
    c = hub.client()
    beater = Heartbeater(c)
    beater.start()
    try:
        first, second = c.enqueue("sleep")["task_id"], c.enqueue("sleep")["task_id"]

        def watched(task_id: int, ttl: float) -> tuple[TaskContext, str]:
            got = c.lease(["sleep"], ttl=ttl)
            assert got["task"]["id"] == task_id
            token = got["lease"]["token"]
            ctx = TaskContext(task_id=task_id, kind="sleep", atom=None, params={}, attempt=1,
                              checkpoint_in=None, save=lambda _s, _d: None, hub=c, lease_token=token)
            beater.watch(ctx, token, ttl)
            return ctx, token

        _, long_token = watched(first, 60.0)  # its first beat is 2 s away: the thread sleeps till then
        beater.unwatch()
        c.call("ack", {"task_id": first, "lease_token": long_token})
        ctx, token = watched(second, 1.5)  # beats every 0.5 s
        time.sleep(3.5)  # more than twice its ttl: only heartbeats keep it
        assert hub.sql("select status, lease_token, attempts from tasks where id=?", second) == [("leased", token, 1)]
        assert not ctx.lease_lost
        beater.unwatch()
        assert c.call("ack", {"task_id": second, "lease_token": token}) == {"status": "done"}
    finally:
        beater.close()
        c.close()
