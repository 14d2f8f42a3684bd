"""Chart series from a columnar cache, so a month of points costs milliseconds, not a table scan.

Parsing a month of 30-second observations (86,400 JSON rows) and matching their scores takes
over half a second in Python; a dashboard asks for it on every zoom. Each atom's
observations and newest scores are therefore kept as numpy columns, loaded once and then
extended from where they left off (observations by id, scores by their own id): the tables
only grow, so the increments are exact. Observations that arrive out of time order
(another host's clock, an import of old data) are merged by one re-sort.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from kiri.hub.store.prepared import Prepared
from kiri.hub.store.schema import observations, scores
from kiri.model.schema import AtomSchema

_GROW = 4096


@dataclass
class _Columns:
    fields: tuple[str, ...]
    n: int = 0
    last_obs_id: int = 0
    last_score_id: int = 0
    last_ts: float = -math.inf
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ts: np.ndarray = field(default_factory=lambda: np.empty(0))
    vals: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    score: np.ndarray = field(default_factory=lambda: np.empty(0))
    thr: np.ndarray = field(default_factory=lambda: np.empty(0))
    tail: np.ndarray = field(default_factory=lambda: np.empty(0))  # calibrated tail probability
    anom: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    wid: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    pos: dict[int, int] = field(default_factory=dict)

    def reserve(self, extra: int) -> None:
        need = self.n + extra
        if need <= len(self.ids):
            return
        size = max(need, 2 * len(self.ids), _GROW)

        def grow(a: np.ndarray, fill: Any) -> np.ndarray:
            out = np.full((size, *a.shape[1:]), fill, dtype=a.dtype)
            out[: self.n] = a[: self.n]
            return out

        if self.vals.shape[1] != len(self.fields):
            self.vals = np.empty((0, len(self.fields)))
        self.ids, self.ts, self.vals = grow(self.ids, 0), grow(self.ts, 0.0), grow(self.vals, np.nan)
        self.score, self.thr, self.tail = grow(self.score, np.nan), grow(self.thr, np.nan), grow(self.tail, np.nan)
        self.anom, self.wid = grow(self.anom, False), grow(self.wid, 0)


class SeriesCache:
    """Per-atom columns, shared by the reader's threads (one lock per atom)."""

    def __init__(self) -> None:
        self._cols: dict[str, _Columns] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def columns(self, c: sa.Connection, schema: AtomSchema) -> _Columns:
        """The atom's columns brought up to date with the connection's snapshot."""
        with self._guard:
            lock = self._locks.setdefault(schema.name, threading.Lock())
        with lock:
            names = tuple(f.name for f in schema.fields)
            cols = self._cols.get(schema.name)
            if cols is None or cols.fields != names:
                cols = self._cols[schema.name] = _Columns(names)
            self._extend(c, schema.name, cols)
            return cols

    @staticmethod
    def _extend(c: sa.Connection, atom: str, cols: _Columns) -> None:
        rows = _NEW_OBSERVATIONS.tuples(c, {"atom": atom, "after": cols.last_obs_id})
        if rows:
            ids, ts, datas = zip(*rows, strict=True)
            cols.reserve(len(rows))
            a, b = cols.n, cols.n + len(rows)
            cols.ids[a:b] = ids
            cols.ts[a:b] = ts
            names, nan = cols.fields, math.nan
            parsed = [[d.get(n, nan) for n in names] for d in map(orjson.loads, datas)]
            cols.vals[a:b] = np.array(parsed, dtype=np.float64).reshape(len(rows), len(names))
            cols.n = b
            cols.last_obs_id = int(cols.ids[b - 1])
            if cols.ts[a] < cols.last_ts or np.any(np.diff(cols.ts[a:b]) < 0):
                # late arrivals (another host's clock, an import of old data): re-sort by time
                order = np.argsort(cols.ts[:b], kind="stable")
                for name in ("ids", "ts", "vals", "score", "thr", "tail", "anom", "wid"):
                    arr = getattr(cols, name)
                    arr[:b] = arr[:b][order]
                cols.pos = dict(zip(cols.ids[:b].tolist(), range(b), strict=True))
            else:
                cols.pos.update(zip(ids, range(a, b), strict=True))
            cols.last_ts = float(cols.ts[b - 1])
        new = _NEW_SCORES.tuples(c, {"atom": atom, "after": cols.last_score_id})
        if not new:
            return
        sid, oid, wid, score, thr, tail, anom = (np.array(x) for x in zip(*new, strict=True))
        tail = tail.astype(float)  # None (uncalibrated weights) becomes nan
        cols.last_score_id = int(sid[-1])
        pos = cols.pos
        idx = np.fromiter((pos.get(o, -1) for o in oid.tolist()), dtype=np.int64, count=len(oid))
        # per observation, the newest weights' score wins (over older rows here and in the columns)
        order = np.lexsort((wid, idx))
        last = order[np.r_[idx[order][1:] != idx[order][:-1], True]]
        last = last[idx[last] >= 0]
        take = last[wid[last] >= cols.wid[idx[last]]]
        at = idx[take]
        cols.wid[at], cols.score[at], cols.thr[at], cols.tail[at] = wid[take], score[take], thr[take], tail[take]
        cols.anom[at] = anom[take].astype(bool)


_o, _s = observations.c, scores.c
_NEW_OBSERVATIONS = Prepared(sa.select(_o.id, _o.ts, _o.data)
                             .where(_o.atom == sa.bindparam("atom"), _o.id > sa.bindparam("after")).order_by(_o.id))
_NEW_SCORES = Prepared(sa.select(_s.id, _s.observation_id, _s.weights_id, _s.score, _s.threshold, _s.tail_p,
                                 _s.anomalous)
                       .where(_s.atom == sa.bindparam("atom"), _s.id > sa.bindparam("after")).order_by(_s.id))


def _column(a: np.ndarray) -> list[Any]:
    """A numpy column as JSON-ready values, missing ones as null."""
    if a.dtype.kind == "f":
        return [None if math.isnan(x) else x for x in a.tolist()]
    return a.tolist()


def downsample(cols: _Columns, since: float | None, until: float | None, points: int) -> dict[str, Any]:
    """The range's points, or ``points`` time buckets that keep each one's highest score.

    A bucket reports its highest score with that observation's id and time (so an anomaly
    never disappears when the view zooms out), whether any of its points was anomalous,
    and the mean of each field.
    """
    ts_all = cols.ts[: cols.n]
    a = 0 if since is None else int(np.searchsorted(ts_all, since, side="left"))
    b = cols.n if until is None else int(np.searchsorted(ts_all, until, side="right"))
    ts, ids, vals = ts_all[a:b], cols.ids[a:b], cols.vals[a:b]
    score, thr, tail, anom = cols.score[a:b], cols.thr[a:b], cols.tail[a:b], cols.anom[a:b]
    out: dict[str, Any] = {"count": int(b - a), "bucket": None}
    if b - a == 0:
        out.update(t=[], id=[], score=[], threshold=[], tail_p=[], anomalous=[], n=[],
                   values={n: [] for n in cols.fields})
        return out
    lo = since if since is not None else float(ts[0])
    hi = until if until is not None else float(ts[-1])
    if b - a > points and hi > lo:
        width = (hi - lo) / points
        bucket = np.minimum(((ts - lo) / width).astype(np.int64), points - 1)
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        # the index of each bucket's highest score: sort by (bucket, score) and take each bucket's last
        key = np.where(np.isnan(score), -np.inf, score)
        order = np.lexsort((key, bucket))
        ends = np.r_[starts[1:], len(ts)]
        keep = order[ends - 1]
        n = ends - starts
        with np.errstate(invalid="ignore"):
            sums = np.add.reduceat(np.nan_to_num(vals), starts, axis=0)
            cnt = np.add.reduceat(~np.isnan(vals), starts, axis=0)
            means = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
        out.update(bucket=width, t=_column(ts[keep]), id=_column(ids[keep]), score=_column(score[keep]),
                   threshold=_column(thr[keep]), tail_p=_column(tail[keep]),
                   anomalous=np.logical_or.reduceat(anom, starts).tolist(),
                   n=n.tolist(), values={name: _column(means[:, j]) for j, name in enumerate(cols.fields)})
    else:
        out.update(t=_column(ts), id=_column(ids), score=_column(score), threshold=_column(thr),
                   tail_p=_column(tail), anomalous=anom.tolist(), n=[1] * (b - a),
                   values={name: _column(vals[:, j]) for j, name in enumerate(cols.fields)})
    return out
