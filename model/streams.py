"""Seeded single metric streams with labelled anomalies: what ``bench/detect.py`` and tests judge.

Each stream is one numeric series at a fixed interval with a kind of normal behaviour seen
on real machines, and anomalies of three kinds:

- **point**: one to three readings far off (a spike or a drop);
- **contextual**: a stretch whose values are ordinary for the stream but not for the time of
  day (daytime level at night) or not for the level it has been at;
- **collective**: a stretch where no reading alone is extreme: a flat-lined sensor, a mild
  level shift, or noise that doubles.

Anomalies are events with a start and a length; ``labels[i]`` names the event kind covering
observation i (or None). Nothing here is tuned to any public data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

DAY = 86400.0
KINDS = ("seasonal", "shifts", "drift", "heavy_tail", "plateaus", "counts")
ANOMALIES = ("point", "contextual", "collective")


@dataclass
class Stream:
    kind: str
    interval: float
    times: np.ndarray
    values: np.ndarray
    labels: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)

    def events(self) -> list[tuple[int, int, str]]:
        """(start, end exclusive, kind) of each labelled run."""
        out, i = [], 0
        while i < len(self.labels):
            if self.labels[i] is None:
                i += 1
                continue
            j = i
            while j < len(self.labels) and self.labels[j] == self.labels[i]:
                j += 1
            out.append((i, j, self.labels[i]))
            i = j
        return out


def _daily(t: np.ndarray) -> np.ndarray:
    """0 at 3am, 1 at 3pm."""
    h = (t % DAY) / 3600.0
    return 0.5 - 0.5 * np.cos(2 * np.pi * (h - 3) / 24)


def _weekly(t: np.ndarray) -> np.ndarray:
    wd = np.floor(t / DAY) % 7
    return np.where(wd < 5, 1.0, 0.5)


def _seasonal(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 20 + 45 * _daily(t) * _weekly(t) + rng.normal(0, 3, len(t))


def _shifts(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Normal operation moves between a few levels (deploys, batch jobs), each held for hours."""
    levels = np.array([30.0, 45.0, 60.0])
    out = np.empty(len(t))
    i = 0
    while i < len(t):
        n = int(rng.integers(36, 200))
        out[i: i + n] = levels[rng.integers(0, 3)]
        i += n
    return out + rng.normal(0, 1.5, len(t))


def _drift(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A slow climb (a disk filling, a leak) with daily wiggle: weeks later the level is new."""
    days = (t - t[0]) / DAY
    return 100 + 12 * days + 5 * _daily(t) + rng.normal(0, 1.0, len(t))


def _heavy_tail(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Request latency: log-normal body with Student-t bursts (ordinary outliers are normal here)."""
    base = np.exp(3.0 + 0.3 * _daily(t) + 0.25 * rng.standard_t(4, len(t)))
    return base


def _plateaus(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A temperature-like signal that holds a plateau, steps, and holds again."""
    out = np.empty(len(t))
    level, i = 40.0, 0
    while i < len(t):
        n = int(rng.integers(20, 120))
        level = float(np.clip(level + rng.normal(0, 3), 25, 60))
        out[i: i + n] = level
        i += n
    return out + rng.normal(0, 0.2, len(t))


def _counts(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer event counts per interval (errors, logins) with a daily rate."""
    return rng.poisson(0.5 + 6 * _daily(t) * _weekly(t)).astype(np.float64)


NORMAL: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "seasonal": _seasonal, "shifts": _shifts, "drift": _drift, "heavy_tail": _heavy_tail,
    "plateaus": _plateaus, "counts": _counts,
}


def _inject(kind: str, anomaly: str, x: np.ndarray, t: np.ndarray, s: int, n: int,
            rng: np.random.Generator) -> int:
    """Apply one anomaly at observation s; returns how many observations it covers."""
    lo, hi = np.quantile(x[max(0, s - 600): s + 1], [0.01, 0.99]) if s else (x.min(), x.max())
    span = max(hi - lo, 1e-6)
    if anomaly == "point":
        m = int(rng.integers(1, 4))
        up = rng.random() < 0.7 or (lo - 0.8 * span < 0 and kind in ("counts", "heavy_tail"))
        x[s: s + m] = (hi + rng.uniform(0.6, 1.5) * span) if up else (lo - rng.uniform(0.6, 1.0) * span)
        if kind == "counts":
            x[s: s + m] = np.round(np.maximum(0, x[s: s + m]))
        return m
    if anomaly == "contextual":
        m = int(rng.integers(12, 36))
        seg = slice(s, s + m)
        if kind in ("seasonal", "counts"):  # the afternoon's level, at night
            t_day = t[seg] - (t[seg] % DAY) + 15 * 3600.0
            donor = NORMAL[kind](t_day, rng)
            x[seg] = donor
        else:  # a level inside the normal range, but a jump from where it was
            x[seg] = x[seg] + (0.5 * span if x[s] < (lo + hi) / 2 else -0.5 * span)
        return m
    m = int(rng.integers(24, 72))
    seg = slice(s, s + m)
    style = rng.integers(0, 3)
    if style == 0 and kind != "counts":  # stuck sensor
        x[seg] = x[s]
    elif style == 1:  # noise doubles
        x[seg] = x[seg] + rng.normal(0, 0.5 * max(np.std(np.diff(x[max(0, s - 300): s + 1])), 1e-3), m) * 3
    else:  # a mild sustained shift
        x[seg] = x[seg] + 0.25 * span
    if kind == "counts":
        x[seg] = np.round(np.maximum(0, x[seg]))
    return m


def generate(kind: str, n: int = 4000, seed: int = 0, interval: float = 300.0, anomalies: int = 6,
             learn: int = 0, contamination: float = 0.0, start: float = 1704067200.0) -> Stream:
    """One stream of ``n`` readings: ``anomalies`` events after the first ``learn`` observations,
    and in the first ``learn`` ones about ``contamination`` of them anomalous (unlabelled there
    in spirit: a detector must not be told, but the labels say where they are)."""
    if kind not in NORMAL:
        raise ValueError(f"unknown stream kind {kind!r}; known: {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    t = start + np.arange(n) * interval
    x = NORMAL[kind](t, rng)
    labels: list[str | None] = [None] * n
    taken = np.zeros(n, dtype=bool)

    def place(lo: int, hi: int) -> None:
        for _ in range(200):
            a = ANOMALIES[int(rng.integers(0, 3))]
            s = int(rng.integers(lo, max(lo + 1, hi - 80)))
            if a == "contextual" and kind in ("seasonal", "counts"):
                s = s - (s % int(DAY / interval)) + int(2.5 * 3600 / interval)  # 2:30am that day
                if not lo <= s < hi - 80:
                    continue
            if taken[max(0, s - 30): s + 110].any():
                continue
            m = _inject(kind, a, x, t, s, n, rng)
            taken[s: s + m] = True
            for i in range(s, min(n, s + m)):
                labels[i] = a
            return

    if contamination > 0 and learn:
        budget = contamination * learn
        while sum(1 for i in range(learn) if labels[i]) < budget * 0.9 and not taken[: learn - 80].all():
            before = sum(taken[:learn])
            place(0, learn)
            if sum(taken[:learn]) == before:
                break
    gap = (n - learn) / max(1, anomalies)
    for e in range(anomalies):
        place(learn + int(e * gap) + 20, learn + int((e + 1) * gap))
    return Stream(kind, interval, t, x, labels)


def learn_size(n: int) -> int:
    """The learning period the real-stream evaluation allows: the first 15%, at most 750 rows."""
    return min(750, math.floor(0.15 * n))
