"""Scoring through the hub: work for scorer agents, their scores, and the history view.

New observations enqueue a ``score`` task for their atom (at most one waiting per atom: the
scorer takes every unscored observation, including ones that arrive while it works). A
scorer asks for work (the active weights, unscored observations, and per host the readings
just before them in time as context) and records scores under its lease; a resend after a lost reply finds
the scores already there and stores nothing twice.
"""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.store.db import as_dict
from kiri.hub.store.prepared import Prepared
from kiri.hub.store.schema import observations, scores, tasks, weights
from kiri.hub.watch import decisions as D
from kiri.hub.watch import learning as L
from kiri.hub.watch import rollups as R
from kiri.hub.watch.observations import AtomRegistry
from kiri.model.explain import blame
from kiri.protocol import InvalidParams, LeaseLost, NotFound
from kiri.protocol import params as P


def ensure_score_task(c: sa.Connection, atom: str, env: Q.Env) -> None:
    waiting = c.execute(sa.select(tasks.c.id).where(
        tasks.c.status == Q.QUEUED, tasks.c.kind == "score", tasks.c.atom == atom).limit(1)).first()
    if waiting is None:
        Q.enqueue(c, P.Enqueue(kind="score", atom=atom, max_attempts=10), env)


MAX_BETWEEN = 5000  # a stream's already-stored readings fetched between a batch's first and last


def _scored_to(c: sa.Connection, atom: str) -> int:
    return c.execute(sa.select(sa.func.max(scores.c.observation_id)).where(scores.c.atom == atom)).scalar() or 0


def _obs(r: sa.Row) -> dict[str, Any]:
    return {"id": r.id, "time": r.ts, "host": r.host, "values": orjson.Fragment(r.data)}


def work(reg: AtomRegistry, c: sa.Connection, p: P.ScoringWork, env: Q.Env) -> dict[str, Any]:
    schema = reg.get(p.atom)
    active = c.execute(sa.select(weights.c.id, weights.c.version, weights.c.hash, weights.c.info).where(
        weights.c.atom == schema.name, weights.c.status == "active")).first()
    if active is None:
        return {"weights": None, "context": [], "observations": []}
    done = _scored_to(c, schema.name)
    o = observations.c
    todo = c.execute(sa.select(o.id, o.ts, o.host, o.data).where(o.atom == schema.name, o.id > done)
                     .order_by(o.id).limit(p.limit)).all()
    ctx = stream_context(c, schema.name, todo, p.context)
    info = orjson.loads(active.info)
    return {
        "weights": {"id": active.id, "version": active.version, "hash": active.hash,
                    "threshold": info.get("threshold")},
        "context": [_obs(r) for r in ctx],
        "observations": [_obs(r) for r in todo],
    }


def stream_context(c: sa.Connection, atom: str, todo: list[sa.Row], k: int) -> list[sa.Row]:
    """The observations that ``todo`` must be scored against, per stream (atom, host).

    A stream's observations are ordered by time (then id), so each host is scored against
    its own history, and a late or out-of-order import against the readings around it in
    time: for each host in ``todo``, its ``k`` readings before the earliest of its rows
    here, and its readings between that one and its latest here that are not in ``todo``
    (at most ``MAX_BETWEEN``: a reading imported years late is scored against the first of
    them). The scorer sorts each host's rows by (time, id).
    """
    if not todo:
        return []
    o = observations.c
    ids = {r.id for r in todo}
    out: list[sa.Row] = []
    by_host: dict[str | None, list[sa.Row]] = {}
    for r in todo:
        by_host.setdefault(r.host, []).append(r)
    for host, rows in by_host.items():
        same = o.host.is_(None) if host is None else o.host == host
        first = min(rows, key=lambda r: (r.ts, r.id))
        last = max(rows, key=lambda r: (r.ts, r.id))
        # each (ts, id) bound also as a plain range on ts, so SQLite walks the stream index's
        # range instead of the stream's whole history (an OR alone defeats the index)
        before = sa.and_(o.ts <= first.ts, sa.or_(o.ts < first.ts, o.id < first.id))
        if k:
            prior = c.execute(sa.select(o.id, o.ts, o.host, o.data).where(o.atom == atom, same, before)
                              .order_by(o.ts.desc(), o.id.desc()).limit(k)).all()
            out.extend(r for r in reversed(prior) if r.id not in ids)
        if len(rows) > 1:
            after_first = sa.and_(o.ts >= first.ts, sa.or_(o.ts > first.ts, o.id > first.id))
            before_last = sa.and_(o.ts <= last.ts, sa.or_(o.ts < last.ts, o.id < last.id))
            # ids first (the stream index covers them): in time-ordered data these are just
            # the batch's own rows, and nothing more is read
            between = c.execute(sa.select(o.id).where(o.atom == atom, same, after_first, before_last)
                                .order_by(o.ts, o.id).limit(MAX_BETWEEN + len(rows))).scalars().all()
            extra = [i for i in between if i not in ids][:MAX_BETWEEN]
            if extra:
                out.extend(c.execute(sa.select(o.id, o.ts, o.host, o.data).where(o.id.in_(extra))
                                     .order_by(o.ts, o.id)).all())
    return out


_INSERT_SCORES = Prepared(scores.insert().values(**{col: sa.bindparam(col) for col in (
    "observation_id", "atom", "weights_id", "score", "threshold", "tail_p", "surprise", "anomalous", "created_at")}))


def is_anomalous(s: P.ScoreIn, p: P.RecordScores) -> bool:
    """Anomalous: the tail probability under the alarm rate (calibrated weights), else score over threshold."""
    if s.tail_p is not None and p.alarm_rate is not None:
        return s.tail_p < p.alarm_rate
    return s.score > p.threshold


def record(c: sa.Connection, p: P.RecordScores, env: Q.Env) -> dict[str, Any]:
    if not Q.holds_lease(c, p.task_id, p.lease_token):
        raise LeaseLost(f"task {p.task_id} is not leased to you; scores not recorded")
    w = c.execute(sa.select(weights.c.atom, weights.c.info).where(weights.c.id == p.weights_id)).first()
    if w is None:
        raise NotFound(f"weights {p.weights_id} do not exist")
    if w.atom != p.atom:
        raise InvalidParams(f"weights {p.weights_id} belong to {w.atom!r}, not {p.atom!r}")
    ids = [s.observation_id for s in p.scores]
    # by id alone (rowid lookups); with the atom in the WHERE, SQLite may walk the atom's index
    found = [r for r in c.execute(sa.select(observations.c.id, observations.c.host, observations.c.ts,
                                            observations.c.atom).where(observations.c.id.in_(ids)))
             if r.atom == p.atom]
    host_of = {r.id: r.host for r in found}
    missing = [i for i in ids if i not in host_of]
    if missing:
        raise InvalidParams(f"observation(s) {missing[:5]} are not {p.atom!r} observations")
    info = orjson.loads(w.info)
    learning = {h for h in set(host_of.values()) if L.is_learning(info, h)}
    already = {r.observation_id for r in c.execute(sa.select(scores.c.observation_id).where(
        scores.c.weights_id == p.weights_id, scores.c.observation_id.in_(ids)))}
    rows = [{"observation_id": s.observation_id, "atom": p.atom, "weights_id": p.weights_id, "score": s.score,
             "threshold": p.threshold, "tail_p": s.tail_p, "surprise": orjson.dumps(s.surprise).decode(),
             "anomalous": is_anomalous(s, p) and host_of[s.observation_id] not in learning, "created_at": env.now}
            for s in p.scores if s.observation_id not in already]
    if rows:
        _INSERT_SCORES.run_many(c, rows)
        new = {r["observation_id"] for r in rows}
        R.mark(c, R.readings_keys((p.atom, r.host, r.ts) for r in found if r.id in new))
    out: dict[str, Any] = {"stored": len(rows), "already": len(already),
                           "anomalous": sum(r["anomalous"] for r in rows)}
    if p.decision is not None:
        decision = p.decision
        host = host_of.get(decision.observation_id) if decision.observation_id is not None else None
        if host in learning and decision.action != "ok":
            # weights that never saw this host decide nothing yet: recorded as ok, with why
            decision = decision.model_copy(update={
                "action": "ok", "policy": f"learning:{host}"[:64],
                "inputs": {**decision.inputs, "held_back": decision.action}})
        out["decision"] = (D.find(c, p.task_id, decision.observation_id)
                           or D.insert(c, p.task_id, p.atom, decision, env))
    for host in sorted(learning):
        L.learn(c, p.atom, host, env)
    return out


def history(reg: AtomRegistry, c: sa.Connection, p: P.History, env: Q.Env) -> dict[str, Any]:
    """The latest observations of an atom with tokens and their newest score and blame."""
    schema = reg.get(p.atom)
    o = observations.c
    q = sa.select(o.id, o.ts, o.host, o.data).where(o.atom == schema.name)
    if p.since is not None:
        q = q.where(o.ts >= p.since)
    obs = c.execute(q.order_by(o.id.desc()).limit(p.n)).all()
    s = scores.c
    latest: dict[int, sa.Row] = {}
    if obs:
        for r in c.execute(sa.select(s.observation_id, s.weights_id, s.score, s.threshold, s.anomalous, s.surprise,
                                     s.tail_p)
                           .where(s.observation_id.in_([r.id for r in obs])).order_by(s.weights_id)):
            latest[r.observation_id] = r
    out = []
    for r in reversed(obs):
        values = orjson.loads(r.data)
        toks = schema.stored_tokens(values)
        item: dict[str, Any] = {"id": r.id, "time": r.ts, "host": r.host, "values": values, "tokens": toks,
                                "score": None}
        sc = latest.get(r.id)
        if sc is not None:
            surprise = orjson.loads(sc.surprise)
            item.update(score=sc.score, threshold=sc.threshold, anomalous=bool(sc.anomalous), weights_id=sc.weights_id,
                        tail_p=sc.tail_p,
                        blame=blame(toks, surprise))
        out.append(item)
    return {"atom": schema.name, "observations": out}


def list_scores(c: sa.Connection, p: P.Scores, env: Q.Env) -> dict[str, Any]:
    """Scores of an atom in the order they were recorded, each naming its observation and weights."""
    s = scores.c
    after = p.after_id
    if p.observations_from and after == 0:  # start where those observations' scores start (a trainer's window)
        first = c.execute(sa.select(sa.func.min(s.id)).where(s.atom == p.atom,
                                                              s.observation_id >= p.observations_from)).scalar()
        after = (first or 1) - 1
    rows = c.execute(sa.select(s.id, s.observation_id, s.weights_id, s.score, s.threshold, s.anomalous, s.surprise,
                               s.tail_p, s.created_at).where(s.atom == p.atom, s.id > after,
                                                            s.observation_id >= p.observations_from)
                     .order_by(s.id).limit(p.limit)).all()
    out = []
    for r in rows:
        d = as_dict(r)
        d["surprise"] = orjson.Fragment(d["surprise"])
        d["anomalous"] = bool(d["anomalous"])
        out.append(d)
    return {"scores": out, "next_after_id": rows[-1].id if len(rows) == p.limit else None}
