"""`kiri demo` (the README's run command) and `kiri status`, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import free_port


def _demo(tmp_path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiri.cli", "demo", "--data-dir", str(tmp_path),
                           "--port", str(port), "--http-port", str(free_port()), "--days", "1",
                           "--once", "--no-collect"], capture_output=True, text=True, timeout=180)


def test_demo_sets_up_everything_stops_cleanly_and_resumes(tmp_path):
    port = free_port()
    first = _demo(tmp_path, port)
    assert first.returncode == 0, first.stderr + first.stdout
    out = first.stdout
    assert "seeding 2,880 synthetic pulse observations" in out and "training pulse" in out
    assert "agents" in out and "stopped; run `kiri demo` again" in out
    for name in ("hub", "trainer", "collector", "scorer"):
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert "Traceback" not in log, f"{name}.log:\n{log}"
    hub_log = (tmp_path / "logs" / "hub.log").read_text()
    assert "hub stopped cleanly" in hub_log and "dashboard and JSON API on http://127.0.0.1:" in hub_log
    assert "dashboard: http://127.0.0.1:" in out
    again = _demo(tmp_path, port)
    assert again.returncode == 0, again.stderr
    assert "seeding" not in again.stdout  # the same database, resumed


def test_status_shows_atoms_and_agents(hub, agents_factory):
    c = hub.client()
    c.call("observe", {"atom": "drift", "observations": [{"values": {"added": 3, "completed": 1, "switched": 2,
                                                                      "hour": 10, "weekday": 1}}]})
    agent = agents_factory(hub, "echo")
    env = {**os.environ, "KIRI_HUB": f"127.0.0.1:{hub.port}"}
    from tests.conftest import wait_until

    wait_until(lambda: c.call("stats")["agents"], 20)
    out = subprocess.run([sys.executable, "-m", "kiri.cli", "status"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "drift" in out.stdout and "T0 C0 S1 H3 W0" in out.stdout and "no observations" in out.stdout
    assert "agent-0" in out.stdout
    agent.stop()
