"""KIRI's monitor endpoints, kept working so its existing clients are not broken.

The shapes follow KIRI's server: ``/api/status`` keys atoms by name with ``metrics``,
``tokens`` (one string), ``score``, ``per_token`` and ``verdict``; ``/api/history`` is a
list; ``/api/train`` streams NDJSON lines ``{step, loss, lr, total}``, one per step (the
trainer's heartbeats carry its latest steps one by one), and ends with ``{done, final_loss,
steps}`` plus whether the quality gate accepted the weights. Two deliberate differences: collection and training happen
in agents (the hub only queues the work), and ``GET /api/collect`` does not collect,
because no GET ever writes: it returns the latest readings; ``POST /api/collect`` queues a
collection and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import sqlalchemy as sa
from aiohttp import web
from pydantic import Field, ValidationError

from kiri.hub.core import queue as Q
from kiri.hub.store.schema import agents, decisions, observations, tasks, weights
from kiri.hub.watch import scoring as SC
from kiri.hub.watch import views as V
from kiri.hub.web.common import NoQuery, Query, Route, body, hub_of, ok, query, read
from kiri.hub.web.streams import ENDED, follow
from kiri.protocol import InvalidParams, NotFound, Unavailable
from kiri.protocol import params as P

COLLECT_ATOMS = ("pulse", "rhythm")


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()


ELEVATED, ANOMALY = 2.0, 5.0  # KIRI's verdict bands on the score: normal below 2, elevated below 5


def _verdict(item: dict[str, Any] | None, trained: bool) -> str:
    """KIRI's verdict: its fixed bands on the score (kiri's own, learned one is ``kiri_verdict``)."""
    if item is None or item.get("score") is None:
        return "not_trained" if not trained else "unscored"
    score = float(item["score"])
    return "normal" if score < ELEVATED else "elevated" if score < ANOMALY else "anomaly"


def _kiri_obs(item: dict[str, Any] | None, trained: bool, schema: Any) -> dict[str, Any]:
    """One reading as KIRI showed it: metrics keyed by token letter (C, M, ...), tokens as one
    string, the per-token surprise, KIRI's verdict band, and kiri's own learned verdict beside it."""
    out: dict[str, Any] = {"metrics": {}, "tokens": "", "score": 0.0, "per_token": {},
                           "verdict": _verdict(item, trained), "kiri_verdict": None, "threshold": None,
                           "tail_p": None, "timestamp": None, "params": schema.n_params}
    if item is None:
        return out
    values = item["values"]
    out.update(metrics={f.letter: values[f.name] for f in schema.fields if f.name in values},
               tokens=" ".join(item["tokens"]), score=item.get("score") or 0.0,
               per_token={b["token"]: round(b["surprise"], 3) for b in item.get("blame") or []},
               kiri_verdict=None if item.get("anomalous") is None else "anomaly" if item["anomalous"] else "normal",
               threshold=item.get("threshold"), tail_p=item.get("tail_p"), timestamp=_iso(item["time"]))
    return out


def _status(c: sa.Connection, hub: Any, now: float) -> dict[str, Any]:
    st = V.status(c, hub.atoms, now)
    out: dict[str, Any] = {"timestamp": _iso(now)}
    for a in st["atoms"]:
        out[a["name"]] = _kiri_obs(a["latest"], a["weights"] is not None, hub.atoms.get(a["name"]))
    n_obs = c.execute(sa.select(sa.func.count()).select_from(observations)).scalar() or 0
    last = c.execute(sa.select(sa.func.max(weights.c.created_at))).scalar()
    n_anom = c.execute(sa.select(sa.func.count()).select_from(decisions)
                       .where(decisions.c.action == "alert")).scalar() or 0
    out["nerve"] = st["nerve"]["latest"]
    out["stats"] = {"total_observations": n_obs, "total_anomalies": n_anom,
                    "uptime_seconds": int(now - hub.started_at), "last_trained": _iso(last)}
    return out


async def status(req: web.Request) -> web.Response:
    return ok(await read(req, _status, hub_of(req), time.time()))


class KiriHistory(Query):
    atom: P.Name = "pulse"
    n: Annotated[int, Field(ge=1, le=1000)] = 100


def _history(c: sa.Connection, hub: Any, p: KiriHistory) -> list[dict[str, Any]]:
    env = Q.Env(now=time.time(), settings=hub.settings.queue)
    res = SC.history(hub.atoms, c, P.History(atom=p.atom, n=p.n), env)
    trained = c.execute(sa.select(weights.c.id).where(weights.c.atom == res["atom"]).limit(1)).first() is not None
    schema = hub.atoms.get(res["atom"])
    out = []
    for item in res["observations"]:
        k = _kiri_obs(item, trained, schema)
        out.append({"timestamp": k["timestamp"], "tokens": k["tokens"], "score": k["score"],
                    "verdict": k["verdict"], "metrics": k["metrics"], "per_token": k["per_token"],
                    "kiri_verdict": k["kiri_verdict"], "threshold": k["threshold"]})
    return out


async def history(req: web.Request) -> web.Response:
    p = query(req, KiriHistory)
    return ok(await read(req, _history, hub_of(req), p))


def _latest(c: sa.Connection, hub: Any) -> dict[str, Any]:
    trained = {r.atom for r in c.execute(sa.select(weights.c.atom).where(weights.c.status == "active"))}
    out = {}
    for atom in COLLECT_ATOMS:
        item = V.latest_observation(c, hub.atoms, atom)
        out[atom] = None if item is None else _kiri_obs(item, atom in trained, hub.atoms.get(atom))
    return out


async def collect_latest(req: web.Request) -> web.Response:
    query(req, NoQuery)
    return ok(await read(req, _latest, hub_of(req)))


class CollectQuery(Query):
    wait: Annotated[float, Field(ge=0, le=120)] = 10.0


async def collect_now(req: web.Request) -> web.Response:
    """Queue a collection of pulse and rhythm and wait (up to ``wait`` s) for collectors to do it."""
    p = query(req, CollectQuery)
    await body(req)
    hub = hub_of(req)
    ids = {}
    for atom in COLLECT_ATOMS:
        res = await hub.call("enqueue", {"kind": "collect", "atom": atom, "max_attempts": 1,
                                         "dedupe_key": f"collect-now:{atom}"})
        ids[atom] = res["task_id"]
    deadline = time.monotonic() + p.wait
    pending = set(ids.values())
    sub = hub.events.subscribe()
    try:
        while pending and time.monotonic() < deadline:
            states = await read(req, _states, list(pending))
            pending = {tid for tid, st in states.items() if st in ("queued", "leased")}
            if pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.next(1.0), max(0.01, deadline - time.monotonic()))
    finally:
        hub.events.unsubscribe(sub)
    out = await read(req, _latest, hub)
    out["tasks"] = ids
    out["complete"] = not pending
    return ok(out, status=200 if not pending else 202)


def _states(c: sa.Connection, ids: list[int]) -> dict[int, str]:
    return {r.id: r.status for r in c.execute(sa.select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(ids)))}


class KiriTrain(Query):
    atom: P.Name = "pulse"
    steps: Annotated[int, Field(ge=1, le=1_000_000)] = 300
    every: Annotated[int, Field(ge=1, le=1_000_000)] = 1  # one line per this many steps


def _trainers(c: sa.Connection) -> int:
    """Connected agents that serve ``train`` tasks."""
    n = 0
    for (kinds,) in c.execute(sa.select(agents.c.kinds).where(agents.c.connected.is_(True))):
        try:
            n += "train" in (orjson.loads(kinds) if kinds else [])
        except orjson.JSONDecodeError:
            continue
    return n


def _gate(c: sa.Connection, weights_id: Any) -> tuple[str | None, str | None]:
    """A published version's status and the quality gate's reason."""
    if not isinstance(weights_id, int):
        return None, None
    row = c.execute(sa.select(weights.c.status, weights.c.reason).where(weights.c.id == weights_id)).first()
    return (row.status, row.reason) if row is not None else (None, None)


async def train(req: web.Request) -> web.StreamResponse:
    """Queue training and stream its progress as KIRI's NDJSON lines until it ends."""
    p = query(req, KiriTrain)
    await body(req)
    hub = hub_of(req)
    try:
        atom = hub.atoms.get(p.atom).name
    except InvalidParams:
        raise NotFound(f"unknown atom: {p.atom}") from None
    if not await read(req, _trainers):
        # KIRI trained in the server; here an agent does, and without one this would wait forever
        raise Unavailable("no trainer agent is connected: start one with `kiri-agent --role trainer`; "
                          "nothing was queued")
    res = await hub.call("retrain", {"atom": atom, "reason": "POST /api/train", "params": {"steps": p.steps}})
    task_id = res["task_id"]
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    await resp.prepare(req)

    async def line(d: dict[str, Any]) -> None:
        await resp.write(orjson.dumps(d) + b"\n")

    async with contextlib.aclosing(follow(req, task_id)) as story:
        with contextlib.suppress(ConnectionError):
            note = "joined the training already queued" if res.get("deduplicated") else "queued"
            await line({"info": f"task {task_id} {note}; waiting for a trainer agent", "task_id": task_id})
            last: dict[str, Any] = {}
            task: dict[str, Any] = {"status": "queued"}
            sent = 0  # the last step given its own line
            async for kind, data in story:
                if kind == "progress" and "step" in data:
                    last = data
                    total = data.get("steps")
                    for step, loss, lr in _steps(data):  # each step since the last line, as KIRI sent them
                        if step > sent and (step % p.every == 0 or step == total):
                            await line({"step": step, "loss": loss, "lr": lr, "total": total})
                            sent = step
                elif kind in ("state", "end"):
                    task = data
            if task["status"] == "done":
                result = task.get("result") if isinstance(task.get("result"), dict) else {}
                status, reason = await read(req, _gate, result.get("weights_id"))
                await line({"done": True, "final_loss": result.get("loss", last.get("loss")),
                            "steps": result.get("steps", last.get("steps", p.steps)), "task_id": task_id,
                            "accepted": status == "active", "weights_status": status, "reason": reason,
                            "result": result})
            elif task["status"] in ENDED:
                await line({"error": task.get("error") or f"training {task['status']}", "task_id": task_id})
            await resp.write_eof()
    return resp


def _steps(progress: dict[str, Any]) -> list[tuple[int, Any, Any]]:
    """(step, loss, lr) of every step a progress report carries (its ``trail``), else its latest."""
    trail = progress.get("trail")
    if isinstance(trail, dict):
        try:
            return [(int(s), lo, lr) for s, lo, lr in zip(trail["step"], trail["loss"], trail["lr"], strict=True)]
        except (KeyError, TypeError, ValueError):
            pass
    step = progress.get("step")
    return [(int(step), progress.get("loss"), progress.get("lr"))] if isinstance(step, int) else []


class KiriFeedback(Query):
    action: Annotated[str, Field(pattern="^(ok|alert|suppress|retrain|approve|dismiss)$")] = "ok"
    decision_id: P.TaskId | None = None


def _latest_decision(c: sa.Connection) -> int | None:
    return c.execute(sa.select(sa.func.max(decisions.c.id))).scalar()


async def feedback(req: web.Request) -> web.Response:
    """KIRI's feedback: "this moment should have been <action>", applied to the latest decision."""
    raw = await body(req)
    try:
        p = KiriFeedback.model_validate({k: raw[k] for k in ("action", "decision_id") if k in raw})
    except ValidationError as e:
        raise InvalidParams(P.describe(e)) from None
    hub = hub_of(req)
    did = p.decision_id or await read(req, _latest_decision)
    if did is None:
        raise NotFound("there is no decision to give feedback on yet")
    res = await hub.call("feedback", {"decision_id": did, "verdict": p.action})
    return ok({"ok": True, "action": res["action"], "source": "human", "decision_id": did, **res})


def routes() -> list[Route]:
    return [
        Route("GET", "/api/status", status, "KIRI alias: status keyed by atom name", NoQuery, tag="kiri"),
        Route("GET", "/api/history", history, "KIRI alias: an atom's latest observations as a list", KiriHistory,
              tag="kiri"),
        Route("GET", "/api/collect", collect_latest,
              "KIRI alias: the latest pulse and rhythm readings (a GET never collects)", NoQuery, tag="kiri"),
        Route("POST", "/api/collect", collect_now,
              "KIRI alias: queue a collection of pulse and rhythm and wait for it", CollectQuery, tag="kiri",
              write=True),
        Route("POST", "/api/train", train, "KIRI alias: queue training and stream its progress (NDJSON)", KiriTrain,
              tag="kiri", produces="application/x-ndjson", write=True),
        Route("POST", "/api/feedback", feedback,
              "KIRI alias: label the latest decision (or decision_id) with an action", body=KiriFeedback,
              tag="kiri", write=True),
    ]
