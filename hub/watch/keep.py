"""What the watch loop keeps as it ages: raw readings, decisions, weights versions.

Each function deletes one bounded batch in the caller's transaction and says how much it
deleted, so a hub killed between batches has lost nothing and repeats nothing: every
batch is whole or absent.

- **Raw readings** older than ``Retention.raw`` (counted back from each stream's newest
  reading, so an imported year keeps its last month raw) are folded into the rollups and
  deleted, whole 5-minute buckets at a time (``rollups.fold``). A bucket stays raw while it
  is dirty (its rollup is being recomputed), while any reading in it is referenced by a
  decision that is kept, while a reading in it or in the day after it has not been scored
  yet (and arrived within the window: scoring reads the readings before it as context),
  and for as long as a training task on its atom is running.
- **Decisions** that said ``ok``, older than the raw window, with no label and no alert.
  Labelled decisions, alerts, suppressions and retrains stay forever.
- **Weights versions**: kept are each atom's active version and its ancestors, the newest
  ``Retention.weights`` versions, and any version whose scores are still stored (their
  readings are still raw); the rest go.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import sqlalchemy as sa

from kiri.hub.core.retention import Retention
from kiri.hub.store.prepared import ListStatement, Prepared
from kiri.hub.store.schema import alerts, decisions, labels, observations, rollup_dirty, scores, streams, tasks, weights
from kiri.hub.watch import rollups as R
from kiri.hub.watch.handed import HandedOut

log = logging.getLogger("kiri.hub")

CONTEXT_MARGIN = 86400.0  # seconds after a bucket whose unscored readings may still read it as context
MAX_LOOKS = 8  # batches of raw readings one pass may look through for a bucket it can fold


# a pass's own reads, compiled once and run on the driver's cursor: each pass holds the loop,
# and building these with SQLAlchemy every time was a fifth of a small pass
_o, _s = observations.c, scores.c
_STREAMS = Prepared(sa.select(streams.c.atom, streams.c.host, streams.c.last_ts, streams.c.n)
                    .order_by(streams.c.atom, streams.c.host))
_TRAINING = Prepared(sa.select(tasks.c.atom).where(tasks.c.status == "leased", tasks.c.kind == "train",
                                                   tasks.c.atom.is_not(None)))


_SPAN = (_o.ts >= sa.bindparam("lo"), _o.ts < sa.bindparam("hi"))
_IN_SPAN = {null: sa.select(_o.id, _o.ts, _o.created_at).where(R.stream_is(null), *_SPAN) for null in (True, False)}
_OLDEST = {null: Prepared(q.order_by(_o.ts, _o.id).limit(sa.bindparam("limit", type_=sa.Integer)))
           for null, q in _IN_SPAN.items()}
_WHOLE = {null: Prepared(q) for null, q in _IN_SPAN.items()}
_UNSCORED = {null: Prepared(sa.select(_o.ts).where(
    R.stream_is(null), *_SPAN, _o.created_at > sa.bindparam("since"), ~sa.exists().where(_s.observation_id == _o.id)))
    for null in (True, False)}

_REFERRED = ListStatement(lambda member: sa.select(decisions.c.observation_id).where(
    member(decisions.c.observation_id)))
_DIRTY = ListStatement(lambda member: sa.select(rollup_dirty.c.bucket).where(
    rollup_dirty.c.atom == sa.bindparam("atom"), rollup_dirty.c.host == sa.bindparam("host"),
    member(rollup_dirty.c.bucket)))


@dataclass
class RawPruner:
    """Walks each stream's old raw readings a batch at a time, remembering where it got to
    (a bucket kept raw for now is stepped over, not looked at again until the next sweep)."""

    cursor: dict[tuple[str, str], float] = field(default_factory=dict)
    turn: int = 0
    # per stream: (its reading count then, from, to): no reading in [from, to) was waiting
    # for its score. Still true while the count stands (only a new reading can be unscored:
    # a score is never taken from a kept reading), so a pass reads only past ``to`` instead
    # of the whole day after its buckets again (12% of a pass's time).
    scored: dict[tuple[str, str], tuple[int, float, float]] = field(default_factory=dict)
    # the readings handed to scorers, which a fold may delete: forgotten when one does
    handed: HandedOut | None = None

    def prune(self, c: sa.Connection, policy: Retention, now: float, batch: int | None = None) -> int:
        """Fold and delete one batch of old raw readings (``batch``, default the policy's
        ``raw_batch``, looked at per transaction); returns how many (0: nothing to do)."""
        if policy.raw is None:
            return 0
        found = _STREAMS.tuples(c, {})
        busy = {a for (a,) in _TRAINING.tuples(c, {})}
        for k in range(len(found)):
            atom, host, last_ts, count = found[(self.turn + k) % len(found)]
            if atom in busy:  # a running training window stays whole
                continue
            n = self._stream(c, policy, now, atom, host, last_ts, count, batch or policy.raw_batch)
            if n:
                if self.handed is not None:
                    self.handed.forget()
                self.turn = (self.turn + k) % len(found)
                return n
        self.turn = 0
        return 0

    def _stream(self, c: sa.Connection, policy: Retention, now: float, atom: str, host: str, last_ts: float,
                count: int, batch: int) -> int:
        assert policy.raw is not None
        edge = R.bucket_of(last_ts - policy.raw) * R.BASE  # buckets wholly before the window's start
        start = self.cursor.get((atom, host), float("-inf"))
        stream = {"atom": atom, "host": host}
        for _ in range(MAX_LOOKS):
            if start >= edge:
                break
            rows = _OLDEST[host == ""].tuples(c, {**stream, "lo": start, "hi": edge, "limit": batch})
            if not rows:
                break
            by_bucket: dict[int, list[tuple[int, float, float]]] = {}
            for r in rows:
                by_bucket.setdefault(R.bucket_of(r[1]), []).append(r)
            last = max(by_bucket)
            if len(rows) == batch and len(by_bucket) > 1:
                del by_bucket[last]  # may be cut short by the limit: next batch
                self.cursor[(atom, host)] = start = last * R.BASE
            else:
                if len(rows) == batch:  # one bucket fuller than a batch: read it whole
                    lo, hi = last * R.BASE - 1.0, (last + 1) * R.BASE + 1.0
                    by_bucket[last] = [r for r in _WHOLE[host == ""].tuples(c, {**stream, "lo": lo, "hi": hi})
                                       if R.bucket_of(r[1]) == last]
                self.cursor[(atom, host)] = start = (last + 1) * R.BASE
            ok = self._foldable(c, policy, now, atom, host, count, by_bucket)
            if ok:
                return R.fold(c, atom, host, ok)
        else:
            return 0  # looked at enough for one transaction; the cursor goes on from here next time
        self.cursor.pop((atom, host), None)  # swept to the window: start over next time
        return 0

    def _foldable(self, c: sa.Connection, policy: Retention, now: float, atom: str, host: str, count: int,
                  by_bucket: dict[int, list[tuple[int, float, float]]]) -> list[int]:
        assert policy.raw is not None
        ids = [r[0] for rows in by_bucket.values() for r in rows]
        keep = {i for (i,) in _REFERRED.tuples(c, ids)}  # reading ids that hold their bucket raw
        # readings still to be scored need their predecessors as context: a bucket stays raw
        # while a reading in it, or within CONTEXT_MARGIN after it, waits for its score
        lo, hi = min(by_bucket) * R.BASE, (max(by_bucket) + 1) * R.BASE + CONTEXT_MARGIN
        span = self.scored.get((atom, host))
        if span is None or span[0] != count or not span[1] <= lo < span[2]:
            span = (count, lo, lo)  # nothing from lo on is known to be scored
        start = span[2]  # the readings in [lo, start) are known to be scored
        pending = sorted(t for (t,) in _UNSCORED[host == ""].tuples(c, {
            "atom": atom, "host": host, "lo": start, "hi": hi, "since": now - policy.raw})) if start < hi else []
        if not pending:
            self.scored[(atom, host)] = (count, span[1], max(hi, start))
        dirty = {b for (b,) in _DIRTY.tuples(c, list(by_bucket), atom=atom, host=host)}
        out = []
        for b, rows in sorted(by_bucket.items()):
            start = b * R.BASE
            waiting = bisect.bisect_left(pending, start) < bisect.bisect_left(pending, start + R.BASE + CONTEXT_MARGIN)
            if b not in dirty and not waiting and not any(r[0] in keep for r in rows):
                out.append(b)
        return out


def prune_decisions(c: sa.Connection, policy: Retention, now: float) -> int:
    """Delete one batch of old ``ok`` decisions that nobody labelled and nothing alerted on."""
    if policy.raw is None:
        return 0
    d = decisions.c
    ids = c.execute(sa.select(d.id).where(d.action == "ok", d.created_at < now - policy.raw,
                                          d.id.not_in(sa.select(labels.c.decision_id)),
                                          d.id.not_in(sa.select(alerts.c.decision_id)))
                    .order_by(d.created_at).limit(policy.batch)).scalars().all()
    if ids:
        c.execute(decisions.delete().where(d.id.in_(ids)))
    return len(ids)


def prune_weights(c: sa.Connection, policy: Retention) -> int:
    """Delete the weights versions nothing needs any more (see the module docstring)."""
    if policy.weights is None:
        return 0
    w = weights.c
    rows = c.execute(sa.select(w.id, w.atom, w.version, w.parent_id, w.status)).all()
    parent = {r.id: r.parent_id for r in rows}
    keep: set[int] = set()
    for r in rows:
        if r.status == "active":
            at: int | None = r.id
            while at is not None and at not in keep:  # the active version and its ancestors
                keep.add(at)
                at = parent.get(at)
    by_atom: dict[str, list[sa.Row]] = {}
    for r in rows:
        by_atom.setdefault(r.atom, []).append(r)
    for versions in by_atom.values():
        keep.update(r.id for r in sorted(versions, key=lambda r: -r.version)[: policy.weights])
    drop = [r.id for r in rows if r.id not in keep]
    if not drop:
        return 0
    drop = [i for i in drop if c.execute(sa.select(scores.c.id).where(scores.c.weights_id == i).limit(1)).first()
            is None][: policy.batch]
    if drop:
        c.execute(weights.update().where(w.parent_id.in_(drop)).values(parent_id=None))
        c.execute(weights.delete().where(w.id.in_(drop)))
    return len(drop)
