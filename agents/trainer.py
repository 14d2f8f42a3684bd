"""The ``train`` task: train an atom on the hub's observations and publish a weights version.

Observations come from the hub page by page (never the whole table in one message). The
data window (last observation id) is fixed at the first attempt and carried in every
checkpoint, so a resumed attempt trains on exactly the same data and, training being
bitwise resumable, ends with exactly the weights an uninterrupted run would have.
Checkpoints go to the hub at least every ``checkpoint_every`` seconds (default 30).
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import sys
import time
from typing import Any

from kiri.agents.client import schema_from_atoms
from kiri.agents.handlers import TaskContext, TaskError
from kiri.config import TRAIN_WINDOW  # inside the hub's raw window (30 days): always whole
from kiri.model.schema import NERVE_INPUTS
from kiri.protocol import RpcError

log = logging.getLogger("kiri.trainer")

PAGE = 5000
TRAIN_KEYS = ("steps", "batch_size", "lr", "seed", "context", "holdout", "trim", "patience")


def _pack(meta: dict[str, Any], state: bytes) -> bytes:
    head = json.dumps(meta).encode()
    return struct.pack("<I", len(head)) + head + state


def _unpack(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<I", blob[:4])
    return json.loads(blob[4: 4 + n]), blob[4 + n:]


def load_values(hub: Any, schema: Any, obs_to: int | None, host: str | None = None,
                hosts: dict[str, dict[str, float]] | None = None,
                ids: list[int] | None = None, window: dict[str, Any] | None = None
                ) -> tuple[Any, list[float], int, int]:
    """Raw values [N, F] and times of the atom's observations up to ``obs_to`` (all, if None), paged;
    only ``host``'s when given; only the training window's when ``window`` says so: either
    ``{"recent": seconds}`` (the first attempt: the hub finds where that starts and
    ``window["since"]`` is set to it) or ``{"since": time}`` (a resume: the same rows).
    ``hosts`` is filled with how many came from each host, and their first and last times
    (the learning period reads them from the weights); ``ids`` with each row's observation id.

    Rows come in stream order: host by host, each in time order (then id), so a training
    window holds one host's consecutive readings, as scoring reads them, whatever order
    they were stored in.

    Raw, not tokens: the codec that turns them into tokens is fitted to them (``Codec.fit``).
    """
    import numpy as np

    from kiri.model.codec import values_of

    rows: list[Any] = []
    times: list[float] = []
    keys: list[tuple[bool, str, float, int]] = []  # each row's place in stream order
    first = last = 0
    after = 0
    window = {} if window is None else window
    while True:
        ask: dict[str, Any] = {"since": window["since"]} if window.get("since") is not None else (
            {"recent": window["recent"]} if window.get("recent") is not None else {})
        page = hub.call("observations", {"atom": schema.name, "after_id": after, "limit": PAGE, **ask,
                                         **({"host": host} if host is not None else {})})
        if window.get("recent") is not None:
            window["since"] = page.get("since")  # fixed now: later pages, and any resume, read the same rows
        batch = []
        for o in page["observations"]:
            if obs_to is not None and o["id"] > obs_to:
                page["next_after_id"] = None
                break
            batch.append(o["values"])
            keys.append((o["host"] is not None, o["host"] or "", o["time"], o["id"]))
            if hosts is not None and o["host"] is not None:
                h = hosts.setdefault(o["host"], {"n": 0, "first": o["time"], "last": o["time"]})
                h["n"] += 1
                h["first"], h["last"] = min(h["first"], o["time"]), max(h["last"], o["time"])
            times.append(o["time"])
            first = first or o["id"]
            last = o["id"]
        if batch:
            rows.append(values_of(schema, batch))
        if not page["next_after_id"]:
            break
        after = page["next_after_id"]
    values = np.concatenate(rows) if rows else np.empty((0, schema.width))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    if ids is not None:
        ids.extend(keys[i][3] for i in order)
    return values[order] if order else values, [times[i] for i in order], first, last


def window_scores(hub: Any, atom: str, obs_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each observation's latest recorded score (those never scored are absent): its
    ``score``, ``tail_p`` and ``weights_id``, as the ``scores`` method gives them."""
    wanted = set(obs_ids)
    latest: dict[int, dict[str, Any]] = {}
    after = 0
    while True:
        page = hub.call("scores", {"atom": atom, "after_id": after, "limit": PAGE,
                                   "observations_from": min(wanted, default=0)})
        for sc in page["scores"]:
            if sc["observation_id"] in wanted:
                latest[sc["observation_id"]] = sc  # scores come oldest first: the latest wins
        if not page["next_after_id"]:
            break
        after = page["next_after_id"]
    return latest


def scored_tail_p(scored: dict[int, dict[str, Any]]) -> dict[int, float]:
    """Each observation's latest recorded tail probability (uncalibrated scores are absent).

    What the atom judged unusual while watching, as the Detector's retrains read their own
    verdicts: a retrain does not learn the excess of it as normal (``robust.suspects``).
    """
    return {i: sc["tail_p"] for i, sc in scored.items() if sc.get("tail_p") is not None}


def recent_scores(hub: Any, scored: dict[int, dict[str, Any]], obs_ids: list[int]) -> Any:
    """The window's recent scores, to calibrate the new weights on (``Trainer.weights_bytes``):
    the latest score of each of its readings, in the window's order, from weights that score
    as new weights do (``excess/2``: another statistic would calibrate the wrong scale),
    alarms included. As the Detector recalibrates: scores the stream got while watched, from
    models that had not seen those readings.

    Alarms stay in: left out, a stream's ordinary extremes (a heavy tail's, a plateau's
    steps) alarmed, were left out of the next calibration, and so alarmed again at every
    retrain. The tail's first pass (``calibrate.Tail.fit``) sets aside what lies far out."""
    import numpy as np

    from kiri.model.score import EXCESS

    kinds: dict[int, Any] = {}
    for wid in {sc["weights_id"] for sc in scored.values()}:
        try:
            found = hub.call("weights", {"weights_id": wid})["weights"]
        except RpcError:
            found = []
        kinds[wid] = (found[0].get("info") or {}).get("scoring") if found else None
    out = [sc["score"] for i in obs_ids if (sc := scored.get(i)) is not None and kinds[sc["weights_id"]] == EXCESS]
    return np.asarray(out, dtype=np.float64)


def normal_share(hub: Any, atom: str) -> float:
    """The share of normal readings the active weights put under ``SUSPECT_P`` (what a retrain
    may leave out beyond), from their held-out windows; ``SUSPECT_P`` when unknown."""
    from kiri.model.calibrate import SUSPECT_P

    try:
        active = hub.call("weights", {"atom": atom, "active": True})["weights"][0]
    except (RpcError, IndexError):
        return SUSPECT_P
    share = (active.get("info") or {}).get("suspect_share")
    return float(share) if isinstance(share, int | float) and 0.0 <= share <= 1.0 else SUSPECT_P


def learn_from(schema: Any, obs_ids: list[int], tail_p: dict[int, float], times: list[float],
               rate: float, share: float, values: Any = None) -> Any:
    """[N] bool: the rows to train on, leaving out the suspects (``robust.suspects`` of their
    recorded tail probabilities, against alarm rate ``rate`` and normal ``share``) and, of
    the rows never scored (a first training, an imported history), those past a gap at the
    end of a field's values (``robust.beyond_gap``, on ``values`` [N, F]), as
    ``robust.learnable`` decides."""
    import numpy as np

    from kiri.model.calibrate import typical_interval
    from kiri.model.robust import beyond_gap, learnable, persist_for, suspects

    p = np.fromiter((tail_p.get(i, np.nan) for i in obs_ids), dtype=np.float64, count=len(obs_ids))
    flagged = suspects(p, rate, share)
    unscored = np.isnan(p)
    if values is not None and unscored.any():
        flagged |= beyond_gap(schema, values) & unscored
    return learnable(schema, flagged, persist_for(typical_interval(times)))


def train(ctx: TaskContext) -> dict[str, Any]:
    import numpy as np

    from kiri.model.calibrate import DEFAULT_ALARMS_PER_WEEK, alarm_rate, typical_interval
    from kiri.model.codec import Codec
    from kiri.model.schema import SchemaError
    from kiri.model.train import TrainConfig, Trainer

    if not ctx.atom:
        raise TaskError("a train task needs an atom (kiri enqueue train ATOM)", retry=False)
    hub = ctx.hub
    if ctx.atom == "nerve":
        return train_nerve(ctx)
    try:
        schema = schema_from_atoms(hub.call("atoms")["atoms"], ctx.atom)
    except SchemaError as e:
        raise TaskError(str(e), retry=False) from None
    params = ctx.params
    try:
        config = TrainConfig.from_params({k: params[k] for k in TRAIN_KEYS if k in params})
        every = float(params.get("checkpoint_every", 30.0))
        per_week = float(params.get("alarms_per_week", DEFAULT_ALARMS_PER_WEEK))
        alarm_rate(per_week, 300.0)  # checked before training
    except (TypeError, ValueError) as e:
        raise TaskError(f"bad train parameters: {e}", retry=False) from None

    recent = params.get("window", TRAIN_WINDOW)  # seconds back from the newest reading; "all": everything
    if recent == "all":
        recent = None
    elif isinstance(recent, bool) or not isinstance(recent, (int, float)) or not 60 <= recent <= 1e11:
        raise TaskError(f"bad train parameters: window must be seconds (at least 60) or 'all', got {recent!r}",
                        retry=False)
    host = params.get("host")
    if host is not None and (not isinstance(host, str) or not host or len(host) > 200):
        raise TaskError(f"bad train parameters: host must be a host name, got {host!r}", retry=False)
    hosts: dict[str, dict[str, float]] = {}  # per host: n, first, last (for the learning period)
    obs_ids: list[int] = []
    scored: dict[int, dict[str, Any]] | None = None  # the window's latest scores, once read
    if ctx.checkpoint_in is not None:
        meta, state = _unpack(ctx.checkpoint_in.data)
        values, times, first, last = load_values(hub, schema, meta["obs_to"], host, hosts, obs_ids,
                                                 {"since": meta.get("since")})
        left = set(meta.get("left_out", []))  # the rows the interrupted run left out, exactly
        window_values, kept = values, np.array([i not in left for i in obs_ids], dtype=bool)
        values = values[kept]
        rate = alarm_rate(per_week, typical_interval(times))
        codec = Trainer.state_codec(schema, state) or Codec.fixed(schema)
        ids = codec.encode(values)
        trainer = Trainer.resume(schema, ids, state)
        parent = meta["parent_id"]
        log.info("task %s: resuming %s at step %d", ctx.task_id, schema.name, trainer.step_no)
    else:
        window: dict[str, Any] = {"recent": recent} if recent is not None else {}
        values, times, first, last = load_values(hub, schema, None, host, hosts, obs_ids, window)
        if len(values) < 2:
            whose = f" from {host}" if host is not None else ""
            raise TaskError(f"atom {schema.name!r} has {len(values)} observation(s){whose}; push more first",
                            retry=False)
        # what the atom found unusual while watching is not learned as normal; the ids go
        # into the checkpoint, so a resumed run trains on exactly the same rows
        rate = alarm_rate(per_week, typical_interval(times))
        scored = window_scores(hub, schema.name, obs_ids)
        keep = learn_from(schema, obs_ids, scored_tail_p(scored), times, rate, normal_share(hub, schema.name), values)
        left_out = {i for i, k in zip(obs_ids, keep.tolist(), strict=True) if not k}
        window_values, kept = values, keep
        values = values[keep]
        codec = Codec.fit(schema, values)  # edges from this data: a retrain follows a stream that moved
        ids = codec.encode(values)
        parent, init = None, None
        if params.get("warm_start", False):
            try:
                active = hub.call("weights", {"atom": schema.name, "active": True, "blob": True})["weights"][0]
                parent, init = active["id"], base64.b64decode(active["blob"])
            except RpcError:  # no active version yet: start fresh
                parent, init = None, None
        trainer = Trainer(schema, ids, config, init=init, codec=codec)
        meta = {"obs_from": first, "obs_to": last, "parent_id": parent, "left_out": sorted(left_out),
                "since": window.get("since")}

    bar = _bar(trainer.total_steps, trainer.step_no)
    last_ck = time.monotonic()

    def progress(p: Any) -> None:  # every step: the step's own line for clients that plot each
        ctx.step(p.step, round(p.loss, 4), p.lr)
        if p.step % 25 == 0 or p.step >= p.steps:
            ctx.progress(step=p.step, steps=p.steps, loss=round(p.loss, 4), lr=p.lr)
            if bar is not None:
                bar.update(p.step - bar.pos)

    while not trainer.finished:
        slice_end = min(trainer.total_steps, trainer.step_no + 25)
        trainer.run(until=slice_end, on_progress=progress, every=1)
        if time.monotonic() - last_ck >= every and not trainer.finished:
            ctx.checkpoint(trainer.step_no, _pack(meta, trainer.state_bytes()))
            last_ck = time.monotonic()
        ctx.raise_if_stopping()
    if bar is not None:
        bar.render_finish()
    ctx.report()  # every step reaches the hub before the task ends, however short the run
    gate = quality_gate(hub, schema, trainer, values, float(params.get("gate_margin", 0.1)))
    # calibrated on the window's recent scores (a resumed run reads the scores again; its
    # tensors stay bitwise those of an uninterrupted run)
    watched = recent_scores(hub, scored if scored is not None else window_scores(hub, schema.name, obs_ids), obs_ids)
    blob = trainer.weights_bytes({"task_id": ctx.task_id, "obs_from": meta["obs_from"], "obs_to": meta["obs_to"],
                                  "quality": gate, "hosts": hosts, "host": host,
                                  "left_out": len(meta.get("left_out", []))}, alarm_rate=rate, recent=watched,
                                 window=window_values, kept=kept)
    res = hub.call("publish_weights", {
        "task_id": ctx.task_id, "lease_token": ctx.lease_token, "atom": schema.name,
        "blob": base64.b64encode(blob).decode(), "parent_id": meta["parent_id"],
        "obs_from": meta["obs_from"], "obs_to": meta["obs_to"], "loss": trainer.last_loss,
        "activate": gate["passed"], "reason": gate["reason"],
    })["weights"]
    return {"weights_id": res["id"], "version": res["version"], "status": res["status"],
            "loss": trainer.last_loss, "observations": len(ids), "hash": res["hash"]}


def train_nerve(ctx: TaskContext) -> dict[str, Any]:
    """The nerve learns from the owner's labels only, never from its own decisions."""
    from kiri.model.nerve import Label, fold_check
    from kiri.model.nerve import train as fit

    rows = ctx.hub.call("labels", {"limit": 100_000})["labels"]
    if not rows:
        raise TaskError("the nerve has no human labels yet: give feedback with `kiri feedback`", retry=False)
    labels = [Label(scores={a: r["inputs"].get(a, 0.0) for a in NERVE_INPUTS},
                    hour=r["inputs"]["hour"], weekday=r["inputs"]["weekday"], action=r["action"],
                    thresholds=r["inputs"].get("thresholds")) for r in rows]
    steps = int(ctx.params.get("steps", 300))
    seed = int(ctx.params.get("seed", 0))
    check = fold_check(labels, steps=steps, seed=seed)  # the promise, on held-out folds of the labels
    blob = fit(labels, steps=steps, seed=seed)
    res = ctx.hub.call("publish_weights", {
        "task_id": ctx.task_id, "lease_token": ctx.lease_token, "atom": "nerve",
        "blob": base64.b64encode(blob).decode(),
        "info": {"labels": len(labels), "label_ids": [rows[0]["id"], rows[-1]["id"]], "folds": check},
        "activate": check["passed"], "reason": f"trained on {len(labels)} human labels; {check['reason']}",
    })["weights"]
    return {"weights_id": res["id"], "version": res["version"], "labels": len(labels), "status": res["status"]}


def quality_gate(hub: Any, schema: Any, trainer: Any, values: Any, margin: float) -> dict[str, Any]:
    """Compare the new model with the active version on the newest held-out windows.

    The new version passes when its separation is at least the active one's times
    (1 - margin). With no active version, or no held-out windows, it passes by default.
    Each model reads the raw values through its own codec (the edges it was trained with)
    and is scored as its weights score (the active one by its ``scoring``, the new one as
    new weights do: ``excess/2``), neither looking past flagged context: the corrupted rows
    are the point. (The new model used to be judged by plain surprise over every field and
    the active one by its own statistic, so the gate compared two different numbers.)
    """
    from kiri.model.codec import Codec
    from kiri.model.score import Scorer, separation
    from kiri.model.weights import WeightsError, load_weights

    trainer.model.eval()
    codec = trainer.codec or Codec.fixed(schema)
    ids = codec.encode(values)
    targets = trainer.newest_held()  # judged on the newest held-out data, not on old windows
    new = separation(Scorer.from_model(schema, trainer.model, trainer.k, excess=True, codec=codec), ids, targets)
    trainer.model.train()
    out: dict[str, Any] = {"new": new, "active": None, "margin": margin, "passed": True, "reason": None}
    try:
        active = hub.call("weights", {"atom": schema.name, "active": True, "blob": True})["weights"][0]
    except RpcError:
        out["reason"] = "no active version: accepted"
        return out
    try:
        old = Scorer(load_weights(base64.b64decode(active["blob"])), context=trainer.k)
        old.calibration = None  # (only used here to look past flagged context: see above)
        out["active"] = separation(old, old.encode(values), targets) | {"version": active["version"]}
    except (WeightsError, ValueError) as e:
        out["reason"] = f"active version {active['version']} could not be evaluated ({e}): accepted"
        return out
    floor = out["active"]["separation"] * (1 - margin)
    out["passed"] = new["separation"] >= floor
    verdict = "passes" if out["passed"] else "fails"
    out["reason"] = (f"separation {new['separation']:.3f} {verdict} the gate {floor:.3f} "
                     f"(active v{active['version']}: {out['active']['separation']:.3f}, margin {margin:.0%})")
    return out


def _bar(total: int, start: int) -> Any:
    """A progress bar on the terminal when there is one (never in logs or tests)."""
    if not sys.stderr.isatty():
        return None
    import click

    bar = click.progressbar(length=total, label="training", file=sys.stderr)
    bar.pos = start
    return bar
