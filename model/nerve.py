"""The nerve: reads every atom's latest score (plus hour and weekday) and picks an action.

It learns only from the owner's labels. KIRI trained its nerve on its own past decisions,
which only teaches it to agree with itself; here the training examples are human feedback,
full stop. Until there are ``min_labels`` of them the nerve uses a documented rule on the
summed scores, each scaled by its atom's own threshold:

    alert   if  pulse/t_pulse + rhythm/t_rhythm + drift/t_drift >= 1
    ok      otherwise

so one atom past its threshold alerts, and so do several atoms each part of the way there.
An atom with no known threshold uses ``alert_sum`` (4.0 nats). Missing scores count as 0
(nothing surprising seen yet).

That rule is what weights from before calibration get. When every atom with a score also
has a calibrated tail probability, the rule is instead

    alert   if  combine(p_pulse, p_rhythm, p_drift) < alarm rate

(``calibrate.combine``: Fisher's method for several atoms each somewhat unusual, Bonferroni
on the smallest for one very unusual): two ordinary highs, which the scaled sum added up
to an alarm, stay ordinary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiri.model.calibrate import combine
from kiri.model.schema import NERVE, NERVE_ACTIONS, NERVE_INPUTS
from kiri.model.train import TrainConfig, Trainer
from kiri.model.weights import Weights, load_weights

INPUT_ATOMS = NERVE_INPUTS


@dataclass(frozen=True)
class Label:
    """One owner-labelled example: the inputs a decision saw, and the right action."""

    scores: Mapping[str, float]
    hour: float
    weekday: float
    action: str
    thresholds: Mapping[str, float] | None = None  # the atoms' thresholds when it was decided


@dataclass(frozen=True)
class Decision:
    action: str
    probs: dict[str, float]
    policy: str  # "rule:alert_sum=4.0" or "model:<weights hash prefix>"
    inputs: dict[str, float]


def state_ids(scores: Mapping[str, float], hour: float, weekday: float) -> list[int]:
    obs = {a: float(scores.get(a, 0.0)) for a in INPUT_ATOMS}
    obs.update(hour=hour, weekday=weekday)
    return NERVE.encode(obs)


def _examples(labels: Sequence[Label]) -> torch.Tensor:
    actions = NERVE.action_ids()
    rows = []
    for lab in labels:
        if lab.action not in NERVE_ACTIONS:
            raise ValueError(f"label action {lab.action!r} is not one of {', '.join(NERVE_ACTIONS)}")
        rows.append([0, *state_ids(lab.scores, lab.hour, lab.weekday), actions[NERVE_ACTIONS.index(lab.action)]])
    return torch.tensor(rows, dtype=torch.long)


def train(labels: Sequence[Label], steps: int = 300, seed: int = 0) -> bytes:
    """Nerve weights learned from human labels only."""
    if not labels:
        raise ValueError("the nerve needs at least one human label to train")
    ex = _examples(labels)
    states = ex[:, 1:-1]
    cfg = TrainConfig(steps=steps, batch_size=min(64, len(ex)), seed=seed, context=0)
    t = Trainer(NERVE, states, cfg, examples=ex, predict=1)
    t.run()
    return t.weights_bytes({"labels": len(labels)})


def fold_check(labels: Sequence[Label], steps: int = 300, seed: int = 0, folds: int = 5) -> dict[str, Any]:
    """Cross-validate a learned nerve against the rule it replaces, on the owner's own labels.

    The promise a learned nerve must keep before it is trusted: on held-out labels, it
    alerts on at least as many of the incidents the owner wanted alerted as the rule does,
    and on no more of the readings the owner wanted left alone. Each fold trains on the
    other folds' labels only.
    """
    folds = max(2, min(folds, len(labels) // 2))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {i: k % folds for k, i in enumerate(order)}
    approved = {"learned": 0, "rule": 0, "n": 0}
    dismissed = {"learned": 0, "rule": 0, "n": 0}
    for f in range(folds):
        train_on = [lab for i, lab in enumerate(labels) if fold_of[i] != f]
        held = [lab for i, lab in enumerate(labels) if fold_of[i] == f]
        if not train_on or not held:
            continue
        learned = Nerve(train(train_on, steps=steps, seed=seed), min_labels=0)
        for lab in held:
            mine = learned.decide(lab.scores, lab.hour, lab.weekday).action == "alert"
            known = {a: float(v) for a, v in (lab.thresholds or {}).items() if isinstance(v, int | float)}
            rule = Nerve(None, thresholds=known).decide(lab.scores, lab.hour, lab.weekday).action == "alert"
            bucket = approved if lab.action == "alert" else dismissed if lab.action == "ok" else None
            if bucket is not None:
                bucket["n"] += 1
                bucket["learned"] += int(mine)
                bucket["rule"] += int(rule)
    passed = approved["learned"] >= approved["rule"] and dismissed["learned"] <= dismissed["rule"]
    reason = (f"held-out labels, {folds} folds: alerts on approved incidents {approved['learned']} "
              f"(rule {approved['rule']} of {approved['n']}), on dismissed readings {dismissed['learned']} "
              f"(rule {dismissed['rule']} of {dismissed['n']}): "
              + ("keeps the promise" if passed else "would alert less on what you approved or more on what "
                                                    "you dismissed; the rule stays"))
    return {"approved": approved, "dismissed": dismissed, "folds": folds, "passed": passed, "reason": reason}


class Nerve:
    def __init__(self, weights: bytes | Weights | None = None, *, min_labels: int = 20,
                 alert_sum: float = 4.0, thresholds: Mapping[str, float] | None = None) -> None:
        self.weights = load_weights(weights) if isinstance(weights, bytes | bytearray) else weights
        if self.weights is not None and self.weights.schema.name != "nerve":
            raise ValueError("nerve weights expected, got weights for atom " + self.weights.schema.name)
        self.min_labels = min_labels
        self.alert_sum = alert_sum
        self.thresholds = {a: float((thresholds or {}).get(a, alert_sum)) for a in INPUT_ATOMS}

    @property
    def learned(self) -> bool:
        return self.weights is not None and int(self.weights.info.get("labels", 0)) >= self.min_labels

    def decide(self, scores: Mapping[str, float], hour: float, weekday: float,
               tail_ps: Mapping[str, float | None] | None = None, alarm_rate: float | None = None) -> Decision:
        inputs = {a: float(scores.get(a, 0.0)) for a in INPUT_ATOMS} | {"hour": hour, "weekday": weekday}
        ps = [tail_ps.get(a) for a in INPUT_ATOMS if a in scores] if tail_ps else []
        if not self.learned and alarm_rate and ps and all(p is not None for p in ps):
            combined = combine([float(p) for p in ps if p is not None])
            p_alert = alarm_rate / (alarm_rate + combined)
            probs = {"ok": 1.0 - p_alert, "alert": p_alert, "suppress": 0.0, "retrain": 0.0}
            action = "alert" if combined < alarm_rate else "ok"
            return Decision(action, probs, "rule:combined_tail_p<rate",
                            inputs | {"tail_p": combined, "alarm_rate": alarm_rate})
        if not self.learned:
            total = sum(inputs[a] / self.thresholds[a] for a in INPUT_ATOMS)
            p_alert = 1.0 / (1.0 + math.exp(-(total - 1.0) * 16.0))
            probs = {"ok": 1.0 - p_alert, "alert": p_alert, "suppress": 0.0, "retrain": 0.0}
            action = "alert" if total >= 1.0 else "ok"
            return Decision(action, probs, "rule:scaled_sum>=1", inputs)
        assert self.weights is not None
        x = torch.tensor([[0, *state_ids(scores, hour, weekday)]], dtype=torch.long)
        with torch.inference_mode():
            logits = self.weights.model(x, last=1)[0, -1]
        p = torch.softmax(logits[NERVE.action_ids()], dim=-1).tolist()
        probs = dict(zip(NERVE_ACTIONS, p, strict=True))
        action = max(probs, key=probs.__getitem__)
        return Decision(action, probs, f"model:{self.weights.hash[:12]}", inputs)
