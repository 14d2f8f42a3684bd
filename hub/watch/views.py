"""Read-only pictures of the hub for people: status, chart series, one observation, metrics.

Every function here only reads. They run on the reader's query-only connections (see
``reader.py``), never on the hub's writing connection, so a heavy page cannot stall the queue.
"""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa

from kiri.hub.core import retention as RT
from kiri.hub.core.queue import counts, throughput
from kiri.hub.core.retention import Retention
from kiri.hub.store import db as dbmod
from kiri.hub.store.schema import agents, decisions, kinds, observations, scores, streams, tasks, weights
from kiri.hub.watch import learning as L
from kiri.hub.watch import series as SR
from kiri.hub.watch.observations import AtomRegistry
from kiri.model.explain import blame, verdict
from kiri.model.schema import AtomSchema
from kiri.protocol import NotFound

QUIET_AFTER = 120.0  # seconds without a word from a connected agent before it looks unwell
MAX_POINTS = 5000


def _verdict(score: sa.Row | None) -> str:
    return verdict(None if score is None else bool(score.anomalous))


# what ``_observation`` shows of a score
_SCORE = (scores.c.score, scores.c.threshold, scores.c.anomalous, scores.c.surprise, scores.c.weights_id,
          scores.c.tail_p)


def _latest_score(c: sa.Connection, obs_id: int) -> sa.Row | None:
    s = scores.c
    return c.execute(sa.select(*_SCORE).where(s.observation_id == obs_id).order_by(s.weights_id.desc())
                     .limit(1)).first()


def _observation(schema: AtomSchema, row: sa.Row, score: sa.Row | None) -> dict[str, Any]:
    values = orjson.loads(row.data)
    toks = schema.stored_tokens(values)
    out: dict[str, Any] = {"id": row.id, "atom": schema.name, "time": row.ts, "host": row.host, "values": values,
                           "tokens": toks, "score": None, "threshold": None, "anomalous": None, "tail_p": None,
                           "verdict": _verdict(score), "blame": [], "weights_id": None}
    if score is not None:
        out.update(score=score.score, threshold=score.threshold, anomalous=bool(score.anomalous),
                   weights_id=score.weights_id, tail_p=score.tail_p, blame=blame(toks, orjson.loads(score.surprise)))
    return out


def _active_weights(c: sa.Connection) -> dict[str, dict[str, Any]]:
    w = weights.c
    out = {}
    for r in c.execute(sa.select(w.id, w.atom, w.version, w.created_at, w.activated_at, w.loss, w.info)
                       .where(w.status == "active")):
        info = orjson.loads(r.info)
        out[r.atom] = {"id": r.id, "version": r.version, "created_at": r.created_at,
                       "activated_at": r.activated_at, "loss": r.loss, "threshold": info.get("threshold"),
                       "hosts": info.get("hosts"), "judged_anomalous": info.get("judged_anomalous")}
    return out


def latest_observation(c: sa.Connection, reg: AtomRegistry, atom: str) -> dict[str, Any] | None:
    schema = reg.get_committed(atom)
    o = observations.c
    row = c.execute(sa.select(o.id, o.ts, o.host, o.data).where(o.atom == schema.name)
                    .order_by(o.ts.desc(), o.id.desc()).limit(1)).first()
    return None if row is None else _observation(schema, row, _latest_score(c, row.id))


def stream_latest(c: sa.Connection, reg: AtomRegistry) -> list[dict[str, Any]]:
    """Every stream (atom, host) with its latest reading and that reading's newest score,
    from the ``streams`` table: three reads in all, whatever the length of the history and
    the number of streams (one read per stream made a fleet's status and /metrics cost a
    millisecond per host)."""
    st, o, s = streams.c, observations.c, scores.c
    listed = [r for r in c.execute(sa.select(st.atom, st.host, st.n, st.last_id).order_by(st.atom, st.host))
              if not reg.get_committed(r.atom).actions]
    ids = [r.last_id for r in listed]
    readings: dict[int, sa.Row] = {}
    newest: dict[int, sa.Row] = {}
    for k in range(0, len(ids), _IN_CHUNK):
        part = ids[k:k + _IN_CHUNK]
        readings.update((r.id, r) for r in c.execute(sa.select(o.id, o.ts, o.host, o.data).where(o.id.in_(part))))
        for r in c.execute(sa.select(s.observation_id, *_SCORE).where(s.observation_id.in_(part))
                           .order_by(s.weights_id)):
            newest[r.observation_id] = r  # ordered by weights: the newest weights' score stays
    out = []
    for r in listed:
        row = readings.get(r.last_id)
        if row is None:  # gone (retention): nothing to show for the stream
            continue
        out.append({**_observation(reg.get_committed(r.atom), row, newest.get(row.id)), "readings": r.n})
    return out


_IN_CHUNK = 500  # ids per IN list (SQLite allows 999 parameters before 3.32)


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


def status(c: sa.Connection, reg: AtomRegistry, now: float, retention: Retention | None = None) -> dict[str, Any]:
    """Everything the front page shows, from one consistent snapshot."""
    active = _active_weights(c)
    by_atom: dict[str, list[dict[str, Any]]] = {}
    for st in stream_latest(c, reg):
        by_atom.setdefault(st["atom"], []).append(st)
    atoms_out = []
    for schema in reg.all_committed():
        if schema.actions:  # the nerve: its decisions are shown apart
            continue
        w = active.get(schema.name)
        hosts = by_atom.get(schema.name, [])
        for h in hosts:  # one entry per stream: the atom's latest reading from each host
            h["learning"] = L.state(c, schema.name, w, h["host"])
            if h["learning"] is not None:
                h["verdict"] = "learning"
        # the atom's latest reading is its newest stream's (streams are ordered by time, then id)
        newest = max(hosts, key=lambda h: (h["time"], h["id"]), default=None)
        latest = None if newest is None else {k: v for k, v in newest.items() if k not in ("readings", "learning")}
        atoms_out.append({"name": schema.name, "latest": latest, "weights": w,
                          "learning": None if newest is None else newest["learning"], "hosts": hosts})
    d = decisions.c
    last = c.execute(sa.select(d.id, d.atom, d.action, d.policy, d.probs, d.created_at)
                     .order_by(d.id.desc()).limit(1)).first()
    nerve = {"weights": active.get("nerve"),
             "latest": None if last is None else {"id": last.id, "atom": last.atom, "action": last.action,
                                                  "policy": last.policy, "probs": orjson.Fragment(last.probs),
                                                  "time": last.created_at}}
    return {"time": now, "atoms": atoms_out, "nerve": nerve, "agents": agent_list(c, now),
            "queue": queue_summary(c), "retention": (retention or Retention()).describe()}


def observation(c: sa.Connection, reg: AtomRegistry, obs_id: int) -> dict[str, Any]:
    o = observations.c
    row = c.execute(sa.select(o.id, o.atom, o.ts, o.host, o.data).where(o.id == obs_id)).first()
    if row is None:
        raise NotFound(f"observation {obs_id} does not exist")
    return {"observation": _observation(reg.get_committed(row.atom), row, _latest_score(c, row.id))}


def series(c: sa.Connection, reg: AtomRegistry, atom: str, host: str | None, since: float | None,
           until: float | None, points: int) -> dict[str, Any]:
    """An atom's values and scores over a time range, column by column, for a chart."""
    schema = reg.get_committed(atom)
    out: dict[str, Any] = {"atom": schema.name, "fields": [
        {"name": f.name, "letter": f.letter, "low": f.low, "high": f.high, "buckets": f.buckets}
        for f in schema.fields], "since": since, "until": until}
    out.update(SR.series(c, schema.name, [f.name for f in schema.fields], host, since, until, points))
    return out


def metrics_snapshot(c: sa.Connection, reg: AtomRegistry, db_url: str, now: float) -> dict[str, Any]:
    """What /metrics reports from the database, read in one snapshot."""
    t = tasks.c
    # only tasks that stumbled (a small partial index), not every task of the retention window
    outcomes = [{"kind": r.kind, "failures": r.failures or 0, "expiries": r.expiries or 0}
                for r in c.execute(sa.select(t.kind, sa.func.sum(t.failures).label("failures"),
                                             sa.func.sum(t.expiries).label("expiries"))
                                   .where(sa.or_(t.failures > 0, t.expiries > 0)).group_by(t.kind))]
    training = []
    for r in c.execute(sa.select(t.id, t.atom, t.progress).where(t.status == "leased", t.kind == "train")):
        prog = orjson.loads(r.progress) if r.progress else {}
        training.append({"task_id": r.id, "atom": r.atom or "", "progress": prog if isinstance(prog, dict) else {}})
    atoms_out = stream_latest(c, reg)
    d = decisions.c
    last = c.execute(sa.select(d.action, d.created_at).order_by(d.id.desc()).limit(1)).first()
    a = agents.c
    roles = [(r.role, r.n) for r in c.execute(sa.select(a.role, sa.func.count().label("n"))
                                               .where(a.connected.is_(True), a.role != "cli").group_by(a.role))]
    return {"tasks": counts(c), "outcomes": outcomes, "pruned": RT.totals(c), "training": training, "atoms": atoms_out,
            "throughput": throughput(c, now),
            "kinds": [{"kind": r.kind, "paused": bool(r.paused), "concurrency": r.concurrency}
                      for r in c.execute(sa.select(kinds.c.kind, kinds.c.paused, kinds.c.concurrency))],
            "nerve": None if last is None else {"action": last.action, "time": last.created_at},
            "agents": roles, "files": dbmod.file_sizes(db_url)}


# --- pages for the read worker processes (``Reader.run_json``) ------------------------------
# Module-level and taking plain values, so they pickle; each reads the atom registry itself.

def _registry(c: sa.Connection) -> AtomRegistry:
    reg = AtomRegistry()
    reg.load(c)
    return reg


def status_page(c: sa.Connection, now: float, retention: Retention | None) -> dict[str, Any]:
    return status(c, _registry(c), now, retention)


def series_page(c: sa.Connection, atom: str, host: str | None, since: float | None, until: float | None,
                points: int) -> dict[str, Any]:
    return series(c, _registry(c), atom, host, since, until, points)


def history_page(c: sa.Connection, p: Any, env: Any) -> dict[str, Any]:
    from kiri.hub.watch.scoring import history

    return history(_registry(c), c, p, env)


def warm_up(c: sa.Connection) -> None:
    """Each atom's whole-range chart and the status page, once, answered to no one: the
    statements compile and the pages are read before the first person asks."""
    reg = _registry(c)
    for schema in reg.all_committed():
        series(c, reg, schema.name, None, None, None, 1000)
    status(c, reg, 0.0, None)
