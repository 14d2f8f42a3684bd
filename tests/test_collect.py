"""Collection of this machine's real state, driven by schedules that live in the hub."""

from __future__ import annotations

import socket

from tests.conftest import wait_until
from tests.test_cli import kiri


def test_collector_pushes_real_pulse_readings(hub, agents_factory):
    # the network probe targets a port on this machine that we open ourselves
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    agent = agents_factory(hub, "collect")
    c = hub.client()
    up = c.enqueue("collect", "pulse", {"probe": f"127.0.0.1:{port}"})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", up)[0][0] == "done", 60)
    listener.close()
    down = c.enqueue("collect", "pulse", {"probe": f"127.0.0.1:{port}"})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", down)[0][0] == "done", 60)
    first, second = (c.call("task", {"task_id": t})["task"]["result"]["values"] for t in (up, down))
    assert first["net"] == 1.0 and second["net"] == 0.0
    for v in (first, second):
        assert 0 <= v["cpu"] <= 100 and 0 < v["mem"] <= 100 and 0 < v["disk"] <= 100 and v["load"] >= 0
    assert hub.sql("select count(*) from observations where atom='pulse'")[0][0] == 2
    # rhythm needs an idle source this headless machine does not have: it says so, invents nothing
    rh = c.enqueue("collect", "rhythm")["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", rh)[0][0] == "done", 60)
    assert c.call("task", {"task_id": rh})["task"]["result"]["status"] == "unavailable on this host"
    assert hub.sql("select count(*) from observations where atom='rhythm'")[0][0] == 0
    agent.stop()


def test_schedule_fires_once_per_interval_across_hub_restarts(hub, agents_factory):
    import time

    agent = agents_factory(hub, "echo")
    out = kiri(hub, "schedule", "add", "echo", "--every", "1s", "-p", "x=1")
    assert "schedule 1: echo" in out.stdout
    t0 = time.time()
    wait_until(lambda: hub.sql("select count(*) from tasks where kind='echo' and status='done'")[0][0] >= 2, 20)
    for _ in range(3):
        hub.kill()  # SIGKILL: no graceful anything
        time.sleep(0.3)
        hub.start()
    time.sleep(1.5)
    elapsed = time.time() - t0
    n = hub.sql("select count(*) from tasks where kind='echo'")[0][0]
    fired = hub.sql("select fired from schedules")[0][0]
    assert n == fired  # every firing made exactly one task (the consumer keeps up)
    assert 3 <= n <= int(elapsed) + 1, (n, elapsed)  # at most once per interval, restarts included
    listed = kiri(hub, "schedule", "list").stdout
    assert "echo" in listed and "1s" in listed
    assert "removed" in kiri(hub, "schedule", "rm", "1").stdout
    assert "no schedules" in kiri(hub, "schedule", "list").stdout
    bad = kiri(hub, "schedule", "add", "echo", "--every", "soon", ok=False)
    assert bad.returncode == 2 and "duration" in bad.stderr
    assert kiri(hub, "schedule", "add", "collect", "pulse", "--every", "30s").returncode == 0
    again = kiri(hub, "schedule", "add", "collect", "pulse", "--every", "30s", ok=False)
    assert again.returncode == 1 and "exists" in again.stderr
    # a first run later than now: a delay may be zero, never negative
    now = time.time()
    assert kiri(hub, "schedule", "add", "train", "pulse", "--every", "1d", "--first-in", "2h").returncode == 0
    (next_run,) = hub.sql("select next_run from schedules where kind = 'train'")[0]
    assert 7190 < next_run - now < 7210
    early = kiri(hub, "schedule", "add", "echo", "--every", "1m", "--first-in", "-5s", ok=False)
    assert early.returncode == 2 and "between 0 and a year" in early.stderr
    agent.stop()
