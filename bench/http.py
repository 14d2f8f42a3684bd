"""How the HTTP face holds up with a month of 30-second data, and whether it stalls the queue.

Starts a hub with its HTTP face, stores 30 days of pulse observations at 30 s (86,400), trains
pulse briefly and lets a scorer score them all, then times the dashboard's requests (median
of N) and the TCP protocol's round trip with and without the dashboard's reads running.

    python bench/http.py [--days 30] [--repeat 10]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from kiri.agents.client import HubClient
from kiri.model import synth
from tests.conftest import free_port, wait_until


def timed_get(url: str) -> tuple[float, int]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        n = len(r.read())
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port, http_port = free_port(), free_port()
        log = open(Path(tmp) / "hub.log", "ab")  # noqa: SIM115
        procs = [subprocess.Popen([sys.executable, "-m", "kiri.hub.cli", "serve", "--data-dir", tmp,
                                   "--port", str(port), "--http-port", str(http_port)], stdout=log, stderr=log)]
        base = f"http://127.0.0.1:{http_port}"
        try:
            wait_until(lambda: _up(base), 30, what="hub")
            c = HubClient(("127.0.0.1", port), role="cli", agent="bench")
            c.connect()
            series = synth.generate("pulse", args.days, seed=0, start=time.time() - args.days * synth.DAY)
            t = time.perf_counter()
            for i in range(0, len(series.rows), 5000):
                c.call("observe", {"atom": "pulse", "observations": [
                    {"values": r, "time": ts} for r, ts in zip(series.rows[i:i + 5000], series.times[i:i + 5000],
                                                               strict=True)]})
            print(f"stored {len(series.rows):,} observations in {time.perf_counter() - t:.1f} s")
            for role, kinds in (("trainer", "train"), ("scorer", "score")):
                agent = [sys.executable, "-m", "kiri.agents.cli", "--role", role, "--kinds", kinds,
                         "--hub", f"127.0.0.1:{port}", "--log-level", "warning"]
                procs.append(subprocess.Popen(agent, stdout=log, stderr=log))
            c.enqueue("train", "pulse", {"steps": 200})
            t = time.perf_counter()
            wait_until(lambda: _scored(c) >= len(series.rows), 1200, interval=0.5, what="every observation scored")
            print(f"trained and scored them in {time.perf_counter() - t:.1f} s")
            pages = {
                "series, whole month, 1000 points": "/api/v1/series?atom=pulse&points=1000",
                "series, last day, 2880 points": f"/api/v1/series?atom=pulse&points=5000&since={time.time() - 86400}",
                "status": "/api/v1/status",
                "metrics": "/metrics",
                "history n=100": "/api/v1/history?atom=pulse&n=100",
            }
            print(f"\nGET, median of {args.repeat} (one client):")
            for name, path in pages.items():
                runs = [timed_get(base + path) for _ in range(args.repeat)]
                print(f"  {name:36s} {1000 * statistics.median(r[0] for r in runs):8.1f} ms  {runs[0][1]:>9,} bytes")
            rtt_idle = _pings(c, 400)
            stop = threading.Event()

            def hammer() -> None:
                while not stop.is_set():
                    timed_get(base + pages["series, whole month, 1000 points"])

            th = threading.Thread(target=hammer, daemon=True)
            th.start()
            rtt_busy = _pings(c, 400)
            stop.set()
            th.join()
            q = statistics.quantiles
            print("\nTCP ping round trip (the queue's loop), p50 / p99:")
            print(f"  idle                                 {1000 * statistics.median(rtt_idle):6.2f} / "
                  f"{1000 * q(rtt_idle, n=100)[98]:6.2f} ms")
            print(f"  while a client pulls the month      {1000 * statistics.median(rtt_busy):6.2f} / "
                  f"{1000 * q(rtt_busy, n=100)[98]:6.2f} ms")
            c.close()
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(30)


def _up(base: str) -> bool:
    try:
        return timed_get(base + "/healthz")[1] > 0
    except OSError:
        return False


def _scored(c: HubClient) -> int:
    st = c.call("stats")
    busy = sum(r["count"] for r in st["tasks"] if r["status"] in ("queued", "leased"))
    if busy:
        return 0
    hist = c.call("history", {"atom": "pulse", "n": 1})["observations"]
    return 10**9 if hist and hist[-1]["score"] is not None else 0


def _pings(c: HubClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.call("ping")
        out.append(time.perf_counter() - t)
        time.sleep(0.002)
    return out


if __name__ == "__main__":
    main()
