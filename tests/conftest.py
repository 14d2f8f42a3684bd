"""Real processes, real sockets, real files: helpers to run hubs and agents in tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiri.agents.client import HubClient

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class HubProc:
    """A `kiri-hub serve` child process on a fixed port and data dir (so it can restart)."""

    def __init__(self, data_dir: Path, port: int, *extra: str, token: str | None = None, http: bool = False) -> None:
        self.data_dir = data_dir
        self.port = port
        self.extra = list(extra)
        self.token = token
        # the HTTP face on its own free port, or none (many hubs run side by side in tests)
        self.http_port: int | None = free_port() if http else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "hub.log"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "kiri.db"

    @property
    def url(self) -> str:
        assert self.http_port is not None, "start the hub with http=True"
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, wait: bool = True) -> HubProc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [PY, "-m", "kiri.hub.cli", "serve", "--data-dir", str(self.data_dir),
                "--port", str(self.port), *self.extra]
        args += ["--http-port", str(self.http_port)] if self.http_port else ["--no-http"]
        if self.token:
            args += ["--token", self.token]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited with {self.proc.returncode}:\n{self.log()}")
            for port in (self.port, self.http_port):
                if port is None:
                    continue
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                except OSError:
                    return False
            return True

        wait_until(ready, timeout, what="hub to listen")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def client(self, **kw) -> HubClient:
        c = HubClient(self.address, token=self.token, **kw)
        c.connect()
        return c

    @property
    def db_url(self) -> str | None:
        """The ``--db`` the hub was given (None: the SQLite file in its data dir)."""
        return self.extra[self.extra.index("--db") + 1] if "--db" in self.extra else None

    def sql(self, query: str, *args: object) -> list[tuple]:
        """Read the hub's database directly (a separate reader, as an operator would); ``?``
        placeholders on either backend."""
        if self.db_url is not None and self.db_url.startswith("postgresql"):
            import psycopg
            from sqlalchemy.engine import make_url

            u = make_url(self.db_url)
            with psycopg.connect(host=u.query["host"], user=u.username, dbname=u.database) as pg:
                return [tuple(r) for r in pg.execute(query.replace("?", "%s"), args).fetchall()]
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(query, args).fetchall()
        finally:
            con.close()


class AgentProc:
    def __init__(self, hub: HubProc, kinds: str, name: str, journal: Path, *extra: str) -> None:
        self.journal = journal
        args = [PY, "-m", "kiri.agents.cli", "--role", "trainer", "--kinds", kinds,
                "--hub", f"127.0.0.1:{hub.port}", "--name", name, "--journal", str(journal),
                "--log-level", "warning", *extra]
        env = dict(os.environ)
        if hub.token:
            env["KIRI_TOKEN"] = hub.token
        self.log_path = journal.with_suffix(".log")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)

    def entries(self) -> list[dict]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator:
    hubs: list[HubProc] = []

    def make(*extra: str, token: str | None = None, start: bool = True, http: bool = False) -> HubProc:
        h = HubProc(tmp_path / f"hub{len(hubs)}", free_port(), *extra, token=token, http=http)
        hubs.append(h)
        return h.start() if start else h

    yield make
    for h in hubs:
        if h.proc and h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(10)


@pytest.fixture(scope="session")
def pg() -> Iterator:
    """A PostgreSQL server for the whole run (started on first use): see ``tests/pg.py``."""
    from tests.pg import PgCluster

    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


# short leases, ticks and backoffs: the tests see expiries and retries in well under a second
FAST = ("--lease-ttl", "2", "--tick", "0.05", "--backoff-base", "0.05", "--backoff-cap", "0.2")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_hub(request, hub_factory) -> HubProc:
    """A hub on each backend in turn: SQLite (its data dir's file) and PostgreSQL."""
    if request.param == "postgresql":
        return hub_factory(*FAST, "--db", request.getfixturevalue("pg").new_database())
    return hub_factory(*FAST)


@pytest.fixture
def hub(hub_factory) -> HubProc:
    return hub_factory(*FAST)


@pytest.fixture
def agents_factory(tmp_path: Path) -> Iterator:
    procs: list[AgentProc] = []

    def make(hub: HubProc, kinds: str = "echo,sleep,count,fail", *extra: str) -> AgentProc:
        n = len(procs)
        a = AgentProc(hub, kinds, f"agent-{n}", tmp_path / f"agent-{n}.jsonl", *extra)
        procs.append(a)
        return a

    yield make
    for a in procs:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait(10)


def push(hub: HubProc, atom: str, rows: list, times: list, host: str | None = None) -> None:
    """Store observations through the protocol, in the largest batches it takes."""
    c = hub.client()
    try:
        for i in range(0, len(rows), 5000):
            c.call("observe", {"atom": atom, "observations": [
                {"values": r, "time": t, **({"host": host} if host else {})}
                for r, t in zip(rows[i:i + 5000], times[i:i + 5000], strict=True)]})
    finally:
        c.close()


class Watched:
    """A hub with its HTTP face, a trainer and a scorer, trained atoms and scored anomalies."""

    def __init__(self, hub: HubProc, agents: list[AgentProc], spike_ids: list[int]) -> None:
        self.hub = hub
        self.agents = agents
        self.spike_ids = spike_ids


@pytest.fixture(scope="session")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """Shared by the HTTP API and browser tests: setting it up trains real atoms (~30 s)."""
    from kiri.model import synth

    root = tmp_path_factory.mktemp("watched")
    # read worker processes whatever the machine (on two cores the default serves reads from
    # threads, which every other hub here does): the reads below go through both paths
    hub = HubProc(root / "hub", free_port(), "--lease-ttl", "3", "--tick", "0.1", "--read-processes", "2",
                  http=True).start()
    agents = [AgentProc(hub, "train", "trainer-0", root / "trainer.jsonl", "--lease-ttl", "2"),
              AgentProc(hub, "score", "scorer-0", root / "scorer.jsonl", "--lease-ttl", "2")]
    try:
        start = time.time() - 2 * synth.DAY
        train = synth.generate("pulse", 1.5, seed=0, start=start)
        push(hub, "pulse", train.rows, train.times, host="synthetic")
        drift = synth.generate("drift", 2, seed=0, start=start)
        push(hub, "drift", drift.rows, drift.times)
        c = hub.client()
        for atom in ("pulse", "drift"):
            c.enqueue("train", atom, {"steps": 200})
        c.close()
        wait_until(lambda: hub.sql("select count(*) from weights where status='active'")[0][0] == 2, 180,
                   what="pulse and drift trained")
        test = synth.generate("pulse", 0.4, seed=1, start=start + 1.5 * synth.DAY, anomalies={"spike": 2})
        first = hub.sql("select coalesce(max(id), 0) from observations")[0][0] + 1
        push(hub, "pulse", test.rows, test.times, host="synthetic")
        spike_ids = [first + i for i, lab in enumerate(test.labels) if lab == "spike"]
        wait_until(lambda: hub.sql("select count(*) from tasks where status in ('queued', 'leased')")[0][0] == 0
                   and hub.sql("select count(*) from scores where observation_id = ?", spike_ids[-1])[0][0] == 1,
                   180, what="the new day scored")
        yield Watched(hub, agents, spike_ids)
    finally:
        for a in agents:
            if a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait(10)
        if hub.proc and hub.proc.poll() is None:
            hub.proc.kill()
            hub.proc.wait(10)
