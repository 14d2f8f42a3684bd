"""Detection quality at kiri's own thresholds (its defaults, no labels), beside the best threshold.

Two parts, each over several seeds:

1. **Single streams** (``kiri.model.streams``: seasonal, level shifts, slow drift, heavy
   tails, plateaus, integer counts; point, contextual and collective anomalies). A detector
   learns from the first 15% (at most 750 rows), which holds 0/2/5/10% anomalies, and then
   scores the rest as a running hub would (retraining daily). An event is caught when an
   alarm falls inside it or within ``--late`` observations after; precision is the share of
   alarms that fall there. The anomaly-free alarm rate comes from the same streams with no
   anomalies at all, against the alarm budget, beside how calibrated their tail
   probabilities are (on normal data the share under p is p).
2. **Composition**: pulse and rhythm over a week of 5-minute observations, one atom each,
   trained on a week (clean, or with anomalies left in), judged on the next with 150
   injected anomalies: pulse wildly off, rhythm off (activity when the owner sleeps), and
   both mildly off (daytime load and some activity at night: each plausible alone). The
   decision is the nerve's fallback rule (``calibrate.combine`` of both atoms' tail
   probabilities against the nerve's budget).

"before" is kiri's defaults before calibrated detection (``before()``: equal-width buckets,
500 steps, threshold max(1.5, 2·p99), the scaled-sum nerve rule), run in the same process.

"best F1" sweeps every threshold over the same scores: the gap between it and F1 is what
kiri's own threshold gives away ("separates" versus "decides").

``--why`` also prints, per atom of the composition, its false alarms (how many follow an
injected anomaly: a missed anomaly whose end is flagged) and how many buckets its last
codec gives each field (a field whose fitted cuts collide gets fewer than its schema's),
and per seed the nerve rule's false alarms and misses per class: which seeds carry a mean.

    python bench/detect.py [--seeds 3] [--quick] [--part composition --why]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import time
from collections import defaultdict

import click
import numpy as np
import torch

from kiri.model import calibrate as cal
from kiri.model import schema as S
from kiri.model import streams, synth
from kiri.model.codec import Codec, values_of
from kiri.model.detect import Detector, schema_for
from kiri.model.score import Scorer
from kiri.model.train import TrainConfig, Trainer

WEEK = 7 * 86400.0


def before(schema: S.AtomSchema, learn: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kiri's defaults before calibrated detection, for the before/after columns: the schema's
    equal-width buckets, 500 steps, the longest context that fits, a random 20% hold-out,
    threshold max(1.5, 2 x p99 of held-out scores), verdict score > threshold, no retraining.

    Returns (score / threshold, flags).
    """
    k = schema.max_context()
    codec = Codec.fixed(schema)
    t = Trainer(schema, codec.encode(learn), TrainConfig(steps=500, trim=0.0, context=k), split="random")
    t.run()
    sc = Scorer.from_model(schema, t.model, k)
    held = sc.score(codec.encode(learn)).mean[t.held] if len(t.held) >= 200 else sc.score(codec.encode(learn)).mean
    p99 = float(torch.quantile(held.float(), 0.99)) if len(held) else 0.0
    threshold = max(1.5, 2.0 * p99)
    ids = codec.encode(np.concatenate([learn[len(learn) - k:], test])) if k else codec.encode(test)
    score = sc.score(ids, start=k if k else 0).mean.numpy()
    return score / threshold, score > threshold


def prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def event_scores(flag: np.ndarray, events: list[tuple[int, int, str]], late: int) -> dict[str, list[int]]:
    """Per class [caught, total], and overall [alarms inside events, alarms] (index "alarms")."""
    inside = np.zeros(len(flag), dtype=bool)
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s, e, kind in events:
        inside[s: min(len(flag), e + late)] = True
        caught = bool(flag[s: min(len(flag), e + late)].any())
        out[kind][0] += caught
        out[kind][1] += 1
    out["alarms"] = [int((flag & inside).sum()), int(flag.sum())]
    return out


def f1_of(counts: dict[str, list[int]], cls: str | None = None) -> tuple[float, float, float]:
    good, alarms = counts["alarms"]
    keys = [k for k in counts if k != "alarms" and (cls is None or k == cls)]
    caught = sum(counts[k][0] for k in keys)
    total = sum(counts[k][1] for k in keys)
    p = good / alarms if alarms else (1.0 if total == 0 else 0.0)
    r = caught / total if total else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def best_f1(stat: np.ndarray, events: list[tuple[int, int, str]], late: int) -> float:
    """The best event F1 over every threshold on ``stat`` (higher = more anomalous)."""
    cands = np.unique(np.quantile(stat, np.linspace(0.9, 1.0, 60)))
    best = 0.0
    for c in cands:
        best = max(best, f1_of(event_scores(stat >= c, events, late))[2])
    return best


def single_streams(seeds: int, contaminations: list[float], n: int, late: int, kinds: list[str]) -> None:
    print(f"\n== single streams: {len(kinds)} kinds x {seeds} seeds, {n} observations at 5 min, "
          f"learning on the first {streams.learn_size(n)}; budget {cal.DEFAULT_ALARMS_PER_WEEK:g} alarms/week ==")
    print(f"{'training':>12s} {'kiri':>6s} {'class':>11s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'best F1':>8s}")
    learn = streams.learn_size(n)
    for c in contaminations:
        totals: dict[str, dict[str, list[int]]] = {w: defaultdict(lambda: [0, 0]) for w in ("before", "now")}
        bests: dict[str, list[float]] = {"before": [], "now": []}
        for seed in range(seeds):
            for kind in kinds:
                st = streams.generate(kind, n=n, seed=seed, learn=learn, contamination=c)
                det = Detector(interval=st.interval, seed=seed).fit(st.values[:learn])
                r = det.score(st.values[learn:])
                ev = [(s - learn, e - learn, k) for s, e, k in st.events() if s >= learn]
                ratio, old_flags = before(schema_for(st.values[:learn].reshape(-1, 1)),
                                          st.values[:learn].reshape(-1, 1), st.values[learn:].reshape(-1, 1))
                for who, flags, stat in (("now", r.anomalous, -np.log(r.tail_p)), ("before", old_flags, ratio)):
                    for k, v in event_scores(flags, ev, late).items():
                        totals[who][k][0] += v[0]
                        totals[who][k][1] += v[1]
                    bests[who].append(best_f1(stat, ev, late))
        label = f"{c:.0%} anom."
        for who in ("before", "now"):
            for cls in [*streams.ANOMALIES, None]:
                p, rr, f = f1_of(totals[who], cls)
                extra = f"{np.mean(bests[who]):8.3f}" if cls is None else ""
                print(f"{label:>12s} {who:>6s} {cls or 'overall':>11s} {p:9.3f} {rr:7.3f} {f:6.3f} {extra}")
    # anomaly-free alarm rate against the budget
    alarms: dict[str, float] = defaultdict(float)
    per_kind: dict[str, float] = defaultdict(float)
    tails: dict[str, list[np.ndarray]] = defaultdict(list)
    weeks = 0.0
    for seed in range(seeds):
        for kind in kinds:
            st = streams.generate(kind, n=n, seed=100 + seed, anomalies=0)
            det = Detector(interval=st.interval, seed=seed).fit(st.values[:learn])
            r = det.score(st.values[learn:])
            _, old_flags = before(schema_for(st.values[:learn].reshape(-1, 1)), st.values[:learn].reshape(-1, 1),
                                  st.values[learn:].reshape(-1, 1))
            alarms["now"] += int(r.anomalous.sum())
            alarms["before"] += int(old_flags.sum())
            per_kind[kind] += int(r.anomalous.sum())
            tails[kind].append(r.tail_p)
            weeks += (n - learn) * st.interval / WEEK
    for who in ("before", "now"):
        print(f"anomaly-free, {who}: {alarms[who] / weeks:.2f} alarms/week (budget {cal.DEFAULT_ALARMS_PER_WEEK:g}; "
              f"{int(alarms[who])} alarms in {weeks:.1f} stream-weeks)")
    print("  now, per kind (alarms/week): " + ", ".join(f"{k} {v / (weeks / len(kinds)):.1f}"
                                                       for k, v in per_kind.items()))
    # calibration: on normal data a tail probability is uniform, so the share under p is p
    levels = (0.1, 0.01, 0.001)
    print("  calibration, share of readings whose tail probability is under " + " / ".join(f"{p:g}" for p in levels)
          + " (uniform: the same):")
    for kind, ps in tails.items():
        allp = np.concatenate(ps)
        print(f"    {kind:>11s} " + " / ".join(f"{float((allp < p).mean()):.4f}" for p in levels))


# --- composition --------------------------------------------------------------------------

COMPOSITION = ("pulse_wild", "rhythm_off", "both_mild")
TOUCHES = {"pulse_wild": ("pulse",), "rhythm_off": ("rhythm",), "both_mild": ("pulse", "rhythm")}  # atoms changed


def _asleep(t: float) -> bool:
    """The synthetic owner's sleeping hours (synth's rhythm: awake 8-23 on workdays, 10-24 at weekends)."""
    h, w = synth._clock(t)
    return not ((8 <= h < 23) if w < 5 else (10 <= h < 24))


def compose(seed: int, n_each: int, start: float) -> tuple[dict[str, synth.Series], list[str | None]]:
    """A week of pulse and rhythm at 5 minutes, with n_each single-reading anomalies per class."""
    pulse = synth.generate("pulse", 7, seed=seed, start=start, interval=300.0, event_list=[])
    rhythm = synth.generate("rhythm", 7, seed=seed, start=start, interval=300.0, event_list=[])
    rng = np.random.default_rng([seed, 99])
    n = len(pulse.rows)
    labels: list[str | None] = [None] * n
    nights = [i for i in range(n) if _asleep(pulse.times[i])]
    for cls in COMPOSITION:
        pool = nights if cls != "pulse_wild" else list(range(n))
        placed = tries = 0
        while placed < n_each:
            tries += 1
            if tries > 100_000:
                raise RuntimeError(f"cannot place {n_each} {cls} anomalies apart in a week")
            i = int(pool[rng.integers(0, len(pool))])
            if any(labels[j] for j in range(max(0, i - 1), min(n, i + 2))):
                continue
            labels[i] = cls
            placed += 1
            p, r = pulse.rows[i], rhythm.rows[i]
            if cls == "pulse_wild":
                p.update(cpu=rng.uniform(95, 100), mem=rng.uniform(92, 99), swap=rng.uniform(85, 100),
                         load=rng.uniform(17, 20))
            elif cls == "rhythm_off":
                r.update(activity=rng.uniform(40, 60), idle=rng.uniform(0, 30))
            else:  # each plausible alone (afternoon load; an evening's light use), never together at night
                p.update(cpu=rng.uniform(40, 50), load=rng.uniform(3.5, 4.5))
                r.update(activity=rng.uniform(8, 16), idle=rng.uniform(400, 900))
    return {"pulse": pulse, "rhythm": rhythm}, labels


def why(atom: str, det: Detector, tail_p: np.ndarray, lab: np.ndarray, late: int) -> str:
    """One atom's false alarms on the judged week (its own tail probability under its alarm
    rate, on a normal reading), how many of them follow within ``late`` readings an injected
    anomaly that changed this atom's readings (``TOUCHES``: with 150 anomalies a week, any
    anomaly is within 6 readings of 45% of them), and how many buckets its last codec gives
    each field (of the schema's)."""
    normal = lab == ""
    false = (tail_p < det.alarm_rate) & normal
    after = np.zeros(len(lab), dtype=bool)
    for i in np.flatnonzero(np.isin(lab, [c for c in COMPOSITION if atom in TOUCHES[c]])):
        after[i + 1: i + 1 + late] = True
    assert det.scorer is not None and det.schema is not None
    used = ", ".join(f"{f.name} {len(e) + 1}/{f.buckets}"
                     for f, e in zip(det.schema.fields, det.scorer.codec.edges, strict=True))
    return (f"{atom}: {int(false.sum())} false alarms, {int((false & after).sum())} within {late} after one of "
            f"its anomalies; buckets used: {used}")


def composition(seeds: int, contaminations: list[float], explain: bool = False, late: int = 6) -> None:
    print("\n== composition: pulse + rhythm, a week at 5 min, 150 anomalies in the judged week ==")
    print(f"{'training':>12s} {'rule':>8s} {'class':>11s} {'precision':>9s} {'recall':>7s} {'F1':>6s} "
          f"{'best F1':>8s}")
    for c in contaminations:
        rows: dict[tuple[str, str], list[float]] = defaultdict(list)
        for seed in range(seeds):
            n_train = round(c * 2016 / 3)
            train, _ = compose(seed, n_train, synth.EPOCH)
            test, labels = compose(seed + 50, 50, synth.EPOCH + 7 * synth.DAY)
            ps, old = [], []
            lab = np.array([x or "" for x in labels])
            for atom in ("pulse", "rhythm"):
                schema = S.get(atom)
                learn_v, test_v = values_of(schema, train[atom].rows), values_of(schema, test[atom].rows)
                det = Detector(schema, interval=300.0, seed=seed).fit(learn_v)
                r = det.score(test_v)
                ps.append(r.tail_p)
                old.append(before(schema, learn_v, test_v)[0])
                if explain:
                    print(f"    {c:.0%} anom., seed {seed}, {why(atom, det, r.tail_p, lab, late)}")
            rate = cal.alarm_rate(cal.DEFAULT_ALARMS_PER_WEEK, 300.0)
            combined = np.array([cal.combine([a, b]) for a, b in zip(ps[0], ps[1], strict=True)])
            if explain:
                fa = (combined < rate) & (lab == "")
                missed = {cls: int(((combined >= rate) & (lab == cls)).sum()) for cls in COMPOSITION}
                print(f"    {c:.0%} anom., seed {seed}, combined: {int(fa.sum())} false alarms, missed {missed}")
            rules = {"before": (old[0] + old[1] >= 1.0, old[0] + old[1]), "now": (combined < rate, -np.log(combined))}
            for name, (flag, stat) in rules.items():
                for cls in [*COMPOSITION, "overall"]:
                    pos = lab != "" if cls == "overall" else lab == cls
                    keep = pos | (lab == "")
                    tp = float((flag & pos).sum())
                    fp = float((flag & (lab == "")).sum())
                    fn = float((~flag & pos).sum())
                    p, r, f = prf(tp, fp, fn)
                    best = 0.0
                    if cls == "overall":
                        for q in np.unique(np.quantile(stat[keep], np.linspace(0.8, 1.0, 80))):
                            fl = stat >= q
                            best = max(best, prf(float((fl & pos).sum()), float((fl & (lab == "")).sum()),
                                                 float((~fl & pos).sum()))[2])
                    rows[(name, cls)].append((p, r, f, best))
        for (name, cls), vals in rows.items():
            m = np.mean(np.array(vals), axis=0)
            extra = f"{m[3]:8.3f}" if cls == "overall" else ""
            print(f"{f'{c:.0%} anom.':>12s} {name:>8s} {cls:>11s} {m[0]:9.3f} {m[1]:7.3f} {m[2]:6.3f} {extra}")


@click.command()
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--quick", is_flag=True, help="Clean and 5% training only, two stream kinds fewer.")
@click.option("--n", "n", default=4000, show_default=True, type=click.IntRange(1000, 50000),
              help="Observations per single stream.")
@click.option("--late", default=6, show_default=True, help="Observations after an event that still catch it.")
@click.option("--part", type=click.Choice(["all", "streams", "composition"]), default="all", show_default=True)
@click.option("--why", "explain", is_flag=True,
              help="Composition: each atom's false alarms (how many follow an anomaly) and the buckets its last "
                   "codec gives each field, of the schema's (two of them for values beyond the range seen); "
                   "then the nerve rule's false alarms and misses per class, per seed.")
def main(seeds: int, quick: bool, n: int, late: int, part: str, explain: bool) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cont = [0.0, 0.05] if quick else [0.0, 0.02, 0.05, 0.10]
    kinds = list(streams.KINDS[:4]) if quick else list(streams.KINDS)
    if part in ("all", "streams"):
        single_streams(seeds, cont, n, late, kinds)
    if part in ("all", "composition"):
        composition(seeds, [0.0, 0.05] if quick else [0.0, 0.05, 0.10], explain, late)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
