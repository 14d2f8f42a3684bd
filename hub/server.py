"""The hub's TCP face: newline-delimited JSON-RPC 2.0 with group commit and long-poll leases.

Everything runs on one asyncio loop thread that owns the single database connection:
requests that arrive together (in one turn of the loop) are executed in one transaction,
and their replies are written only after that transaction commits. One writer means no
"database is locked", and group commit means one fsync serves many requests.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from pydantic import BaseModel, ValidationError

from kiri import PROTOCOL_VERSION, __version__
from kiri.hub import db as dbmod
from kiri.hub import decisions as D
from kiri.hub import observations as O
from kiri.hub import params as P
from kiri.hub import queue as Q
from kiri.hub import schedules as SCH
from kiri.hub import scoring as SC
from kiri.hub import weights as W
from kiri.hub.events import EventBus, publish_batch
from kiri.hub.reader import Reader
from kiri.hub.series import SeriesCache
from kiri.hub.transport import Connection, Connections, Limits
from kiri.hub.web.app import HttpFace
from kiri.hub.web.metrics import HubMetrics
from kiri.protocol import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RpcError,
    Unauthorized,
    Unavailable,
    reply_err,
    reply_ok,
)

log = logging.getLogger("kiri.hub")

MAX_DEPTH = 64  # nesting of a request's params; orjson itself cannot write beyond 254
MAX_REFUSED_BEFORE_HELLO = 3


@dataclass(frozen=True)
class HubSettings:
    db_url: str
    host: str = "127.0.0.1"
    port: int = 7746
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_checkpoint: int = 64 << 20
    tick: float = 0.5
    wal_checkpoint_every: float = 30.0
    wal_max_bytes: int = 8 << 20
    queue: Q.QueueSettings = field(default_factory=Q.QueueSettings)
    http_port: int | None = None  # None: no HTTP face
    http_host: str | None = None  # default: the same address as the TCP side


class Op:
    """One request waiting for the next batch (or, for a lease, for work to arrive)."""

    __slots__ = ("conn", "deadline", "func", "fut", "kinds", "method", "params", "reply", "req_id", "timer")

    def __init__(self, conn: Connection | None, req_id: Any, method: str, params: Any,
                 func: Callable[..., Any], reply: bool = True) -> None:
        self.conn = conn
        self.req_id = req_id
        self.method = method
        self.params = params
        self.func = func
        self.reply = reply
        self.deadline = 0.0
        self.kinds: frozenset[str] = frozenset()
        self.timer: asyncio.TimerHandle | None = None
        # set for calls made inside the hub process (the HTTP face): resolved after commit
        self.fut: asyncio.Future[Any] | None = None


def _raise(_c: sa.Connection, err: RpcError, _env: Q.Env) -> None:
    """An op that answers with a request's error, in its turn."""
    raise err


def _min(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _pong(_c: sa.Connection, _p: None, env: Q.Env) -> dict[str, Any]:
    return {"pong": True, "time": env.now}


Handler = Callable[[sa.Connection, Any, Q.Env], Any]


class Hub:
    def __init__(self, settings: HubSettings, engine: sa.Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.connections = Connections(settings.limits, self, self.loop)
        self.pending: list[Op] = []
        self.waiters: list[Op] = []
        self.batch_scheduled = False
        self.closing = False
        self.started_at = time.time()
        self.server: asyncio.Server | None = None
        self.db: sa.Connection = engine.connect()
        self.due_timer: asyncio.TimerHandle | None = None
        self.due_at = float("inf")
        self.tick_task: asyncio.Task[None] | None = None
        self.last_wal_checkpoint = time.monotonic()
        self.stats_counters: dict[str, int] = {"batches": 0, "ops": 0, "leases": 0, "acks": 0}
        self.atoms = O.AtomRegistry()
        self.events = EventBus()
        self.metrics = HubMetrics()
        self.reader = Reader(settings.db_url)
        self.series = SeriesCache()  # chart columns, kept by the reader's threads
        self.http: HttpFace | None = None
        self.methods: dict[str, tuple[type[BaseModel], Handler]] = {
            "enqueue": (P.Enqueue, Q.enqueue),
            "lease": (P.Lease, Q.lease),
            "heartbeat": (P.Heartbeat, Q.heartbeat),
            "checkpoint": (P.Checkpoint, self._checkpoint),
            "ack": (P.Ack, Q.ack),
            "fail": (P.Fail, Q.fail),
            "cancel": (P.TaskRef, Q.cancel),
            "retry": (P.TaskRef, Q.retry),
            "task": (P.TaskRef, Q.get_task),
            "tasks": (P.Tasks, Q.list_tasks),
            "stats": (P.Empty, self._stats),
            "atoms": (P.Empty, self.atoms.list),
            "define_atom": (P.DefineAtom, self.atoms.define),
            "observe": (P.Observe, self._observe),
            "commit_import": (P.ImportRef, self._commit_import),
            "abort_import": (P.ImportRef, O.abort_import),
            "observations": (P.Observations, lambda c, p, env: O.list_observations(self.atoms, c, p, env)),
            "weights": (P.WeightsQuery, W.query),
            "publish_weights": (P.PublishWeights, self._publish_weights),
            "activate_weights": (P.ActivateWeights, self._activate_weights),
            "scoring_work": (P.ScoringWork, lambda c, p, env: SC.work(self.atoms, c, p, env)),
            "record_scores": (P.RecordScores, SC.record),
            "history": (P.History, lambda c, p, env: SC.history(self.atoms, c, p, env)),
            "scores": (P.Scores, SC.list_scores),
            "schedule_add": (P.ScheduleAdd, SCH.add),
            "schedule_rm": (P.ScheduleRef, SCH.remove),
            "schedules": (P.Empty, SCH.list_all),
            "nerve_inputs": (P.Empty, D.nerve_inputs),
            "record_decision": (P.RecordDecision, D.record),
            "alert_result": (P.AlertResult, D.alert_result),
            "decisions": (P.Decisions, D.list_decisions),
            "feedback": (P.Feedback, D.feedback),
            "labels": (P.Labels, D.list_labels),
            "pending_alerts": (P.PendingAlerts, D.pending_alerts),
        }

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        with self.db.begin():
            Q.disconnect_all(self.db)
            self.atoms.load(self.db)
        self._arm_due(self._query(lambda c: _min(Q.next_due(c, time.time()), SCH.next_run(c))))
        self.server = await self.loop.create_server(
            self.connections.factory(), self.settings.host, self.settings.port, reuse_address=True,
            backlog=512,
        )
        self.tick_task = self.loop.create_task(self._ticker())
        if self.settings.http_port is not None:
            self.http = HttpFace(self)
            await self.http.start(self.settings.http_host or self.settings.host, self.settings.http_port)

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, finish what is in flight, answer waiters, close the database."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        self.events.close()
        if self.http is not None:
            await self.http.stop()
        if self.tick_task:
            self.tick_task.cancel()
        if self.pending:
            self._run_batch()
        for op in self.waiters:
            self._answer_waiter_empty(op)
        self.waiters.clear()
        self.connections.close_all()
        await asyncio.sleep(0)
        self._flush_agents()
        self.reader.close()
        dbmod.wal_checkpoint(self.db, "TRUNCATE")
        self.db.close()
        self.engine.dispose()
        log.info("hub stopped cleanly")

    # --- requests ----------------------------------------------------------------------

    def handle_line(self, conn: Connection, line: bytes) -> None:
        """Parse and check one line, then queue it for the next batch.

        Even errors and pings wait their turn, so a connection's replies always come back
        in the order its requests were sent (a waiting lease aside).
        """
        if not line.strip():
            return
        req_id: Any = None
        is_request = False  # a valid request without an id is a notification: no reply
        try:
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise ParseError(f"not valid JSON: {e}") from None
            if not isinstance(msg, dict):
                raise InvalidRequest("expected one JSON-RPC 2.0 request object per line (batches are not supported)")
            raw_id = msg.get("id")
            if raw_id is not None and (not isinstance(raw_id, str | int) or isinstance(raw_id, bool)):
                raise InvalidRequest("id must be a string, an integer or null")
            req_id = raw_id
            if msg.get("jsonrpc") != "2.0":
                raise InvalidRequest('jsonrpc must be "2.0"')
            method = msg.get("method")
            if not isinstance(method, str):
                raise InvalidRequest("method is missing or not a string")
            has_id = is_request = "id" in msg
            raw_params = msg.get("params", {})
            if not isinstance(raw_params, dict):
                raise InvalidParams("params must be an object with named fields")
            if line.count(b"[") + line.count(b"{") > MAX_DEPTH:  # only then can it nest too deep
                depth = P.nesting_depth(raw_params, MAX_DEPTH)
                if depth > MAX_DEPTH:
                    raise InvalidParams(f"params nest more than {MAX_DEPTH} levels deep; flatten them")
            self._dispatch(conn, req_id, has_id, method, raw_params)
        except RpcError as e:
            # Errors in the request itself are answered even without an id (id null), as
            # JSON-RPC 2.0 asks; a well-formed notification's errors are not.
            if is_request or isinstance(e, ParseError | InvalidRequest):
                self._submit(Op(conn, req_id, "error", e, _raise))

    def _dispatch(self, conn: Connection, req_id: Any, has_id: bool, method: str,
                  raw: dict[str, Any]) -> None:
        if method == "hello":
            self._hello(conn, req_id, raw)
            return
        if not conn.authenticated:
            conn.refused_before_hello += 1
            if conn.refused_before_hello >= MAX_REFUSED_BEFORE_HELLO:
                self._run_batch()  # flush earlier replies first
                conn.send(reply_err(req_id, Unauthorized("requests without hello; closing")))
                conn.close()
                return
            raise Unauthorized("say hello first: the first request on a connection must be hello")
        if method == "ping":
            self._submit(Op(conn, req_id, "ping", None, _pong, reply=has_id))
            return
        params, func = self._validated(method, raw)
        op = Op(conn, req_id, method, params, func, reply=has_id)
        if method == "lease":
            op.kinds = frozenset(params.kinds)
            op.deadline = time.time() + params.wait
        self._submit(op)

    def _hello(self, conn: Connection, req_id: Any, raw: dict[str, Any]) -> None:
        try:
            p = P.Hello.model_validate(raw)
        except ValidationError as e:
            raise InvalidParams(P.describe(e)) from None
        want = self.settings.token
        if want is not None and not hmac.compare_digest(
            (p.token or "").encode("utf-8", "surrogatepass"), want.encode()
        ):
            conn.bad_tokens += 1
            if conn.bad_tokens >= 3:
                self._run_batch()  # flush earlier replies first
                conn.send(reply_err(req_id, Unauthorized("wrong token (3 tries); closing")))
                conn.close()
                return
            raise Unauthorized("wrong token: pass the hub's token with --token or KIRI_TOKEN")
        self.connections.authenticated(conn)
        conn.agent = p.agent
        conn.role = p.role

        def register(c: sa.Connection, params: P.Hello, env: Q.Env) -> dict[str, Any]:
            conn.agent_id = Q.upsert_agent(c, params, env)
            return {"hub": __version__, "protocol": PROTOCOL_VERSION, "agent_id": conn.agent_id}

        self._submit(Op(conn, req_id, "hello", p, register))

    async def call(self, method: str, raw: dict[str, Any]) -> Any:
        """Run one protocol method from inside the hub (the HTTP face) in the next batch.

        Same validation, same transaction and group commit as a TCP request: the HTTP face
        adds no second way to write.
        """
        if method == "lease":  # a lease needs a connection to hand the task to
            raise MethodNotFound("lease is only served over the TCP protocol")
        params, func = self._validated(method, raw)
        return await self._await(Op(None, None, method, params, func, reply=False))

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        """A round trip through the batch loop and a database transaction (for /healthz)."""
        if self.closing:
            raise Unavailable("hub is shutting down")
        return await asyncio.wait_for(self._await(Op(None, None, "ping", None, _pong, reply=False)), timeout)

    def _validated(self, method: str, raw: dict[str, Any]) -> tuple[Any, Handler]:
        """A method's checked parameters and its handler, or the error to answer with."""
        entry = self.methods.get(method)
        if entry is None:
            raise MethodNotFound(f"unknown method {method!r}; see DESIGN.md for the method list")
        if self.closing:
            raise Unavailable("hub is shutting down; reconnect and retry")
        model, func = entry
        try:
            return model.model_validate(raw), func
        except ValidationError as e:
            raise InvalidParams(P.describe(e)) from None

    def _await(self, op: Op) -> asyncio.Future[Any]:
        """Queue an op from inside the hub; the future resolves after its batch commits."""
        op.fut = self.loop.create_future()
        self._submit(op)
        return op.fut

    def _submit(self, op: Op) -> None:
        self.pending.append(op)
        if not self.batch_scheduled:
            self.batch_scheduled = True
            self.loop.call_soon(self._run_batch)

    # --- group commit ------------------------------------------------------------------

    def _run_batch(self) -> None:
        self.batch_scheduled = False
        ops, self.pending = self.pending, []
        if not ops:
            return
        now = time.time()
        env = Q.Env(now=now, settings=self.settings.queue)
        results: list[tuple[Op, Any, RpcError | None]] = []
        try:
            with self.db.begin():
                for op in ops:
                    results.append(self._exec(op, env))
            self.atoms.commit()
        except Exception:
            self.atoms.rollback()
            # The batch as a whole failed (a constraint, a full disk ...): nothing of it was
            # committed. Run each op in its own transaction so only the culprit gets the error.
            log.exception("batch of %d failed; retrying its operations one by one", len(ops))
            results = []
            env = Q.Env(now=now, settings=self.settings.queue)
            for op in ops:
                one_env = Q.Env(now=now, settings=self.settings.queue)
                try:
                    with self.db.begin():
                        res = self._exec(op, one_env)
                    self.atoms.commit()
                    env.available += one_env.available
                    env.due += one_env.due
                except Exception as e:
                    self.atoms.rollback()
                    log.exception("operation %s failed", op.method)
                    res = (op, None, InternalError(f"internal error in {op.method}: {type(e).__name__}"))
                results.append(res)
        self.stats_counters["batches"] += 1
        self.stats_counters["ops"] += len(ops)
        out: dict[Connection, list[bytes]] = {}
        for op, result, err in results:
            try:
                self._finish(op, result, err, out)
            except Exception:  # one bad reply must not cost the batch's other replies
                log.exception("could not answer %s", op.method)
        for conn, chunks in out.items():
            conn.send(b"".join(chunks))
        if self.events.subscribers:
            publish_batch(self.events, results)
        for t in env.due:
            self._arm_due(t)
        if env.available and self.waiters:
            self._wake(env.available)

    def _exec(self, op: Op, env: Q.Env) -> tuple[Op, Any, RpcError | None]:
        env.agent = op.conn.agent if op.conn is not None else None
        try:
            return op, op.func(self.db, op.params, env), None
        except RpcError as e:
            return op, None, e

    def _finish(self, op: Op, result: Any, err: RpcError | None, out: dict[Connection, list[bytes]]) -> None:
        """Turn one op's outcome into its reply (buffered per connection in ``out``)."""
        conn = op.conn
        if op.fut is not None and not op.fut.done():
            if err is not None:
                op.fut.set_exception(err)
            else:
                op.fut.set_result(result)
        if op.method == "lease" and err is None:
            if result is None:
                if op.deadline > time.time() and conn is not None and not conn.closed and not self.closing:
                    self._add_waiter(op)
                    return
                result = {"task": None}
            elif conn is None or conn.closed:
                # The asker is gone: hand the task straight back rather than wait for expiry.
                self._release_orphan(result)
                return
            if result.get("task") is not None:
                self.stats_counters["leases"] += 1
                self.metrics.leased(result["task"], time.time())
        if op.method == "ack" and err is None:
            self.stats_counters["acks"] += 1
            nxt = result.get("next")
            if nxt and nxt.get("task") is not None:
                self.stats_counters["leases"] += 1
                self.metrics.leased(nxt["task"], time.time())
                if conn is None or conn.closed:
                    self._release_orphan(nxt)
        if conn is None or not op.reply or conn.closed:
            return
        if err is not None:
            data = reply_err(op.req_id, err)
        else:
            try:
                data = reply_ok(op.req_id, result)
            except TypeError as e:  # pragma: no cover - a handler returned something unencodable
                log.exception("cannot encode reply to %s", op.method)
                data = reply_err(op.req_id, InternalError(f"cannot encode reply: {e}"))
        out.setdefault(conn, []).append(data)

    def _release_orphan(self, result: dict[str, Any]) -> None:
        task, lease = result["task"], result["lease"]
        params = P.Fail(task_id=task["id"], lease_token=lease["token"], error="orphaned lease", release=True)
        self._submit(Op(None, None, "fail", params, Q.fail, reply=False))

    # --- long-poll ---------------------------------------------------------------------

    def _add_waiter(self, op: Op) -> None:
        self.waiters.append(op)
        if op.timer is None:
            op.timer = self.loop.call_at(
                self.loop.time() + max(0.0, op.deadline - time.time()), self._waiter_timeout, op
            )

    def _waiter_timeout(self, op: Op) -> None:
        op.timer = None
        if op in self.waiters:
            self.waiters.remove(op)
            self._answer_waiter_empty(op)

    def _answer_waiter_empty(self, op: Op) -> None:
        if op.timer:
            op.timer.cancel()
            op.timer = None
        if op.conn is not None and op.reply:
            op.conn.send(reply_ok(op.req_id, {"task": None}))

    def _wake(self, kinds: list[str] | None) -> None:
        """Re-run waiting leases: one waiter per newly available task, or all of them."""
        if kinds is None:
            woken, self.waiters = self.waiters, []
        else:
            woken = []
            for kind in kinds:
                for i, w in enumerate(self.waiters):
                    if kind in w.kinds:
                        woken.append(self.waiters.pop(i))
                        break
                if not self.waiters:
                    break
        for w in woken:
            self._submit(w)

    def is_busy(self, conn: Connection) -> bool:
        return any(w.conn is conn for w in self.waiters)

    def connection_closed(self, conn: Connection) -> None:
        keep = []
        for w in self.waiters:
            if w.conn is conn:
                if w.timer:
                    w.timer.cancel()
            else:
                keep.append(w)
        self.waiters = keep
        if conn.agent_id is not None and not self.closing:
            agent_id = conn.agent_id

            def mark(c: sa.Connection, _p: Any, env: Q.Env) -> None:
                Q.touch_agents(c, [(agent_id, env.now, self._still_connected(agent_id))])

            self._submit(Op(None, None, "disconnect", None, mark, reply=False))

    def _still_connected(self, agent_id: int) -> bool:
        return any(c.agent_id == agent_id for c in self.connections)

    # --- timers: due tasks, reaper, WAL ------------------------------------------------

    def _arm_due(self, t: float | None) -> None:
        if t is None or t >= self.due_at:
            return
        if self.due_timer:
            self.due_timer.cancel()
        self.due_at = t
        self.due_timer = self.loop.call_at(self.loop.time() + max(0.0, t - time.time()), self._on_due)

    def _on_due(self) -> None:
        self.due_timer = None
        self.due_at = float("inf")
        if self.closing:
            return
        if self.waiters:
            self._wake(None)

        def fire(c: sa.Connection, _p: Any, env: Q.Env) -> None:
            SCH.fire_due(c, env)

        self._submit(Op(None, None, "schedules", None, fire, reply=False))  # its env.due re-arms the timer
        self._arm_due(self._query(lambda c: Q.next_due(c, time.time())))

    def _query(self, fn: Callable[[sa.Connection], Any]) -> Any:
        with self.db.begin():
            return fn(self.db)

    async def _ticker(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.settings.tick)
            try:
                self._tick()
            except Exception:
                log.exception("hub tick failed; will try again")

    def _tick(self) -> None:
        def reap(c: sa.Connection, _p: Any, env: Q.Env) -> list[tuple[int, str]]:
            reaped = Q.reap(c, env)
            O.expire_staged(c, env.now)
            SCH.fire_due(c, env)
            for task_id, status in reaped:
                log.info("lease on task %s expired; task is now %s", task_id, status)
            self._flush_agents_in(c, env.now)
            if self.waiters and not env.available and Q.any_ready(c, env.now):
                env.available.extend(k for w in self.waiters for k in w.kinds)
            return reaped

        self._submit(Op(None, None, "reap", None, reap, reply=False))
        self._maybe_checkpoint_wal()

    def _flush_agents_in(self, c: sa.Connection, now: float) -> None:
        seen: dict[int, float] = {}
        for conn in self.connections:
            if conn.agent_id is not None:
                seen[conn.agent_id] = max(seen.get(conn.agent_id, 0.0), conn.last_seen)
        Q.touch_agents(c, [(a, t, True) for a, t in seen.items()])

    def _flush_agents(self) -> None:
        try:
            with self.db.begin():
                self._flush_agents_in(self.db, time.time())
                Q.disconnect_all(self.db)
        except Exception:
            log.exception("could not record agents as disconnected")

    def _maybe_checkpoint_wal(self) -> None:
        """Keep the WAL bounded even when readers never pause.

        SQLite's own auto-checkpoint is PASSIVE: with a reader always holding a snapshot it
        copies pages back but can never restart the WAL, which then grows forever. A
        TRUNCATE checkpoint waits (briefly) for readers to move to the newest snapshot and
        then resets the file. The short busy timeout keeps the event loop from stalling.
        """
        sizes = dbmod.file_sizes(self.settings.db_url)
        if not sizes:
            return
        due = time.monotonic() - self.last_wal_checkpoint >= self.settings.wal_checkpoint_every
        if not (due or sizes.get("wal_bytes", 0) > self.settings.wal_max_bytes):
            return
        self.last_wal_checkpoint = time.monotonic()
        res = dbmod.wal_checkpoint(self.db, "TRUNCATE", busy_timeout_ms=200)
        if res and res[0]:
            log.debug("WAL checkpoint busy (a reader holds an old snapshot); will retry")

    # --- methods served by the hub object itself ---------------------------------------

    def _checkpoint(self, c: sa.Connection, p: P.Checkpoint, env: Q.Env) -> dict[str, Any]:
        return Q.checkpoint(c, p, env, self.settings.max_checkpoint)

    # New data, or new weights, mean there is scoring to do.
    def _observe(self, c: sa.Connection, p: P.Observe, env: Q.Env) -> dict[str, Any]:
        res = O.observe(self.atoms, c, p, env)
        if p.import_id is None:
            SC.ensure_score_task(c, p.atom, env)
        return res

    def _commit_import(self, c: sa.Connection, p: P.ImportRef, env: Q.Env) -> dict[str, Any]:
        res = O.commit_import(c, p, env)
        for atom in res["atoms"]:
            SC.ensure_score_task(c, atom, env)
        return res

    def _publish_weights(self, c: sa.Connection, p: P.PublishWeights, env: Q.Env) -> dict[str, Any]:
        res = W.publish(c, p, env)
        if res["weights"]["status"] == "active" and not res["already"]:
            SC.ensure_score_task(c, p.atom, env)
        return res

    def _activate_weights(self, c: sa.Connection, p: P.ActivateWeights, env: Q.Env) -> dict[str, Any]:
        res = W.activate(c, p, env)
        SC.ensure_score_task(c, p.atom, env)
        return res

    def _stats(self, c: sa.Connection, _p: P.Empty, env: Q.Env) -> dict[str, Any]:
        agents = [
            {"agent_id": x.agent_id, "name": x.agent, "role": x.role, "peer": x.peer,
             "last_seen": x.last_seen}
            for x in self.connections if x.authenticated and x.role != "cli"
        ]
        return {
            "hub": {"version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                    "uptime": env.now - self.started_at, "db": dbmod.redact(self.settings.db_url),
                    **dbmod.file_sizes(self.settings.db_url), **self.stats_counters,
                    "connections": len(self.connections), "waiting_leases": len(self.waiters)},
            "tasks": Q.counts(c),
            "agents": sorted(agents, key=lambda a: a["name"] or ""),
        }
