"""Bulk import through the CLI: observations per second and the CLI's peak memory.

Writes ``--days`` of synthetic pulse (30 s readings) as JSON lines, starts a throwaway hub,
and runs ``kiri observe pulse --file`` on it ``--repeat`` times (each into a fresh hub),
sampling the CLI process's resident memory every 10 ms, until every row is stored (a big
import's commit moves in steps). ``--cli-root`` runs another
checkout's CLI against the same hub code, ``--root`` another checkout's hub and CLI (a
folder holding ``kiri/``), to compare before and after in one run.

    python bench/importing.py [--days 30] [--repeat 3] [--cli-root OLD] [--root OLD_PKGROOT]
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
from typing import BinaryIO

import click
import orjson
import psutil

from bench._hub import running_hub
from kiri.model import synth

ROOT = Path(__file__).resolve().parent.parent


def run_cli(port: int, path: Path, cwd: Path | None = None, atom: str = "pulse") -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one ``kiri observe ATOM --file PATH`` (``cwd``: another
    checkout's kiri package)."""
    env = {**os.environ, "KIRI_HUB": f"127.0.0.1:{port}", **({"PYTHONPATH": str(cwd)} if cwd else {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kiri.cli", "observe", atom, "--file", str(path)],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"import failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, peak


def stored(db: Path, n: int, timeout: float = 600.0) -> None:
    """Wait until the hub has ``n`` observations (a committed import may still be moving)."""
    deadline = time.monotonic() + timeout
    while True:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            if con.execute("SELECT count(*) FROM observations").fetchone()[0] >= n:
                return
        finally:
            con.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {n} observations stored after {timeout:.0f} s")
        time.sleep(0.02)


def write_synth(f: BinaryIO, atom: str, days: float, hosts: int = 1, full_precision: bool = False) -> int:
    """``hosts`` hosts' synthetic ``atom`` as JSON lines, host after host (seed = host number;
    a host field only when there are several), values to 4 decimals as ``kiri synth`` prints
    them (one host: the same bytes), or every digit the generator made (``full_precision``: a
    file about half again as big). The number of lines."""
    n = 0
    for h in range(hosts):
        s = synth.generate(atom, days, seed=h)
        host = {"host": f"host{h:02d}"} if hosts > 1 else {}
        for t, row in zip(s.times, s.rows, strict=True):
            values = row if full_precision else {k: round(v, 4) for k, v in row.items()}
            f.write(orjson.dumps({"time": t, **host, **values}) + b"\n")
            n += 1
    return n


@click.command()
@click.option("--days", default=30.0, show_default=True, type=click.FloatRange(0.1, 3650))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--hosts", default=1, show_default=True, type=click.IntRange(1, 100),
              help="Hosts in the file (each --days long, one after another, as bench/year.py writes them).")
@click.option("--cli-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also time the CLI of this checkout (its kiri package), against the same hub.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also time this package root's hub and CLI (a folder holding kiri/, e.g. an older checkout's).")
def main(days: float, repeat: int, hosts: int, cli_root: Path | None, root: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="kiri-import-") as tmp:
        data = Path(tmp) / "pulse.jsonl"
        with data.open("wb") as f:
            write_synth(f, "pulse", days, hosts)
        n = sum(1 for _ in data.open("rb"))
        print(f"{n:,} observations ({data.stat().st_size / 1e6:.0f} MB of JSON lines), median of {repeat}")
        # (name, the CLI's package root, the hub's package root: None for this checkout's)
        runs = ([("this checkout", ROOT, None)] + ([("--cli-root", cli_root, None)] if cli_root else [])
                + ([("--root", root, root)] if root else []))
        for _ in range(repeat):
            for name, cli, hub in runs:
                with running_hub(root=hub) as (port, folder):
                    t0 = time.perf_counter()
                    _, peak = run_cli(port, data, cli)
                    stored(folder / "kiri.db", n)  # a CLI that does not follow a big commit to its end
                    secs = time.perf_counter() - t0
                results.setdefault(name, []).append((secs, peak))
        for name, runs in results.items():
            secs = statistics.median(s for s, _ in runs)
            peak = statistics.median(p for _, p in runs)
            print(f"  {name:14s} {secs:6.1f} s = {n / secs:9,.0f} obs/s, CLI peak RSS {peak / 2**20:6.0f} MiB")


results: dict[str, list[tuple[float, int]]] = {}

if __name__ == "__main__":
    main()
