"""A year on one hub: import, train, backfill, retention, then charts, status and /metrics
while a client enqueues every 10 ms.

Generates ``--days`` of pulse (30 s), rhythm (5 min) and drift (hourly) for ``--hosts``
hosts as JSON lines, plus ``--task-days`` of finished task history (a collect and a score
task every 30 s), and on a fresh hub with default retention:

1. imports each file with ``kiri observe ATOM --file`` (obs/s, the CLI's peak RSS);
2. trains each atom (``--steps``) and backfill-scores everything through one scorer agent
   (obs/s end to end);
3. waits for rollups and retention to settle (database size before and after);
4. restarts the hub and times the year chart's first call, then medians of the year chart
   (all hosts and one host), a zoomed-in day, status and /metrics;
5. enqueues every 10 ms while another client reads charts, status and /metrics in a loop
   (round-trip p50 / p99 / max) and reports the hub's RSS.

    python bench/year.py [--days 365] [--hosts 1] [--steps 200] [--task-days 365]
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
import threading
import time
import urllib.request
from pathlib import Path

import click
import psutil

from bench.importing import run_cli, write_synth
from kiri.agents.client import HubClient
from kiri.hub.store.reader import default_processes
from tests.conftest import free_port, wait_until

ATOMS = {"pulse": 30.0, "rhythm": 300.0, "drift": 3600.0}


def timed_get(url: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
    return time.perf_counter() - t, body


def write_data(folder: Path, days: float, hosts: int, full_precision: bool = False) -> dict[str, tuple[Path, int]]:
    """Each atom's file (``importing.write_synth``: 4 decimals as the issue's file had)."""
    out = {}
    for atom in ATOMS:
        path = folder / f"{atom}.jsonl"
        with open(path, "wb") as f:
            out[atom] = (path, write_synth(f, atom, days, hosts, full_precision))
    return out


def seed_tasks(db: Path, days: float, now: float) -> int:
    """Finished collect and score tasks, one of each every 30 s, written straight to the file."""
    con = sqlite3.connect(db, timeout=60)
    n = int(days * 86400 / 30)
    rows = []
    for i in range(n):
        t = now - days * 86400 + i * 30
        rows.append(("collect", "pulse", "done", t, t, t, t))
        rows.append(("score", "pulse", "done", t, t, t, t))
    for k in range(0, len(rows), 50_000):
        con.executemany("INSERT INTO tasks (kind, atom, status, run_after, created_at, updated_at, finished_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", rows[k:k + 50_000])
        con.commit()
    con.close()
    return len(rows)


class Hub:
    def __init__(self, folder: Path, *extra: str) -> None:
        self.folder = folder
        self.extra = extra
        self.port, self.http = free_port(), free_port()
        self.log = open(folder / "hub.log", "ab")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def start(self, *more: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kiri.hub.cli", "serve", "--data-dir", str(self.folder),
                                      "--port", str(self.port), "--http-port", str(self.http), "--log-level",
                                      os.environ.get("KIRI_BENCH_HUB_LOG", "info"), *self.extra, *more],
                                     stdout=self.log, stderr=self.log)
        wait_until(self._up, 600, what="hub")

    def _up(self) -> bool:
        try:
            return timed_get(self.base + "/healthz")[1] != b""
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None

    def rss(self) -> int:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss

    def sql(self, q: str) -> list[tuple]:
        con = sqlite3.connect(f"file:{self.folder / 'kiri.db'}?mode=ro", uri=True, timeout=60)
        try:
            return con.execute(q).fetchall()
        finally:
            con.close()


LOADED = 20.0  # seconds of enqueues under read load


def loaded_enqueues(hub: Hub, paths: list[str]) -> tuple[list[float], int]:
    """Enqueue round trips every 10 ms while one client reads ``paths`` in a loop; the hub's peak RSS."""
    c = HubClient(("127.0.0.1", hub.port), role="cli", agent="bench")
    c.connect()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for path in paths:
                timed_get(hub.base + path)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    rtt, peak = [], hub.rss()
    end = time.monotonic() + LOADED
    while time.monotonic() < end:
        t = time.perf_counter()
        c.enqueue("bench-noop", None, {})
        rtt.append(time.perf_counter() - t)
        peak = max(peak, hub.rss())
        time.sleep(0.01)
    stop.set()
    th.join()
    c.close()
    return rtt, peak


def db_bytes(folder: Path) -> int:
    return sum(os.stat(p).st_size for p in folder.glob("kiri.db*"))


def db_parts(folder: Path) -> str:
    """The database's size on disk, and how much of it is the WAL (which the hub truncates
    at its next periodic checkpoint, within 30 s: ``HubSettings.wal_checkpoint_every``)."""
    wal = folder / "kiri.db-wal"
    w = os.stat(wal).st_size if wal.exists() else 0
    return f"{db_bytes(folder) / 2**20:.0f} MiB ({w / 2**20:.0f} MiB of it the WAL)"


def settle(hub: Hub, what: str, timeout: float = 3600, retention: bool = True) -> float:
    """Wait until rollups are computed and (``retention``) retention has nothing left to do
    (the file stops shrinking)."""
    t = time.perf_counter()
    wait_until(lambda: hub.sql("select count(*) from rollup_dirty")[0][0] == 0, timeout, interval=1.0,
               what=f"rollups after {what}")
    if not retention:
        return time.perf_counter() - t
    last, still = db_bytes(hub.folder), 0
    while still < 3 and time.perf_counter() - t < timeout:
        time.sleep(2.0)
        now = db_bytes(hub.folder)
        free = hub.sql("pragma freelist_count")[0][0]
        still = still + 1 if now == last and free == 0 else 0
        last = now
    return time.perf_counter() - t


@click.command()
@click.option("--days", default=365.0, show_default=True, type=click.FloatRange(1, 3650))
@click.option("--hosts", default=1, show_default=True, type=click.IntRange(1, 100))
@click.option("--steps", default=200, show_default=True, type=click.IntRange(10, 100_000))
@click.option("--task-days", default=365.0, show_default=True, type=click.FloatRange(0, 3650))
@click.option("--repeat", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--skip-scoring", is_flag=True, help="Import and chart only (no training, no backfill).")
@click.option("--keep-raw", default="30d", show_default=True, help="The hub's --keep-raw.")
@click.option("--wait-retention/--no-wait-retention", default=True, show_default=True,
              help="Wait for retention to fold the old raw readings before the charts (else they are read "
                   "while it still works, as a user would right after a big import).")
@click.option("--full-precision", is_flag=True,
              help="Write every digit of the generated values, not 4 decimals as `kiri synth` prints them.")
@click.option("--keep-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Work in this folder and leave it there (the database, the hub's log) instead of a temp one.")
def main(days: float, hosts: int, steps: int, task_days: float, repeat: int, skip_scoring: bool,
         keep_raw: str, wait_retention: bool, full_precision: bool, keep_dir: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="kiri-year-") as tmp:
        folder = Path(tmp) if keep_dir is None else keep_dir
        folder.mkdir(parents=True, exist_ok=True)
        print(f"{days:g} days, {hosts} host(s): writing data ...", flush=True)
        files = write_data(folder, days, hosts, full_precision)
        total = sum(n for _, n in files.values())
        hub = Hub(folder, "--keep-raw", keep_raw)
        hub.start()  # creates the database
        if task_days:  # the hub is its file's only writer: the history goes in while it is stopped
            hub.stop()
            n = seed_tasks(folder / "kiri.db", task_days, time.time())
            print(f"task history: {n:,} finished tasks written", flush=True)
            hub.start()
        agents: list[subprocess.Popen[bytes]] = []
        try:
            seconds, peaks = 0.0, []
            for atom, (path, n) in files.items():
                took, peak = run_cli(hub.port, path, atom=atom)
                seconds += took
                peaks.append(peak)
                print(f"  import {atom}: {n:,} obs in {took:.1f} s ({n / took:,.0f} obs/s), CLI peak RSS "
                      f"{peak / 2**20:.0f} MiB", flush=True)
            print(f"import: {total:,} obs in {seconds:.1f} s = {total / seconds:,.0f} obs/s; "
                  f"CLI peak RSS {max(peaks) / 2**20:.0f} MiB", flush=True)
            print(f"database after import: {db_parts(folder)}", flush=True)
            c = HubClient(("127.0.0.1", hub.port), role="cli", agent="bench")
            c.connect()
            if not skip_scoring:
                agent = [sys.executable, "-m", "kiri.agents.cli", "--hub", f"127.0.0.1:{hub.port}", "--log-level",
                         "warning"]
                agents.append(subprocess.Popen([*agent, "--role", "trainer", "--kinds", "train"], stdout=hub.log,
                                               stderr=hub.log))
                t = time.perf_counter()
                for atom in ATOMS:
                    c.enqueue("train", atom, {"steps": steps})
                wait_until(lambda: hub.sql("select count(*) from weights where status = 'active'")[0][0] == 3,
                           3600, interval=1.0, what="three atoms trained")
                print(f"trained the three atoms ({steps} steps) in {time.perf_counter() - t:.1f} s", flush=True)
                before = hub.sql("select count(*) from scores")[0][0]
                agents.append(subprocess.Popen([*agent, "--role", "scorer", "--kinds", "score"], stdout=hub.log,
                                               stderr=hub.log))
                t = time.perf_counter()
                for atom in ATOMS:
                    c.enqueue("score", atom)

                # each atom's newest reading: one index seek each (a "group by atom" over the
                # observations scanned the whole index, half a second a poll at ten hosts, and
                # took that much CPU from the backfill it timed)
                newest = [hub.sql(f"select max(id) from observations where atom = '{atom}'")[0][0]
                          for atom in ATOMS]

                def scored() -> bool:  # cheap to ask: no score task waiting, every atom's newest reading scored
                    busy = hub.sql("select count(*) from tasks where kind = 'score' and status in "
                                   "('queued', 'leased')")[0][0]
                    return busy == 0 and all(hub.sql(f"select 1 from scores where observation_id = {i} limit 1")
                                             for i in newest)

                wait_until(scored, 7200, interval=1.0, what="everything scored")
                took = time.perf_counter() - t
                n = total - before
                print(f"backfill: {n:,} readings scored in {took:.1f} s = {n / took:,.0f} obs/s end to end",
                      flush=True)
            c.close()
            for a in agents:
                a.terminate()
                a.wait(60)
            agents.clear()
            took = settle(hub, "import and scoring", retention=wait_retention)
            what = "rollups and retention" if wait_retention else "rollups (retention still folding)"
            print(f"{what} settled in {took:.0f} s; database now {db_parts(folder)} "
                  f"({hub.sql('select count(*) from observations')[0][0]:,} raw readings kept, "
                  f"{hub.sql('select count(*) from rollups')[0][0]:,} rollup rows, "
                  f"{hub.sql('select count(*) from tasks')[0][0]:,} tasks)", flush=True)

            hub.stop()
            hub.start()
            host = "&host=host00" if hosts > 1 else ""
            year = "/api/v1/series?atom=pulse&points=1000"
            first, _ = timed_get(hub.base + year)
            print(f"\nafter a restart, the year chart's first call: {1000 * first:.1f} ms", flush=True)
            wait_until(lambda: timed_get(hub.base + year)[0] < 1.0, 60, what="the chart workers")
            time.sleep(3.0)  # the read workers are up
            last_t = hub.sql("select max(ts) from observations where atom = 'pulse'")[0][0]
            pages = {
                "year chart, pulse, 1000 points": year,
                "year chart, one host": year + host,
                "year chart, rhythm": "/api/v1/series?atom=rhythm&points=1000",
                "last day, pulse, 2000 points": f"/api/v1/series?atom=pulse&points=2000&since={last_t - 86400}"
                                                + host,
                "status": "/api/v1/status",
                "metrics": "/metrics",
            }
            print(f"GET, median of {repeat}:")
            for name, path in pages.items():
                runs = [timed_get(hub.base + path) for _ in range(repeat)]
                print(f"  {name:34s} {1000 * statistics.median(r[0] for r in runs):8.1f} ms "
                      f"{len(runs[0][1]):>10,} bytes", flush=True)

            print(f"\nenqueue every 10 ms for {LOADED:g} s while a client reads charts, status and /metrics:")
            mine = str(default_processes())  # what a hub started without --read-processes runs here
            for label, procs, paths in (("reads in two worker processes", "2", list(pages.values())),
                                        ("reads in hub threads", "0", list(pages.values())),
                                        ("floor: the client reads /healthz only", mine, ["/healthz"])):
                shown = label + (" (default here)" if procs == mine and paths != ["/healthz"] else "")
                hub.stop()
                hub.start("--read-processes", procs)
                wait_until(lambda: timed_get(hub.base + year)[0] < 1.0, 60, what="the chart workers")
                time.sleep(3.0)
                rtt, peak = loaded_enqueues(hub, paths)
                q = statistics.quantiles(rtt, n=100)
                print(f"  {shown:50s} p50 {1000 * statistics.median(rtt):.2f} ms, p99 {1000 * q[98]:.2f} ms, "
                      f"max {1000 * max(rtt):.1f} ms ({len(rtt)} enqueues); hub RSS {peak / 2**20:.0f} MiB "
                      "(its read workers not counted)", flush=True)
        finally:
            for a in agents:
                a.terminate()
                a.wait(60)
            hub.stop()


if __name__ == "__main__":
    main()
