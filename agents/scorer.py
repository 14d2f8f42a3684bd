"""The ``score`` task: score an atom's new observations with its active weights.

It loops until the atom has nothing unscored, so observations that arrive while it works
are not left behind. Each observation is scored with its own host's readings just before
it in time as context (the windows its weights were trained on); every score is recorded under the
task's lease with the weights version that produced it.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from kiri.agents import alerts
from kiri.agents.alerts import AlertConfig
from kiri.agents.handlers import Handler, TaskContext, TaskError
from kiri.model.explain import blame, worst_first

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


def handler(sinks: AlertConfig) -> Handler:
    """The ``score`` task's handler, delivering alerts to ``sinks``."""
    return lambda ctx: score(ctx, sinks)


def score(ctx: TaskContext, sinks: AlertConfig) -> dict[str, Any]:
    if not ctx.atom:
        raise TaskError("a score task needs an atom", retry=False)
    hub = ctx.hub
    redeliver(hub, sinks)
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
        means, per, tail_ps, tokens = score_streams(sc, work["context"], work["observations"])
        calibrated = sc.calibration is not None
        # the batch's most unusual observation: lowest tail probability, else highest score
        i = (min(range(len(means)), key=lambda j: (tail_ps[j], -means[j])) if calibrated
             else max(range(len(means)), key=means.__getitem__))
        obs = work["observations"][i]
        toks = sc.schema.tokens(tokens[i])
        worst = {"observation_id": obs["id"], "time": obs["time"], "host": obs.get("host"),
                 "score": means[i], "threshold": sc.threshold,
                 "tail_p": tail_ps[i], "alarm_rate": nerve_rate(sc.alarm_rate, [
                     o for o in work["context"] + work["observations"] if o.get("host") == obs.get("host")], sinks),
                 "blame": blame(toks, per[i])}
        decision, payload = decide(ctx, worst, sinks)
        # scores and the decision on them are stored in one transaction: a kill loses neither
        res = hub.call("record_scores", {
            "task_id": ctx.task_id, "lease_token": ctx.lease_token, "atom": ctx.atom, "weights_id": weights_id,
            "threshold": sc.threshold, "decision": decision,
            **({"alarm_rate": sc.alarm_rate} if calibrated and sc.alarm_rate is not None else {}),
            "scores": [{"observation_id": o["id"], "score": m, "surprise": s,
                        **({"tail_p": p} if p is not None else {})}
                       for o, m, s, p in zip(work["observations"], means, per, tail_ps, strict=True)],
        })
        total += res["stored"]
        anomalous += res["anomalous"]
        actions[decision["action"]] = actions.get(decision["action"], 0) + 1
        act(hub, res["decision"], payload, sinks)
        ctx.progress(scored=total, anomalous=anomalous)
    return {"scored": total, "anomalous": anomalous, "weights_id": weights_id, "decisions": actions}


def score_streams(sc: Any, context: list[dict[str, Any]], observations: list[dict[str, Any]]
                  ) -> tuple[list[float], list[list[float]], list[float | None], list[list[int]]]:
    """Score ``observations`` stream by stream: each host's rows (its context and its new
    ones) in time order, so a host is judged against its own history, never a neighbour's.

    Returns, in the order of ``observations``: mean surprise, per-token surprise, tail
    probability (None for uncalibrated weights) and token ids. The context rows are scored
    too: their scores start each stream's sustained-unusualness mean.
    """
    from kiri.model.codec import values_of

    at = {o["id"]: i for i, o in enumerate(observations)}  # the new rows (context rows are not in it)
    n = len(observations)
    means: list[float] = [0.0] * n
    per: list[list[float]] = [[] for _ in range(n)]
    tail_ps: list[float | None] = [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    streams: dict[str | None, list[dict[str, Any]]] = {}
    for o in context + observations:
        streams.setdefault(o.get("host"), []).append(o)
    for rows in streams.values():
        rows.sort(key=lambda o: (o["time"], o["id"]))
        ids = sc.encode(values_of(sc.schema, [o["values"] for o in rows]))
        result = sc.score(ids)
        mean = result.mean
        start = next((j for j, o in enumerate(rows) if o["id"] in at), None)
        if start is None:
            continue
        tail = sc.tail_p(mean[start:], prefix=mean[:start].numpy())
        # whole columns to Python at once: a tensor indexed row by row costs microseconds a row
        mean_l, surprise_l, ids_l = mean.tolist(), result.surprise.tolist(), ids.tolist()
        tail_l = tail.tolist() if tail is not None else None
        for j in range(start, len(rows)):
            i = at.get(rows[j]["id"])
            if i is None:
                continue
            means[i] = mean_l[j]
            per[i] = surprise_l[j]
            tail_ps[i] = tail_l[j - start] if tail_l is not None else None
            tokens[i] = ids_l[j]
    return means, per, tail_ps, tokens


def nerve_rate(atom_rate: float | None, observations: list[dict[str, Any]], sinks: AlertConfig) -> float | None:
    """Alarms per decision the nerve's rule may raise on normal data: the owner's nerve
    budget (``--alarms-per-week``) at this atom's observation interval, else the atom's own
    rate (None for weights made before calibration, which keep the old rule)."""
    from kiri.model.calibrate import alarm_rate, typical_interval

    if atom_rate is None or sinks.alarms_per_week is None:
        return atom_rate
    return alarm_rate(sinks.alarms_per_week, typical_interval([o["time"] for o in observations]))


def decide(ctx: TaskContext, worst: dict[str, Any], sinks: AlertConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The nerve over every atom's latest score (this atom's worst new one): the decision to
    record, and what an alert about it would say."""
    import time

    from kiri.model.nerve import Nerve

    hub = ctx.hub
    state = hub.call("nerve_inputs")
    latest = {a: v["score"] for a, v in state["scores"].items()}
    thresholds = {a: v["threshold"] for a, v in state["scores"].items()}
    tail_ps = {a: v.get("tail_p") for a, v in state["scores"].items()}
    latest[ctx.atom] = worst["score"]
    thresholds[ctx.atom] = worst["threshold"]
    tail_ps[ctx.atom] = worst.get("tail_p")
    weights = _weights(hub, state["nerve"]["weights_id"]) if state["nerve"] is not None else None
    lt = time.localtime(worst["time"])
    d = Nerve(weights, thresholds=thresholds).decide(latest, lt.tm_hour + lt.tm_min / 60, lt.tm_wday,
                                                     tail_ps=tail_ps, alarm_rate=worst.get("alarm_rate"))
    scaled = {a: latest.get(a, 0.0) / max(thresholds.get(a, 1.0), 1e-9) for a in latest}
    decision = {
        "observation_id": worst["observation_id"],
        "inputs": d.inputs | {"thresholds": thresholds, "host": worst.get("host")},
        "action": d.action, "probs": d.probs, "policy": d.policy, "cooldown": sinks.cooldown,
        "stale": time.time() - worst["time"] > sinks.max_age,
        "retrain_atom": max(scaled, key=scaled.__getitem__) if scaled else ctx.atom,
    }
    payload = {"atom": ctx.atom, "host": worst.get("host"), "observation_id": worst["observation_id"],
               "time": worst["time"],
               "score": worst["score"], "threshold": worst["threshold"], "probs": d.probs, "policy": d.policy,
               "blame": worst_first(worst["blame"])}  # an alert names the worst tokens first
    return decision, payload


def act(hub: Any, recorded: dict[str, Any], payload: dict[str, Any], sinks: AlertConfig) -> None:
    """Deliver the alert the hub says to deliver (the hub applied the cool-down)."""
    alert = recorded.get("alert")
    if alert and alert["deliver"]:
        send(hub, {"alert_id": alert["id"], "decision_id": recorded["decision_id"], **payload}, sinks)


def send(hub: Any, payload: dict[str, Any], sinks: AlertConfig) -> None:
    outcome = alerts.deliver(payload, sinks)
    ok = len(outcome) == 1 or any(v == "sent" for k, v in outcome.items() if k != "log")
    hub.call("alert_result", {"alert_id": payload["alert_id"], "status": "sent" if ok else "failed",
                              "detail": json.dumps(outcome)})


def redeliver(hub: Any, sinks: AlertConfig) -> None:
    """Alerts whose scorer died between recording and delivering them: deliver them now."""
    for payload in hub.call("pending_alerts", {"older_than": 30.0})["alerts"]:
        log.warning("delivering alert %s left pending by a stopped scorer", payload["alert_id"])
        send(hub, payload, sinks)
