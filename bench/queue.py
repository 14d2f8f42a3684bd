"""End-to-end queue throughput and enqueue-to-start latency, through real TCP and processes.

Throughput: N `kiri-agent` processes serve the `echo` kind; the bench enqueues TASKS tasks
(pipelined over one connection) and times until every task is done, and prints the CPU a
task cost the hubs, the agents and (on PostgreSQL) the server's processes meanwhile, so
the side that bounds the rate shows. Every enqueue, lease
and ack is committed before its reply. Latency: one idle agent long-polls; the bench
enqueues one task at a time and the agent reports when its lease reply arrived.

With ``--db pg`` the same runs on PostgreSQL (a throwaway server the bench starts, as the
tests do; or ``--db postgresql://...``, an existing database the bench empties first), with
``synchronous_commit`` on and off, through one hub and through two hubs sharing the
database (agents split between them, tasks enqueued through the first; the latency agent
waits on the second, so its wake-up crosses hubs).

    python bench/queue.py [--tasks 20000] [--agents 1,4,8] [--synchronous NORMAL,FULL]
    python bench/queue.py --db pg [--hubs 1,2] [--agents 1,4,8]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import contextlib
import multiprocessing as mp
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import click
import orjson
import psutil

from bench._hub import running_hub
from kiri.agents.client import HubClient


def pipelined_enqueue(port: int, n: int, window: int = 256) -> None:
    """Enqueue n tasks over one socket, keeping `window` requests in flight."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    s.sendall(orjson.dumps({"jsonrpc": "2.0", "id": 0, "method": "hello",
                            "params": {"agent": "bench", "role": "cli"}}) + b"\n")
    f.readline()
    sent = done = 0
    while done < n:
        burst = []
        while sent < n and sent - done < window:
            sent += 1
            burst.append(orjson.dumps({"jsonrpc": "2.0", "id": sent, "method": "enqueue",
                                       "params": {"kind": "echo", "params": {"i": sent}}}) + b"\n")
        if burst:
            s.sendall(b"".join(burst))
        line = f.readline()
        if b'"error"' in line:
            raise RuntimeError(line)
        done += 1
    s.close()


def unfinished(client: HubClient) -> int:
    """Echo tasks queued or leased: ``kinds`` counts only those (the ready and leased index
    entries), where ``stats`` counts every task in the table. Polled every 50 ms during a
    run of 20,000 tasks, ``stats`` took a fifth of a core from the queue it measured."""
    return sum(r["queued"] + r["leased"] for r in client.call("kinds")["kinds"] if r["kind"] == "echo")


@dataclass
class Run:
    rate: float  # tasks/s
    cpu: dict[str, float]  # µs of CPU a task: the hubs, the agents, PostgreSQL's server processes


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _postgres() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


def throughput(ports: list[int], n_agents: int, n_tasks: int) -> Run:
    """Agents spread over the hubs round robin; tasks enqueued through the first hub. The CPU
    each side spent while the tasks ran (the agents' start-up not counted) shows which one
    bounds the rate."""
    procs = [subprocess.Popen([sys.executable, "-m", "kiri.agents.cli", "--role", "trainer", "--kinds", "echo",
                               "--hub", f"127.0.0.1:{ports[i % len(ports)]}", "--log-level", "warning", "--wait", "5"])
             for i in range(n_agents)]
    clients = [HubClient(("127.0.0.1", p)) for p in ports]
    c = clients[0]
    try:
        while sum(k.call("stats")["hub"]["waiting_leases"] for k in clients) < n_agents:
            time.sleep(0.05)
        assert unfinished(c) == 0
        hubs_ = [p for p in psutil.Process().children() if "kiri.hub.cli" in " ".join(p.cmdline())]
        agents = [psutil.Process(p.pid) for p in procs]
        sides = {"hubs": hubs_, "agents": agents}
        before = {k: _cpu_seconds(v) for k, v in sides.items()} | {"postgres": _cpu_seconds(_postgres())}
        t0 = time.perf_counter()
        pipelined_enqueue(ports[0], n_tasks)  # returns once every enqueue is answered (stored)
        while unfinished(c):
            time.sleep(0.05)
        rate = n_tasks / (time.perf_counter() - t0)
        after = {k: _cpu_seconds(v) for k, v in sides.items()} | {"postgres": _cpu_seconds(_postgres())}
        return Run(rate, {k: 1e6 * (after[k] - before[k]) / n_tasks for k in after})
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        for k in clients:
            k.close()


def _runs(runs: list[Run], pg: bool) -> str:
    """The median rate, each run's, and the CPU a task of the median run."""
    mid = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
    sides = ("postgres", "hubs", "agents") if pg else ("hubs", "agents")
    return (f"{mid.rate:8.0f} tasks/s (median of {len(runs)}; runs {', '.join(f'{r.rate:.0f}' for r in runs)}; "
            f"CPU a task {', '.join(f'{k} {mid.cpu[k]:.0f}' for k in sides)} µs)")


def _latency_agent(port: int, n: int, out: mp.Queue) -> None:
    c = HubClient(("127.0.0.1", port), agent="latency-agent", role="trainer")
    c.connect()
    out.put("ready")
    for _ in range(n):
        r = c.lease(["echo"], wait=30)
        t = time.time()
        c.call("ack", {"task_id": r["task"]["id"], "lease_token": r["lease"]["token"]})
        out.put((r["task"]["params"]["sent"], t))


def latency(port: int, agent_port: int | None = None, n: int = 300) -> list[float]:
    """Enqueue through ``port``; the idle agent waits on ``agent_port`` (another hub) or the same."""
    q: mp.Queue = mp.Queue()
    agent = mp.Process(target=_latency_agent, args=(agent_port or port, n, q))
    agent.start()
    q.get(timeout=30)
    c = HubClient(("127.0.0.1", port))
    watch = HubClient(("127.0.0.1", agent_port or port))
    samples = []
    for _ in range(n):
        while watch.call("stats")["hub"]["waiting_leases"] < 1:
            time.sleep(0.0005)
        sent = time.time()
        c.enqueue("echo", params={"sent": sent})
        s, started = q.get(timeout=30)
        samples.append((started - s) * 1000)
        time.sleep(0.002)
    agent.join(30)
    c.close()
    watch.close()
    return samples


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


@contextlib.contextmanager
def hubs(count: int, *extra: str) -> Iterator[list[int]]:
    """``count`` hubs with the same arguments (on PostgreSQL: the same database)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_hub(*extra))[0] for _ in range(count)]


def _pg_databases(db: str) -> Iterator[str]:
    """Fresh, empty PostgreSQL databases: on a throwaway server (``pg``), or ``db`` emptied each time."""
    if db == "pg":
        from tests.pg import PgCluster

        cluster = PgCluster()
        try:
            while True:
                yield cluster.new_database()
        finally:
            cluster.stop()
    import sqlalchemy as sa

    from kiri.hub.store.db import driver_url

    while True:
        engine = sa.create_engine(driver_url(db))
        with engine.begin() as c:
            c.exec_driver_sql("DROP SCHEMA public CASCADE")
            c.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
        yield driver_url(db)


@click.command()
@click.option("--tasks", default=20000, show_default=True)
@click.option("--agents", default="1,4,8", show_default=True)
@click.option("--synchronous", default="NORMAL,FULL", show_default=True,
              help="SQLite's synchronous settings; on PostgreSQL, synchronous_commit on and off are both run.")
@click.option("--repeat", default=3, show_default=True, help="Throughput runs per setting (median reported).")
@click.option("--db", default="sqlite", show_default=True,
              help="sqlite, pg (a throwaway PostgreSQL server), or a postgresql:// URL (emptied first).")
@click.option("--hubs", "hub_counts", default="1,2", show_default=True, help="Hubs sharing the database (PostgreSQL).")
def main(tasks: int, agents: str, synchronous: str, repeat: int, db: str, hub_counts: str) -> None:
    if db == "sqlite":
        for sync in synchronous.split(","):
            for n in (int(x) for x in agents.split(",")):
                with running_hub("--synchronous", sync) as (port, _):  # a fresh database per setting
                    runs = [throughput([port], n, tasks) for _ in range(repeat)]
                print(f"synchronous={sync:6s} agents={n}: {_runs(runs, pg=False)}", flush=True)
            with running_hub("--synchronous", sync) as (port, _):
                lat = latency(port)
                print(f"synchronous={sync:6s} enqueue-to-start latency, idle agent: p50 {pct(lat, 50):.3f} ms  "
                      f"p90 {pct(lat, 90):.3f} ms  p99 {pct(lat, 99):.3f} ms  (n={len(lat)})", flush=True)
        return
    fresh = _pg_databases(db)
    try:
        for commit in ("on", "off"):
            def url(commit: str = commit) -> str:
                base = next(fresh)
                return f"{base}{'&' if '?' in base else '?'}options=-csynchronous_commit%3D{commit}"

            for n_hubs in (int(x) for x in hub_counts.split(",")):
                for n in (int(x) for x in agents.split(",")):
                    with hubs(n_hubs, "--db", url()) as ports:
                        runs = [throughput(ports, n, tasks) for _ in range(repeat)]
                    print(f"postgresql synchronous_commit={commit:3s} hubs={n_hubs} agents={n}: "
                          f"{_runs(runs, pg=True)}", flush=True)
                with hubs(n_hubs, "--db", url()) as ports:
                    lat = latency(ports[0], ports[-1])
                where = "across hubs" if n_hubs > 1 else "one hub"
                print(f"postgresql synchronous_commit={commit:3s} hubs={n_hubs} enqueue-to-start latency, idle agent "
                      f"({where}): p50 {pct(lat, 50):.3f} ms  p90 {pct(lat, 90):.3f} ms  p99 {pct(lat, 99):.3f} ms "
                      f"(n={len(lat)})", flush=True)
    finally:
        fresh.close()


if __name__ == "__main__":
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the throwaway PostgreSQL server, the hubs
    # and the agents are stopped by their cleanup instead of being left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
