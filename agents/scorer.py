"""The ``score`` task: score an atom's new observations with its active weights.

It loops until the atom has nothing unscored, so observations that arrive while it works
are not left behind. Each observation is scored with the observations just before it as
context (the windows its weights were trained on); every score is recorded under the
task's lease with the weights version that produced it.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from kiri.agents.handlers import TaskContext, TaskError, handler

log = logging.getLogger("kiri.scorer")

_CACHE: dict[int, Any] = {}  # weights id -> Scorer (weights never change under an id)


def _scorer(hub: Any, weights_id: int) -> Any:
    from kiri.model.score import Scorer
    from kiri.model.weights import load_weights

    sc = _CACHE.get(weights_id)
    if sc is None:
        w = hub.call("weights", {"weights_id": weights_id, "blob": True})["weights"][0]
        sc = _CACHE[weights_id] = Scorer(load_weights(base64.b64decode(w["blob"])))
    return sc


@handler("score")
def score(ctx: TaskContext) -> dict[str, Any]:
    import torch

    if not ctx.atom:
        raise TaskError("a score task needs an atom", retry=False)
    hub = ctx.hub
    total = anomalous = 0
    weights_id = None
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
        res = hub.call("record_scores", {
            "task_id": ctx.task_id, "lease_token": ctx.lease_token, "atom": ctx.atom, "weights_id": weights_id,
            "threshold": sc.threshold,
            "scores": [{"observation_id": o["id"], "score": m, "surprise": s}
                       for o, m, s in zip(work["observations"], means, per, strict=True)],
        })
        total += res["stored"]
        anomalous += res["anomalous"]
        ctx.progress(scored=total, anomalous=anomalous)
    return {"scored": total, "anomalous": anomalous, "weights_id": weights_id}
