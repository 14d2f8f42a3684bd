"""``kiri demo``: the whole watch loop on this machine, from one command.

Starts a hub on the local SQLite database and one agent of each role as child processes,
seeds synthetic history for every preset atom (first run only), trains them, schedules
real collection of this machine, and prints a live status line. Ctrl-C stops every child
cleanly; running it again resumes from the same database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kiri.agents.client import HubClient
from kiri.model import synth
from kiri.model.schema import NERVE_INPUTS
from kiri.protocol import NotFound

ATOMS = NERVE_INPUTS


class Demo:
    def __init__(self, data_dir: Path, port: int, days: float, seed: int, collect: bool, http_port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.http_port = http_port
        self.days = days
        self.seed = seed
        self.collect = collect
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = data_dir / "logs"

    def _spawn(self, name: str, args: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=log,
                                            start_new_session=True)

    def start(self) -> HubClient:
        self._spawn("hub", ["kiri.hub.cli", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
                            "--http-port", str(self.http_port)])
        deadline = time.monotonic() + 60
        while True:
            if self.procs["hub"].poll() is not None:
                raise RuntimeError(f"the hub exited; see {self.logs / 'hub.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the hub did not start within 60 s")
            time.sleep(0.1)
        hub = f"127.0.0.1:{self.port}"
        for role in ("trainer", "collector", "scorer"):
            self._spawn(role, ["kiri.agents.cli", "--role", role, "--hub", hub, "--name", f"demo-{role}"])
        client = HubClient(("127.0.0.1", self.port), role="cli", agent="kiri-demo")
        client.connect()
        return client

    def seed_and_train(self, c: HubClient, say: Any) -> None:
        """Synthetic history and first training, only where there is none yet."""
        now = time.time()
        start = now - self.days * synth.DAY
        for atom in ATOMS:
            if c.call("observations", {"atom": atom, "limit": 1})["observations"]:
                continue
            series = synth.generate(atom, self.days, seed=self.seed, start=start)
            say(f"seeding {len(series.rows):,} synthetic {atom} observations ({self.days:g} days)")
            for i in range(0, len(series.rows), 5000):
                c.call("observe", {"atom": atom, "observations": [
                    {"values": r, "time": t, "host": "synthetic"}
                    for r, t in zip(series.rows[i:i + 5000], series.times[i:i + 5000], strict=True)]})
        for atom in ATOMS:
            try:
                c.call("weights", {"atom": atom, "active": True})
            except NotFound:  # no active weights yet
                c.enqueue("train", atom, {"steps": 500}, dedupe_key=f"demo-train:{atom}")
                say(f"training {atom}")
        if self.collect:
            existing = {(s["kind"], s["atom"]) for s in c.call("schedules")["schedules"]}
            here = socket.gethostname()
            for atom, every in (("pulse", 30.0), ("rhythm", 300.0)):
                if ("collect", atom) not in existing:
                    c.call("schedule_add", {"kind": "collect", "atom": atom, "every": every})
                    say(f"collecting this machine's {atom} every {every:g} s")
                if ("train", atom) not in existing:
                    # the learning period trains on this host once it has enough readings; after
                    # that, a daily warm-started retrain on its own data follows slow change
                    c.call("schedule_add", {"kind": "train", "atom": atom, "every": 86400.0, "first_in": 86400.0,
                                            "params": {"host": here, "warm_start": True}})

    def status_line(self, c: HubClient) -> str:
        stats = c.call("stats")
        counts: dict[str, int] = {}
        for row in stats["tasks"]:
            counts[row["status"]] = counts.get(row["status"], 0) + row["count"]
        parts = [f"tasks {counts.get('queued', 0)}q/{counts.get('leased', 0)}r/{counts.get('done', 0)}d"]
        for a in c.call("status")["atoms"]:
            h, learning = a["latest"], a.get("learning")
            if a["name"] not in ATOMS:
                continue
            if learning:
                progress = "training" if learning["training"] else f"{learning['have']}/{learning['need']}"
                parts.append(f"{a['name']} learning {progress}")
            elif h is None or h["score"] is None:
                parts.append(f"{a['name']} -")
            else:
                parts.append(f"{a['name']} {h['score']:.2f}{'!' if h['anomalous'] else ''}")
        dec = c.call("decisions", {"limit": 1})["decisions"]
        if dec:
            parts.append(f"nerve {dec[0]['action']}")
        parts.append(f"agents {len(stats['agents'])}")
        return " | ".join(parts)

    def stop(self) -> None:
        for name in ("collector", "scorer", "trainer", "hub"):
            p = self.procs.get(name)
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(20)
                if p.poll() is None:
                    p.kill()


def run(data_dir: Path, port: int, days: float, seed: int, collect: bool, once: bool, say: Any,
        http_port: int = 7745) -> int:
    demo = Demo(data_dir, port, days, seed, collect, http_port)
    stopping = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        c = demo.start()
        say(f"hub on 127.0.0.1:{port}, database {data_dir / 'kiri.db'}, logs in {demo.logs}")
        say(f"dashboard: http://127.0.0.1:{http_port}/  (JSON API under /api/v1, metrics at /metrics)")
        demo.seed_and_train(c, say)
        tty = sys.stdout.isatty()
        while not stopping:
            line = demo.status_line(c)
            if tty:
                sys.stdout.write("\r\x1b[2K" + line)
                sys.stdout.flush()
            else:
                say(line)
            if once:
                break
            for _ in range(20):
                if stopping:
                    break
                time.sleep(0.1)
        if tty:
            sys.stdout.write("\n")
        c.close()
    finally:
        say("stopping the agents and the hub ...")
        demo.stop()
        for s, h in old.items():
            signal.signal(s, h)
    say("stopped; run `kiri demo` again to resume from the same database")
    return 0


def default_dir() -> Path:
    from kiri import config

    return Path(os.environ.get("KIRI_DATA_DIR") or config.data_dir())
