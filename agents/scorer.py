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
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from kiri.agents import alerts
from kiri.agents.alerts import AlertConfig
from kiri.agents.handlers import Handler, TaskContext, TaskError
from kiri.model.explain import blame, worst_first

log = logging.getLogger("kiri.scorer")

# weights id -> loaded Weights, newest use last (weights never change under an id); a few
# kept, so a scorer that lives through months of retrains does not keep every version
_CACHE: OrderedDict[int, Any] = OrderedDict()
CACHED_WEIGHTS = 8
_SCORERS: dict[str, tuple[int, Any]] = {}  # atom -> (weights id, its Scorer, which remembers windows)


def _weights(hub: Any, weights_id: int) -> Any:
    """Weights by id, downloaded and parsed once while they are in use."""
    from kiri.model.weights import load_weights

    w = _CACHE.get(weights_id)
    if w is None:
        blob = hub.call("weights", {"weights_id": weights_id, "blob": True})["weights"][0]["blob"]
        w = _CACHE[weights_id] = load_weights(base64.b64decode(blob))
        while len(_CACHE) > CACHED_WEIGHTS:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(weights_id)
    return w


def _scorer(hub: Any, atom: str, weights_id: int) -> Any:
    """The atom's Scorer for these weights, kept from batch to batch and task to task: it
    remembers the windows it has scored (``Scorer._surprise``), and a backfill's batches
    repeat most of them."""
    from kiri.model.score import Scorer

    got = _SCORERS.get(atom)
    if got is None or got[0] != weights_id:
        got = _SCORERS[atom] = (weights_id, Scorer(_weights(hub, weights_id)))
    return got[1]


def handler(sinks: AlertConfig) -> Handler:
    """The ``score`` task's handler, delivering alerts to ``sinks``."""
    return lambda ctx: score(ctx, sinks)


def columns(rows: Any) -> dict[str, list[Any]]:
    """Readings as columns (id, time, host, values), whether the hub sent columns or, as
    hubs before columns did, one object per reading."""
    if isinstance(rows, dict):
        return rows
    return {"id": [o["id"] for o in rows], "time": [o["time"] for o in rows],
            "host": [o.get("host") for o in rows], "values": [o["values"] for o in rows]}


def score(ctx: TaskContext, sinks: AlertConfig) -> dict[str, Any]:
    """Score batch after batch until the atom has nothing unscored.

    Pipelined three deep: while this thread scores one batch, the hub hands out the next
    (asked for by id, ``after_id``, before this one is scored: a fetcher thread) and stores
    the one before (a recorder thread), all on the same connection. So the hub never waits
    for the scorer and the scorer rarely for the hub. At most one batch is being stored, and
    it is stored before the next batch's decision reads the nerve's inputs, so every
    decision sees the scores before it.
    """
    if not ctx.atom:
        raise TaskError("a score task needs an atom", retry=False)
    hub = ctx.hub
    redeliver(hub, sinks)
    totals = {"scored": 0, "anomalous": 0}
    weights_id = None
    actions: dict[str, int] = {}

    def fetch(after: int) -> dict[str, Any]:
        return hub.call("scoring_work", {"atom": ctx.atom, "limit": BATCH, "context": 16, "columns": True,
                                         "after_id": after})

    def store(params: dict[str, Any], payload: dict[str, Any]) -> None:
        # scores and the decision on them are stored in one transaction: a kill loses neither
        res = hub.call("record_scores", params)
        totals["scored"] += res["stored"]
        totals["anomalous"] += res["anomalous"]
        act(hub, res["decision"], payload, sinks)

    with ThreadPoolExecutor(1, thread_name_prefix="kiri-record") as recorder, \
            ThreadPoolExecutor(1, thread_name_prefix="kiri-fetch") as fetcher:
        pending: Future[None] | None = None
        coming: Future[dict[str, Any]] = fetcher.submit(fetch, 0)
        try:
            while True:
                ctx.raise_if_stopping()
                work = coming.result()
                if work["weights"] is None:
                    if pending is not None:
                        pending.result()
                    return {"scored": totals["scored"], "skipped": "no active weights yet"}
                new, context = columns(work["observations"]), columns(work["context"])
                if not new["id"]:
                    break
                coming = fetcher.submit(fetch, max(new["id"]))  # the next batch, while this one is scored
                weights_id = work["weights"]["id"]
                sc = _scorer(hub, ctx.atom, weights_id)
                means, per, tail_ps, tokens = score_streams(sc, context, new)  # while the last batch is stored
                if pending is not None:
                    pending.result()  # raises what storing it raised (a lost lease ends the task)
                    ctx.progress(**totals)
                params, payload = _batch(ctx, sinks, sc, weights_id, context, new, means, per, tail_ps, tokens,
                                         actions)
                pending = recorder.submit(store, params, payload)
            if pending is not None:
                pending.result()
                ctx.progress(**totals)
        finally:
            coming.cancel()
    return {**totals, "weights_id": weights_id, "decisions": actions}


def _batch(ctx: TaskContext, sinks: AlertConfig, sc: Any, weights_id: int, context: dict[str, list[Any]],
           new: dict[str, list[Any]], means: np.ndarray, per: np.ndarray, tail_ps: np.ndarray, tokens: np.ndarray,
           actions: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A scored batch's ``record_scores`` parameters, with the nerve's decision on its most
    unusual reading, and what an alert about it would say."""
    calibrated = sc.calibration is not None
    # the batch's most unusual observation: lowest tail probability, else highest score
    i = int(np.lexsort((-means, tail_ps))[0]) if calibrated else int(np.argmax(means))
    host = new["host"][i]
    worst = {"observation_id": new["id"][i], "time": new["time"][i], "host": host,
             "score": float(means[i]), "threshold": sc.threshold,
             "tail_p": float(tail_ps[i]) if calibrated else None,
             "alarm_rate": nerve_rate(sc.alarm_rate, [
                 t for t, h in zip(context["time"] + new["time"], context["host"] + new["host"],
                                   strict=True) if h == host], sinks),
             "blame": blame(sc.schema.tokens(tokens[i].tolist()), per[i].tolist())}
    decision, payload = decide(ctx, worst, sinks)
    actions[decision["action"]] = actions.get(decision["action"], 0) + 1
    params = {
        "task_id": ctx.task_id, "lease_token": ctx.lease_token, "atom": ctx.atom, "weights_id": weights_id,
        "threshold": sc.threshold, "decision": decision,
        **({"alarm_rate": sc.alarm_rate} if calibrated and sc.alarm_rate is not None else {}),
        "columns": {"observation_id": new["id"], "score": means, "width": per.shape[1],
                    "surprise": np.round(per.reshape(-1), SURPRISE_DECIMALS),
                    **({"tail_p": tail_ps} if calibrated else {})},
    }
    return params, payload


BATCH = 5000  # observations per scoring_work: the most record_scores takes in one call
# Per-token surprise is stored for blame, which shows a tenth of a nat: four decimals keep
# every figure anyone reads and halve the stored text (a score row is a fifth smaller, and a
# backfill's inserts about as much faster). Scores and tail probabilities keep full precision.
SURPRISE_DECIMALS = 4


def score_streams(sc: Any, context: dict[str, list[Any]], new: dict[str, list[Any]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score the ``new`` readings stream by stream: each host's rows (its context and its new
    ones) in time order, so a host is judged against its own history, never a neighbour's.

    Returns, in the order of ``new``: mean surprise [n], per-token surprise [n, F], tail
    probability [n] (NaN for uncalibrated weights) and token ids [n, F]. The context rows are
    scored too: their scores start each stream's sustained-unusualness mean.
    """
    from kiri.model.codec import values_of

    n, f = len(new["id"]), sc.schema.width
    means = np.zeros(n)
    per = np.zeros((n, f))
    tail_ps = np.full(n, np.nan)
    tokens = np.zeros((n, f), dtype=np.int64)
    ids = np.array(context["id"] + new["id"], dtype=np.int64)
    times = np.array(context["time"] + new["time"], dtype=np.float64)
    hosts = context["host"] + new["host"]
    values = values_of(sc.schema, context["values"] + new["values"])
    is_new = np.arange(len(ids)) >= len(context["id"])  # position in new: index - len(context)
    for host in dict.fromkeys(hosts):
        rows = np.array([k for k, h in enumerate(hosts) if h == host], dtype=np.int64)
        rows = rows[np.lexsort((ids[rows], times[rows]))]  # the stream in (time, id) order
        fresh = is_new[rows]
        if not fresh.any():
            continue
        start = int(np.argmax(fresh))
        tok = sc.encode(values[rows])
        result = sc.score(tok, values=values[rows])
        mean = result.mean.numpy()
        tail = sc.tail_p(mean[start:], prefix=mean[:start])
        at = rows[start:][fresh[start:]] - len(context["id"])  # where this stream's new rows go
        means[at] = mean[start:][fresh[start:]]
        per[at] = result.surprise.numpy()[start:][fresh[start:]]
        tokens[at] = tok.numpy()[start:][fresh[start:]]
        if tail is not None:
            tail_ps[at] = tail[fresh[start:]]
    return means, per, tail_ps, tokens


def nerve_rate(atom_rate: float | None, times: list[float], sinks: AlertConfig) -> float | None:
    """Alarms per decision the nerve's rule may raise on normal data: the owner's nerve
    budget (``--alarms-per-week``) at this atom's observation interval, else the atom's own
    rate (None for weights made before calibration, which keep the old rule). ``times``: the
    deciding stream's readings."""
    from kiri.model.calibrate import alarm_rate, typical_interval

    if atom_rate is None or sinks.alarms_per_week is None:
        return atom_rate
    return alarm_rate(sinks.alarms_per_week, typical_interval(times))


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
    """Deliver to every sink and record the outcome: ``sent`` when every sink delivered,
    ``partial`` when some failed, ``failed`` when all did (the detail says which), so a
    broken sink is seen, not assumed sent. (With no sink configured, the log is the sink.)"""
    outcome = alerts.deliver(payload, sinks)
    real = {k: v for k, v in outcome.items() if k != "log"} or outcome
    ok = [v == "sent" for v in real.values()]
    status = "sent" if all(ok) else "partial" if any(ok) else "failed"
    hub.call("alert_result", {"alert_id": payload["alert_id"], "status": status, "detail": json.dumps(outcome)})


def redeliver(hub: Any, sinks: AlertConfig) -> None:
    """Alerts whose scorer died between recording and delivering them: deliver them now."""
    for payload in hub.call("pending_alerts", {"older_than": 30.0})["alerts"]:
        log.warning("delivering alert %s left pending by a stopped scorer", payload["alert_id"])
        send(hub, payload, sinks)
