"""Streaming replies: a task's progress (NDJSON or SSE) and the dashboard's change feed (SSE).

Both are pushed from the hub's event bus, not polled: a heartbeat carrying progress reaches
the browser in the same loop turn its transaction commits. A stream re-reads the task from
the database when it goes quiet, so a missed event can delay an update but never lose the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import StringConstraints

from kiri.hub.core import queue as Q
from kiri.hub.web.common import NoQuery, Query, hub_of, path_int, query, read
from kiri.protocol import TASK_STATES
from kiri.protocol import params as P

ENDED = frozenset(TASK_STATES) - {"queued", "leased"}
KEEPALIVE = 15.0
COALESCE = 0.25  # the change feed sends at most one update per topic set this often


class ProgressQuery(Query):
    format: Annotated[str, StringConstraints(pattern="^(ndjson|sse)$")] | None = None


def _wants_sse(req: web.Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "sse"
    return "text/event-stream" in req.headers.get("Accept", "")


async def _open(req: web.Request, sse: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream" if sse else "application/x-ndjson",
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(req)
    return resp


def _frame(sse: bool, event: str, data: Any) -> bytes:
    payload = orjson.dumps(data)
    if sse:
        return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"
    return payload + b"\n"


async def task_state(req: web.Request, task_id: int) -> dict[str, Any]:
    env = Q.Env(now=time.time(), settings=hub_of(req).settings.queue)
    task = (await read(req, Q.get_task, P.TaskRef(task_id=task_id), env))["task"]
    task.pop("params", None)
    return orjson.loads(orjson.dumps(task))  # stored JSON fragments become plain values


def _summary(task: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "kind", "atom", "status", "attempts", "max_attempts", "lease_owner", "progress", "error", "result",
            "started_at", "finished_at")
    return {k: task.get(k) for k in keys}


async def follow(req: web.Request, task_id: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A task as it happens: ``("state", task)`` now and when it changes, ``("progress", p)``
    per heartbeat, ``("idle", {})`` after a quiet while, ``("end", task)`` once it has ended.

    The first item is read before anything else is sent, so an unknown task raises NotFound
    in time for a proper 404. If the hub stops first, the story ends without ``end``.
    """
    hub = hub_of(req)
    sub = hub.events.subscribe(task_id)  # before the first read, so nothing falls in between
    try:
        task = await task_state(req, task_id)
        yield "state", task
        while task["status"] not in ENDED:
            ev = await sub.next(KEEPALIVE)
            if ev is None:  # the hub is stopping
                return
            if ev["type"] == "progress":
                yield "progress", ev["progress"]
                continue
            if ev["type"] == "idle":
                yield "idle", {}
            task = await task_state(req, task_id)
            if ev["type"] in ("task", "resync") or task["status"] in ENDED:
                yield "state", task
        yield "end", task
    finally:
        hub.events.unsubscribe(sub)


async def task_progress(req: web.Request) -> web.StreamResponse:
    """Stream one task: its state now, each progress report, then how it ended."""
    p = query(req, ProgressQuery)
    task_id = path_int(req, "id")
    story = follow(req, task_id)
    async with contextlib.aclosing(story):
        _, task = await anext(story)  # 404 before any byte is sent
        sse = _wants_sse(req, p.format)
        resp = await _open(req, sse)
        with contextlib.suppress(ConnectionError):
            await resp.write(_frame(sse, "state", {"type": "state", "task": _summary(task)}))
            async for kind, data in story:
                if kind == "progress":
                    await resp.write(_frame(sse, kind, {"type": kind, "task_id": task_id, "progress": data}))
                elif kind == "idle":
                    if sse:
                        await resp.write(b": keepalive\n\n")
                else:
                    await resp.write(_frame(sse, kind, {"type": kind, "task": _summary(data)}))
            await resp.write_eof()
        return resp


async def events(req: web.Request) -> web.StreamResponse:
    """The dashboard's live feed: which parts of the picture changed, and training progress."""
    query(req, NoQuery)
    hub = hub_of(req)
    sub = hub.events.subscribe()
    try:
        resp = await _open(req, True)
        with contextlib.suppress(ConnectionError):
            await resp.write(_frame(True, "hello", {"time": time.time()}))
            while True:
                ev = await sub.next(KEEPALIVE)
                if ev is None:
                    break
                if ev["type"] == "idle":
                    await resp.write(b": keepalive\n\n")
                    continue
                # gather what else happens in the next moment into one message per kind
                topics: set[str] = set()
                progress: dict[int, Any] = {}
                deadline = asyncio.get_running_loop().time() + COALESCE
                ended = False
                while ev is not None:
                    if ev["type"] == "changed":
                        topics.update(ev["topics"])
                    elif ev["type"] == "progress":
                        progress[ev["task_id"]] = ev["progress"]
                    elif ev["type"] == "resync":
                        topics.add("all")
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    ev = await sub.next(left)
                    if ev is None:
                        ended = True
                    elif ev["type"] == "idle":
                        break
                if topics:
                    await resp.write(_frame(True, "changed", {"topics": sorted(topics)}))
                for tid, prog in progress.items():
                    await resp.write(_frame(True, "progress", {"task_id": tid, "progress": prog}))
                if ended:
                    break
            await resp.write_eof()
        return resp
    finally:
        hub.events.unsubscribe(sub)
