"""Two hubs over one PostgreSQL, four agents under load, one hub SIGKILLed again and again.

Starts a throwaway PostgreSQL server (as the tests do; or ``--db postgresql://...``, an
existing database emptied first), two hubs on it, four echo agents that each know both hubs
(two list A first, two B first), a schedule firing every second, and a client enqueueing
all along through whichever hub answers. Then ``--kills`` times: SIGKILL one hub (A and B
in turn), wait, start it again. At the end it waits for the queue to drain and reports:
tasks accepted and done, tasks acked twice (from the agents' journals), tasks lost, the
schedule's firings against its intervals, and how often agents moved to the other hub.

    python bench/ha.py [--kills 10] [--down 1.0] [--up 3.0]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import collections
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import psycopg
from sqlalchemy.engine import make_url

from bench._hub import free_port
from kiri.agents.client import HubClient
from kiri.protocol import RpcError


class Hub:
    def __init__(self, url: str, folder: Path, name: str) -> None:
        self.url, self.port, self.name = url, free_port(), name
        self.folder = folder / name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "hub.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kiri.hub.cli", "serve", "--db", self.url, "--port",
                                      str(self.port), "--data-dir", str(self.folder), "--no-http",
                                      "--lease-ttl", "2"], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                HubClient(("127.0.0.1", self.port), reconnect_for=0.2).connect()
                return
            time.sleep(0.05)
        raise RuntimeError(f"hub {self.name} did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def _sql(url: str, query: str) -> list[tuple]:
    u = make_url(url)
    with psycopg.connect(host=u.query.get("host"), port=u.port, user=u.username, password=u.password,
                         dbname=u.database) as c:
        return [tuple(r) for r in c.execute(query).fetchall()]


@click.command()
@click.option("--kills", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--down", default=1.0, show_default=True, help="Seconds a killed hub stays down.")
@click.option("--up", default=3.0, show_default=True, help="Seconds between a restart and the next kill.")
@click.option("--db", default="pg", show_default=True, help="pg (a throwaway server) or a postgresql:// URL.")
def main(kills: int, down: float, up: float, db: str) -> None:
    from bench.queue import _pg_databases

    fresh = _pg_databases(db)
    url = next(fresh)
    with tempfile.TemporaryDirectory(prefix="kiri-ha-") as tmp:
        folder = Path(tmp)
        hubs = [Hub(url, folder, "a"), Hub(url, folder, "b")]
        for h in hubs:
            h.start()
        both = [f"127.0.0.1:{h.port}" for h in hubs]
        agents = []
        for i in range(4):
            order = both if i % 2 == 0 else both[::-1]
            log = (folder / f"agent{i}.log").open("ab")
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "kiri.agents.cli", "--role", "trainer", "--kinds", "echo", "--name",
                 f"agent{i}", "--hub", ",".join(order), "--journal", str(folder / f"agent{i}.jsonl"),
                 "--log-level", "info"], stdout=log, stderr=log))
        client = HubClient([("127.0.0.1", h.port) for h in hubs], reconnect_for=30.0)
        client.call("schedule_add", {"kind": "echo", "every": 1.0, "params": {"schedule": True}})
        accepted: list[int] = []
        unsure = 0
        stop = threading.Event()

        def enqueue() -> None:
            nonlocal unsure
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    accepted.append(client.enqueue("echo", params={"i": i})["task_id"])
                except (RpcError, OSError):
                    unsure += 1  # no answer: maybe stored, maybe not (enqueue is not resent)
                time.sleep(0.004)

        feeder = threading.Thread(target=enqueue, daemon=True)
        t0 = time.monotonic()
        feeder.start()
        for k in range(kills):
            victim = hubs[k % 2]
            time.sleep(up)
            victim.kill()
            time.sleep(down)
            victim.start()
            print(f"kill {k + 1}/{kills}: hub {victim.name} killed and restarted", flush=True)
        time.sleep(up)
        stop.set()
        feeder.join(30)
        fired, created = _sql(url, "SELECT fired, created_at FROM schedules")[0]
        client.call("schedule_rm", {"schedule_id": 1})
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = _sql(url, "SELECT count(*) FROM tasks WHERE status IN ('queued', 'leased')")[0][0]
            if left == 0:
                break
            time.sleep(0.5)
        for a in agents:
            a.terminate()
        for a in agents:
            a.wait(30)
        for h in hubs:
            h.kill()
        acks: collections.Counter[int] = collections.Counter()
        for i in range(4):
            path = folder / f"agent{i}.jsonl"
            for line in path.read_text().splitlines() if path.exists() else []:
                e = json.loads(line)
                if e["call"] == "ack":
                    acks[e["task_id"]] += 1
        status = dict(_sql(url, "SELECT id, status FROM tasks"))
        attempts = collections.Counter(a for (a,) in _sql(url, "SELECT attempts FROM tasks WHERE status = 'done'"))
        slots = [int((t - created) // 1.0) for (t,) in _sql(
            url, "SELECT created_at FROM tasks WHERE dedupe_key = 'schedule:1'")]
        moves = sum((folder / f"agent{i}.log").read_text().count("trying the next hub") for i in range(4))
        lost = [t for t in accepted if status.get(t) != "done"]
        print(f"{kills} kills over {elapsed:.0f} s; {len(accepted)} tasks accepted "
              f"({unsure} enqueues unanswered while a hub died), {sum(1 for s in status.values() if s == 'done')} "
              "tasks done in all")
        print(f"  accepted but not done: {len(lost)}  {lost[:10]}")
        print(f"  acked twice: {sum(1 for n in acks.values() if n > 1)}")
        print(f"  done tasks by attempts: {dict(sorted(attempts.items()))} (a second attempt: its hub died mid-task)")
        print(f"  schedule: {fired} firings, {len(slots)} tasks, {len(slots) - len(set(slots))} intervals fired twice")
        print(f"  agents moved to the other hub {moves} times")
    fresh.close()


if __name__ == "__main__":
    main()
