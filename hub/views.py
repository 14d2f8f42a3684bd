"""Read-only pictures of the hub for people: status, chart series, one observation, metrics.

Every function here only reads. They run on the reader's query-only connections (see
``reader.py``), never on the hub's writing connection, so a heavy page cannot stall the queue.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from kiri.hub import db as dbmod
from kiri.hub.observations import AtomRegistry
from kiri.hub.queue import counts
from kiri.hub.schema import agents, decisions, observations, scores, tasks, weights
from kiri.model.schema import AtomSchema
from kiri.protocol import NotFound

QUIET_AFTER = 120.0  # seconds without a word from a connected agent before it looks unwell
MAX_POINTS = 5000


def _verdict(score: sa.Row | None) -> str:
    if score is None:
        return "unscored"
    return "anomaly" if score.anomalous else "normal"


def _latest_score(c: sa.Connection, obs_id: int) -> sa.Row | None:
    s = scores.c
    return c.execute(sa.select(s.score, s.threshold, s.anomalous, s.surprise, s.weights_id)
                     .where(s.observation_id == obs_id).order_by(s.weights_id.desc()).limit(1)).first()


def _observation(schema: AtomSchema, row: sa.Row, score: sa.Row | None) -> dict[str, Any]:
    values = orjson.loads(row.data)
    toks = schema.tokens(schema.encode(values))
    out: dict[str, Any] = {"id": row.id, "atom": schema.name, "time": row.ts, "host": row.host, "values": values,
                           "tokens": toks, "score": None, "threshold": None, "anomalous": None,
                           "verdict": _verdict(score), "blame": [], "weights_id": None}
    if score is not None:
        surprise = orjson.loads(score.surprise)
        probs = [float(np.exp(-v)) for v in surprise]
        out.update(score=score.score, threshold=score.threshold, anomalous=bool(score.anomalous),
                   weights_id=score.weights_id,
                   blame=[{"token": t, "surprise": v, "probability": p}
                          for t, v, p in zip(toks, surprise, probs, strict=False)])
    return out


def _active_weights(c: sa.Connection) -> dict[str, dict[str, Any]]:
    w = weights.c
    out = {}
    for r in c.execute(sa.select(w.id, w.atom, w.version, w.created_at, w.activated_at, w.loss, w.info)
                       .where(w.status == "active")):
        info = orjson.loads(r.info)
        out[r.atom] = {"id": r.id, "version": r.version, "created_at": r.created_at,
                       "activated_at": r.activated_at, "loss": r.loss, "threshold": info.get("threshold")}
    return out


def latest_observation(c: sa.Connection, reg: AtomRegistry, atom: str) -> dict[str, Any] | None:
    schema = reg.get(atom)
    o = observations.c
    row = c.execute(sa.select(o.id, o.ts, o.host, o.data).where(o.atom == schema.name)
                    .order_by(o.ts.desc(), o.id.desc()).limit(1)).first()
    return None if row is None else _observation(schema, row, _latest_score(c, row.id))


def agent_list(c: sa.Connection, now: float) -> list[dict[str, Any]]:
    """Every agent the hub has met, with its health and what it is working on now."""
    running: dict[str, list[dict[str, Any]]] = {}
    t = tasks.c
    for r in c.execute(sa.select(t.id, t.kind, t.atom, t.progress, t.lease_owner, t.started_at)
                       .where(t.status == "leased")):
        running.setdefault(r.lease_owner or "", []).append(
            {"id": r.id, "kind": r.kind, "atom": r.atom, "started_at": r.started_at,
             "progress": orjson.Fragment(r.progress) if r.progress else None})
    out = []
    a = agents.c
    for r in c.execute(sa.select(agents).order_by(a.connected.desc(), a.last_seen.desc())):
        if r.role == "cli":
            continue
        health = ("down" if not r.connected else "quiet" if now - r.last_seen > QUIET_AFTER else "up")
        out.append({"id": r.id, "name": r.name, "role": r.role, "host": r.host, "pid": r.pid, "version": r.version,
                    "kinds": orjson.loads(r.kinds) if r.kinds else None, "connected": bool(r.connected),
                    "health": health, "first_seen": r.first_seen, "last_seen": r.last_seen,
                    "tasks": running.get(r.name, [])})
    return out


def queue_summary(c: sa.Connection) -> dict[str, Any]:
    by_state: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for row in counts(c):
        by_state[row["status"]] = by_state.get(row["status"], 0) + row["count"]
        by_kind.setdefault(row["kind"], {})[row["status"]] = row["count"]
    return {"by_state": by_state, "by_kind": by_kind}


def status(c: sa.Connection, reg: AtomRegistry, now: float) -> dict[str, Any]:
    """Everything the front page shows, from one consistent snapshot."""
    active = _active_weights(c)
    atoms_out = []
    for schema in reg.all():
        if schema.actions:  # the nerve: its decisions are shown apart
            continue
        atoms_out.append({"name": schema.name, "latest": latest_observation(c, reg, schema.name),
                          "weights": active.get(schema.name)})
    d = decisions.c
    last = c.execute(sa.select(d.id, d.atom, d.action, d.policy, d.probs, d.created_at)
                     .order_by(d.id.desc()).limit(1)).first()
    nerve = {"weights": active.get("nerve"),
             "latest": None if last is None else {"id": last.id, "atom": last.atom, "action": last.action,
                                                  "policy": last.policy, "probs": orjson.Fragment(last.probs),
                                                  "time": last.created_at}}
    return {"time": now, "atoms": atoms_out, "nerve": nerve, "agents": agent_list(c, now),
            "queue": queue_summary(c)}


def observation(c: sa.Connection, reg: AtomRegistry, obs_id: int) -> dict[str, Any]:
    o = observations.c
    row = c.execute(sa.select(o.id, o.atom, o.ts, o.host, o.data).where(o.id == obs_id)).first()
    if row is None:
        raise NotFound(f"observation {obs_id} does not exist")
    return {"observation": _observation(reg.get(row.atom), row, _latest_score(c, row.id))}


def series(c: sa.Connection, reg: AtomRegistry, atom: str, since: float | None, until: float | None,
           points: int) -> dict[str, Any]:
    """An atom's values and scores over a time range, column by column, for a chart.

    Longer ranges are cut into ``points`` equal time buckets. Each bucket keeps its highest
    score (and that observation's id and time), so an anomaly never disappears when the
    view zooms out; field values are averaged.
    """
    schema = reg.get(atom)
    names = [f.name for f in schema.fields]
    o, s = observations.c, scores.c
    q = sa.select(o.id, o.ts, o.data).where(o.atom == schema.name)
    if since is not None:
        q = q.where(o.ts >= since)
    if until is not None:
        q = q.where(o.ts <= until)
    rows = c.execute(q.order_by(o.ts, o.id)).all()
    out: dict[str, Any] = {"atom": schema.name, "fields": [
        {"name": f.name, "letter": f.letter, "low": f.low, "high": f.high, "buckets": f.buckets}
        for f in schema.fields], "since": since, "until": until, "count": len(rows), "bucket": None,
        "t": [], "id": [], "score": [], "threshold": [], "anomalous": [], "n": [], "values": {n: [] for n in names}}
    if not rows:
        return out
    ids = np.fromiter((r.id for r in rows), dtype=np.int64, count=len(rows))
    ts = np.fromiter((r.ts for r in rows), dtype=np.float64, count=len(rows))
    vals = np.full((len(rows), len(names)), np.nan)
    for i, r in enumerate(rows):
        d = orjson.loads(r.data)
        for j, n in enumerate(names):
            v = d.get(n)
            if v is not None:
                vals[i, j] = v
    score = np.full(len(rows), np.nan)
    thr = np.full(len(rows), np.nan)
    anom = np.zeros(len(rows), dtype=bool)
    pos = {int(x): i for i, x in enumerate(ids)}
    # the newest weights' score of each observation (rows come in weights order; the last wins)
    for r in c.execute(sa.select(s.observation_id, s.score, s.threshold, s.anomalous)
                       .where(s.atom == schema.name, s.observation_id >= int(ids.min()),
                              s.observation_id <= int(ids.max())).order_by(s.weights_id)):
        i = pos.get(r.observation_id)
        if i is not None:
            score[i], thr[i], anom[i] = r.score, r.threshold, bool(r.anomalous)
    lo = since if since is not None else float(ts[0])
    hi = until if until is not None else float(ts[-1])
    if len(rows) > points and hi > lo:
        width = (hi - lo) / points
        b = np.minimum(((ts - lo) / width).astype(np.int64), points - 1)
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        ends = np.r_[starts[1:], len(rows)]
        keep = np.empty(len(starts), dtype=np.int64)
        for k, (a, e) in enumerate(zip(starts, ends, strict=True)):
            seg = score[a:e]
            keep[k] = a + (int(np.nanargmax(seg)) if not np.all(np.isnan(seg)) else 0)
        n = ends - starts
        with np.errstate(invalid="ignore"):
            sums = np.add.reduceat(np.nan_to_num(vals), starts, axis=0)
            cnt = np.add.reduceat(~np.isnan(vals), starts, axis=0)
            means = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
        any_anom = np.logical_or.reduceat(anom, starts)
        out.update(bucket=width, t=ts[keep], id=ids[keep], score=score[keep], threshold=thr[keep],
                   anomalous=any_anom, n=n)
        out["values"] = {name: means[:, j] for j, name in enumerate(names)}
    else:
        out.update(t=ts, id=ids, score=score, threshold=thr, anomalous=anom, n=np.ones(len(rows), dtype=np.int64))
        out["values"] = {name: vals[:, j] for j, name in enumerate(names)}
    for key in ("t", "id", "score", "threshold", "n"):
        out[key] = _column(out[key])
    out["anomalous"] = [bool(x) for x in out["anomalous"]]
    out["values"] = {k: _column(v) for k, v in out["values"].items()}
    return out


def _column(a: np.ndarray) -> list[Any]:
    """A numpy column as JSON-ready values, missing ones as null."""
    if a.dtype.kind == "f":
        return [None if math.isnan(x) else x for x in a.tolist()]
    return a.tolist()


def metrics_snapshot(c: sa.Connection, reg: AtomRegistry, db_url: str, now: float) -> dict[str, Any]:
    """What /metrics reports from the database, read in one snapshot."""
    t = tasks.c
    outcomes = [{"kind": r.kind, "failures": r.failures or 0, "expiries": r.expiries or 0}
                for r in c.execute(sa.select(t.kind, sa.func.sum(t.failures).label("failures"),
                                             sa.func.sum(t.expiries).label("expiries")).group_by(t.kind))]
    training = []
    for r in c.execute(sa.select(t.id, t.atom, t.progress).where(t.status == "leased", t.kind == "train")):
        prog = orjson.loads(r.progress) if r.progress else {}
        training.append({"task_id": r.id, "atom": r.atom or "", "progress": prog if isinstance(prog, dict) else {}})
    atoms_out = []
    for schema in reg.all():
        if schema.actions:
            continue
        latest = latest_observation(c, reg, schema.name)
        if latest is not None:
            atoms_out.append(latest)
    d = decisions.c
    last = c.execute(sa.select(d.action, d.created_at).order_by(d.id.desc()).limit(1)).first()
    a = agents.c
    roles = [(r.role, r.n) for r in c.execute(sa.select(a.role, sa.func.count().label("n"))
                                               .where(a.connected.is_(True), a.role != "cli").group_by(a.role))]
    return {"tasks": counts(c), "outcomes": outcomes, "training": training, "atoms": atoms_out,
            "nerve": None if last is None else {"action": last.action, "time": last.created_at},
            "agents": roles, "files": dbmod.file_sizes(db_url)}
