"""The ``score`` task: score an atom's new observations with its active weights.

It loops until the atom has nothing unscored, so observations that arrive while it works
are not left behind. Each observation is scored with the observations just before it as
context (the windows its weights were trained on); every score is recorded under the
task's lease with the weights version that produced it.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from kiri.agents.handlers import TaskContext, TaskError, handler

log = logging.getLogger("kiri.scorer")

_CACHE: dict[int, Any] = {}  # weights id -> loaded Weights (weights never change under an id)


def _weights(hub: Any, weights_id: int) -> Any:
    """Weights by id, downloaded and parsed once per agent process."""
    from kiri.model.weights import load_weights

    w = _CACHE.get(weights_id)
    if w is None:
        blob = hub.call("weights", {"weights_id": weights_id, "blob": True})["weights"][0]["blob"]
        w = _CACHE[weights_id] = load_weights(base64.b64decode(blob))
    return w


def _scorer(hub: Any, weights_id: int) -> Any:
    from kiri.model.score import Scorer

    return Scorer(_weights(hub, weights_id))


@handler("score")
def score(ctx: TaskContext) -> dict[str, Any]:
    import torch

    if not ctx.atom:
        raise TaskError("a score task needs an atom", retry=False)
    hub = ctx.hub
    redeliver(hub)
    total = anomalous = 0
    weights_id = None
    actions: dict[str, int] = {}
    while True:
        ctx.raise_if_stopping()
        work = hub.call("scoring_work", {"atom": ctx.atom, "limit": 2000, "context": 16})
        if work["weights"] is None:
            return {"scored": total, "skipped": "no active weights yet"}
        if not work["observations"]:
            break
        weights_id = work["weights"]["id"]
        sc = _scorer(hub, weights_id)
        context = work["context"][len(work["context"]) - sc.k:] if sc.k else []
        rows = [sc.schema.encode(o["values"]) for o in context + work["observations"]]
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), sc.schema.width)
        result = sc.score(ids, start=len(context))
        means = result.mean.tolist()
        per = result.surprise.tolist()
        i = max(range(len(means)), key=means.__getitem__)  # the batch's most surprising observation
        obs = work["observations"][i]
        toks = sc.schema.tokens(ids[len(context) + i].tolist())
        worst = {"observation_id": obs["id"], "time": obs["time"], "score": means[i], "threshold": sc.threshold,
                 "blame": sorted(({"token": t, "surprise": v} for t, v in zip(toks, per[i], strict=True)),
                                 key=lambda b: -b["surprise"])}
        decision, payload = decide(ctx, worst)
        # scores and the decision on them are stored in one transaction: a kill loses neither
        res = hub.call("record_scores", {
            "task_id": ctx.task_id, "lease_token": ctx.lease_token, "atom": ctx.atom, "weights_id": weights_id,
            "threshold": sc.threshold, "decision": decision,
            "scores": [{"observation_id": o["id"], "score": m, "surprise": s}
                       for o, m, s in zip(work["observations"], means, per, strict=True)],
        })
        total += res["stored"]
        anomalous += res["anomalous"]
        actions[decision["action"]] = actions.get(decision["action"], 0) + 1
        act(hub, res["decision"], payload)
        ctx.progress(scored=total, anomalous=anomalous)
    return {"scored": total, "anomalous": anomalous, "weights_id": weights_id, "decisions": actions}


def decide(ctx: TaskContext, worst: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The nerve over every atom's latest score (this atom's worst new one): the decision to
    record, and what an alert about it would say."""
    import time

    from kiri.agents import alerts
    from kiri.model.nerve import Nerve

    hub = ctx.hub
    state = hub.call("nerve_inputs")
    latest = {a: v["score"] for a, v in state["scores"].items()}
    thresholds = {a: v["threshold"] for a, v in state["scores"].items()}
    latest[ctx.atom] = worst["score"]
    thresholds[ctx.atom] = worst["threshold"]
    weights = _weights(hub, state["nerve"]["weights_id"]) if state["nerve"] is not None else None
    lt = time.localtime(worst["time"])
    d = Nerve(weights, thresholds=thresholds).decide(latest, lt.tm_hour + lt.tm_min / 60, lt.tm_wday)
    scaled = {a: latest.get(a, 0.0) / max(thresholds.get(a, 1.0), 1e-9) for a in latest}
    decision = {
        "observation_id": worst["observation_id"], "inputs": d.inputs | {"thresholds": thresholds},
        "action": d.action, "probs": d.probs, "policy": d.policy, "cooldown": alerts.CONFIG.cooldown,
        "stale": time.time() - worst["time"] > alerts.CONFIG.max_age,
        "retrain_atom": max(scaled, key=scaled.__getitem__) if scaled else ctx.atom,
    }
    payload = {"atom": ctx.atom, "observation_id": worst["observation_id"], "time": worst["time"],
               "score": worst["score"], "threshold": worst["threshold"], "blame": worst["blame"], "probs": d.probs,
               "policy": d.policy}
    return decision, payload


def act(hub: Any, recorded: dict[str, Any], payload: dict[str, Any]) -> None:
    """Deliver the alert the hub says to deliver (the hub applied the cool-down)."""
    alert = recorded.get("alert")
    if alert and alert["deliver"]:
        send(hub, {"alert_id": alert["id"], "decision_id": recorded["decision_id"], **payload})


def send(hub: Any, payload: dict[str, Any]) -> None:
    from kiri.agents import alerts

    outcome = alerts.deliver(payload)
    ok = len(outcome) == 1 or any(v == "sent" for k, v in outcome.items() if k != "log")
    hub.call("alert_result", {"alert_id": payload["alert_id"], "status": "sent" if ok else "failed",
                              "detail": json.dumps(outcome)})


def redeliver(hub: Any) -> None:
    """Alerts whose scorer died between recording and delivering them: deliver them now."""
    for payload in hub.call("pending_alerts", {"older_than": 30.0})["alerts"]:
        log.warning("delivering alert %s left pending by a stopped scorer", payload["alert_id"])
        send(hub, payload)
