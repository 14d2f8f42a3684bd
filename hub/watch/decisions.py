"""Decisions, alerts and the owner's feedback.

The scorer runs the nerve (the hub does no model math) and records its decision here. The
hub owns what must be shared across scorers: the per-atom alert cool-down (one incident,
one alert), the deduplicated retrain job, and the human labels the nerve learns from,
which are stored apart from the nerve's own decisions.
"""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.store.db import ALERTS_LOCK, as_dict
from kiri.hub.store.schema import alerts, decisions, labels, observations, scores, weights
from kiri.hub.watch import retrain
from kiri.model.schema import NERVE_INPUTS
from kiri.protocol import LeaseLost, NotFound
from kiri.protocol import params as P

_alerts_lock = sa.select(sa.func.pg_advisory_xact_lock(ALERTS_LOCK))

NERVE_MIN_LABELS = 20
NERVE_RETRAIN_EVERY = 10  # new labels since the nerve last trained


def nerve_inputs(c: sa.Connection, _p: P.Empty, env: Q.Env) -> dict[str, Any]:
    """The latest score of every input atom, and the nerve's active weights if any."""
    out: dict[str, Any] = {}
    for atom in NERVE_INPUTS:
        row = c.execute(
            sa.select(scores.c.score, scores.c.threshold, scores.c.tail_p, scores.c.observation_id, observations.c.ts)
            .join(observations, observations.c.id == scores.c.observation_id)
            .where(scores.c.atom == atom).order_by(scores.c.observation_id.desc(), scores.c.id.desc()).limit(1)
        ).first()
        if row is not None:
            out[atom] = {"score": row.score, "threshold": row.threshold, "tail_p": row.tail_p,
                         "observation_id": row.observation_id, "time": row.ts}
    nerve = c.execute(sa.select(weights.c.id, weights.c.info).where(
        weights.c.atom == "nerve", weights.c.status == "active")).first()
    n_labels = c.execute(sa.select(sa.func.count()).select_from(labels)).scalar() or 0
    return {"scores": out, "labels": n_labels,
            "nerve": {"weights_id": nerve.id, "labels": orjson.loads(nerve.info).get("labels", 0)} if nerve else None}


def record(c: sa.Connection, p: P.RecordDecision, env: Q.Env) -> dict[str, Any]:
    existing = find(c, p.task_id, p.observation_id)
    if existing is not None:
        return existing
    if not Q.holds_lease(c, p.task_id, p.lease_token):
        raise LeaseLost(f"task {p.task_id} is not leased to you; decision not recorded")
    return insert(c, p.task_id, p.atom, p, env)


def find(c: sa.Connection, task_id: int, observation_id: int | None) -> dict[str, Any] | None:
    """The decision already recorded for this task and observation (a resend), if any."""
    existing = c.execute(sa.select(decisions.c.id).where(
        decisions.c.task_id == task_id, decisions.c.observation_id == observation_id)).first()
    if existing is None:
        return None
    alert = c.execute(sa.select(alerts.c.id, alerts.c.status).where(alerts.c.decision_id == existing.id)).first()
    return {"decision_id": existing.id, "already": True,
            "alert": {"id": alert.id, "deliver": alert.status == "pending"} if alert else None}


def insert(c: sa.Connection, task_id: int, atom: str, p: P.DecisionIn,
           env: Q.Env) -> dict[str, Any]:
    """Record a decision and act on it: alert (under the per-atom cool-down) or retrain."""
    did = c.execute(decisions.insert().values(
        atom=atom, observation_id=p.observation_id, task_id=task_id, inputs=orjson.dumps(p.inputs).decode(),
        action=p.action, probs=orjson.dumps(p.probs).decode(), policy=p.policy, created_at=env.now,
    ).returning(decisions.c.id)).scalar_one()
    out: dict[str, Any] = {"decision_id": did, "already": False, "alert": None}
    if p.action == "alert":
        if c.dialect.name == "postgresql":
            # hubs sharing the database: the check below would not see another hub's alert
            # until it commits, so both would deliver; this lock, taken in a statement of its
            # own, makes the second wait for the first one's commit, and its check (a new
            # snapshot) then sees that alert. Alerts are rare: one lock for all atoms.
            c.execute(_alerts_lock)
        recent = c.execute(sa.select(alerts.c.id).where(
            alerts.c.atom == atom, alerts.c.status.in_(["pending", "sent", "partial"]),
            alerts.c.created_at > env.now - p.cooldown).limit(1)).first()
        status = "stale" if p.stale else "cooled" if recent is not None else "pending"
        aid = c.execute(alerts.insert().values(decision_id=did, atom=atom, status=status, created_at=env.now)
                        .returning(alerts.c.id)).scalar_one()
        out["alert"] = {"id": aid, "deliver": status == "pending"}
    elif p.action == "retrain":
        target = p.retrain_atom or atom
        res = retrain.request(c, target, f"decision {did}", env)
        out["retrain_task_id"] = res["task_id"]
    return out


def pending_alerts(c: sa.Connection, p: P.PendingAlerts, env: Q.Env) -> dict[str, Any]:
    """Alerts recorded but never reported delivered: their scorer died mid-way; deliver them."""
    rows = c.execute(sa.select(alerts.c.id, alerts.c.atom, alerts.c.decision_id, decisions.c.observation_id,
                               decisions.c.inputs, decisions.c.probs, decisions.c.policy, alerts.c.created_at)
                     .join(decisions, decisions.c.id == alerts.c.decision_id)
                     .where(alerts.c.status == "pending", alerts.c.created_at < env.now - p.older_than)
                     .order_by(alerts.c.id).limit(100)).all()
    out = []
    for r in rows:
        sc = c.execute(sa.select(scores.c.score, scores.c.threshold, observations.c.ts, observations.c.host)
                       .join(observations, observations.c.id == scores.c.observation_id)
                       .where(scores.c.observation_id == r.observation_id).order_by(scores.c.id.desc())).first()
        out.append({"alert_id": r.id, "decision_id": r.decision_id, "atom": r.atom, "host": sc.host if sc else None,
                    "observation_id": r.observation_id, "time": sc.ts if sc else r.created_at,
                    "score": sc.score if sc else 0.0, "threshold": sc.threshold if sc else 0.0, "blame": [],
                    "probs": orjson.Fragment(r.probs), "policy": r.policy, "redelivery": True})
    return {"alerts": out}


def alert_result(c: sa.Connection, p: P.AlertResult, env: Q.Env) -> dict[str, Any]:
    n = c.execute(alerts.update().where(alerts.c.id == p.alert_id).values(
        status=p.status, detail=p.detail, sent_at=env.now if p.status == "sent" else None)).rowcount
    if not n:
        raise NotFound(f"alert {p.alert_id} does not exist")
    return {"alert_id": p.alert_id, "status": p.status}


def list_decisions(c: sa.Connection, p: P.Decisions, env: Q.Env) -> dict[str, Any]:
    q = sa.select(decisions, alerts.c.status.label("alert")).outerjoin(alerts, alerts.c.decision_id == decisions.c.id)
    if p.before_id:
        q = q.where(decisions.c.id < p.before_id)
    rows = c.execute(q.order_by(decisions.c.id.desc()).limit(p.limit)).all()
    latest_label: dict[int, dict[str, Any]] = {}  # the newest label of each decision on the page
    for lab in c.execute(sa.select(labels.c.decision_id, labels.c.verdict, labels.c.action)
                         .where(labels.c.decision_id.in_([r.id for r in rows])).order_by(labels.c.id)):
        latest_label[lab.decision_id] = {"verdict": lab.verdict, "action": lab.action}
    out = []
    for r in rows:
        d = as_dict(r)
        d["inputs"] = orjson.Fragment(d["inputs"])
        d["probs"] = orjson.Fragment(d["probs"])
        d["label"] = latest_label.get(r.id)
        out.append(d)
    return {"decisions": out}


def feedback(c: sa.Connection, p: P.Feedback, env: Q.Env) -> dict[str, Any]:
    d = c.execute(sa.select(decisions.c.action).where(decisions.c.id == p.decision_id)).first()
    if d is None:
        raise NotFound(f"decision {p.decision_id} does not exist")
    if p.verdict == "approve":
        action = d.action
    elif p.verdict == "dismiss":
        # "that was wrong": an alarm (or retrain, or suppression) should have been ok; a missed one an alert
        action = "alert" if d.action == "ok" else "ok"
    else:
        action = p.verdict
    lid = c.execute(labels.insert().values(decision_id=p.decision_id, verdict=p.verdict, action=action,
                                           created_at=env.now).returning(labels.c.id)).scalar_one()
    out: dict[str, Any] = {"label_id": lid, "action": action}
    total = c.execute(sa.select(sa.func.count()).select_from(labels)).scalar() or 0
    active = c.execute(sa.select(weights.c.info).where(weights.c.atom == "nerve", weights.c.status == "active")).first()
    trained_on = orjson.loads(active.info).get("labels", 0) if active else 0
    if total >= NERVE_MIN_LABELS and total - trained_on >= NERVE_RETRAIN_EVERY:
        res = retrain.request(c, "nerve", f"{total - trained_on} new labels", env)
        out["nerve_retrain_task_id"] = res["task_id"]
    return out


def list_labels(c: sa.Connection, p: P.Labels, env: Q.Env) -> dict[str, Any]:
    rows = c.execute(sa.select(labels.c.id, labels.c.action, decisions.c.inputs)
                     .join(decisions, decisions.c.id == labels.c.decision_id)
                     .order_by(labels.c.id).limit(p.limit)).all()
    return {"labels": [{"id": r.id, "action": r.action, "inputs": orjson.Fragment(r.inputs)} for r in rows]}


