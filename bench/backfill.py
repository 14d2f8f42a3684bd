"""Backfill scoring through hub and scorer: observations per second end to end.

Writes ``--days`` of synthetic pulse (30 s readings) for ``--hosts`` hosts, imports it into a
throwaway hub, trains the atom once (``--steps``), then starts one scorer agent and times
how long it takes until every reading has a score. Prints obs/s and the CPU seconds the hub
and the scorer spent, so the bottleneck shows; then the same until the rollups (what charts
read) include every score too: the backfill's whole cost to the hub. ``--root`` runs another
checkout's package (a folder holding ``kiri/``) for hub, CLI and agents, to compare before
and after in one run.

    python bench/backfill.py [--days 30] [--hosts 1] [--repeat 3] [--root /path/to/pkgroot]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import orjson
import psutil

from bench._hub import free_port
from kiri.model import synth


def write_data(path: Path, days: float, hosts: int) -> int:
    n = 0
    with path.open("wb") as f:
        for h in range(hosts):
            s = synth.generate("pulse", days, seed=h)
            host = {"host": f"host{h:02d}"} if hosts > 1 else {}
            for t, row in zip(s.times, s.rows, strict=True):
                f.write(orjson.dumps({"time": t, **host, **row}) + b"\n")
                n += 1
    return n


def sql(db: Path, q: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return con.execute(q).fetchall()
    finally:
        con.close()


def wait(what: str, ok, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def one_run(data: Path, n: int, steps: int, root: Path | None, profile: Path | None = None, tag: str = "run"
            ) -> tuple[float, float, float, float, float]:
    """Seconds to score everything, the hub's and scorer's CPU seconds meanwhile, then the
    seconds and the hub's CPU seconds until the rollups caught up as well."""
    env = {**os.environ, **({"PYTHONPATH": str(root)} if root else {})}
    cwd = str(root) if root else None
    with tempfile.TemporaryDirectory(prefix="kiri-backfill-") as tmp:
        port = free_port()
        addr = f"127.0.0.1:{port}"
        db = Path(tmp) / "kiri.db"
        log = open(Path(tmp) / "log", "ab")  # noqa: SIM115
        hub = subprocess.Popen([sys.executable, "-m", "kiri.hub.cli", "serve", "--data-dir", tmp, "--port", str(port),
                                "--no-http", "--log-level", "warning"], env=env, cwd=cwd, stdout=log, stderr=log)
        procs = [hub]
        try:
            wait("the hub", lambda: db.exists() and sql(db, "select count(*) from sqlite_master")[0][0] > 0, 60)
            time.sleep(0.5)
            cli = [sys.executable, "-m", "kiri.cli"]
            subprocess.run([*cli, "observe", "pulse", "--file", str(data)], env={**env, "KIRI_HUB": addr}, cwd=cwd,
                           check=True, stdout=subprocess.DEVNULL)
            agent = [sys.executable, "-m", "kiri.agents.cli", "--hub", addr, "--log-level", "warning"]
            # the scorer runs as a service does: started, connected and idle before there are weights
            scorer = subprocess.Popen([*agent, "--role", "scorer", "--kinds", "score"], env=env, cwd=cwd,
                                      stdout=log, stderr=log)
            procs.append(scorer)
            wait("the scorer to connect", lambda: sql(db, "select count(*) from agents where role = 'scorer' "
                                                          "and connected = 1")[0][0], 120)
            time.sleep(8.0)  # its start-up imports (torch) are done
            trainer = subprocess.Popen([*agent, "--role", "trainer", "--kinds", "train"], env=env, cwd=cwd,
                                       stdout=log, stderr=log)
            procs.append(trainer)
            subprocess.run([*cli, "enqueue", "train", "pulse", "--param", f"steps={steps}"],
                           env={**env, "KIRI_HUB": addr}, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
            hp, sp = psutil.Process(hub.pid), psutil.Process(scorer.pid)
            # the backfill starts when the weights are published (a score task is queued with them)
            deadline = time.monotonic() + 3600
            while not sql(db, "select count(*) from weights where status = 'active'")[0][0]:
                if time.monotonic() > deadline:
                    raise RuntimeError("no weights")
                time.sleep(0.02)
            h0, s0 = cpu(hp), cpu(sp)
            spies = [] if profile is None else [
                subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-r", "200", "-f", "raw",
                                  "-o", str(profile / f"{tag}-{name}.txt"), "-p", str(pid)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name, pid in (("hub", hub.pid), ("scorer", scorer.pid))]
            s_cpu = 0.0

            def done() -> bool:
                nonlocal s_cpu
                s_cpu = cpu(sp) - s0
                # the newest score's id first (one index seek): counting a growing table every
                # 0.2 s took a tenth of a core from the hub and scorer it measures
                if (sql(db, "select max(id) from scores")[0][0] or 0) < n:
                    return False
                return sql(db, "select count(distinct observation_id) from scores")[0][0] >= n

            wait("every reading scored", done)
            h_cpu = cpu(hp) - h0
            for spy in spies:
                spy.send_signal(2)
                spy.wait(60)
            t0 = sql(db, "select min(created_at) from weights where status = 'active'")[0][0]
            t1 = sql(db, "select max(created_at) from scores")[0][0]
            # the charts' aggregates catch up with the scores after: the rest of the hub's work
            wait("rollups up to date", lambda: sql(db, "select count(*) from rollup_dirty")[0][0] == 0)
            return t1 - t0, h_cpu, s_cpu, time.time() - t0, cpu(hp) - h0
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(60)
            log.close()


@click.command()
@click.option("--days", default=30.0, show_default=True, type=click.FloatRange(0.1, 3650))
@click.option("--hosts", default=1, show_default=True, type=click.IntRange(1, 100))
@click.option("--steps", default=30, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--profile", type=click.Path(file_okay=False, path_type=Path),
              help="Record py-spy profiles of the hub and the scorer during the backfill into this folder.")
@click.option("--root", "roots", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also run this package root (a folder holding kiri/), e.g. an older checkout's.")
def main(days: float, hosts: int, steps: int, repeat: int, profile: Path | None, roots: tuple[Path, ...]) -> None:
    with tempfile.TemporaryDirectory(prefix="kiri-backfill-data-") as tmp:
        data = Path(tmp) / "pulse.jsonl"
        n = write_data(data, days, hosts)
        print(f"{n:,} readings of pulse ({days:g} days, {hosts} host(s)), median of {repeat}", flush=True)
        runs: dict[str, list[tuple[float, float, float, float, float]]] = {}
        for _ in range(repeat):
            for root in (None, *roots):
                name = "this checkout" if root is None else str(root)
                if profile is not None:
                    profile.mkdir(parents=True, exist_ok=True)
                r = one_run(data, n, steps, root, profile, "this" if root is None else root.name)
                runs.setdefault(name, []).append(r)
                print(f"  {name}: {r[0]:.1f} s = {n / r[0]:,.0f} obs/s (hub CPU {r[1]:.1f} s, "
                      f"scorer CPU {r[2]:.1f} s); rollups caught up after {r[3]:.1f} s, hub CPU {r[4]:.1f} s",
                      flush=True)
        print("median:")
        for name, rs in runs.items():
            took = statistics.median(r[0] for r in rs)
            print(f"  {name:30s} {n / took:10,.0f} obs/s; hub CPU {statistics.median(r[1] for r in rs):.1f} s, "
                  f"scorer CPU {statistics.median(r[2] for r in rs):.1f} s; with rollups "
                  f"{n / statistics.median(r[3] for r in rs):,.0f} obs/s, hub CPU "
                  f"{statistics.median(r[4] for r in rs):.1f} s")


if __name__ == "__main__":
    main()
