"""Detection quality: train each atom on a clean synthetic week, score a held-out week with
injected anomalies, and report precision / recall / F1 at each atom's own default threshold
(computed from its training scores at training time, never from the labels).

Per class, precision counts every false alarm on normal observations against that class
(other classes' observations are left out); "overall" treats every class as positive.
"incidents" is event-level recall: an anomaly event counts as caught when any of its
observations is flagged (an owner gets one alert per incident, not one per reading).
The last table is the nerve's fallback rule on the summed scores of all three atoms,
evaluated at pulse's timestamps: the only place a cross-domain anomaly can show.

    python bench/quality.py [--steps 500] [--seed 0]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import bisect

import click
import torch

from kiri.model import schema as S
from kiri.model import synth
from kiri.model.nerve import Nerve
from kiri.model.score import Scorer
from kiri.model.train import TrainConfig, Trainer
from kiri.model.weights import load_weights
from kiri.model.windows import encode_many

ANOMALIES = {"spike": 6, "busy_idle_owner": 4, "night_activity": 3, "overload": 3}


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def incidents(flagged: list[bool], labels: list[str | None], cls: str) -> tuple[int, int]:
    """(caught, total) runs of consecutive observations labelled ``cls``."""
    caught = total = 0
    i = 0
    while i < len(labels):
        if labels[i] == cls or (cls == "overall" and labels[i] is not None):
            j = i
            while j < len(labels) and labels[j] == labels[i]:
                j += 1
            total += 1
            caught += any(flagged[i:j])
            i = j
        else:
            i += 1
    return caught, total


def report(title: str, flagged: list[bool], labels: list[str | None]) -> None:
    fp = sum(1 for f, lab in zip(flagged, labels, strict=True) if f and lab is None)
    print(f"\n{title}  ({len(labels)} observations, {sum(lab is not None for lab in labels)} anomalous, "
          f"{fp} false alarms)")
    print(f"  {'class':18s} {'n':>5s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'incidents':>10s}")
    classes = sorted({lab for lab in labels if lab})
    for c in [*classes, "overall"]:
        pos = [(lab == c) if c != "overall" else lab is not None for lab in labels]
        tp = sum(1 for f, p in zip(flagged, pos, strict=True) if f and p)
        fn = sum(1 for f, p in zip(flagged, pos, strict=True) if not f and p)
        p, r, f1 = prf(tp, fp, fn)
        caught, total = incidents(flagged, labels, c)
        print(f"  {c:18s} {sum(pos):5d} {p:9.3f} {r:7.3f} {f1:6.3f} {f'{caught}/{total}':>10s}")


@click.command()
@click.option("--steps", default=500, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(steps: int, seed: int) -> None:
    torch.set_num_threads(1)
    train_world = synth.world(7, seed=seed)
    test_start = synth.EPOCH + 7 * synth.DAY
    test_world = synth.world(7, seed=seed + 1, start=test_start, anomalies=ANOMALIES)
    scores: dict[str, tuple[list[float], list[float]]] = {}
    thresholds: dict[str, float] = {}
    for atom in ("pulse", "rhythm", "drift"):
        schema = S.get(atom)
        t = Trainer(schema, encode_many(schema, train_world[atom].rows), TrainConfig(steps=steps, seed=seed))
        t.run()
        scorer = Scorer(load_weights(t.weights_bytes()))
        series = test_world[atom]
        r = scorer.score(encode_many(schema, series.rows))
        flagged = (r.mean > scorer.threshold).tolist()
        report(f"{atom}: threshold {scorer.threshold:.2f} nats, final loss {t.last_loss:.3f}", flagged,
               series.labels)
        scores[atom] = (series.times, r.mean.tolist())
        thresholds[atom] = scorer.threshold
    nerve = Nerve(thresholds=thresholds)
    pulse = test_world["pulse"]
    flagged = []
    labels = []
    for t, lab in zip(pulse.times, pulse.labels, strict=True):
        latest = {}
        for atom, (times, vals) in scores.items():
            i = bisect.bisect_right(times, t) - 1
            latest[atom] = vals[i] if i >= 0 else 0.0
        hour, weekday = synth._clock(t)
        flagged.append(nerve.decide(latest, hour, weekday).action == "alert")
        # the moment is anomalous if any atom is inside an anomaly window
        labels.append(lab or next((s.labels[bisect.bisect_right(s.times, t) - 1] for a, s in test_world.items()
                                   if a != "pulse" and s.labels[bisect.bisect_right(s.times, t) - 1]), None))
    report("nerve fallback rule (sum of threshold-scaled scores >= 1), at pulse's timestamps", flagged, labels)


if __name__ == "__main__":
    main()
