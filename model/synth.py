"""Seeded synthetic data with daily and weekly rhythms, and labelled anomalies.

The same seed gives byte-identical data on any day: time starts at a fixed epoch (Monday
2024-01-01 00:00 UTC) unless a start is given, and every random draw comes from one
seeded generator. Anomalies are events (class, start, duration) applied consistently to
every atom they touch, all atoms sharing one clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EPOCH = 1704067200.0  # Monday 2024-01-01 00:00:00 UTC
DAY = 86400.0
INTERVALS = {"pulse": 30.0, "rhythm": 300.0, "drift": 3600.0}

# anomaly class -> (atoms it changes, duration in seconds, when it happens)
CLASSES: dict[str, tuple[tuple[str, ...], float, str]] = {
    "spike": (("pulse",), 300.0, "any"),
    "night_activity": (("rhythm",), 3600.0, "weekend_night"),
    "overload": (("drift",), 7200.0, "workday"),
    # the machine is busy at night while the owner sleeps: only pulse's readings deviate
    # (rhythm shows the usual sleeping owner), so only pulse carries the label
    "busy_idle_owner": (("pulse",), 1800.0, "night"),
}


@dataclass(frozen=True)
class Event:
    kind: str
    start: float
    duration: float

    def covers(self, t: float) -> bool:
        return self.start <= t < self.start + self.duration


@dataclass
class Series:
    atom: str
    times: list[float] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def _clock(t: float) -> tuple[float, int]:
    """Hour of day (float) and weekday (0 = Monday) in UTC."""
    days = (t - EPOCH) / DAY
    return (days % 1.0) * 24.0, math.floor(days) % 7


def _workday(t: float) -> bool:
    h, w = _clock(t)
    return w < 5 and 9 <= h < 18


def _place(kind: str, rng: np.random.Generator, start: float, days: float) -> Event:
    _, duration, when = CLASSES[kind]
    for _ in range(10_000):
        t = start + float(rng.uniform(0, days * DAY - duration))
        h, w = _clock(t)
        ok = {
            "any": True,
            "weekend_night": w >= 5 and 2 <= h < 4,
            "workday": w < 5 and 10 <= h < 16,
            "night": 1 <= h < 5,
        }[when]
        if ok:
            return Event(kind, t, duration)
    raise ValueError(f"could not place a {kind!r} anomaly in {days} days")


def events(seed: int, days: float, start: float = EPOCH, counts: dict[str, int] | None = None) -> list[Event]:
    """Anomaly events, non-overlapping, placed by the seed."""
    rng = np.random.default_rng([seed, 7])
    out: list[Event] = []
    for kind, n in sorted((counts or {}).items()):
        if kind not in CLASSES:
            raise ValueError(f"unknown anomaly class {kind!r}; known: {', '.join(CLASSES)}")
        placed = 0
        while placed < n:
            e = _place(kind, rng, start, days)
            if all(e.start + e.duration <= o.start or o.start + o.duration <= e.start for o in out):
                out.append(e)
                placed += 1
    return sorted(out, key=lambda e: e.start)


def _pulse(t: float, rng: np.random.Generator, event: str | None) -> dict[str, float]:
    h, w = _clock(t)
    day = 0.5 - 0.5 * math.cos(2 * math.pi * (h - 3) / 24)  # 0 at 3am, 1 at 3pm
    busy = day * (1.0 if w < 5 else 0.45)
    cpu = 12 + 42 * busy + rng.normal(0, 4)
    mem = 48 + 8 * busy + rng.normal(0, 2)
    disk = 45 + 1.5 * ((t - EPOCH) / (7 * DAY)) % 3 + rng.normal(0, 0.3)
    swap = 26 + 2 * busy + rng.normal(0, 2)
    load = 1.0 + 4.5 * busy + abs(rng.normal(0, 0.4))
    net = 1.0 if rng.random() > 0.002 else 0.0
    if event == "spike":
        cpu, mem = rng.uniform(95, 100), rng.uniform(92, 99)
        swap, load = rng.uniform(85, 100), rng.uniform(17, 20)
    elif event == "busy_idle_owner":
        cpu, mem = rng.uniform(62, 80), rng.uniform(60, 70)
        load = rng.uniform(8, 12)
    return {"cpu": cpu, "mem": mem, "disk": disk, "swap": swap, "load": load, "net": net}


def _rhythm(t: float, rng: np.random.Generator, event: str | None) -> dict[str, float]:
    h, w = _clock(t)
    awake = (8 <= h < 23) if w < 5 else (10 <= h < 24)
    at_desk = (9 <= h < 12.5 or 13.5 <= h < 18.5) if w < 5 else (11 <= h < 13 or 15 <= h < 18)
    if at_desk:
        activity, idle = rng.uniform(35, 55), rng.exponential(40)
    elif awake:
        activity, idle = rng.uniform(3, 20), rng.uniform(300, 2400)
    else:
        activity, idle = 0.0, 3600.0
    if event == "night_activity":
        activity, idle = rng.uniform(40, 60), rng.uniform(0, 30)
    return {"idle": idle, "activity": activity, "hour": h, "weekday": float(w)}


def _drift(t: float, rng: np.random.Generator, event: str | None) -> dict[str, float]:
    h, w = _clock(t)
    if _workday(t):
        added, completed, switched = rng.poisson(3), rng.poisson(2.5), rng.poisson(2.5)
    elif w < 5 and 18 <= h < 21:
        added, completed, switched = rng.poisson(0.6), rng.poisson(0.4), rng.poisson(0.4)
    else:
        added = completed = switched = 0
    if event == "overload":
        added, completed, switched = rng.integers(15, 21), rng.integers(0, 2), rng.integers(9, 11)
    return {"added": float(added), "completed": float(completed), "switched": float(switched),
            "hour": h, "weekday": float(w)}


GENERATORS = {"pulse": _pulse, "rhythm": _rhythm, "drift": _drift}


def generate(atom: str, days: float = 7.0, seed: int = 0, start: float = EPOCH,
             anomalies: dict[str, int] | None = None, interval: float | None = None,
             event_list: list[Event] | None = None) -> Series:
    """One atom's observations every ``interval`` seconds for ``days``, with anomalies."""
    if atom not in GENERATORS:
        raise ValueError(f"no synthetic generator for atom {atom!r}; available: {', '.join(GENERATORS)}")
    if not 0 < days <= 3650:
        raise ValueError("days must be in (0, 3650]")
    step = interval or INTERVALS[atom]
    evs = event_list if event_list is not None else events(seed, days, start, anomalies)
    mine = [e for e in evs if atom in CLASSES[e.kind][0]]
    rng = np.random.default_rng([seed, sorted(GENERATORS).index(atom)])
    out = Series(atom)
    n = int(days * DAY // step)
    j = 0
    for i in range(n):
        t = start + i * step
        while j < len(mine) and mine[j].start + mine[j].duration <= t:
            j += 1
        ev = mine[j].kind if j < len(mine) and mine[j].covers(t) else None
        out.times.append(t)
        out.rows.append({k: float(v) for k, v in GENERATORS[atom](t, rng, ev).items()})
        out.labels.append(ev)
    return out


def world(days: float = 7.0, seed: int = 0, start: float = EPOCH,
          anomalies: dict[str, int] | None = None) -> dict[str, Series]:
    """Every preset atom over the same days, sharing one set of anomaly events."""
    evs = events(seed, days, start, anomalies)
    return {a: generate(a, days, seed, start, event_list=evs) for a in GENERATORS}
