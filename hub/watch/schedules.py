"""Schedules: the hub enqueues periodic tasks itself.

Firing a schedule and moving its ``next_run`` happen in one transaction, so a schedule fires
once per interval however often the hub restarts, and never twice. Intervals missed while
the hub was down are skipped, not replayed in a burst: the next run is the first slot on the
schedule's grid that is still in the future.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.store.db import as_dict
from kiri.hub.store.schema import schedules
from kiri.protocol import Conflict, NotFound
from kiri.protocol import params as P


def add(c: sa.Connection, p: P.ScheduleAdd, env: Q.Env) -> dict[str, Any]:
    exists = c.execute(sa.select(schedules.c.id).where(schedules.c.kind == p.kind, schedules.c.atom == p.atom)).first()
    if exists is not None:
        raise Conflict(f"a {p.kind} schedule for {p.atom or 'no atom'} exists (id {exists.id}); remove it first")
    sid = c.execute(schedules.insert().values(
        kind=p.kind, atom=p.atom, params=orjson.dumps(p.params).decode(), every=p.every,
        next_run=env.now + p.first_in, created_at=env.now).returning(schedules.c.id)).scalar_one()
    env.due.append(env.now + p.first_in)
    return {"schedule_id": sid}


def remove(c: sa.Connection, p: P.ScheduleRef, env: Q.Env) -> dict[str, Any]:
    if c.execute(schedules.delete().where(schedules.c.id == p.schedule_id)).rowcount == 0:
        raise NotFound(f"schedule {p.schedule_id} does not exist")
    return {"removed": p.schedule_id}


def list_all(c: sa.Connection, _p: P.Empty, env: Q.Env) -> dict[str, Any]:
    rows = c.execute(sa.select(schedules).order_by(schedules.c.id)).all()
    out = []
    for r in rows:
        d = as_dict(r)
        d["params"] = orjson.Fragment(d["params"])
        out.append(d)
    return {"schedules": out}


def fire_due(c: sa.Connection, env: Q.Env) -> list[int]:
    """Enqueue every due schedule's task and move it to its next slot; returns task ids."""
    fired = []
    # several hubs may share the database: a hub fires the schedules it could lock and skips
    # those another hub is firing right now (whose next_run will have moved when it commits)
    due = sa.select(schedules).where(schedules.c.next_run <= env.now).with_for_update(skip_locked=True)
    for r in c.execute(due).all():
        res = Q.enqueue(c, P.Enqueue(kind=r.kind, atom=r.atom, params=orjson.loads(r.params),
                                     dedupe_key=f"schedule:{r.id}", max_attempts=3), env)
        slots = math.floor((env.now - r.next_run) / r.every) + 1
        nxt = r.next_run + slots * r.every
        # a firing while the previous task still waits adds no second copy (dedupe key)
        new = not res["deduplicated"]
        c.execute(schedules.update().where(schedules.c.id == r.id).values(
            next_run=nxt, last_run=env.now, last_task_id=res["task_id"], fired=schedules.c.fired + int(new)))
        env.due.append(nxt)
        if new:
            fired.append(res["task_id"])
    return fired


def next_run(c: sa.Connection) -> float | None:
    return c.execute(sa.select(sa.func.min(schedules.c.next_run))).scalar()
