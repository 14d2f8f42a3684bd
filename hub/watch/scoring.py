"""Scoring through the hub: work for scorer agents, their scores, and the history view.

New observations enqueue a ``score`` task for their atom (at most one waiting per atom: the
scorer takes every unscored observation, including ones that arrive while it works). A
scorer asks for work (the active weights, unscored observations, and per host the readings
just before them in time as context) and records scores under its lease; a resend after a lost reply finds
the scores already there and stores nothing twice.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.store.bulk import BulkInsert
from kiri.hub.store.db import as_dict
from kiri.hub.store.prepared import ListStatement, Prepared, by_ids, one_range
from kiri.hub.store.schema import observations, scores, tasks, weights
from kiri.hub.watch import decisions as D
from kiri.hub.watch import learning as L
from kiri.hub.watch import rollups as R
from kiri.hub.watch.handed import Found, HandedOut
from kiri.hub.watch.observations import AtomRegistry, number_rows
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


Reading = tuple[int, float, str | None, str]  # id, ts, host, data (JSON text), as the driver reads it
_ID, _TS, _HOST, _DATA = range(4)


def _obs(r: Reading) -> dict[str, Any]:
    return {"id": r[_ID], "time": r[_TS], "host": r[_HOST], "values": orjson.Fragment(r[_DATA])}


def _columns(rows: list[Reading]) -> dict[str, Any]:
    """Readings as columns; the stored JSON objects go out as they are, one fragment for all."""
    return {"id": [r[_ID] for r in rows], "time": [r[_TS] for r in rows], "host": [r[_HOST] for r in rows],
            "values": orjson.Fragment("[" + ",".join(r[_DATA] for r in rows) + "]")}


_o = observations.c
_READING = (_o.id, _o.ts, _o.host, _o.data)
_TODO = Prepared(sa.select(*_READING).where(_o.atom == sa.bindparam("atom"), _o.id > sa.bindparam("done"))
                 .order_by(_o.id).limit(sa.bindparam("limit")))


# each (ts, id) bound also as a plain range on ts, so SQLite walks the stream index's range
# instead of the stream's whole history (an OR alone defeats the index)
_BEFORE = {null: Prepared(sa.select(*_READING).where(
    R.stream_is(null), _o.ts <= sa.bindparam("ts"), sa.or_(_o.ts < sa.bindparam("ts"), _o.id < sa.bindparam("id")))
    .order_by(_o.ts.desc(), _o.id.desc()).limit(sa.bindparam("k"))) for null in (True, False)}

def _between(null: bool) -> list[sa.ColumnElement[bool]]:
    return [R.stream_is(null),
            _o.ts >= sa.bindparam("ts0"), sa.or_(_o.ts > sa.bindparam("ts0"), _o.id > sa.bindparam("id0")),
            _o.ts <= sa.bindparam("ts1"), sa.or_(_o.ts < sa.bindparam("ts1"), _o.id < sa.bindparam("id1"))]


_BETWEEN = {null: Prepared(sa.select(_o.id).where(*_between(null)).order_by(_o.ts, _o.id).limit(sa.bindparam("limit")))
            for null in (True, False)}
_BETWEEN_COUNT = {null: Prepared(sa.select(sa.func.count()).where(*_between(null))) for null in (True, False)}


def work(reg: AtomRegistry, c: sa.Connection, p: P.ScoringWork, env: Q.Env,
         handed: HandedOut | None = None) -> dict[str, Any]:
    """The active weights, the atom's next unscored readings and their streams' context;
    ``handed`` remembers the readings for their ``record``."""
    schema = reg.get(p.atom)
    active = c.execute(sa.select(weights.c.id, weights.c.version, weights.c.hash, weights.c.info).where(
        weights.c.atom == schema.name, weights.c.status == "active")).first()
    empty: Any = _columns([]) if p.columns else []
    if active is None:
        return {"weights": None, "context": empty, "observations": empty}
    done = max(_scored_to(c, schema.name), p.after_id)
    todo: list[Reading] = _TODO.tuples(c, {"atom": schema.name, "done": done, "limit": p.limit})
    ctx = stream_context(c, schema.name, todo, p.context)
    if handed is not None:
        handed.remember(schema.name, todo)
    info = orjson.loads(active.info)
    shape = _columns if p.columns else (lambda rows: [_obs(r) for r in rows])
    return {
        "weights": {"id": active.id, "version": active.version, "hash": active.hash,
                    "threshold": info.get("threshold")},
        "context": shape(ctx),
        "observations": shape(todo),
    }


def stream_context(c: sa.Connection, atom: str, todo: list[Reading], k: int) -> list[Reading]:
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
    ids = {r[_ID] for r in todo}
    out: list[Reading] = []
    by_host: dict[str | None, list[Reading]] = {}
    for r in todo:
        by_host.setdefault(r[_HOST], []).append(r)
    when = itemgetter(_TS, _ID)
    for host, rows in by_host.items():
        stream = {"atom": atom, "host": host}
        first, last = min(rows, key=when), max(rows, key=when)
        if k:
            prior = _BEFORE[host is None].tuples(c, {**stream, "ts": first[_TS], "id": first[_ID], "k": k})
            out.extend(r for r in reversed(prior) if r[_ID] not in ids)
        if len(rows) > 1:
            span = {**stream, "ts0": first[_TS], "id0": first[_ID], "ts1": last[_TS], "id1": last[_ID]}
            # counted first (on the stream index): in time-ordered data the stream's readings
            # between the batch's first and last are just the batch's own, and nothing is read
            if _BETWEEN_COUNT[host is None].tuples(c, span)[0][0] == len(rows) - 2:
                continue
            between = _BETWEEN[host is None].tuples(c, {**span, "limit": MAX_BETWEEN + len(rows)})
            extra = [i for (i,) in between if i not in ids][:MAX_BETWEEN]
            if extra:
                out.extend(tuple(r) for r in c.execute(sa.select(*_READING).where(_o.id.in_(extra))
                                                       .order_by(_o.ts, _o.id)))
    return out


_BULK_SCORES = BulkInsert(scores, ["observation_id", "score", "tail_p", "surprise", "anomalous"])


def anomalous_of(score: list[float], tail_p: list[float | None], p: P.RecordScores,
                 learning: list[bool] | None) -> list[bool]:
    """Which scores are anomalous: the tail probability under the alarm rate (calibrated
    weights), else the score over the threshold; never a reading whose host is still
    ``learning``. In numpy: a backfill records thousands per call."""
    over = np.asarray(score, dtype=np.float64) > p.threshold
    if p.alarm_rate is not None:
        t = np.asarray(tail_p, dtype=np.float64)  # None: NaN, judged by the threshold
        over = np.where(np.isnan(t), over, t < p.alarm_rate)
    if learning is not None:
        over &= ~np.asarray(learning, dtype=bool)
    return over.tolist()


def surprise_texts(flat: list[float], width: int, keep: list[int], n: int) -> list[str]:
    """Each kept score's per-token surprise as the JSON list it is stored as (the text
    ``orjson.dumps`` of the list gives): written for the whole batch in one call and cut."""
    rows = np.asarray(flat, dtype=np.float64).reshape(n, width)
    return ["[" + row + "]" for row in number_rows(rows if len(keep) == n else rows[keep])]


# "atom || ''": not an index of its own, so SQLite reads the ids by rowid (the atom's index walks its history)
_ATOM_IS = _o.atom.op("||")(sa.literal_column("''")) == sa.bindparam("atom")
_FOUND_IN_RANGE = Prepared(sa.select(_o.id, _o.ts, _o.host).where(
    _o.id >= sa.bindparam("lo"), _o.id <= sa.bindparam("hi"), _ATOM_IS).order_by(_o.id))
_FOUND_LISTED = ListStatement(lambda member: sa.select(_o.id, _o.ts, _o.host).where(member(_o.id), _ATOM_IS)
                              .order_by(_o.id))


def _readings(c: sa.Connection, atom: str, ids: list[int]) -> Found:
    """The atom's readings among ``ids``: a batch's ids are usually a run, read as one range
    (others come too: the caller places its own), scattered ones as a list."""
    if one_range(ids):
        return Found(_FOUND_IN_RANGE.tuples(c, {"lo": min(ids), "hi": max(ids), "atom": atom}))
    return Found(_FOUND_LISTED.tuples(c, ids, atom=atom))


_s = scores.c
_SCORED_COLS = [_s.observation_id, _s.weights_id]
# every score of the readings, whatever its weights: the (observation_id, weights_id) index alone
_SCORED = Prepared(sa.select(*_SCORED_COLS).where(_s.observation_id >= sa.bindparam("lo"),
                                                  _s.observation_id <= sa.bindparam("hi")))


def record(c: sa.Connection, p: P.RecordScores, env: Q.Env, handed: HandedOut | None = None) -> dict[str, Any]:
    """Store a batch's scores (once: a resend stores nothing twice) and the decision on them,
    and merge first scores into the rollups. ``handed``: the batches handed out lately, whose
    readings' time and host need not be read again."""
    if not Q.holds_lease(c, p.task_id, p.lease_token):
        raise LeaseLost(f"task {p.task_id} is not leased to you; scores not recorded")
    w = c.execute(sa.select(weights.c.atom, weights.c.info).where(weights.c.id == p.weights_id)).first()
    if w is None:
        raise NotFound(f"weights {p.weights_id} do not exist")
    if w.atom != p.atom:
        raise InvalidParams(f"weights {p.weights_id} belong to {w.atom!r}, not {p.atom!r}")
    cols = p.as_columns()
    ids = cols.observation_id
    wanted = set(ids)
    # each reading's host and time, read once: to check they are this atom's, to know which
    # hosts are still learning (their scores are not anomalous yet), and for the rollups
    memo = handed.find(p.atom, ids) if handed is not None else None
    if memo is not None:
        found, places = memo
    else:
        found = _readings(c, p.atom, ids)
        places = found.places(ids)
    if places is None:
        missing = set(ids) - set(found.ids.tolist())
        raise InvalidParams(f"observation(s) {[i for i in ids if i in missing][:5]} are not {p.atom!r} observations")
    if len(wanted) != len(ids):
        raise InvalidParams("an observation is scored twice in one call")
    hosts = found.host_of(places)
    info = orjson.loads(w.info)
    learning = {h for h in set(hosts) if L.is_learning(info, h)}
    # which readings have scores already: by these weights (a resend: stored once), or by
    # others (the rollups must then recompute the reading's newest score)
    before = [r for r in by_ids(c, _SCORED, _SCORED_COLS, _s.observation_id, ids) if r[0] in wanted]
    already = {i for i, wid in before if wid == p.weights_id}
    rescored = {i for i, _wid in before}
    tails = cols.tail_p or [None] * len(ids)
    keep = [k for k, i in enumerate(ids) if i not in already] if already else list(range(len(ids)))
    anomalous: list[bool] = []
    if keep:
        kept = [ids[k] for k in keep] if already else ids
        score = [cols.score[k] for k in keep] if already else cols.score
        tail_p = [tails[k] for k in keep] if already else tails
        host = [hosts[k] for k in keep] if already else hosts
        ts = found.ts[places[keep]] if already else found.ts[places]
        anomalous = anomalous_of(score, tail_p, p, [h in learning for h in host] if learning else None)
        _BULK_SCORES.run(c, {
            "observation_id": kept, "score": score, "tail_p": tail_p,
            "surprise": surprise_texts(cols.surprise, cols.width, keep, len(ids)),
            "anomalous": anomalous}, {"atom": p.atom, "weights_id": p.weights_id, "threshold": p.threshold,
                                      "created_at": env.now})
        if rescored:
            first = [k for k, i in enumerate(kept) if i not in rescored]
            R.add_first_scores(c, p.atom, [host[k] for k in first], [kept[k] for k in first], ts[first].tolist(),
                               [score[k] for k in first], p.threshold, [tail_p[k] for k in first],
                               [anomalous[k] for k in first])
            R.mark_readings(c, [i for i in kept if i in rescored])
        else:
            R.add_first_scores(c, p.atom, host, kept, ts.tolist(), score, p.threshold, tail_p, anomalous)
    out: dict[str, Any] = {"stored": len(keep), "already": len(already), "anomalous": sum(anomalous)}
    if p.decision is not None:
        decision = p.decision
        at = ids.index(decision.observation_id) if learning and decision.observation_id in wanted else None
        if at is not None and hosts[at] in learning and decision.action != "ok":
            # weights that never saw this host decide nothing yet: recorded as ok, with why
            decision = decision.model_copy(update={
                "action": "ok", "policy": f"learning:{hosts[at]}"[:64],
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
