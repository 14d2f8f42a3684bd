"""``/api/v1``: the JSON API, a thin face over the same methods agents call over TCP.

Reads run on the reader's query-only connections; writes go through ``Hub.call``, i.e.
the very handlers, validation and group commit of the TCP protocol. So the HTTP face has
no write path of its own to get wrong, and a GET cannot write.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import sqlalchemy as sa
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kiri.hub.core import queue as Q
from kiri.hub.watch import views as V
from kiri.hub.watch import weights as W
from kiri.hub.watch.decisions import list_decisions
from kiri.hub.web import streams
from kiri.hub.web.common import NoQuery, Query, Route, body, hub_of, ok, path_int, query, read, read_page
from kiri.hub.web.streams import ProgressQuery
from kiri.importing import clock_fields
from kiri.protocol import InvalidParams, NotFound
from kiri.protocol import params as P

PREFIX = "/api/v1"


class SeriesQuery(Query):
    atom: P.Name
    since: Annotated[float, Field(ge=0, le=1e11)] | None = None
    until: Annotated[float, Field(ge=0, le=1e11)] | None = None
    points: Annotated[int, Field(ge=10, le=V.MAX_POINTS)] = 1000
    host: Annotated[str, StringConstraints(max_length=200)] | None = None  # "" for readings without a host


class ObservationsBody(BaseModel):
    """Either ``observations: [...]`` or one observation's ``values`` (and ``time``, ``host``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    atom: P.Name
    observations: list[dict[str, Any]] | None = None
    values: dict[str, Any] | None = None
    time: float | None = None
    host: str | None = None


class RetrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=4096)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31)] | None = None
    warm_start: bool | None = None


def _env(req: web.Request) -> Q.Env:
    return Q.Env(now=time.time(), settings=hub_of(req).settings.queue)


def _atom(req: web.Request, name: str) -> str:
    try:
        return hub_of(req).atoms.get(name).name
    except InvalidParams:
        raise NotFound(f"no atom named {name!r}; GET {PREFIX}/atoms lists them") from None


# --- reads -----------------------------------------------------------------------------

async def get_status(req: web.Request) -> web.Response:
    query(req, NoQuery)
    hub = hub_of(req)
    return await read_page(req, V.status_page, time.time(), hub.settings.retention)


async def get_atoms(req: web.Request) -> web.Response:
    query(req, NoQuery)
    hub = hub_of(req)
    return ok(hub.atoms.list(None, P.Empty(), _env(req)))  # type: ignore[arg-type]


async def get_history(req: web.Request) -> web.Response:
    p = query(req, P.History)
    return await read_page(req, V.history_page, p, _env(req))


async def get_series(req: web.Request) -> web.Response:
    p = query(req, SeriesQuery)
    if p.since is not None and p.until is not None and p.until < p.since:
        raise InvalidParams("until must not be before since")
    return await read_page(req, V.series_page, p.atom, p.host, p.since, p.until, p.points)


async def get_observation(req: web.Request) -> web.Response:
    query(req, NoQuery)
    oid = path_int(req, "id")
    return ok(await read(req, V.observation, hub_of(req).atoms, oid))


async def get_tasks(req: web.Request) -> web.Response:
    p = query(req, P.Tasks)
    return ok(await read(req, Q.list_tasks, p, _env(req)))


async def get_task(req: web.Request) -> web.Response:
    query(req, NoQuery)
    p = P.TaskRef(task_id=path_int(req, "id"))
    return ok(await read(req, Q.get_task, p, _env(req)))


async def get_agents(req: web.Request) -> web.Response:
    query(req, NoQuery)
    return ok({"agents": await read(req, V.agent_list, time.time())})


def _task_stats(c: sa.Connection, now: float) -> dict[str, Any]:
    return {"counts": Q.counts(c), "last_hour": Q.throughput(c, now)}


async def get_task_stats(req: web.Request) -> web.Response:
    query(req, NoQuery)
    return ok(await read(req, _task_stats, time.time()))


class WeightsList(Query):
    atom: P.Name | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 50


async def get_weights(req: web.Request) -> web.Response:
    q = query(req, WeightsList)
    p = P.WeightsQuery(atom=q.atom, limit=q.limit)
    return ok(await read(req, W.query, p, _env(req)))


async def get_decisions(req: web.Request) -> web.Response:
    p = query(req, P.Decisions)
    return ok(await read(req, list_decisions, p, _env(req)))


# --- writes ----------------------------------------------------------------------------

async def post_observations(req: web.Request) -> web.Response:
    raw = await body(req)
    if "import_id" in raw:
        raise InvalidParams("bulk imports with import_id go through `kiri observe --file`; "
                            "POST up to 10,000 observations at a time here instead")
    try:
        b = ObservationsBody.model_validate(raw)
    except ValidationError as e:
        raise InvalidParams(P.describe(e)) from None
    if (b.observations is None) == (b.values is None):
        raise InvalidParams("give either observations (a list) or values (one observation), not both or neither")
    if b.observations is not None:
        obs: list[dict[str, Any]] = b.observations
    else:
        one: dict[str, Any] = {"values": b.values}
        if b.time is not None:
            one["time"] = b.time
        if b.host is not None:
            one["host"] = b.host
        obs = [one]
    # like `kiri observe`: hour and weekday fields left out are the observation's local time
    schema = hub_of(req).atoms.get(b.atom)
    now = time.time()
    for o in obs:
        t = o.get("time", now)
        if isinstance(o.get("values"), dict) and isinstance(t, int | float) and 0 <= t <= 1e11:
            o["values"] = clock_fields(schema, o["values"], float(t))
    return ok(await hub_of(req).call("observe", {"atom": b.atom, "observations": obs}), status=201)


async def post_task(req: web.Request) -> web.Response:
    return ok(await hub_of(req).call("enqueue", await body(req)), status=201)


async def post_cancel(req: web.Request) -> web.Response:
    await body(req)
    return ok(await hub_of(req).call("cancel", {"task_id": path_int(req, "id")}))


async def post_retry(req: web.Request) -> web.Response:
    await body(req)
    return ok(await hub_of(req).call("retry", {"task_id": path_int(req, "id")}))


class KindBody(P.KindSettings):
    """``set_kind``'s settings in a request body, where an unknown key is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _kinds(c: sa.Connection) -> dict[str, Any]:
    return {"kinds": Q.kind_rows(c)}


async def get_kinds(req: web.Request) -> web.Response:
    query(req, NoQuery)
    return ok(await read(req, _kinds))


async def post_kind(req: web.Request) -> web.Response:
    raw = await body(req)
    try:
        b = KindBody.model_validate(raw)
    except ValidationError as e:
        raise InvalidParams(P.describe(e)) from None
    kind = req.match_info["kind"]
    return ok(await hub_of(req).call("set_kind", {"kind": kind, **b.model_dump(include=b.model_fields_set)}))


async def post_activate(req: web.Request) -> web.Response:
    await body(req)
    atom = _atom(req, req.match_info["atom"])
    version = path_int(req, "version")
    return ok(await hub_of(req).call("activate_weights", {"atom": atom, "version": version}))


async def post_feedback(req: web.Request) -> web.Response:
    return ok(await hub_of(req).call("feedback", await body(req)), status=201)


async def post_retrain(req: web.Request) -> web.Response:
    atom = _atom(req, req.match_info["atom"])
    try:
        b = RetrainBody.model_validate(await body(req))
    except ValidationError as e:
        raise InvalidParams(P.describe(e)) from None
    params = {k: v for k, v in b.model_dump().items() if v is not None}
    res = await hub_of(req).call("retrain", {"atom": atom, "reason": "retrain requested over HTTP",
                                             "params": params})
    return ok(res, status=200 if res.get("deduplicated") else 201)


# --- the route table -------------------------------------------------------------------

def routes() -> list[Route]:
    v = PREFIX
    return [
        Route("GET", f"{v}/status", get_status,
              "Every atom's latest observation, tokens, score, verdict and blame; agents; queue", NoQuery),
        Route("GET", f"{v}/atoms", get_atoms, "Every atom the hub knows, with its fields and ranges", NoQuery),
        Route("GET", f"{v}/history", get_history, "An atom's latest observations with scores and blame", P.History),
        Route("GET", f"{v}/series", get_series,
              "An atom's values and scores over a time range (one host's, or all hosts'), at most `points` "
              "buckets: raw readings zoomed in, rollups zoomed out; each bucket keeps its highest score and "
              "each field's mean, min and max", SeriesQuery),
        Route("GET", f"{v}/observations/{{id}}", get_observation, "One observation with tokens, score and blame",
              NoQuery, path_params={"id": "integer"}),
        Route("POST", f"{v}/observations", post_observations,
              "Store observations (validated like `kiri observe`; all or nothing)", body=ObservationsBody, write=True),
        Route("GET", f"{v}/tasks", get_tasks, "The queue, newest first", P.Tasks),
        Route("POST", f"{v}/tasks", post_task, "Enqueue a task", body=P.Enqueue, write=True),
        Route("GET", f"{v}/tasks/stats", get_task_stats,
              "Tasks by kind and state, and per kind over the last hour: completed, dead, mean and "
              "95th-percentile duration, error rate", NoQuery),
        Route("GET", f"{v}/kinds", get_kinds,
              "Every kind with settings or unfinished tasks: paused, concurrency limit, default deadline, "
              "queued and leased counts", NoQuery),
        Route("POST", f"{v}/kinds/{{kind}}", post_kind,
              "Pause or resume a kind, set its concurrency limit or default deadline (keys left out stay; "
              "null clears)", body=KindBody, write=True, path_params={"kind": "string"}),
        Route("GET", f"{v}/tasks/{{id}}", get_task, "One task with its checkpoint", NoQuery,
              path_params={"id": "integer"}),
        Route("POST", f"{v}/tasks/{{id}}/cancel", post_cancel, "Cancel a task", write=True,
              path_params={"id": "integer"}),
        Route("POST", f"{v}/tasks/{{id}}/retry", post_retry, "Run a dead or cancelled task again", write=True,
              path_params={"id": "integer"}),
        Route("GET", f"{v}/tasks/{{id}}/progress", streams.task_progress,
              "A task's progress as a stream until it ends: NDJSON, or Server-Sent Events with "
              "`Accept: text/event-stream` or `format=sse`", ProgressQuery, produces="application/x-ndjson",
              path_params={"id": "integer"}),
        Route("GET", f"{v}/agents", get_agents, "Every agent with role, host, health, last seen and current tasks",
              NoQuery),
        Route("GET", f"{v}/weights", get_weights, "Weights versions with lineage, newest first", WeightsList),
        Route("POST", f"{v}/weights/{{atom}}/{{version}}/activate", post_activate,
              "Make a weights version the active one (also a rollback)", write=True,
              path_params={"atom": "string", "version": "integer"}),
        Route("GET", f"{v}/decisions", get_decisions, "The nerve's decisions, newest first, with labels", P.Decisions),
        Route("POST", f"{v}/feedback", post_feedback, "Label a decision (approve, dismiss, or the right action)",
              body=P.Feedback, write=True),
        Route("POST", f"{v}/atoms/{{atom}}/retrain", post_retrain,
              "Enqueue training for an atom (one waiting retrain per atom)", body=RetrainBody, write=True,
              path_params={"atom": "string"}),
        Route("GET", f"{v}/events", streams.events,
              "Server-Sent Events: `changed` (topics) after every commit, `progress` on heartbeats", NoQuery,
              produces="text/event-stream"),
    ]
