"""Chart series: raw readings zoomed in, rollup tiers zoomed out, so any range costs about
the same whatever the length of the history, and the hub keeps nothing per reading in memory.

A chart of ``points`` points over a range asks for buckets of ``(until - since) / points``
seconds. Narrower than the finest rollup tier (5 minutes) it reads the raw readings, if
they are all still there and not too many; otherwise the coarsest tier no wider than a
bucket (so a year at 1,000 points reads about 9,000 hourly rows per host), or a coarser
one when the hosts asked for together would need more than ``ROLLUP_MAX`` rows. Every bucket
reports the highest score with that reading's id (an anomaly never disappears when the
view zooms out), the lowest tail probability, whether any reading was anomalous, and each
field's mean, minimum and maximum, so the chart can draw the band and not only a mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa

from kiri.hub.store.schema import observations, rollups, streams
from kiri.hub.watch import rollups as R

RAW_MAX = 20_000  # raw readings one chart reads at most; past that it reads the 5-minute tier
# rollup rows one chart reads at most: all of many hosts' streams over a long range read a
# coarser tier (a 10-host year: daily rows, 365 points) rather than 87,600 hourly rows
ROLLUP_MAX = 20_000


def _column(a: np.ndarray) -> np.ndarray:
    """A numpy column, encoded by orjson (``OPT_SERIALIZE_NUMPY``) with NaN and ±inf as null:
    no Python object per value."""
    return np.ascontiguousarray(a)


def _streams(c: sa.Connection, atom: str, host: str | None) -> list[sa.Row]:
    st = streams.c
    q = sa.select(st.host, st.first_ts, st.last_ts).where(st.atom == atom).order_by(st.host)
    if host is not None:
        q = q.where(st.host == host)
    return list(c.execute(q).all())


def _raw_complete(c: sa.Connection, atom: str, hosts: Sequence[str], lo: float, hi: float) -> bool:
    """No 5-minute bucket in the range has had raw readings folded away by retention."""
    r = rollups.c
    return c.execute(sa.select(r.bucket).where(
        r.atom == atom, r.host.in_(list(hosts)), r.tier == R.BASE, r.bucket >= R.bucket_of(lo),
        r.bucket <= R.bucket_of(hi), r.folded.is_not(None)).limit(1)).first() is None


def _raw_count(c: sa.Connection, atom: str, host: str | None, lo: float, hi: float) -> int:
    o = observations.c
    q = sa.select(sa.func.count()).where(o.atom == atom, o.ts >= lo, o.ts <= hi)
    if host is not None:
        q = q.where(R.host_is(o.host, host))
    return int(c.execute(q).scalar() or 0)


def series(c: sa.Connection, atom: str, fields: Sequence[str], host: str | None, since: float | None,
           until: float | None, points: int) -> dict[str, Any]:
    """An atom's readings and scores over a time range, column by column, for a chart.

    ``host`` None: every host's readings together (a bucket's band spans them all).
    """
    found = _streams(c, atom, host)
    hosts = [r.host for r in found]
    out: dict[str, Any] = {"host": host, "count": 0, "bucket": None, "tier": "raw"}
    if not found:
        out.update(_empty(fields))
        return out
    lo = since if since is not None else min(r.first_ts for r in found)
    hi = until if until is not None else max(r.last_ts for r in found)
    width = (hi - lo) / points
    if width < R.BASE and _raw_complete(c, atom, hosts, lo, hi) and _raw_count(c, atom, host, lo, hi) <= RAW_MAX:
        out.update(_raw(c, atom, fields, host, lo, hi, points))
        return out
    tier = max(t for t in R.TIERS if t <= max(width, R.BASE))
    while tier != R.TIERS[-1] and len(hosts) * (hi - lo) / tier > ROLLUP_MAX:  # many hosts: coarser
        tier = R.TIERS[R.TIERS.index(tier) + 1]
    idx, stats = R.view_arrays(c, atom, hosts, fields, tier, R.bucket_of(lo, tier), R.bucket_of(hi, tier))
    out.update(_tiered(idx, stats, tier, lo, width, points, fields))
    return out


def _empty(fields: Sequence[str]) -> dict[str, Any]:
    return {"t": [], "id": [], "score": [], "threshold": [], "tail_p": [], "anomalous": [], "n": [],
            "values": {n: [] for n in fields}, "min": {n: [] for n in fields}, "max": {n: [] for n in fields}}


def _raw(c: sa.Connection, atom: str, fields: Sequence[str], host: str | None, lo: float, hi: float,
         points: int) -> dict[str, Any]:
    """Raw readings: each its own point, or ``points`` time buckets when there are more."""
    hosts = [host] if host is not None else [r.host for r in _streams(c, atom, None)]
    parts = [R.read_raw(c, atom, h, fields, lo, math.nextafter(hi, math.inf)) for h in hosts]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("ids", "ts", "vals", "score", "thr",
                                                                         "tail", "anom")}
    order = np.lexsort((cat["ids"], cat["ts"]))
    ids, ts, vals = cat["ids"][order], cat["ts"][order], cat["vals"][order].reshape(len(order), len(fields))
    score, thr, tail, anom = cat["score"][order], cat["thr"][order], cat["tail"][order], cat["anom"][order]
    out: dict[str, Any] = {"count": len(ids)}
    if len(ids) == 0:
        out.update(_empty(fields))
        return out
    if len(ids) <= points or hi <= lo:
        cols = {n: _column(vals[:, j]) for j, n in enumerate(fields)}
        out.update(t=_column(ts), id=_column(ids), score=_column(score), threshold=_column(thr),
                   tail_p=_column(tail), anomalous=anom.astype(bool).tolist(), n=[1] * len(ids),
                   values=cols, min=cols, max=cols)
        return out
    width = (hi - lo) / points
    group = np.minimum(((ts - lo) / width).astype(np.int64), points - 1)
    stats = R.from_readings(ids, ts, vals, score, thr, tail, anom)
    _, merged = R.reduce(stats, group)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    # a bucket's point sits at its highest score's reading (its first reading if none is scored)
    at = np.where(np.isnan(merged[:, R.MAX_TS]), ts[starts], merged[:, R.MAX_TS])
    out.update(_columns(merged, fields), bucket=width, t=_column(at),
               id=_column(np.where(np.isnan(merged[:, R.MAX_ID]), ids[starts], merged[:, R.MAX_ID]).astype(np.int64)))
    return out


def _tiered(idx: np.ndarray, stats: np.ndarray, tier: int, lo: float, width: float, points: int,
            fields: Sequence[str]) -> dict[str, Any]:
    """Rollup rows (bucket indexes, aggregates; of every host asked for) merged into ``points``
    time buckets."""
    if len(idx) == 0:
        return {"count": 0, "bucket": width, "tier": tier, **_empty(fields)}
    start = idx.astype(np.float64) * tier
    group = np.clip(np.floor((start - lo) / width), 0, points - 1).astype(np.int64) if width > 0 else idx * 0
    order = np.argsort(group, kind="stable")
    _, merged = R.reduce(stats[order], group[order])
    first = start[order][np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])]
    max_id = merged[:, R.MAX_ID]
    return {"count": int(merged[:, R.N].sum()), "bucket": width, "tier": tier, **_columns(merged, fields),
            "t": _column(np.maximum(first, lo)),
            "id": [None if math.isnan(x) else int(x) for x in max_id.tolist()]}


def _columns(m: np.ndarray, fields: Sequence[str]) -> dict[str, Any]:
    with np.errstate(invalid="ignore", divide="ignore"):
        means = m[:, R.HEAD + 1::4] / m[:, R.HEAD::4]
    return {"score": _column(m[:, R.SCORE_MAX]), "threshold": _column(m[:, R.MAX_THR]),
            "tail_p": _column(m[:, R.TAIL_MIN]), "anomalous": (m[:, R.ANOM] > 0).tolist(),
            "anomalies": m[:, R.ANOM].astype(np.int64).tolist(), "n": m[:, R.N].astype(np.int64).tolist(),
            "values": {n: _column(means[:, j]) for j, n in enumerate(fields)},
            "min": {n: _column(m[:, R.HEAD + 4 * j + 2]) for j, n in enumerate(fields)},
            "max": {n: _column(m[:, R.HEAD + 4 * j + 3]) for j, n in enumerate(fields)}}
