"""Queue semantics: enqueue, lease, heartbeat, checkpoint, ack, fail, cancel, retry, reap.

Each function runs inside a transaction the server opened and must raise an ``RpcError``
*before* it writes anything, so a refused request never leaves half a change behind.
Fencing lives here: every call that touches a leased task names the lease token, and a
stale token matches no row.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import bindparam as bp
from sqlalchemy import literal_column

from kiri.hub.store.db import LIMITS_LOCK, as_dict
from kiri.hub.store.prepared import Prepared
from kiri.hub.store.schema import agents, checkpoints, kinds, tasks
from kiri.protocol import Conflict, InvalidParams, LeaseLost, NotFound, RpcError
from kiri.protocol import params as P

QUEUED = literal_column("'queued'")
LEASED = literal_column("'leased'")
MAX_JSON_BYTES = 1 << 20


@dataclass(frozen=True)
class QueueSettings:
    lease_ttl: float = 30.0
    backoff_base: float = 1.0
    backoff_cap: float = 300.0


@dataclass
class Env:
    """What one operation knows of its caller, and the side effects it leaves for the server."""

    now: float
    settings: QueueSettings
    agent: str | None = None
    available: list[str] = field(default_factory=list)  # kinds that became leasable now
    freed: list[str] = field(default_factory=list)  # limited kinds a leased task of ended (room under the limit)
    due: list[float] = field(default_factory=list)  # future run_after times to wake at


def _json(value: Any, what: str) -> str:
    text = orjson.dumps(value).decode()
    if len(text) > MAX_JSON_BYTES:
        raise InvalidParams(f"{what} is {len(text)} bytes of JSON; the limit is {MAX_JSON_BYTES}")
    return text


def _frag(text: str | None) -> Any:
    """Pass stored JSON through to the reply without decoding and re-encoding it."""
    return orjson.Fragment(text) if text else None


def backoff(failures: int, s: QueueSettings) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
    base = min(s.backoff_cap, s.backoff_base * (2 ** max(0, failures - 1)))
    return base / 2 + random.random() * base / 2


# --- enqueue ---------------------------------------------------------------------------

_insert_task = Prepared(
    tasks.insert()
    .values(kind=bp("v_kind"), atom=bp("v_atom"), params=bp("v_params"), priority=bp("v_priority"),
            status="queued", run_after=bp("v_run_after"), max_attempts=bp("v_max"),
            dedupe_key=bp("v_dedupe"), parent_id=bp("v_parent"), created_at=bp("v_now"),
            updated_at=bp("v_now"), deadline=bp("v_deadline"))
    .returning(tasks.c.id)
)
_find_dedupe = sa.select(tasks.c.id).where(
    tasks.c.dedupe_key == bp("key"), tasks.c.status.in_(["queued", "leased"])
)


def enqueue(c: sa.Connection, p: P.Enqueue, env: Env) -> dict[str, Any]:
    if p.dedupe_key is not None:
        existing = c.execute(_find_dedupe, {"key": p.dedupe_key}).scalar()
        if existing is not None:
            return {"task_id": existing, "deduplicated": True}
    if p.parent_id is not None and c.execute(
        sa.select(tasks.c.id).where(tasks.c.id == p.parent_id)
    ).scalar() is None:
        raise NotFound(f"parent task {p.parent_id} does not exist")
    row = _insert_task.first(c, _insert_args(p, env))
    assert row is not None
    return _enqueued(p, row["id"], env)


def _insert_args(p: P.Enqueue, env: Env) -> dict[str, Any]:
    """The insert's parameters; raises (before anything is written) on oversized params."""
    return {
        "v_kind": p.kind, "v_atom": p.atom, "v_params": _json(p.params, "params"), "v_priority": p.priority,
        "v_run_after": env.now + p.delay, "v_max": p.max_attempts, "v_dedupe": p.dedupe_key,
        "v_parent": p.parent_id, "v_now": env.now, "v_deadline": p.deadline,
    }


def _enqueued(p: P.Enqueue, task_id: int, env: Env) -> dict[str, Any]:
    if p.delay > 0:
        env.due.append(env.now + p.delay)
    else:
        env.available.append(p.kind)
    return {"task_id": task_id, "deduplicated": False}


Answer = tuple[Any, RpcError | None]


def enqueue_run(c: sa.Connection, ps: list[P.Enqueue], env: Env) -> list[Answer]:
    """Enqueues that arrived one after another in one batch (a client pipelining them), in
    their order. Those with neither dedupe key nor parent need no read first, so a run of
    them is inserted by one pipelined ``Prepared.each``: on PostgreSQL one round trip for
    the run instead of one per task. The others, in between, go one by one as before."""
    out: list[Answer] = []
    plain: list[tuple[int, P.Enqueue, dict[str, Any]]] = []

    def flush() -> None:
        for (slot, p, _args), rows in zip(plain, _insert_task.each(c, [a for _, _, a in plain]), strict=True):
            out[slot] = (_enqueued(p, rows[0][0], env), None)
        plain.clear()

    for p in ps:
        out.append((None, None))
        if p.dedupe_key is not None or p.parent_id is not None:
            flush()
            try:
                out[-1] = (enqueue(c, p, env), None)
            except RpcError as e:
                out[-1] = (None, e)
            continue
        try:
            plain.append((len(out) - 1, p, _insert_args(p, env)))
        except RpcError as e:
            out[-1] = (None, e)
    flush()
    return out


# --- lease -----------------------------------------------------------------------------

def _held_back(kind: sa.BindParameter[Any]) -> sa.Exists:
    """The kind is paused, or as many of it are leased as its concurrency allows. A kind
    without settings has no row: one primary-key probe, and the count runs only for a kind
    with a limit (on the status/kind index, over its leased tasks alone)."""
    running = tasks.alias("running")
    leased_now = (sa.select(sa.func.count()).select_from(running)
                  .where(running.c.status == LEASED, running.c.kind == kind).scalar_subquery())
    return sa.exists().where(kinds.c.kind == kind, sa.or_(
        kinds.c.paused, sa.and_(kinds.c.concurrency.is_not(None), kinds.c.concurrency <= leased_now)))


def _next_ready(n_kinds: int) -> sa.ScalarSelect[Any]:
    """The best ready task among n kinds: one index probe per kind, then the best of those;
    a kind paused or at its concurrency limit offers none.

    On PostgreSQL, where several hubs lease from one table at once, each probe locks the task
    it finds and skips tasks another transaction holds (``FOR UPDATE SKIP LOCKED``): two
    hubs never pick the same task, and neither waits for the other. SQLite has one writer
    and no such clause (SQLAlchemy leaves it out)."""
    probes = [
        sa.select(tasks.c.id, tasks.c.priority, tasks.c.run_after)
        .where(tasks.c.status == QUEUED, tasks.c.kind == bp(f"k{i}"), tasks.c.run_after <= bp("now"),
               ~_held_back(bp(f"k{i}")))
        .order_by(tasks.c.priority.desc(), tasks.c.run_after, tasks.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .subquery(f"p{i}")
        for i in range(n_kinds)
    ]
    if n_kinds == 1:
        return sa.select(probes[0].c.id).scalar_subquery()
    best = sa.union_all(*(sa.select(p) for p in probes)).subquery("best")
    return (
        sa.select(best.c.id)
        .order_by(best.c.priority.desc(), best.c.run_after, best.c.id)
        .limit(1)
        .scalar_subquery()
    )


# (spelled out: SQLAlchemy drops the table names inside RETURNING, and "kind = kind" would
# compare the kinds table's column with itself)
_kind_deadline = sa.text("(SELECT kinds.deadline FROM kinds WHERE kinds.kind = tasks.kind)")


def _lease_stmt(n_kinds: int, token: str = "tok") -> sa.Update:
    """``token``: the new lease token's parameter name (an ack-then-lease statement also binds
    the acked task's token)."""
    return (
        tasks.update()
        .where(tasks.c.id == _next_ready(n_kinds))
        .values(
            status="leased",
            attempts=tasks.c.attempts + 1,
            lease_owner=bp("owner"),
            lease_token=bp(token),
            lease_ttl=bp("ttl"),
            lease_expires_at=bp("expires"),
            started_at=sa.func.coalesce(tasks.c.started_at, bp("now")),
            updated_at=bp("now"),
        )
        .returning(tasks.c.id, tasks.c.kind, tasks.c.atom, tasks.c.params, tasks.c.attempts,
                   tasks.c.max_attempts, tasks.c.priority, tasks.c.parent_id, tasks.c.run_after,
                   sa.func.coalesce(tasks.c.deadline, _kind_deadline).label("deadline"))
    )


def _lease_with_checkpoint_stmt(n_kinds: int) -> sa.Select[Any]:
    """PostgreSQL: the lease and its checkpoint in one statement (a data-modifying CTE), one
    round trip instead of two. SQLite has no UPDATE inside WITH, and no round trips."""
    leased = _lease_stmt(n_kinds).cte("leased")
    ck = checkpoints.c
    return (sa.select(leased, ck.step.label("ck_step"), ck.data.label("ck_data"))
            .select_from(leased.outerjoin(checkpoints, ck.task_id == leased.c.id)))


@functools.cache
def _prepared_lease(n_kinds: int, joined: bool) -> Prepared:
    """One prepared lease statement per number of kinds (and backend), built on first use."""
    return Prepared(_lease_with_checkpoint_stmt(n_kinds) if joined else _lease_stmt(n_kinds))


def _limits_lock_stmt(n_kinds: int) -> sa.Select[Any]:
    """PostgreSQL: wait for the transaction-scoped lock on leasing limited kinds, if any of
    these kinds has a limit.

    The lease statement counts a kind's leased tasks in its own snapshot, which cannot see a
    lease another hub has made but not yet committed: two hubs would each find room for the
    last slot. Taken in a statement of its own before the lease, the lock makes the second
    hub wait for the first one's commit, and its lease statement (a new snapshot) then sees
    that lease. One lock for all limited kinds, so locks are never taken in two orders (no
    deadlock); kinds without a limit take none, and lease as concurrently as before."""
    return (sa.select(sa.func.pg_advisory_xact_lock(LIMITS_LOCK)).select_from(kinds)
            .where(kinds.c.kind.in_([bp(f"k{i}") for i in range(n_kinds)]), kinds.c.concurrency.is_not(None))
            .limit(1))


@functools.cache
def _prepared_limits_lock(n_kinds: int) -> Prepared:
    return Prepared(_limits_lock_stmt(n_kinds))


_limited_now = Prepared(sa.select(kinds.c.kind).where(kinds.c.concurrency.is_not(None)))
LIMITS_FRESH = 1.0  # seconds a hub trusts its list of limited kinds (its own changes: at once)


def _limited(c: sa.Connection, now: float) -> frozenset[str]:
    """The kinds with a concurrency limit, as this connection last read them (at most
    ``LIMITS_FRESH`` seconds ago): leases of other kinds skip the limits lock's round trip.
    A limit set through this hub applies at once (``set_kind`` forgets the list); one set
    through another hub, within a second."""
    got = c.info.get("kiri.limited")
    if got is None or not 0 <= now - got[0] < LIMITS_FRESH:
        got = c.info["kiri.limited"] = (now, frozenset(k for (k,) in _limited_now.tuples(c, {})))
    return got[1]


def one_statement(c: sa.Connection, method: str, params: Any, now: float) -> bool:
    """PostgreSQL: whether a request is one statement, so that, alone in its batch, it can
    run without a transaction around it (``GroupCommit._alone``). A lease is one (with its
    checkpoint), and so is an ack (with its checkpoint's deletion, and its next lease) —
    unless a kind leased has a concurrency limit: that lease takes a lock first, which must
    be held till the commit."""
    if c.dialect.name != "postgresql":
        return False
    if method == "lease":
        kinds: list[str] = params.kinds
    elif method == "ack":
        kinds = params.next.kinds if params.next is not None else []
    else:
        return False
    return _limited(c, now).isdisjoint(kinds)


def _ended(c: sa.Connection, env: Env, kind: str) -> None:
    """A leased task of ``kind`` ended. That gives a waiting lease something to do only where
    the kind has a concurrency limit (room under it), so only then is it noted in
    ``env.freed``: an ack of an unlimited kind wakes no one here and, on PostgreSQL, sends
    the other hubs no notification (a round trip and a wake-up per task otherwise)."""
    if kind in _limited(c, env.now):
        env.freed.append(kind)


_get_checkpoint = Prepared(
    sa.select(checkpoints.c.step, checkpoints.c.data).where(checkpoints.c.task_id == bp("tid"))
)


def _lease_args(p: P.Lease | P.NextLease, env: Env, token: str = "tok"
                ) -> tuple[list[str], float, dict[str, Any], str]:
    """For a lease asked for: its kinds (each once), its ttl, the lease statement's parameters
    (``k0``… for the kinds, the new token as ``token``) and the new lease's token."""
    kinds = list(dict.fromkeys(p.kinds))
    ttl = p.ttl or env.settings.lease_ttl
    secret = secrets.token_hex(16)
    args: dict[str, Any] = {f"k{i}": k for i, k in enumerate(kinds)}
    args.update({"now": env.now, "owner": env.agent, token: secret, "ttl": ttl, "expires": env.now + ttl})
    return kinds, ttl, args, secret


def _leased(row: dict[str, Any], ck: dict[str, Any] | None, token: str, ttl: float, env: Env) -> dict[str, Any]:
    """The reply to a lease that got a task: the task, its checkpoint and the lease."""
    return {
        "task": {
            "id": row["id"], "kind": row["kind"], "atom": row["atom"], "params": _frag(row["params"]),
            "attempt": row["attempts"], "max_attempts": row["max_attempts"],
            "priority": row["priority"], "parent_id": row["parent_id"], "ready_at": row["run_after"],
            "deadline": row["deadline"],
            "checkpoint": (
                {"step": ck["step"], "data": base64.b64encode(ck["data"]).decode()} if ck else None
            ),
        },
        "lease": {"token": token, "expires_at": env.now + ttl, "ttl": ttl},
    }


def _joined_checkpoint(row: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint a PostgreSQL lease statement read beside its task (``ck_*`` columns)."""
    return {"step": row["ck_step"], "data": row["ck_data"]} if row["ck_step"] is not None else None


def lease(c: sa.Connection, p: P.Lease | P.NextLease, env: Env) -> dict[str, Any] | None:
    """Lease the best ready task of the given kinds, or None when there is none."""
    kinds, ttl, args, token = _lease_args(p, env)
    joined = c.dialect.name == "postgresql"
    if joined and not _limited(c, env.now).isdisjoint(kinds):
        _prepared_limits_lock(len(kinds)).run(c, {f"k{i}": k for i, k in enumerate(kinds)})
    row = _prepared_lease(len(kinds), joined).first(c, args)
    if row is None:
        return None
    ck = _joined_checkpoint(row) if joined else _get_checkpoint.first(c, {"tid": row["id"]})
    return _leased(row, ck, token, ttl, env)


# --- fenced calls on a leased task -----------------------------------------------------

_task_state = sa.select(tasks.c.status, tasks.c.lease_token, tasks.c.lease_owner).where(
    tasks.c.id == bp("tid")
)
# The fence finds its task by primary key. The status goes through coalesce() (a no-op: it
# is never null) so that PostgreSQL's planner cannot pick a status index instead: by their
# statistics ix_tasks_leased and ix_tasks_status_kind look tiny, but under load they hold
# every task leased since the last vacuum as a dead entry, and an ack read ~225 of them
# (bench/queue.py --db pg: 8,565 ack scans read 1.9 M entries of ix_tasks_leased).
_fence = sa.and_(
    tasks.c.id == bp("tid"), sa.func.coalesce(tasks.c.status, "") == LEASED, tasks.c.lease_token == bp("tok")
)


_holds = sa.select(tasks.c.id).where(_fence)


def holds_lease(c: sa.Connection, task_id: int, token: str) -> bool:
    """Whether ``token`` is the live lease on the task: the fence every result write passes."""
    return c.execute(_holds, {"tid": task_id, "tok": token}).first() is not None


def _lost(c: sa.Connection, task_id: int) -> Exception:
    """The precise reason a fenced call matched nothing."""
    row = c.execute(_task_state, {"tid": task_id}).first()
    if row is None:
        return NotFound(f"task {task_id} does not exist")
    if row.status == "leased":
        why = f"it was re-leased to {row.lease_owner or 'another agent'}"
    else:
        why = f"it is now {row.status}"
    return LeaseLost(
        f"lease lost on task {task_id}: {why}; stop working on it and lease again",
        {"task_id": task_id, "status": row.status},
    )


_heartbeat_stmt = Prepared(
    tasks.update()
    .where(_fence)
    .values(
        lease_expires_at=bp("now") + tasks.c.lease_ttl,
        progress=sa.func.coalesce(bp("prog"), tasks.c.progress),
        updated_at=bp("now"),
    )
    .returning(tasks.c.lease_expires_at, tasks.c.cancel_requested)
)


def heartbeat(c: sa.Connection, p: P.Heartbeat, env: Env) -> dict[str, Any]:
    # a ``trail`` (a trainer's latest steps one by one) goes to the task's followers with the
    # progress event, but is not stored: the task keeps its latest figures, not hundreds of them
    kept = p.progress if p.progress is None or "trail" not in p.progress else {
        k: v for k, v in p.progress.items() if k != "trail"}
    progress = _json(kept, "progress") if kept is not None else None
    row = _heartbeat_stmt.first(c, {"tid": p.task_id, "tok": p.lease_token, "now": env.now, "prog": progress})
    if row is None:
        raise _lost(c, p.task_id)
    return {"expires_at": row["lease_expires_at"], "cancel": bool(row["cancel_requested"])}


_touch_stmt = (
    tasks.update()
    .where(_fence)
    .values(lease_expires_at=bp("now") + tasks.c.lease_ttl, updated_at=bp("now"))
    .returning(tasks.c.attempts)
)


def decode_base64(text: str, field: str, what: str, limit: int) -> bytes:
    """A base64 parameter as bytes, refused before any write if malformed or over ``limit``."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParams(f"{field}: must be standard base64 (RFC 4648)") from None
    if len(data) > limit:
        raise InvalidParams(f"{what} is {len(data)} bytes; the limit is {limit}")
    return data


def checkpoint(c: sa.Connection, p: P.Checkpoint, env: Env, max_bytes: int) -> dict[str, Any]:
    data = decode_base64(p.data, "data", "checkpoint", max_bytes)
    row = c.execute(_touch_stmt, {"tid": p.task_id, "tok": p.lease_token, "now": env.now}).first()
    if row is None:
        raise _lost(c, p.task_id)
    c.execute(checkpoints.delete().where(checkpoints.c.task_id == p.task_id))
    c.execute(
        checkpoints.insert(),
        {"task_id": p.task_id, "step": p.step, "data": data, "size": len(data),
         "attempt": row.attempts, "created_at": env.now},
    )
    return {"stored": True, "step": p.step, "bytes": len(data)}


_ack_update = (
    tasks.update()
    .where(_fence)
    .values(status="done", result=bp("res"), lease_expires_at=None,
            finished_at=bp("now"), updated_at=bp("now"))
    .returning(tasks.c.id, tasks.c.kind)
)
_ack_stmt = Prepared(_ack_update)
_drop_checkpoint_stmt = checkpoints.delete().where(checkpoints.c.task_id == bp("tid"))
_drop_checkpoint = Prepared(_drop_checkpoint_stmt)


def _ack_and_drop_stmt() -> sa.Select[Any]:
    """PostgreSQL: the ack and its checkpoint's deletion in one statement (one round trip)."""
    acked = _ack_update.cte("acked")
    gone = checkpoints.delete().where(checkpoints.c.task_id.in_(sa.select(acked.c.id))).cte("gone")
    return sa.select(acked.c.id, acked.c.kind).add_cte(gone)


_ack_and_drop = Prepared(_ack_and_drop_stmt())


def _ack_then_lease_stmt(n_kinds: int) -> sa.Select[Any]:
    """PostgreSQL: the ack, its checkpoint's deletion and the agent's next lease, with that
    task's checkpoint, in one statement: a busy agent's whole turn is one round trip. The
    lease runs only if the ack matched (a lost lease leases nothing) and binds its new token
    as ``ntok``. It sees the ack's snapshot, where the acked task still counts as leased, so
    ``ack`` uses it only for next kinds without a concurrency limit."""
    acked = _ack_update.cte("acked")
    gone = checkpoints.delete().where(checkpoints.c.task_id.in_(sa.select(acked.c.id))).cte("gone")
    leased = _lease_stmt(n_kinds, token="ntok").where(sa.exists(sa.select(acked.c.id))).cte("leased")
    ck = checkpoints.c
    return (sa.select(acked.c.id.label("acked_id"), acked.c.kind.label("acked_kind"), leased,
                      ck.step.label("ck_step"), ck.data.label("ck_data"))
            .select_from(acked.outerjoin(leased, sa.true()).outerjoin(checkpoints, ck.task_id == leased.c.id))
            .add_cte(gone))


@functools.cache
def _prepared_ack_then_lease(n_kinds: int) -> Prepared:
    return Prepared(_ack_then_lease_stmt(n_kinds))


def _ack_then_lease(c: sa.Connection, p: P.Ack, nxt: P.NextLease, env: Env,
                    result: str | None) -> dict[str, Any] | None:
    """PostgreSQL, next kinds without a limit: ack and lease in one statement; the reply, or
    None when the ack matched nothing (the caller finds out why)."""
    kinds, ttl, args, token = _lease_args(nxt, env, token="ntok")
    args.update(tid=p.task_id, tok=p.lease_token, res=result)
    row = _prepared_ack_then_lease(len(kinds)).first(c, args)
    if row is None:
        return None
    _ended(c, env, row["acked_kind"])
    got = _leased(row, _joined_checkpoint(row), token, ttl, env) if row["id"] is not None else None
    return {"status": "done", "next": got or {"task": None}}


def ack(c: sa.Connection, p: P.Ack, env: Env) -> dict[str, Any]:
    result = _json(p.result, "result") if p.result is not None else None
    args = {"tid": p.task_id, "tok": p.lease_token, "now": env.now, "res": result}
    pg = c.dialect.name == "postgresql"
    row: dict[str, Any] | None = None
    if pg and p.next is not None and _limited(c, env.now).isdisjoint(p.next.kinds):
        done = _ack_then_lease(c, p, p.next, env, result)
        if done is not None:
            return done
    elif pg:
        row = _ack_and_drop.first(c, args)
    else:
        row = _ack_stmt.first(c, args)
        if row is not None:
            _drop_checkpoint.run(c, {"tid": p.task_id})
    if row is not None:
        _ended(c, env, row["kind"])
        if p.next is not None:
            nxt = lease(c, p.next, env)
            return {"status": "done", "next": nxt or {"task": None}}
        return {"status": "done"}
    state = c.execute(_task_state, {"tid": p.task_id}).first()
    if state is not None and state.status == "done" and state.lease_token == p.lease_token:
        # A resend after a lost reply. The next task leased with the lost reply will expire
        # and be retried; lease a fresh one so this agent keeps working.
        if p.next is not None:
            nxt = lease(c, p.next, env)
            return {"status": "already_done", "next": nxt or {"task": None}}
        return {"status": "already_done"}
    raise _lost(c, p.task_id)


_fail_select = sa.select(
    tasks.c.attempts, tasks.c.max_attempts, tasks.c.failures, tasks.c.cancel_requested,
    tasks.c.kind,
).where(_fence)


def fail(c: sa.Connection, p: P.Fail, env: Env) -> dict[str, Any]:
    row = c.execute(_fail_select, {"tid": p.task_id, "tok": p.lease_token}).first()
    if row is None:
        state = c.execute(_task_state, {"tid": p.task_id}).first()
        if state is not None and state.lease_token == p.lease_token and state.status != "leased":
            # The same fail (or a release) sent twice, e.g. resent after a reconnect.
            return {"status": state.status, "already": True}
        raise _lost(c, p.task_id)
    where = tasks.c.id == p.task_id
    common = {"lease_expires_at": None, "updated_at": env.now}
    env.freed.append(row.kind)
    if row.cancel_requested:
        c.execute(tasks.update().where(where).values(
            status="cancelled", finished_at=env.now, error=p.error, **common))
        _drop_checkpoint.run(c, {"tid": p.task_id})
        return {"status": "cancelled"}
    if p.release:
        # A graceful hand-back (agent shutting down): no failure, and the attempt is
        # given back so a restart loop cannot push a healthy task to dead.
        c.execute(tasks.update().where(where).values(
            status="queued", run_after=env.now, attempts=tasks.c.attempts - 1, **common))
        env.available.append(row.kind)
        return {"status": "queued", "run_after": env.now}
    failures = row.failures + 1
    if p.retry and row.attempts < row.max_attempts:
        delay = p.delay if p.delay is not None else backoff(failures, env.settings)
        run_after = env.now + delay
        c.execute(tasks.update().where(where).values(
            status="queued", run_after=run_after, failures=failures, error=p.error, **common))
        if delay > 0:
            env.due.append(run_after)
        else:
            env.available.append(row.kind)
        return {"status": "queued", "run_after": run_after}
    c.execute(tasks.update().where(where).values(
        status="dead", failures=failures, error=p.error, finished_at=env.now, **common))
    return {"status": "dead"}


# --- owner actions ---------------------------------------------------------------------

def cancel(c: sa.Connection, p: P.TaskRef, env: Env) -> dict[str, Any]:
    row = c.execute(_task_state, {"tid": p.task_id}).first()
    if row is None:
        raise NotFound(f"task {p.task_id} does not exist")
    if row.status == "queued":
        c.execute(tasks.update().where(tasks.c.id == p.task_id).values(
            status="cancelled", finished_at=env.now, updated_at=env.now))
        _drop_checkpoint.run(c, {"tid": p.task_id})
        return {"status": "cancelled"}
    if row.status == "leased":
        c.execute(tasks.update().where(tasks.c.id == p.task_id).values(
            cancel_requested=True, updated_at=env.now))
        return {"status": "cancelling"}
    raise Conflict(f"task {p.task_id} is already {row.status}; only queued or leased tasks can be cancelled")


def retry(c: sa.Connection, p: P.TaskRef, env: Env) -> dict[str, Any]:
    row = c.execute(
        sa.select(tasks.c.status, tasks.c.kind, tasks.c.dedupe_key).where(tasks.c.id == p.task_id)
    ).first()
    if row is None:
        raise NotFound(f"task {p.task_id} does not exist")
    if row.status not in ("dead", "cancelled"):
        raise Conflict(f"task {p.task_id} is {row.status}; only dead or cancelled tasks can be retried")
    if row.dedupe_key is not None:
        other = c.execute(_find_dedupe, {"key": row.dedupe_key}).scalar()
        if other is not None:
            raise Conflict(
                f"task {other} with the same dedupe key {row.dedupe_key!r} is already pending"
            )
    c.execute(tasks.update().where(tasks.c.id == p.task_id).values(
        status="queued", attempts=0, run_after=env.now, cancel_requested=False,
        finished_at=None, lease_expires_at=None, updated_at=env.now))
    env.available.append(row.kind)
    return {"status": "queued"}


def retry_dead(c: sa.Connection, p: P.RetryDead, env: Env) -> dict[str, Any]:
    """Every dead task (of ``p.kind``), oldest first, back in the queue with fresh attempts:
    what a user does after fixing what killed them. A task whose dedupe key a pending task
    holds stays dead (the work is already queued), as ``retry`` refuses it."""
    q = sa.select(tasks.c.id, tasks.c.kind, tasks.c.dedupe_key).where(tasks.c.status == "dead")
    if p.kind is not None:
        q = q.where(tasks.c.kind == p.kind)
    rows = c.execute(q.order_by(tasks.c.id).limit(p.limit)).all()
    retried: list[int] = []
    skipped: list[int] = []
    keys: set[str] = set()
    for row in rows:
        if row.dedupe_key is not None and (row.dedupe_key in keys
                                           or c.execute(_find_dedupe, {"key": row.dedupe_key}).scalar() is not None):
            skipped.append(row.id)
            continue
        if row.dedupe_key is not None:
            keys.add(row.dedupe_key)
        retried.append(row.id)
    for i in range(0, len(retried), 500):
        c.execute(tasks.update().where(tasks.c.id.in_(retried[i: i + 500])).values(
            status="queued", attempts=0, run_after=env.now, cancel_requested=False,
            finished_at=None, lease_expires_at=None, updated_at=env.now))
    again = set(retried)
    env.available.extend({r.kind for r in rows if r.id in again})
    return {"retried": retried, "skipped": skipped}


# --- kinds: pause, concurrency, default deadline ------------------------------------------

def kind_rows(c: sa.Connection, only: str | None = None) -> list[dict[str, Any]]:
    """Every kind that has settings or unfinished tasks, with its queued and leased counts."""
    counts_q = (sa.select(tasks.c.kind, tasks.c.status, sa.func.count().label("n"))
                .where(tasks.c.status.in_(["queued", "leased"])).group_by(tasks.c.kind, tasks.c.status))
    set_q = sa.select(kinds)
    if only is not None:
        counts_q = counts_q.where(tasks.c.kind == only)
        set_q = set_q.where(kinds.c.kind == only)
    out: dict[str, dict[str, Any]] = {}

    def row(kind: str) -> dict[str, Any]:
        return out.setdefault(kind, {"kind": kind, "paused": False, "concurrency": None, "deadline": None,
                                     "queued": 0, "leased": 0, "updated_at": None})

    for r in c.execute(set_q):
        row(r.kind).update(paused=bool(r.paused), concurrency=r.concurrency, deadline=r.deadline,
                           updated_at=r.updated_at)
    for r in c.execute(counts_q):
        row(r.kind)[r.status] = r.n
    return [out[k] for k in sorted(out)]


def list_kinds(c: sa.Connection, _p: P.Empty, _env: Env) -> dict[str, Any]:
    return {"kinds": kind_rows(c)}


def set_kind(c: sa.Connection, p: P.SetKind, env: Env) -> dict[str, Any]:
    """Change the settings given (a setting given as null is cleared); the rest stay. Waiting
    agents are woken when the change lets more of the kind run (resumed, limit raised)."""
    given = {f: getattr(p, f) for f in ("paused", "concurrency", "deadline") if f in p.model_fields_set}
    before = kind_rows(c, p.kind)
    old = ({f: before[0][f] for f in ("paused", "concurrency", "deadline")} if before
           else {"paused": False, "concurrency": None, "deadline": None})
    new = {"paused": old["paused"], "concurrency": old["concurrency"], "deadline": old["deadline"], **given}
    changed = any(new[f] != old[f] for f in new)
    if changed:
        c.info.pop("kiri.limited", None)  # leases from now on read the limits again
        values = {**new, "updated_at": env.now}
        if c.execute(kinds.update().where(kinds.c.kind == p.kind).values(**values)).rowcount == 0:
            c.execute(kinds.insert().values(kind=p.kind, **values))
        room_before = 0 if old["paused"] else (old["concurrency"] or math.inf)
        room_after = 0 if new["paused"] else (new["concurrency"] or math.inf)
        if room_after > room_before:  # as many wake-ups as tasks that may now start
            ready = c.execute(sa.select(sa.func.count()).where(
                tasks.c.status == QUEUED, tasks.c.kind == p.kind, tasks.c.run_after <= env.now)).scalar() or 0
            env.available.extend([p.kind] * int(min(ready, room_after - room_before, 1000)))
    after = kind_rows(c, p.kind)  # empty: nothing set and no tasks (a no-op on an unknown kind)
    return {"kind": after[0] if after else {"kind": p.kind, **old, "queued": 0, "leased": 0, "updated_at": None},
            "changed": changed}


# --- the reaper ---------------------------------------------------------------------

def reap(c: sa.Connection, env: Env) -> list[tuple[int, str]]:
    """Return expired leases to the queue (or to dead / cancelled); durable, not lazy."""
    expired = tasks.c.lease_expires_at < env.now
    new_status = sa.case(
        (tasks.c.cancel_requested, "cancelled"),
        (tasks.c.attempts >= tasks.c.max_attempts, "dead"),
        else_="queued",
    )
    rows = c.execute(
        tasks.update()
        .where(tasks.c.status == LEASED, expired)
        .values(
            status=new_status,
            expiries=tasks.c.expiries + 1,
            run_after=env.now,
            lease_expires_at=None,
            error=sa.literal("lease expired: ")
            + sa.func.coalesce(tasks.c.lease_owner, "agent")
            + " stopped heartbeating",
            finished_at=sa.case((new_status != "queued", env.now), else_=None),
            updated_at=env.now,
        )
        .returning(tasks.c.id, tasks.c.kind, tasks.c.status)
    ).all()
    for r in rows:
        if r.status == "queued":
            env.available.append(r.kind)
        else:
            _ended(c, env, r.kind)
    return [(r.id, r.status) for r in rows]


def next_due(c: sa.Connection, now: float) -> float | None:
    """Earliest future run_after among queued tasks, so the server can wake waiters then."""
    return c.execute(
        sa.select(sa.func.min(tasks.c.run_after)).where(tasks.c.status == QUEUED, tasks.c.run_after > now)
    ).scalar()


def ready_kinds(c: sa.Connection, kinds_: Iterable[str], now: float) -> list[str]:
    """Which of these kinds have a task a lease would take now (ready, and the kind neither
    paused nor at its limit): one index probe per kind, however many tasks wait paused."""
    out = []
    for kind in dict.fromkeys(kinds_):
        if c.execute(sa.select(_next_ready(1)), {"k0": kind, "now": now}).scalar() is not None:
            out.append(kind)
    return out


# --- reads -----------------------------------------------------------------------------

_SUMMARY = (tasks.c.id, tasks.c.kind, tasks.c.atom, tasks.c.status, tasks.c.priority,
            tasks.c.attempts, tasks.c.max_attempts, tasks.c.failures, tasks.c.expiries,
            tasks.c.lease_owner, tasks.c.run_after, tasks.c.created_at, tasks.c.updated_at,
            tasks.c.finished_at, tasks.c.error, tasks.c.progress, tasks.c.dedupe_key,
            tasks.c.parent_id)


def _summary(row: sa.Row) -> dict[str, Any]:
    d = as_dict(row)
    d["progress"] = _frag(d["progress"])
    return d


def list_tasks(c: sa.Connection, p: P.Tasks, env: Env) -> dict[str, Any]:
    q = sa.select(*_SUMMARY).order_by(tasks.c.id.desc()).limit(p.limit)
    if p.status:
        q = q.where(tasks.c.status == p.status)
    if p.kind:
        q = q.where(tasks.c.kind == p.kind)
    if p.atom:
        q = q.where(tasks.c.atom == p.atom)
    if p.before_id:
        q = q.where(tasks.c.id < p.before_id)
    rows = [_summary(r) for r in c.execute(q)]
    return {"tasks": rows, "next_before_id": rows[-1]["id"] if len(rows) == p.limit else None}


def get_task(c: sa.Connection, p: P.TaskRef, env: Env) -> dict[str, Any]:
    row = c.execute(sa.select(tasks).where(tasks.c.id == p.task_id)).first()
    if row is None:
        raise NotFound(f"task {p.task_id} does not exist (finished tasks are deleted once they are older "
                       "than the hub's --keep-finished-tasks window)")
    d = as_dict(row)
    d.pop("lease_token")
    for key in ("params", "progress", "result"):
        d[key] = _frag(d[key])
    d["cancel_requested"] = bool(d["cancel_requested"])
    ck = c.execute(
        sa.select(checkpoints.c.step, checkpoints.c.size, checkpoints.c.attempt,
                  checkpoints.c.created_at).where(checkpoints.c.task_id == p.task_id)
    ).first()
    d["checkpoint"] = as_dict(ck) if ck else None
    return {"task": d}


THROUGHPUT_WINDOW = 3600.0


def throughput(c: sa.Connection, now: float, window: float = THROUGHPUT_WINDOW) -> list[dict[str, Any]]:
    """Per kind, the tasks that ended in the last ``window`` seconds: how many completed,
    died or were cancelled, the completed ones' mean and 95th-percentile duration (from
    their first lease to their end, retries included) and the error rate (dead among done and dead).

    Aggregated by SQLite over that window's rows (``ix_tasks_finished_at``), the percentile
    by one ordered probe per kind: ``stats`` runs on the hub's loop and is polled, and
    reading a busy hour's rows into Python (15,000 tasks: 135 ms) stalled the queue."""
    t = tasks.c
    since = now - window
    per: dict[str, dict[str, Any]] = {}
    duration = sa.case((t.finished_at < t.started_at, 0.0), else_=t.finished_at - t.started_at)
    # grouped by expressions, not the columns: grouped by the columns, SQLite would rather walk
    # the whole (status, kind) index in order than this window's range of ix_tasks_finished_at
    kind_, status_ = t.kind.concat(""), t.status.concat("")
    q = (sa.select(kind_.label("kind"), status_.label("status"), sa.func.count().label("n"),
                   sa.func.avg(duration).label("mean"),
                   sa.func.count(t.started_at).label("timed"))
         .where(t.finished_at > since).group_by(kind_, status_))
    for r in c.execute(q):
        k = per.setdefault(r.kind, {"kind": r.kind, "done": 0, "dead": 0, "cancelled": 0, "mean_s": None,
                                    "timed": 0})
        if r.status in ("done", "dead", "cancelled"):
            k[r.status] += r.n
        if r.status == "done":
            k["mean_s"], k["timed"] = r.mean, r.timed
    out = []
    for kind in sorted(per):
        k = per.pop(kind)
        timed = k.pop("timed")
        p95 = None
        if timed:
            p95 = c.execute(
                sa.select(duration)
                .where(t.finished_at > since, kind_ == kind, status_ == "done", t.started_at.is_not(None))
                .order_by(duration).limit(1).offset(math.ceil(0.95 * timed) - 1)).scalar()
        ended = k["done"] + k["dead"]
        out.append({**k, "window": window, "per_minute": k["done"] / (window / 60.0), "p95_s": p95,
                    "error_rate": k["dead"] / ended if ended else None})
    return out


def counts(c: sa.Connection) -> list[dict[str, Any]]:
    q = sa.select(tasks.c.kind, tasks.c.status, sa.func.count()).group_by(tasks.c.kind, tasks.c.status)
    return [{"kind": k, "status": s, "count": n} for k, s, n in c.execute(q)]


# --- agents ----------------------------------------------------------------------------

def upsert_agent(c: sa.Connection, p: P.Hello, env: Env, hub: str | None = None) -> int:
    values = {
        "role": p.role, "host": p.host, "pid": p.pid, "version": p.version,
        "kinds": orjson.dumps(p.kinds).decode() if p.kinds is not None else None,
        "connected": True, "last_seen": env.now, "hub": hub,
    }
    agent_id = c.execute(
        agents.update().where(agents.c.name == p.agent).values(**values).returning(agents.c.id)
    ).scalar()
    if agent_id is None:
        agent_id = c.execute(
            agents.insert().values(name=p.agent, first_seen=env.now, **values).returning(agents.c.id)
        ).scalar_one()
    return int(agent_id)


def _held_by(hub: str | None) -> sa.ColumnElement[bool]:
    """Agent rows that are this hub's to mark: its own, and rows no hub has claimed."""
    return sa.or_(agents.c.hub.is_(None), agents.c.hub == hub) if hub is not None else sa.true()


def touch_agents(c: sa.Connection, seen: Iterable[tuple[int, float, bool]], hub: str | None = None) -> None:
    """Record when agents were last seen and whether they are connected to ``hub``.

    A connected agent's row is claimed by this hub; a disconnect only touches a row this
    hub holds: an agent that moved to another hub (fail-over) is that hub's to mark, and
    its old hub's late word must not list it as gone."""
    up = [{"aid": a, "seen": t} for a, t, conn in seen if conn]
    down = [{"aid": a, "seen": t} for a, t, conn in seen if not conn]
    if up:
        c.execute(agents.update().where(agents.c.id == bp("aid"))
                  .values(last_seen=bp("seen"), connected=True, hub=hub), up)
    if down:
        c.execute(agents.update().where(agents.c.id == bp("aid"), _held_by(hub))
                  .values(last_seen=bp("seen"), connected=False), down)


def disconnect_all(c: sa.Connection, hub: str | None = None) -> None:
    """Every agent disconnected (one hub alone: at its start and stop), or those ``hub`` holds
    (a hub sharing its database stops; the others' agents are still theirs)."""
    c.execute(agents.update().where(_held_by(hub)).values(connected=False))
