"""Rollups' raw reads: microseconds per reading for ``read_raw`` and ``compute_base``.

Every rolled-up reading is read back once (``rollups.compute_base`` after an import or a
backfill marks its bucket dirty), and every zoomed-in chart reads raw rows too, so this is
a per-reading cost of imports, backfills and charts alike. The bench stores ``--days`` of
synthetic pulse (30 s readings, one host) in a throwaway SQLite database built by the
migrations, optionally with one score per reading, and times both functions over 6-hour
ranges. ``--root`` also times another checkout's ``hub/watch/rollups.py`` on the same
database, in the same process, alternating rounds.

    python bench/rollups.py [--days 60] [--rounds 3] [--root /path/to/old/checkout]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType

import click
import orjson
import sqlalchemy as sa

from kiri.hub.store import migrate as mig
from kiri.hub.store.db import make_engine
from kiri.hub.store.schema import observations, tasks, weights
from kiri.hub.watch import rollups as R
from kiri.model import synth

SPAN = 6 * 3600.0  # seconds per timed read: 720 readings of pulse


def build(db: Path, days: float, scored: bool) -> tuple[sa.Engine, float, list[str]]:
    engine = make_engine(f"sqlite:///{db}")
    mig.upgrade(engine)
    s = synth.generate("pulse", days, seed=0)
    fields = list(s.rows[0])
    with engine.begin() as c:
        c.execute(tasks.insert().values(id=1, kind="train", status="done", run_after=0, created_at=0, updated_at=0))
        c.execute(weights.insert().values(id=1, atom="pulse", version=1, hash="h", blob=b"", info="{}",
                                          status="active", created_at=0))
        c.execute(observations.insert(), [{"atom": "pulse", "ts": t, "host": None, "data": orjson.dumps(r).decode(),
                                           "created_at": 0.0} for t, r in zip(s.times, s.rows, strict=True)])
        if scored:
            c.execute(sa.text("INSERT INTO scores (observation_id, atom, weights_id, score, threshold, anomalous, "
                              "surprise, tail_p, created_at) SELECT id, atom, 1, 0.5, 1.5, 0, '[0.1]', 0.3, 0 "
                              "FROM observations"))
    return engine, float(s.times[0]), fields


def time_one(mod: ModuleType, c: sa.Connection, t0: float, fields: list[str], days: float) -> tuple[float, float]:
    """µs per reading of read_raw and of compute_base over every 6-hour range of the stream."""
    n_raw = n_base = 0
    raw_s = base_s = 0.0
    spans = int(days * 86400 / SPAN)
    for k in range(spans):
        lo = t0 + k * SPAN
        t = time.perf_counter()
        n_raw += len(mod.read_raw(c, "pulse", "", fields, lo, lo + SPAN).ids)
        raw_s += time.perf_counter() - t
        buckets = list(range(int(lo // R.BASE), int((lo + SPAN) // R.BASE)))
        t = time.perf_counter()
        got = mod.compute_base(c, "pulse", "", fields, buckets)
        base_s += time.perf_counter() - t
        n_base += sum(int(v[0]) for v in got.values() if v is not None)
    return raw_s / max(n_raw, 1) * 1e6, base_s / max(n_base, 1) * 1e6


def load(root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("other_rollups", root / "hub" / "watch" / "rollups.py")
    if spec is None or spec.loader is None:
        raise click.UsageError(f"{root}: no hub/watch/rollups.py there")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@click.command()
@click.option("--days", default=60.0, show_default=True, type=click.FloatRange(1, 3650))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also time this checkout's hub/watch/rollups.py (e.g. an older one).")
def main(days: float, rounds: int, root: Path | None) -> None:
    mods = {"this checkout": R, **({str(root): load(root)} if root else {})}
    for scored in (False, True):
        with tempfile.TemporaryDirectory(prefix="kiri-bench-rollups-") as tmp:
            engine, t0, fields = build(Path(tmp) / "k.db", days, scored)
            got: dict[str, list[tuple[float, float]]] = {name: [] for name in mods}
            with engine.connect() as c:
                for _ in range(rounds):
                    for name, mod in mods.items():
                        got[name].append(time_one(mod, c, t0, fields, days))
            engine.dispose()
        print(f"{days:g} days of pulse, {'one score per reading' if scored else 'unscored'} "
              f"(µs per reading, median of {rounds}):")
        for name, runs in got.items():
            print(f"  {name:30s} read_raw {statistics.median(r[0] for r in runs):6.2f}   "
                  f"compute_base {statistics.median(r[1] for r in runs):6.2f}")


if __name__ == "__main__":
    main()
