"""Rollups: per stream, 5-minute, hourly and daily aggregates that make a year's chart cheap.

A year of 30 s readings is a million rows; a chart of it needs a thousand points. Each
stream (atom, host) therefore keeps, per 5-minute bucket, hour and day, one row of
aggregates: how many readings, each field's count/sum/min/max, how many were scored, the
sum and the highest of their scores (with that reading's id, time and threshold), the
lowest tail probability and how many were anomalous. A reading's score is its newest
weights' score, as everywhere else.

How they stay exact (``tests/test_rollups.py`` checks them against brute force):

- Storing readings or scores marks their 5-minute buckets dirty (``rollup_dirty``) in the
  same transaction. The one exception is a reading's first score (a backfill's, a live
  scorer's), which only adds to its bucket: on SQLite it is merged into the stored rows
  right there (``add_first_scores``), so a backfill does not make ``refresh`` read the
  year's raw rows back.
- ``refresh`` recomputes a bounded batch of dirty buckets from the raw rows, then the hours
  and days above them from the 5-minute rows (sums, minima and maxima compose exactly).
- Retention deletes a 5-minute bucket's raw rows only whole, and in the same transaction
  marks the bucket's aggregate as folded (``folded``: empty for "all of it", so no second
  copy is stored). A late reading in a bucket whose raw rows are gone is then
  ``folded ⊕ raw`` (the folded part written out first): nothing folded is lost or counted
  twice.
- Reads never wait for ``refresh``: a chart computes the few dirty buckets in its range
  on the fly, so it is exact the moment a reading is stored.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from kiri.hub.store.prepared import ListStatement, Prepared, by_ids
from kiri.hub.store.schema import observations, rollup_dirty, rollups, scores

BASE = 300  # seconds in the finest tier; the raw rows fold into it
TIERS = (300, 3600, 86400)  # each divides the next: 12 buckets make an hour, 24 hours a day

# one aggregate row: HEAD columns, then 4 per field (count, sum, min, max)
N, SCORED, SCORE_SUM, SCORE_MAX, MAX_ID, MAX_TS, MAX_THR, TAIL_MIN, ANOM = range(9)
HEAD = 9
_ADD = (N, SCORED, SCORE_SUM, ANOM)

Key = tuple[str, str, int]  # (atom, host, 5-minute bucket index); host "" for readings without one


def width(n_fields: int) -> int:
    return HEAD + 4 * n_fields


def bucket_of(ts: float, tier: int = BASE) -> int:
    return math.floor(ts / tier)


def encode(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, dtype="<f8").tobytes()


def decode(blobs: Sequence[bytes], n_fields: int) -> np.ndarray:
    if not blobs:
        return np.empty((0, width(n_fields)))
    return np.frombuffer(b"".join(blobs), dtype="<f8").reshape(len(blobs), width(n_fields)).copy()


def from_readings(ids: np.ndarray, ts: np.ndarray, vals: np.ndarray, score: np.ndarray, thr: np.ndarray,
                  tail: np.ndarray, anom: np.ndarray) -> np.ndarray:
    """One aggregate row per reading (missing values and scores as NaN)."""
    m, f = vals.shape
    out = np.empty((m, width(f)))
    scored = ~np.isnan(score)
    out[:, N] = 1.0
    out[:, SCORED] = scored
    out[:, SCORE_SUM] = np.where(scored, score, 0.0)
    out[:, SCORE_MAX] = np.where(scored, score, -np.inf)
    out[:, MAX_ID] = np.where(scored, ids, np.nan)
    out[:, MAX_TS] = np.where(scored, ts, np.nan)
    out[:, MAX_THR] = np.where(scored, thr, np.nan)
    out[:, TAIL_MIN] = np.where(np.isnan(tail), np.inf, tail)
    out[:, ANOM] = np.where(scored, anom, 0.0)
    have = ~np.isnan(vals)
    out[:, HEAD::4] = have
    out[:, HEAD + 1::4] = np.where(have, vals, 0.0)
    out[:, HEAD + 2::4] = np.where(have, vals, np.inf)
    out[:, HEAD + 3::4] = np.where(have, vals, -np.inf)
    return out


def reduce(rows: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge rows that share a group (``groups`` sorted ascending): (group ids, merged rows).

    Counts and sums add, minima and maxima compose; the highest score keeps its reading's
    id, time and threshold, ties going to the lowest id, so any grouping gives the same.
    """
    if len(rows) == 0:
        return groups[:0], rows[:0]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    out = np.empty((len(starts), rows.shape[1]))
    f = (rows.shape[1] - HEAD) // 4
    add = list(_ADD) + [HEAD + 4 * j for j in range(f)] + [HEAD + 4 * j + 1 for j in range(f)]
    out[:, add] = np.add.reduceat(rows[:, add], starts, axis=0)
    lows = [TAIL_MIN] + [HEAD + 4 * j + 2 for j in range(f)]
    out[:, lows] = np.minimum.reduceat(rows[:, lows], starts, axis=0)
    highs = [HEAD + 4 * j + 3 for j in range(f)]
    if highs:
        out[:, highs] = np.maximum.reduceat(rows[:, highs], starts, axis=0)
    order = np.lexsort((rows[:, MAX_ID], -rows[:, SCORE_MAX], groups))  # groups keep their places
    best = order[starts]
    out[:, [SCORE_MAX, MAX_ID, MAX_TS, MAX_THR]] = rows[best][:, [SCORE_MAX, MAX_ID, MAX_TS, MAX_THR]]
    return groups[starts], out


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return reduce(np.stack([a, b]), np.zeros(2, dtype=np.int64))[1][0]


# --- marking -------------------------------------------------------------------------------

def mark(c: sa.Connection, keys: Iterable[Key]) -> None:
    """Mark 5-minute buckets dirty: their readings or scores changed in this transaction.

    On SQLite through the driver's cursor: an import or a backfill marks hundreds of buckets
    per step, and SQLAlchemy's per-row parameter handling cost more than SQLite's inserts.
    On PostgreSQL as one INSERT … ON CONFLICT DO NOTHING."""
    rows = set(keys)
    if not rows:
        return
    if c.dialect.name == "sqlite":
        cur = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.executemany(f"INSERT OR IGNORE INTO {rollup_dirty.name} (atom, host, bucket) VALUES (?, ?, ?)", rows)
        finally:
            cur.close()
        return
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    c.execute(pg_insert(rollup_dirty).on_conflict_do_nothing(),
              [{"atom": a, "host": h, "bucket": b} for a, h, b in rows])


def _bucket_sql(postgresql: bool) -> sa.ColumnElement[int]:
    """``bucket_of(observations.ts)`` in SQL, the same IEEE division numpy does. SQLite: the
    quotient truncated, less one for a fraction below zero (floor() is a build option there);
    PostgreSQL: floor(), as its casts round."""
    if postgresql:
        return sa.literal_column(f"CAST(floor(observations.ts / CAST({BASE} AS DOUBLE PRECISION)) AS BIGINT)")
    q = f"observations.ts / {BASE}.0"
    return sa.literal_column(f"(CAST({q} AS INTEGER) - (observations.ts < 0 AND CAST({q} AS INTEGER) != {q}))")


def _marks_of_readings(postgresql: bool) -> ListStatement:
    def build(member: Callable[[sa.ColumnElement[Any]], sa.ColumnElement[bool]]) -> sa.Executable:
        o = observations.c
        keys = sa.select(o.atom, sa.func.coalesce(o.host, ""), _bucket_sql(postgresql)).where(member(o.id)).distinct()
        if postgresql:
            from sqlalchemy.dialects.postgresql import insert as pg_insert
            return pg_insert(rollup_dirty).from_select(["atom", "host", "bucket"], keys).on_conflict_do_nothing()
        return sa.insert(rollup_dirty).prefix_with("OR IGNORE").from_select(["atom", "host", "bucket"], keys)
    return ListStatement(build)


_MARK_READINGS = {"postgresql": _marks_of_readings(True), "sqlite": _marks_of_readings(False)}


def mark_readings(c: sa.Connection, ids: Sequence[int]) -> None:
    """Mark dirty the 5-minute buckets of the readings ``ids`` (their scores changed): found
    and marked by the database in one statement, as a backfill marks thousands a call."""
    if ids:
        _MARK_READINGS[c.dialect.name].run(c, ids)


def host_groups(hosts: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Each host's positions in ``hosts`` (host "" for None), decided in C when all are one."""
    if hosts.count(hosts[0]) == len(hosts):
        return {hosts[0] or "": np.arange(len(hosts))}
    places: dict[str, list[int]] = {}
    for k, h in enumerate(hosts):
        places.setdefault(h or "", []).append(k)
    return {h: np.asarray(ks) for h, ks in places.items()}


def stream_keys(atom: str, host: str, ts: np.ndarray) -> set[Key]:
    """The 5-minute buckets (``Key``) of one stream's readings at times ``ts``."""
    return {(atom, host, int(b)) for b in np.unique(np.floor(ts / BASE))}


# --- computing -----------------------------------------------------------------------------

@dataclass
class Raw:
    """A stream's raw readings in time order, with each one's newest score."""

    ids: np.ndarray
    ts: np.ndarray
    vals: np.ndarray
    score: np.ndarray
    thr: np.ndarray
    tail: np.ndarray
    anom: np.ndarray


def host_is(col: sa.ColumnElement[str | None], host: str) -> sa.ColumnElement[bool]:
    """A stream's host as stored: "" (the streams' and rollups' key) is a reading without one (NULL)."""
    return col.is_(None) if host == "" else col == host


_o = observations.c


def stream_is(null: bool) -> sa.ColumnElement[bool]:
    """A stream's readings in a prepared statement, bound by name: ``atom``, and ``host``
    unless ``null`` (the stream of readings without one). One statement per kind, as SQL
    cannot say "= :host" of NULL."""
    return sa.and_(_o.atom == sa.bindparam("atom"), _o.host.is_(None) if null else _o.host == sa.bindparam("host"))


_RAW = {null: Prepared(sa.select(_o.id, _o.ts, _o.data).where(
    stream_is(null), _o.ts >= sa.bindparam("lo"), _o.ts < sa.bindparam("hi")).order_by(_o.ts, _o.id))
    for null in (True, False)}


def read_raw(c: sa.Connection, atom: str, host: str, fields: Sequence[str], lo: float, hi: float) -> Raw:
    """The stream's readings with ``lo <= ts < hi`` (time, then id order) and their newest scores."""
    rows = _RAW[host == ""].tuples(c, {"atom": atom, "host": host, "lo": lo, "hi": hi})
    m, nan = len(rows), math.nan
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=m)
    ts = np.fromiter((r[1] for r in rows), dtype=np.float64, count=m)
    vals = _values([r[2] for r in rows], fields)
    score, thr, tail = np.full(m, nan), np.full(m, nan), np.full(m, nan)
    anom = np.zeros(m)
    # a stream's readings over a time range are mostly a run of ids: one range read then
    found = by_ids(c, _SCORES_IN_RANGE, list(_SCORE_COLS), _s.observation_id, ids.tolist()) if m else []
    if found:
        # each reading's newest weights' score, in numpy: sort by (reading, weights), keep
        # the last row of each reading, place it where that reading sits in ``ids``
        cols = list(zip(*found, strict=True))
        oid, wid = np.array(cols[0], dtype=np.int64), np.array(cols[1], dtype=np.int64)
        sc, th, tp, an = (np.array(col, dtype=np.float64) for col in cols[2:])  # a NULL tail_p: NaN
        order = np.lexsort((wid, oid))
        last = order[np.r_[oid[order][1:] != oid[order][:-1], True]]
        by_id = np.argsort(ids, kind="stable")
        at = np.searchsorted(ids[by_id], oid[last])
        hit = (at < m) & (ids[by_id][np.minimum(at, m - 1)] == oid[last])
        k, last = by_id[at[hit]], last[hit]
        score[k], thr[k], tail[k], anom[k] = sc[last], th[last], tp[last], an[last] != 0
    return Raw(ids, ts, vals, score, thr, tail, anom)


def _values(data: list[str], fields: Sequence[str]) -> np.ndarray:
    """[m, F] floats of stored JSON objects (NaN where a field is missing). One parse for the
    whole list, not one per row: half the cost, and this runs for every rolled-up reading."""
    m, nan = len(data), math.nan
    parsed = orjson.loads("[" + ",".join(data) + "]") if m else []
    if not fields:
        return np.zeros((m, 0))
    get = itemgetter(*fields)
    try:
        rows = [get(d) for d in parsed] if len(fields) > 1 else [(get(d),) for d in parsed]
    except KeyError:  # a reading stored without some field
        rows = [[d.get(n, nan) for n in fields] for d in parsed]
    return np.array(rows, dtype=np.float64).reshape(m, len(fields))


_s = scores.c
_SCORE_COLS = (_s.observation_id, _s.weights_id, _s.score, _s.threshold, _s.tail_p, _s.anomalous)
_SCORES_IN_RANGE = Prepared(sa.select(*_SCORE_COLS).where(_s.observation_id >= sa.bindparam("lo"),
                                                          _s.observation_id <= sa.bindparam("hi")))


def compute_base(c: sa.Connection, atom: str, host: str, fields: Sequence[str], buckets: Sequence[int]
                 ) -> dict[int, np.ndarray | None]:
    """Fresh 5-minute aggregates of the given buckets: folded part ⊕ the raw rows now there
    (None: the bucket is empty)."""
    out: dict[int, np.ndarray | None] = {}
    wanted = sorted(set(buckets))
    folded = _folded(c, atom, host, wanted, len(fields))
    for run in _runs(wanted):
        lo, hi = run[0] * BASE, (run[-1] + 1) * BASE
        raw = read_raw(c, atom, host, fields, lo - 1.0, hi + 1.0)  # a margin: bucket_of decides
        b = np.floor(raw.ts / BASE).astype(np.int64)
        keep = (b >= run[0]) & (b <= run[-1])
        per = from_readings(raw.ids[keep], raw.ts[keep], raw.vals[keep], raw.score[keep], raw.thr[keep],
                            raw.tail[keep], raw.anom[keep])
        bk = b[keep]
        order = np.argsort(bk, kind="stable")
        idx_of, merged = reduce(per[order], bk[order])
        got = dict(zip(idx_of.tolist(), merged, strict=True))
        for idx in run:
            row, fold = got.get(idx), folded.get(idx)
            out[idx] = row if fold is None else (fold if row is None else merge(fold, row))
    return out


def _runs(sorted_idx: list[int], gap: int = 12) -> list[list[int]]:
    """Consecutive bucket indexes in runs (gaps under ``gap`` joined), one raw query each."""
    runs: list[list[int]] = []
    for i in sorted_idx:
        if runs and i - runs[-1][-1] <= gap:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


ALL_FOLDED = b""  # ``folded`` when the whole aggregate is folded (no raw rows left): no second copy


def _folded(c: sa.Connection, atom: str, host: str, buckets: list[int], n_fields: int) -> dict[int, np.ndarray]:
    r = rollups.c
    out: dict[int, np.ndarray] = {}
    for chunk in range(0, len(buckets), 900):
        for idx, blob, stats in c.execute(sa.select(r.bucket, r.folded, r.stats).where(
                r.atom == atom, r.host == host, r.tier == BASE, r.bucket.in_(buckets[chunk: chunk + 900]),
                r.folded.is_not(None))):
            out[idx] = decode([stats if blob == ALL_FOLDED else blob], n_fields)[0]
    return out


def _materialize_folds(c: sa.Connection, atom: str, host: str, buckets: list[int]) -> None:
    """Before their aggregates change, buckets marked all-folded keep their folded part explicitly."""
    r = rollups.c
    for chunk in range(0, len(buckets), 900):
        c.execute(rollups.update().where(r.atom == atom, r.host == host, r.tier == BASE,
                                         r.bucket.in_(buckets[chunk: chunk + 900]), r.folded == ALL_FOLDED)
                  .values(folded=r.stats))


def stored(c: sa.Connection, atom: str, hosts: Sequence[str] | None, tier: int, lo: int, hi: int,
           n_fields: int) -> dict[tuple[str, int], np.ndarray]:
    """Stored aggregates of ``tier`` with ``lo <= bucket <= hi``, keyed by (host, bucket)."""
    r = rollups.c
    q = sa.select(r.host, r.bucket, r.stats).where(r.atom == atom, r.tier == tier, r.bucket >= lo, r.bucket <= hi)
    if hosts is not None:
        q = q.where(r.host.in_(list(hosts)))
    rows = c.execute(q).all()
    stats = decode([x[2] for x in rows], n_fields)
    return {(x[0], x[1]): stats[i] for i, x in enumerate(rows)}


def view_arrays(c: sa.Connection, atom: str, hosts: Sequence[str] | None, fields: Sequence[str], tier: int,
                lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``view`` as (bucket indexes, aggregate rows), every host's rows together: straight
    from the table when no bucket in range is dirty (the usual case), else through ``view``."""
    d, r = rollup_dirty.c, rollups.c
    span = tier // BASE
    q = sa.select(d.bucket).where(d.atom == atom, d.bucket >= lo * span, d.bucket < (hi + 1) * span)
    if hosts is not None:
        q = q.where(d.host.in_(list(hosts)))
    if c.execute(q.limit(1)).first() is not None:
        got = view(c, atom, hosts, fields, tier, lo, hi)
        keys = list(got)
        return (np.array([k[1] for k in keys], dtype=np.int64),
                np.stack([got[k] for k in keys]) if keys else np.empty((0, width(len(fields)))))
    q2 = sa.select(r.bucket, r.stats).where(r.atom == atom, r.tier == tier, r.bucket >= lo, r.bucket <= hi)
    if hosts is not None:
        q2 = q2.where(r.host.in_(list(hosts)))
    rows = c.execute(q2).all()
    return (np.fromiter((x[0] for x in rows), dtype=np.int64, count=len(rows)),
            decode([x[1] for x in rows], len(fields)))


def _compose(children: dict[tuple[str, int], np.ndarray], tier: int) -> dict[tuple[str, int], np.ndarray]:
    """The next tier's rows from ``tier``'s rows (any subset of whole parents)."""
    if not children:
        return {}
    step = TIERS[TIERS.index(tier) + 1] // tier
    keys = sorted(children, key=lambda k: (k[0], k[1] // step))
    groups: dict[tuple[str, int], int] = {}
    gid = np.array([groups.setdefault((h, b // step), len(groups)) for h, b in keys], dtype=np.int64)
    _, rows = reduce(np.stack([children[k] for k in keys]), gid)
    return dict(zip(groups, rows, strict=True))


def view(c: sa.Connection, atom: str, hosts: Sequence[str] | None, fields: Sequence[str], tier: int,
         lo: int, hi: int) -> dict[tuple[str, int], np.ndarray]:
    """``tier``'s aggregates for buckets ``lo..hi``, exact now: stored rows, with the buckets
    that dirty 5-minute buckets touch computed afresh."""
    f = len(fields)
    out = stored(c, atom, hosts, tier, lo, hi, f)
    span = tier // BASE
    d = rollup_dirty.c
    q = sa.select(d.host, d.bucket).where(d.atom == atom, d.bucket >= lo * span, d.bucket < (hi + 1) * span)
    if hosts is not None:
        q = q.where(d.host.in_(list(hosts)))
    dirty: dict[str, list[int]] = {}
    for h, b in c.execute(q):
        dirty.setdefault(h, []).append(b)
    for host, buckets in dirty.items():
        fresh = compute_base(c, atom, host, fields, buckets)
        if tier == BASE:
            for b, row in fresh.items():
                if row is None:
                    out.pop((host, b), None)
                else:
                    out[(host, b)] = row
            continue
        # rebuild each touched parent from its 5-minute rows, fresh ones in place of stale
        tops = sorted({b // span for b in buckets})
        base = stored(c, atom, [host], BASE, tops[0] * span, (tops[-1] + 1) * span - 1, f)
        base = {k: v for k, v in base.items() if k[1] // span in set(tops)}
        for b, row in fresh.items():
            if row is None:
                base.pop((host, b), None)
            else:
                base[(host, b)] = row
        level = BASE
        while level < tier:
            base = _compose(base, level)
            level = TIERS[TIERS.index(level) + 1]
        for top in tops:
            out.pop((host, top), None)
        out.update(base)
    return out


# --- keeping them --------------------------------------------------------------------------

_UPSERT_SQLITE = (f"INSERT INTO {rollups.name} (atom, host, tier, bucket, n, stats) VALUES (?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT (atom, host, tier, bucket) DO UPDATE SET n = excluded.n, stats = excluded.stats")


def _upsert(c: sa.Connection, rows: list[dict[str, object]]) -> None:
    """Insert or replace aggregate rows. On SQLite through the driver's cursor: a backfill
    saves hundreds of rows per batch, and SQLAlchemy's per-row parameter handling cost five
    times SQLite's own work."""
    if not rows:
        return
    if c.dialect.name == "sqlite":
        cur = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.executemany(_UPSERT_SQLITE, [(r["atom"], r["host"], r["tier"], r["bucket"], r["n"], r["stats"])
                                             for r in rows])
        finally:
            cur.close()
        return
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    ins = pg_insert(rollups)
    c.execute(ins.on_conflict_do_update(index_elements=["atom", "host", "tier", "bucket"],
                                        set_={"n": ins.excluded.n, "stats": ins.excluded.stats}), rows)


def _delete(c: sa.Connection, atom: str, host: str, tier: int, buckets: Iterable[int]) -> None:
    r = rollups.c
    gone = list(buckets)
    for chunk in range(0, len(gone), 900):
        c.execute(rollups.delete().where(r.atom == atom, r.host == host, r.tier == tier,
                                         r.bucket.in_(gone[chunk: chunk + 900])))


def _save(c: sa.Connection, atom: str, host: str, tier: int, rows: dict[int, np.ndarray | None]) -> None:
    _upsert(c, [{"atom": atom, "host": host, "tier": tier, "bucket": b, "n": int(v[N]), "stats": encode(v)}
                for b, v in rows.items() if v is not None])
    _delete(c, atom, host, tier, [b for b, v in rows.items() if v is None])


def refresh(c: sa.Connection, fields_of: dict[str, Sequence[str]], limit: int = 500) -> int:
    """Recompute up to ``limit`` dirty 5-minute buckets and the hours and days above them;
    returns how many (``limit``: there may be more)."""
    d = rollup_dirty.c
    keys = c.execute(sa.select(d.atom, d.host, d.bucket).order_by(d.atom, d.host, d.bucket).limit(limit)).all()
    by_stream: dict[tuple[str, str], list[int]] = {}
    for a, h, b in keys:
        by_stream.setdefault((a, h), []).append(b)
    for (atom, host), buckets in by_stream.items():
        # the marks go first, then the buckets are read: a reading stored meanwhile (by another
        # hub sharing the database) either is read here or marks its bucket again afterwards
        # (its mark waits for this delete), so no change is ever left unmarked and unread
        mine: list[int] = []
        for chunk in range(0, len(buckets), 900):
            mine += c.execute(rollup_dirty.delete().where(d.atom == atom, d.host == host,
                                                          d.bucket.in_(buckets[chunk: chunk + 900]))
                              .returning(d.bucket)).scalars().all()
        fields = fields_of.get(atom)
        if fields is not None and mine:
            _refresh_stream(c, atom, host, list(fields), sorted(mine))
    return len(keys)


def _refresh_stream(c: sa.Connection, atom: str, host: str, fields: list[str], buckets: list[int]) -> None:
    f = len(fields)
    _materialize_folds(c, atom, host, buckets)
    _save(c, atom, host, BASE, compute_base(c, atom, host, fields, buckets))
    touched = set(buckets)
    for level, up in itertools.pairwise(TIERS):
        span = up // level
        tops = sorted({b // span for b in touched})
        children: dict[tuple[str, int], np.ndarray] = {}
        for run in _runs(tops, gap=1):
            children.update(stored(c, atom, [host], level, run[0] * span, (run[-1] + 1) * span - 1, f))
        composed = {b: row for (_h, b), row in _compose(children, level).items()}
        _save(c, atom, host, up, {t: composed.get(t) for t in tops})
        touched = set(tops)


# --- first scores, folded in as they are recorded -------------------------------------------

def _partial(ids: np.ndarray, ts: np.ndarray, score: np.ndarray, thr: np.ndarray, tail: np.ndarray,
             anom: np.ndarray, n_fields: int) -> np.ndarray:
    """One aggregate row per newly scored reading that adds its score and nothing else: the
    reading itself (its count and values) is already in the stored aggregate."""
    out = from_readings(ids, ts, np.full((len(ids), n_fields), np.nan), score, thr, tail, anom)
    out[:, N] = 0.0
    return out


def _in_runs(c: sa.Connection, stmt: Prepared, wanted: np.ndarray, **params: Any) -> list[tuple[Any, ...]]:
    """``stmt``'s rows over the runs of the sorted bucket indexes ``wanted`` (one range read
    per run, so scattered buckets do not read a year of rows between them), first column
    among ``wanted``."""
    keep = set(wanted.tolist())
    out: list[tuple[Any, ...]] = []
    for run in _runs(sorted(keep)):
        out += [r for r in stmt.tuples(c, {**params, "lo": run[0], "hi": run[-1]}) if r[0] in keep]
    return out


def _stored_rows(c: sa.Connection, atom: str, host: str, tier: int, wanted: np.ndarray
                 ) -> dict[int, tuple[bytes, bytes | None]]:
    """(stats, folded) of the stream's stored ``tier`` rows among ``wanted`` bucket indexes."""
    return {b: (s, f) for b, s, f in _in_runs(c, _STORED_RANGE, wanted, atom=atom, host=host, tier=tier)}


_r = rollups.c
_STORED_RANGE = Prepared(sa.select(_r.bucket, _r.stats, _r.folded).where(
    _r.atom == sa.bindparam("atom"), _r.host == sa.bindparam("host"), _r.tier == sa.bindparam("tier"),
    _r.bucket >= sa.bindparam("lo"), _r.bucket <= sa.bindparam("hi")))
_DIRTY_RANGE = Prepared(sa.select(rollup_dirty.c.bucket).where(
    rollup_dirty.c.atom == sa.bindparam("atom"), rollup_dirty.c.host == sa.bindparam("host"),
    rollup_dirty.c.bucket >= sa.bindparam("lo"), rollup_dirty.c.bucket <= sa.bindparam("hi")))


def add_first_scores(c: sa.Connection, atom: str, hosts: Sequence[str | None], ids: Sequence[int],
                     ts: Sequence[float], score: Sequence[float], thr: float, tail: Sequence[float | None],
                     anom: Sequence[bool]) -> None:
    """Readings' first scores (none of them had a score from any weights before) into the
    aggregates of their 5-minute buckets, hours and days, in the transaction that stores them.

    A backfill scores a year of readings whose aggregates the import already computed; marking
    their buckets dirty made ``refresh`` read every raw row back and parse its values again,
    for a change that only adds scores. A first score only adds (counts and sums grow, the
    highest score and lowest tail probability compose), so it merges into the stored rows
    exactly. Buckets that cannot take it are marked dirty as before: one that is dirty
    already (``refresh`` rewrites its rows anyway), one without stored rows, one whose
    aggregate is all folded (its ``folded`` part must stay what it was). On PostgreSQL
    several hubs may write the same rows at once, so every bucket is marked there.
    """
    if not ids:
        return
    t = np.asarray(ts, dtype=np.float64)
    b = np.floor(t / BASE).astype(np.int64)
    keys = ["" if h is None else h for h in hosts]
    if c.dialect.name != "sqlite":
        mark(c, {(atom, h, int(k)) for h, k in zip(keys, b.tolist(), strict=True)})
        return
    oid = np.asarray(ids, dtype=np.int64)
    sc = np.asarray(score, dtype=np.float64)
    tp = np.array([math.nan if x is None else x for x in tail], dtype=np.float64)
    an = np.asarray(anom, dtype=np.float64)
    th = np.full(len(oid), float(thr))
    unmarked: set[Key] = set()
    for host, where in host_groups(keys).items():
        hb = b[where]
        buckets = np.unique(hb)
        base = _stored_rows(c, atom, host, BASE, buckets)
        dirty = {d for (d,) in _in_runs(c, _DIRTY_RANGE, buckets, atom=atom, host=host)}
        parents = [_stored_rows(c, atom, host, tier, np.unique(buckets // (tier // BASE))) for tier in TIERS[1:]]
        widths = {len(s) for s, _f in base.values()} | {len(s) for p in parents for s, _f in p.values()}
        if len(widths) != 1:  # no stored rows, or layouts that disagree: leave it to refresh
            unmarked |= {(atom, host, int(k)) for k in buckets.tolist()}
            continue
        n_fields = (widths.pop() // 8 - HEAD) // 4
        ok = np.array([k not in dirty and k in base and base[k][1] != ALL_FOLDED
                       and all(k // (tier // BASE) in p for tier, p in zip(TIERS[1:], parents, strict=True))
                       for k in buckets.tolist()], dtype=bool)
        unmarked |= {(atom, host, int(k)) for k in buckets[~ok].tolist()}
        take = where[np.isin(hb, buckets[ok])]
        if not len(take):
            continue
        part = _partial(oid[take], t[take], sc[take], th[take], tp[take], an[take], n_fields)
        for tier, stored_rows in zip(TIERS, [base, *parents], strict=True):
            group = b[take] // (tier // BASE)
            have = np.unique(group)
            rows = np.concatenate([decode([stored_rows[g][0] for g in have.tolist()], n_fields), part])
            groups = np.concatenate([have, group])
            order = np.argsort(groups, kind="stable")
            idx, merged = reduce(rows[order], groups[order])
            _save(c, atom, host, tier, dict(zip(idx.tolist(), merged, strict=True)))
    mark(c, unmarked)


def raw_ids(c: sa.Connection, atom: str, host: str, buckets: Sequence[int]) -> dict[int, list[int]]:
    """The ids of the stream's raw readings in each of the given 5-minute buckets."""
    o = observations.c
    out: dict[int, list[int]] = {}
    wanted = set(buckets)
    for run in _runs(sorted(wanted)):
        lo, hi = run[0] * BASE - 1.0, (run[-1] + 1) * BASE + 1.0  # a margin: bucket_of decides
        for oid, ts in c.execute(sa.select(o.id, o.ts).where(o.atom == atom, host_is(o.host, host),
                                                             o.ts >= lo, o.ts < hi)):
            b = bucket_of(ts)
            if b in wanted:
                out.setdefault(b, []).append(oid)
    return out


_DROP_SCORES = ListStatement(lambda member: scores.delete().where(member(scores.c.observation_id)))
_DROP_READINGS = ListStatement(lambda member: observations.delete().where(member(observations.c.id)))
_MARK_FOLDED = ListStatement(lambda member: rollups.update().where(
    rollups.c.atom == sa.bindparam("atom"), rollups.c.host == sa.bindparam("host"), rollups.c.tier == BASE,
    member(rollups.c.bucket)).values(folded=ALL_FOLDED))


def fold(c: sa.Connection, atom: str, host: str, buckets: Sequence[int]) -> int:
    """Delete the raw readings (and their scores) of whole, clean 5-minute buckets, keeping
    each bucket's aggregate as its folded part; returns how many readings went.

    The caller makes sure the buckets are not dirty: their stored aggregate is then exactly
    what the deleted rows held, plus whatever was folded before.
    """
    ids = [i for group in raw_ids(c, atom, host, buckets).values() for i in group]
    if ids:
        _DROP_SCORES.run(c, ids)
        _DROP_READINGS.run(c, ids)
    if buckets:
        _MARK_FOLDED.run(c, list(buckets), atom=atom, host=host)
    return len(ids)
