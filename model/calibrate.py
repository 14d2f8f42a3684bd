"""From raw surprise to a calibrated tail probability, and from an alarm budget to a verdict.

A score in nats means little on its own: a quiet stream's normal is 0.2, a noisy one's 3.
What an owner can reason about is "how often does normal data look at least this unusual?"
That is the tail probability ``p = P(normal score >= s)``; on normal data it is uniform, so a
threshold on it *is* an alarm rate, and an alarm budget ("at most 2 alarms a week") turns
into a threshold without any magic factor.

The tail is estimated from scores on held-out normal-ish data, which in real life holds a
few anomalies nobody labelled. So the estimate is built to survive them:

- scores far beyond what the body (up to the 90th percentile, which a few percent of
  anomalies barely move) makes plausible are set aside first: that is where a
  contaminated history's anomalies sit;
- the rest gives the empirical distribution up to its 98th percentile and, beyond it, an
  exponential survival with the scale of the 90th-98th percentiles (surprise in nats is a
  log-probability, whose upper tail is close to exponential), so a budget of one alarm in
  a thousand readings is an extrapolation of measured shape, not a guess.

Two statistics are calibrated this way: each observation's score (a point anomaly), and the
mean score over the last ``SUSTAIN`` observations (a collective one: a stretch in which
every reading is a bit odd and none alone is alarming). An observation's reported
probability is the smaller of the two, doubled (a Bonferroni correction for looking twice).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BODY = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98)  # levels whose quantiles are kept as measured
SUSTAIN = 6  # observations in the sustained-unusualness window
DEFAULT_ALARMS_PER_WEEK = 2.0
WEEK = 7 * 86400.0
MIN_P = 1e-12
# The tail's scale is never under this (nats per e-fold of rarity). Scores of a confident
# model sit in a clump at zero (``excess/1``: as surprising as expected), which puts the
# 50th to 98th percentiles together; the scale measured there would make a reading a
# quarter of a nat past the clump one in a million. (bench/detect.py, same run: 0.1 spends
# the budget many times over on composition, 0.4 lets a contaminated week's anomalies under
# it; 0.25 is better than both on every figure there.)
MIN_BETA = 0.25


@dataclass(frozen=True)
class Tail:
    """Survival function of a score on normal data: empirical body, exponential beyond it."""

    knots: tuple[float, ...]  # scores at cumulative levels BODY
    beta: float  # exponential scale (nats) beyond the last knot

    @classmethod
    def fit(cls, scores: Sequence[float] | np.ndarray) -> Tail:
        """Two passes: find the far outliers with a tail that is surely too thin, then measure without them.

        Pass 1 extrapolates from the 50th-90th percentiles, which a few percent of anomalies
        cannot move, and drops scores that tail puts below 1e-4: anomalies sitting far out
        (a contaminated history's), and almost no normal scores, since this tail is thinner
        than the real one. Pass 2 keeps the empirical quantiles up to the 98th and takes
        the exponential scale beyond from the 90th-98th: surprise has a heavier tail than
        its body suggests (a mixture over contexts), and a scale from the body alone would
        spend the alarm budget several times over.

        A stream's recent scores come in with their alarms (``RECENT_MIN``): this pass is
        what sets its anomalies aside. Leaving the alarms out beforehand instead (and then
        cutting less here) made every ordinary extreme that once alarmed rarer in the next
        calibration, so it alarmed again at every retrain (bench/detect.py, anomaly-free
        single streams: 6.57 alarms a week against a budget of 2, now 5.14).
        """
        s = np.asarray(scores, dtype=np.float64)
        s = s[np.isfinite(s)]
        if len(s) == 0:
            return cls(knots=tuple(float(x) for x in BODY), beta=1.0)
        q50, q90 = np.quantile(s, [0.5, 0.9])
        beta0 = (q90 - q50) / math.log(5.0)
        if beta0 > 0:
            kept = s[s <= q90 + beta0 * math.log(0.1 / 1e-4)]
            s = kept if len(kept) >= 0.8 * len(s) else s
        knots = np.maximum.accumulate(np.quantile(s, BODY))
        body = (knots[BODY.index(0.9)] - knots[2]) / math.log(5.0)  # the 50th-90th's exponential scale
        if len(s) >= 100:
            spread = knots[-1] - knots[BODY.index(0.9)]
            # never thinner than the body's: scores come in clumps (a few buckets, a few
            # contexts), and two clumps can put the 90th and 98th percentiles together,
            # which would make every score past them look like one in a million
            beta = max(spread / math.log(0.1 / (1.0 - BODY[-1])), body)
        else:  # too few for a 98th percentile: the body's scale, widened
            beta = 1.5 * body
        # (written so that a NaN scale falls to the floor too)
        return cls(knots=tuple(float(k) for k in knots), beta=float(beta if beta > MIN_BETA else MIN_BETA))

    def sf(self, x: np.ndarray | float) -> np.ndarray:
        """P(normal score >= x), for each x."""
        x = np.asarray(x, dtype=np.float64)
        k = np.asarray(self.knots)
        log_surv = np.log1p(-np.asarray(BODY))  # log S at each knot
        body = np.exp(np.interp(x, k, log_surv, left=0.0))
        beyond = (1.0 - BODY[-1]) * np.exp(np.minimum(0.0, -(x - k[-1]) / self.beta))  # used where x > k[-1]
        return np.clip(np.where(x > k[-1], beyond, body), MIN_P, 1.0)

    def isf(self, p: float) -> float:
        """The score whose tail probability is p."""
        if p >= 1.0 - BODY[-1]:
            return float(np.interp(math.log(p), np.log1p(-np.asarray(BODY))[::-1], np.asarray(self.knots)[::-1]))
        return self.knots[-1] + self.beta * math.log((1.0 - BODY[-1]) / p)

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(BODY), "knots": list(self.knots), "beta": self.beta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tail:
        knots = tuple(float(k) for k in d["knots"])
        beta = float(d["beta"])
        if len(knots) != len(BODY) or not all(math.isfinite(k) for k in knots) or not beta > 0:
            raise ValueError(f"calibration tail: expected {len(BODY)} finite knots and a positive beta")
        return cls(knots, beta)


def rolling_mean(scores: np.ndarray, w: int = SUSTAIN, prefix: np.ndarray | None = None) -> np.ndarray:
    """Mean of each score with up to w-1 before it (``prefix``: scores that came before these)."""
    s = np.asarray(scores, dtype=np.float64)
    pre = np.asarray(prefix if prefix is not None else [], dtype=np.float64)[-(w - 1):] if w > 1 else np.empty(0)
    full = np.concatenate([pre, s])
    c = np.concatenate([[0.0], np.cumsum(full)])
    idx = np.arange(len(pre), len(full))
    lo = np.maximum(0, idx - w + 1)
    return (c[idx + 1] - c[lo]) / (idx + 1 - lo)


@dataclass(frozen=True)
class Calibration:
    """Tail models of the point and sustained statistics, fitted on held-out scores."""

    point: Tail
    sustained: Tail
    n: int  # scores it was fitted on

    @classmethod
    def fit(cls, scores: Sequence[float] | np.ndarray) -> Calibration:
        s = np.asarray(scores, dtype=np.float64)
        point = Tail.fit(s)
        capped = np.minimum(s, point.knots[-1])
        sustained = Tail.fit(rolling_mean(capped)[SUSTAIN - 1:] if len(s) >= 4 * SUSTAIN else capped)
        return cls(point, sustained, len(s))

    @property
    def cap(self) -> float:
        """Scores enter the sustained mean capped at normal's 98th percentile: one reading that
        is already an alarm on its own must not make its neighbours alarms too."""
        return self.point.knots[-1]

    def point_p(self, scores: np.ndarray) -> np.ndarray:
        return self.point.sf(np.asarray(scores, dtype=np.float64))

    def tail_p(self, scores: np.ndarray, prefix: np.ndarray | None = None) -> np.ndarray:
        """Calibrated tail probability of each score (``prefix``: the stream's scores just before)."""
        s = np.asarray(scores, dtype=np.float64)
        p_point = self.point.sf(s)
        pre = None if prefix is None else np.minimum(np.asarray(prefix, dtype=np.float64), self.cap)
        p_sus = self.sustained.sf(rolling_mean(np.minimum(s, self.cap), prefix=pre))
        return np.minimum(1.0, 2.0 * np.minimum(p_point, p_sus))

    def threshold(self, alpha: float) -> float:
        """The point score that alone reaches tail probability alpha (the line drawn on charts)."""
        return self.point.isf(alpha / 2.0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tail/1", "point": self.point.to_dict(), "sustained": self.sustained.to_dict(),
                "sustain": SUSTAIN, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Calibration | None:
        if not d:
            return None
        if d.get("kind") != "tail/1":
            raise ValueError(f"unknown calibration {d.get('kind')!r}")
        return cls(Tail.from_dict(d["point"]), Tail.from_dict(d["sustained"]), int(d.get("n", 0)))


# Out-of-sample scores of a stream's recent past (scores it got while being watched, from
# weights that had not seen it, alarms included) needed before a retrain calibrates on them
# instead of on its own held-out windows: far more of them, and every kind of day the stream
# has had (bench/detect.py, anomaly-free streams: 8.4 alarms a week on held-out windows
# alone, 6.5 with this).
RECENT_MIN = 500

SUSPECT_P = 0.05  # a reading this unusual is suspect: retrains leave out the excess of them (robust.suspects)


def suspect_share(calibration: Calibration, scores: np.ndarray) -> float:
    """Share of these (normal) scores whose tail probability falls under ``SUSPECT_P``.

    ``SUSPECT_P`` for a continuous score; far less where scores come in clumps (a quiet
    night scores the same few values over and over), which is why it is measured: a
    retrain leaves out only the suspects beyond this share."""
    s = np.asarray(scores, dtype=np.float64)
    return float((calibration.tail_p(s) < SUSPECT_P).mean()) if len(s) else SUSPECT_P


def alarm_rate(alarms_per_week: float, interval: float) -> float:
    """Alarms per observation that a budget of ``alarms_per_week`` allows at one reading per ``interval`` s."""
    if not (alarms_per_week > 0 and math.isfinite(alarms_per_week)):
        raise ValueError(f"alarms per week must be a positive number, not {alarms_per_week!r}")
    if not (interval > 0 and math.isfinite(interval)):
        raise ValueError(f"observation interval must be a positive number of seconds, not {interval!r}")
    return min(0.5, alarms_per_week * interval / WEEK)


def typical_interval(times: Sequence[float] | np.ndarray | None, default: float = 300.0) -> float:
    """Median spacing of observation times (seconds); ``default`` when there are too few."""
    if times is None:
        return default
    t = np.sort(np.asarray(times, dtype=np.float64))
    d = np.diff(t)
    d = d[d > 0]
    return float(np.median(d)) if len(d) else default


def fisher(ps: Sequence[float]) -> float:
    """Fisher's combined tail probability of independent tail probabilities.

    -2·Σ ln p follows a chi-squared law with 2k degrees of freedom when every p is uniform;
    its survival at even degrees has a closed form, e^(-x/2)·Σ_{i<k} (x/2)^i / i!.
    """
    ps = [min(1.0, max(MIN_P, float(p))) for p in ps]
    if not ps:
        return 1.0
    half = -sum(math.log(p) for p in ps)
    term, total = 1.0, 1.0
    for i in range(1, len(ps)):
        term *= half / i
        total += term
    return min(1.0, math.exp(-half) * total)


def combine(ps: Sequence[float]) -> float:
    """One tail probability for several atoms' tail probabilities (assumed independent).

    The smaller of Fisher's method (several atoms each a bit unusual) and Bonferroni on the
    smallest (one atom very unusual), doubled for using both. Two ordinary highs (say p = 0.1
    each) combine to about 0.3, not to an alarm; one atom at 1e-5 stays alarming alone.
    """
    ps = [min(1.0, max(MIN_P, float(p))) for p in ps]
    if not ps:
        return 1.0
    return min(1.0, 2.0 * min(fisher(ps), len(ps) * min(ps)))
