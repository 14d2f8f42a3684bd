"""The hub: one process, one event loop, one writer connection, composed of its parts.

``core.transport`` cuts bytes into lines and enforces the limits; this module parses each
line into a JSON-RPC request, checks it against the protocol contract
(``kiri.protocol.methods``) and hands it to ``core.commit``, which runs each turn's
requests in one transaction and answers after commit; ``core.wakeups`` parks leases that
found nothing and keeps time; ``methods`` says which domain function answers each method.
The HTTP face (``web``) runs on the same loop and writes only through ``Hub.call``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from pydantic import BaseModel, ValidationError

from kiri import PROTOCOL_VERSION, __version__
from kiri.hub import methods as hub_methods
from kiri.hub.core import peers
from kiri.hub.core import queue as Q
from kiri.hub.core import retention as RT
from kiri.hub.core.commit import GroupCommit, Handler, Op, Outcome
from kiri.hub.core.events import EventBus, publish_batch
from kiri.hub.core.retention import Retention
from kiri.hub.core.transport import Connection, Connections, Limits
from kiri.hub.core.wakeups import LongPoll, Timers
from kiri.hub.store import db as dbmod
from kiri.hub.store.checkpointer import WalCheckpointer, detach_autocheckpoint
from kiri.hub.store.reader import Reader
from kiri.hub.store.schema import atoms
from kiri.hub.watch import keep as KEEP
from kiri.hub.watch import observations as O
from kiri.hub.watch import rollups as RU
from kiri.hub.watch import schedules as SCH
from kiri.hub.watch import scoring as SC
from kiri.hub.watch import views as V
from kiri.hub.watch.handed import HandedOut
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
from kiri.protocol import methods as M
from kiri.protocol import params as P

log = logging.getLogger("kiri.hub")

MAX_DEPTH = 64  # nesting of a request's params; orjson itself cannot write beyond 254
ROLLUP_BATCH = 200  # dirty 5-minute buckets per rollup transaction (a few ms on the loop)
MAX_STRIKES = 3  # wrong tokens, or requests before hello, before the connection is closed
LIVE_SECONDS = 1.0  # a client request this recent makes background work go in smaller steps
# Retention waits while bulk writes stream in (an import's chunk staged, committed or moved,
# or a backfill's batch of ``methods.BULK_SCORES`` scores or more recorded, this recently):
# deleting a year of old tasks held half the loop, and the year's import ran at
# 76,000-77,000 obs/s instead of 93,000-96,000; folding the scored part of a year while the
# rest was still being scored slowed its backfill from 74,500 to 57,000 obs/s
# (bench/year.py). What retention would have deleted is still there when the bulk write is
# done. Everyday scoring records a few readings a call.
BULK_QUIET = 2.0


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
    retention: Retention = field(default_factory=Retention)
    prune_every: float = 60.0  # seconds between retention passes (sooner while a backlog drains)
    # worker processes for the dashboard's heavy reads (0: threads only; None: reader.default_processes())
    read_processes: int | None = None
    vacuum_tasks_after: int = 5000  # PostgreSQL: dead task rows that make the upkeep hub vacuum (0: autovacuum only)


def _raise(_c: sa.Connection, err: RpcError, _env: Q.Env) -> None:
    """An op that answers with a request's error, in its turn."""
    raise err


def _min(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


class Hub:
    def __init__(self, settings: HubSettings, engine: sa.Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.connections = Connections(settings.limits, self, self.loop)
        self.closing = False
        self.started_at = time.time()
        self.server: asyncio.Server | None = None
        self.db: sa.Connection = engine.connect()
        self.last_wal_checkpoint = time.monotonic()
        self.last_prune = 0.0  # the first tick prunes
        self.prune_busy: set[str] = set()  # retention steps that found work last time (repeated soon)
        self.rollup_running = False
        self.prune_running = False
        self.import_running = False
        # commit_import requests with ``wait``, parked until their import's last step (by import id)
        self.import_waiters: dict[str, list[Op]] = {}
        self.last_bulk = 0.0  # time.monotonic() of the last bulk write (``BULK_QUIET``)
        self.served: dict[str, int] = {"leases": 0, "acks": 0}
        self.atoms = O.AtomRegistry(lookup=self._stored_atom)
        # several hubs may share a PostgreSQL database: each batch tells the others what it made
        # leasable (NOTIFY, delivered at commit), and each hub listens (``peers``)
        self.me = peers.hub_id()
        self.shared = self.db.dialect.name == "postgresql"
        self.listener: peers.Listener | None = None
        self.checkpointer: WalCheckpointer | None = None
        # the readings handed to scorers, so their record need not read them again (one hub
        # owns a SQLite file; over a shared PostgreSQL another hub's retention may fold them)
        self.handed = None if self.shared else HandedOut()
        self.raw_pruner = KEEP.RawPruner(handed=self.handed)
        self.commit = GroupCommit(self.db, settings.queue, self.loop, self._answer,
                                  caches=[self.atoms, *([self.handed] if self.handed is not None else [])],
                                  before_commit=self._announce if self.shared else None,
                                  runs={Q.enqueue: Q.enqueue_run},
                                  alone=Q.one_statement if self.shared else None)
        self.longpoll = LongPoll(self.loop, self.commit.submit)
        self.timers = Timers(self.loop, settings.tick, self._on_due, self._tick)
        self.events = EventBus()
        self.metrics = HubMetrics()
        self.reader = Reader(settings.db_url, processes=settings.read_processes)
        self.http: HttpFace | None = None
        handlers = hub_methods.bind(self)
        self.methods: dict[str, tuple[type[BaseModel], Handler]] = {
            name: (M.BY_NAME[name].params, func) for name, func in handlers.items()
        }

    def _stored_atom(self, name: str) -> str | None:
        """An atom's stored definition, read in the running batch's transaction (outside a
        batch, e.g. from the HTTP face, nothing is read: a read would open a transaction)."""
        if not self.db.in_transaction():
            return None
        return self.db.execute(sa.select(atoms.c.schema).where(atoms.c.name == name)).scalar()

    @property
    def upkeeps(self) -> bool:
        """Whether this hub does the background upkeep (rollups, retention, moving committed
        imports): always alone on SQLite; among hubs sharing PostgreSQL, the elected one."""
        return not self.shared or (self.listener is not None and self.listener.leader.is_set())

    def counters(self) -> dict[str, int]:
        extra = {"task_vacuums": self.listener.vacuums} if self.listener is not None else {}
        if self.checkpointer is not None:
            extra["wal_checkpoints"] = self.checkpointer.checkpoints
        return {**self.commit.counters, **self.served, **extra}

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        path = dbmod.sqlite_path(self.settings.db_url)
        if path is not None:  # commits on the loop never checkpoint; a thread does (see store/checkpointer.py)
            sync = detach_autocheckpoint(self.db.connection.dbapi_connection)
            self.checkpointer = WalCheckpointer(path, sync)
            self.checkpointer.start()
        with self.db.begin():
            if not self.shared:  # other hubs' agents are connected to them, not gone
                Q.disconnect_all(self.db)
            self.atoms.load(self.db)
        self.timers.arm(self.commit.query(lambda c: _min(Q.next_due(c, time.time()), SCH.next_run(c))))
        self.server = await self.loop.create_server(
            self.connections.factory(), self.settings.host, self.settings.port, reuse_address=True,
            backlog=512,
        )
        self.timers.start()
        if self.shared:
            self.listener = peers.Listener(self.settings.db_url, self.me, self._heard_from_peer,
                                           vacuum_after=self.settings.vacuum_tasks_after)
            self.listener.start()
            await self.loop.run_in_executor(None, self.listener.listening.wait, 10.0)
        if self.settings.http_port is not None:
            # the read path warmed before the page is served (its statements compiled, each
            # atom's chart and the status page read once: a few tens of ms), so the first chart
            # after a restart is as fast as the next; the queue is served meanwhile
            try:
                await self.reader.run(V.warm_up)
            except Exception:
                log.exception("warming the read path failed; the first pages will be slower")
            self.http = HttpFace(self)
            await self.http.start(self.settings.http_host or self.settings.host, self.settings.http_port)
            self.reader.warm()  # the chart workers start now, not at the first chart
            n = self.reader.processes
            log.info("dashboard reads served %s", f"by {n} worker process(es)" if n else "from hub threads")

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
        self.timers.stop()
        if self.listener is not None:
            self.listener.stop()
        if self.commit.pending:
            self.commit.run()
        self.longpoll.answer_all()
        self.connections.close_all()
        await asyncio.sleep(0)
        self._flush_agents()
        self.reader.close()
        if self.checkpointer is not None:
            self.checkpointer.stop()
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
            # only a line with more brackets than the limit can nest too deep, and only one
            # whose brackets do (the request's own object is one level) has params that might
            entry = M.BY_NAME.get(method)
            if ((entry is None or entry.free_form)
                    and len(line) > 2 * MAX_DEPTH and line.count(b"[") + line.count(b"{") > MAX_DEPTH
                    and P.bracket_depth(line, MAX_DEPTH + 1) - 1 > MAX_DEPTH):
                depth = P.nesting_depth(raw_params, MAX_DEPTH)
                if depth > MAX_DEPTH:
                    raise InvalidParams(f"params nest more than {MAX_DEPTH} levels deep; flatten them")
            self._dispatch(conn, req_id, has_id, method, raw_params)
        except RpcError as e:
            # Errors in the request itself are answered even without an id (id null), as
            # JSON-RPC 2.0 asks; a well-formed notification's errors are not.
            if is_request or isinstance(e, ParseError | InvalidRequest):
                self.commit.submit(Op(conn, req_id, "error", e, _raise))

    def _dispatch(self, conn: Connection, req_id: Any, has_id: bool, method: str,
                  raw: dict[str, Any]) -> None:
        if method == "hello":
            self._hello(conn, req_id, raw)
            return
        if not conn.authenticated:
            conn.refused_before_hello += 1
            if conn.refused_before_hello >= MAX_STRIKES:
                self._close_with(conn, req_id, Unauthorized("requests without hello; closing"))
                return
            raise Unauthorized("say hello first: the first request on a connection must be hello")
        params, func = self._validated(method, raw)
        op = Op(conn, req_id, method, params, func, reply=has_id)
        if method == "lease":
            op.kinds = frozenset(params.kinds)
            op.deadline = time.time() + params.wait
        self.commit.submit(op)

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
            if conn.bad_tokens >= MAX_STRIKES:
                self._close_with(conn, req_id, Unauthorized(f"wrong token ({MAX_STRIKES} tries); closing"))
                return
            raise Unauthorized("wrong token: pass the hub's token with --token or KIRI_TOKEN")
        self.connections.authenticated(conn)
        conn.agent = p.agent
        conn.role = p.role

        def register(c: sa.Connection, params: P.Hello, env: Q.Env) -> dict[str, Any]:
            # the connection learns its agent id in _finish, once this has committed
            agent_id = Q.upsert_agent(c, params, env, self.me)
            return {"hub": __version__, "protocol": PROTOCOL_VERSION, "agent_id": agent_id}

        self.commit.submit(Op(conn, req_id, "hello", p, register))

    def _close_with(self, conn: Connection, req_id: Any, err: RpcError) -> None:
        """The last word to a connection that used up its strikes, after its earlier replies."""
        self.commit.run()  # flush earlier replies first
        conn.send(reply_err(req_id, err))
        conn.close()

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
        return await asyncio.wait_for(self._await(Op(None, None, "ping", None, hub_methods.pong, reply=False)),
                                      timeout)

    def _validated(self, method: str, raw: dict[str, Any]) -> tuple[Any, Handler]:
        """A method's checked parameters and its handler, or the error to answer with."""
        entry = self.methods.get(method)
        if entry is None:
            raise MethodNotFound(f"unknown method {method!r}; docs/protocol.md lists every method")
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
        self.commit.submit(op)
        return op.fut

    # --- after commit: replies, events, wake-ups ---------------------------------------

    def _announce(self, c: sa.Connection, env: Q.Env) -> None:
        peers.announce(c, self.me, env)

    def _heard_from_peer(self, kinds: list[str] | None, due: float | None) -> None:
        """Another hub committed work (called from the listener's thread)."""
        self.loop.call_soon_threadsafe(self._peer_work, kinds, due)

    def _peer_work(self, kinds: list[str] | None, due: float | None) -> None:
        if due is not None:
            self.timers.arm(due)
        if kinds is None or kinds:
            self.longpoll.wake(kinds)

    def _answer(self, results: list[Outcome], env: Q.Env) -> None:
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
            self.timers.arm(t)
        if (env.available or env.freed) and self.longpoll.waiters:
            # freed: a leased task ended, so a kind at its concurrency limit has room again
            self.longpoll.wake(env.available + env.freed)

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
                    self.longpoll.wait(op)
                    return
                result = {"task": None}
            elif conn is None or conn.closed:
                # The asker is gone: hand the task straight back rather than wait for expiry.
                self._release_orphan(result)
                return
            if result.get("task") is not None:
                self.served["leases"] += 1
                self.metrics.leased(result["task"], time.time())
        if op.method == "commit_import" and err is None and self._park_commit(op, result):
            return
        if op.method == "hello" and err is None and conn is not None:
            conn.agent_id = result["agent_id"]
            if conn.closed:  # gone while its hello committed
                self._mark_disconnected(conn.agent_id)
        if op.method == "ack" and err is None:
            self.served["acks"] += 1
            nxt = result.get("next")
            if nxt and nxt.get("task") is not None:
                self.served["leases"] += 1
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
        self.commit.submit(Op(None, None, "fail", params, Q.fail, reply=False))

    # --- connections (called by the transport) -----------------------------------------

    def is_busy(self, conn: Connection) -> bool:
        return self.longpoll.holds(conn)

    def connection_closed(self, conn: Connection) -> None:
        self.longpoll.drop(conn)
        if conn.agent_id is not None:
            self._mark_disconnected(conn.agent_id)

    def _mark_disconnected(self, agent_id: int) -> None:
        if self.closing:
            return

        def mark(c: sa.Connection, _p: Any, env: Q.Env) -> None:
            Q.touch_agents(c, [(agent_id, env.now, self._still_connected(agent_id))], self.me)

        self.commit.submit(Op(None, None, "disconnect", None, mark, reply=False))

    def _still_connected(self, agent_id: int) -> bool:
        return any(c.agent_id == agent_id for c in self.connections)

    # --- time: due tasks, schedules, the reaper, the WAL -------------------------------

    def _on_due(self) -> None:
        if self.closing:
            return
        if self.longpoll.waiters:
            self.longpoll.wake(None)

        def fire(c: sa.Connection, _p: Any, env: Q.Env) -> None:
            SCH.fire_due(c, env)

        self.commit.submit(Op(None, None, "fire_schedules", None, fire, reply=False))  # its env.due re-arms
        self.timers.arm(self.commit.query(lambda c: Q.next_due(c, time.time())))

    def _tick(self) -> None:
        def reap(c: sa.Connection, _p: Any, env: Q.Env) -> list[tuple[int, str]]:
            reaped = Q.reap(c, env)
            if self.upkeeps:
                O.expire_staged(c, env.now)  # the imports table: a few rows, not the staged ones
            SCH.fire_due(c, env)
            for task_id, status in reaped:
                log.info("lease on task %s expired; task is now %s", task_id, status)
            self._flush_agents_in(c, env.now)
            if self.shared and self.upkeeps:
                gone = peers.forget_gone(c)
                if gone:
                    log.info("%d agent(s) of hubs that are gone marked disconnected", gone)
            if self.longpoll.waiters and not env.available:
                env.available.extend(Q.ready_kinds(c, self.longpoll.waiting_kinds(), env.now))
            return reaped

        self.commit.submit(Op(None, None, "reap", None, reap, reply=False))
        self.move_imports()
        self._maybe_rollup()
        self._maybe_prune()
        self._maybe_checkpoint_wal()

    def _clients_active(self) -> bool:
        """A client's request came within ``LIVE_SECONDS``: background work goes in smaller,
        spaced-out steps."""
        return time.monotonic() - self.commit.last_client < LIVE_SECONDS

    def _maybe_rollup(self) -> None:
        """Recompute one bounded batch of dirty rollup buckets (``rollups.refresh``). While a
        backlog drains (an import, a backfill) the next batch follows after this one commits,
        soon or (while requests come) after a pause, so requests go first."""
        if self.rollup_running or self.closing or not self.upkeeps:
            return
        self.rollup_running = True

        def roll(c: sa.Connection, _p: Any, env: Q.Env) -> int:
            t0 = time.perf_counter()
            n = RU.refresh(c, {s.name: [f.name for f in s.fields] for s in self.atoms.all()}, ROLLUP_BATCH)
            if n:
                log.debug("rollups: %d bucket(s) recomputed (%.0f ms)", n, 1000 * (time.perf_counter() - t0))
            return n

        started = time.perf_counter()

        def then(fut: asyncio.Future[Any]) -> None:
            self.rollup_running = False
            if not fut.cancelled() and fut.exception() is None and fut.result() >= ROLLUP_BATCH:
                # while clients keep the hub busy, after a pause three times as long as the batch
                # took (requests keep three quarters of the loop: a backfill is not slowed by
                # rollups of what it just stored); when they do not, right away
                busy = self._clients_active()
                self.loop.call_later(max(0.005, (3.0 if busy else 0.0) * (time.perf_counter() - started)),
                                     self._maybe_rollup)

        self._await(Op(None, None, "rollup", None, roll, reply=False)).add_done_callback(then)

    def _park_commit(self, op: Op, result: dict[str, Any]) -> bool:
        """A commit_import with ``wait`` whose import still has rows to move waits for its last
        step (or for ``wait`` to run out) instead of answering now; one that finds its import
        done releases the others waiting on it. True: parked."""
        import_id = op.params.import_id
        if not result.get("remaining"):
            self._release_commits(import_id)
            return False
        conn = op.conn
        if not op.params.wait or conn is None or conn.closed or self.closing or not op.reply:
            return False
        # asked again when released: then it answers with the progress at once
        again = Op(conn, op.req_id, op.method, op.params.model_copy(update={"wait": 0.0}), op.func)
        self.import_waiters.setdefault(import_id, []).append(again)
        self.loop.call_later(op.params.wait, self._release_commits, import_id, again)
        return True

    def _release_commits(self, import_id: str, only: Op | None = None) -> None:
        """Ask the parked commit_import requests of ``import_id`` again (``only``: that one,
        its wait having run out), so they answer with the progress."""
        waiting = self.import_waiters.get(import_id)
        if not waiting:
            return
        go = [op for op in waiting if only is None or op is only]
        left = [op for op in waiting if op not in go]
        if left:
            self.import_waiters[import_id] = left
        else:
            del self.import_waiters[import_id]
        for op in go:
            self.commit.submit(op)

    def move_imports(self) -> None:
        """Move the next step of a committed import's rows into the observations
        (``observations.move_step``), and the next right after it while steps remain: a
        step is short (``COMMIT_STEP`` rows, about 25 ms), and requests that arrive during
        one are served before the next (a pause would only leave the hub idle while the
        importer waits). Also resumes, at the first tick, a commit that a stopped hub left
        midway."""
        if self.import_running or self.closing or not self.upkeeps:
            return
        self.import_running = True

        def step(c: sa.Connection, _p: Any, env: Q.Env) -> tuple[str, int] | None:
            pending = O.committing(c)
            if not pending:
                return None
            for atom in O.move_step(c, pending[0], env):
                SC.ensure_score_task(c, atom, env)
            return pending[0], O.progress(c, pending[0])["remaining"]

        def then(fut: asyncio.Future[Any]) -> None:
            self.import_running = False
            if not fut.cancelled() and fut.exception() is None and fut.result():
                self.last_bulk = time.monotonic()
                moved, remaining = fut.result()
                if not remaining:  # its last step: commits waiting on it answer now
                    self._release_commits(moved)
                self.loop.call_later(0.001, self.move_imports)

        self._await(Op(None, None, "move_import", None, step, reply=False)).add_done_callback(then)

    def _maybe_prune(self) -> None:
        """One retention pass (every step a bounded batch, in one transaction): every
        ``prune_every`` seconds, or, while steps still find work (after an upgrade, a long stop
        or a big import), again: while clients are being served after a pause as long as the
        pass took, so requests keep at least half the loop; with nobody waiting, right away
        (a year folded at half speed for no one). A step that found nothing waits for the
        next full pass."""
        if self.prune_running or self.closing or not self.upkeeps:
            return
        if time.monotonic() - self.last_bulk < BULK_QUIET:
            return  # an import or a backfill is streaming in: the next tick after it asks again
        full = time.monotonic() - self.last_prune >= self.settings.prune_every
        if not full and not self.prune_busy:
            return
        if full:
            self.last_prune = time.monotonic()
        self.prune_running = True
        policy = self.settings.retention
        # while clients are being served, raw readings fold in smaller passes: a request that
        # arrives during a pass waits for it (ten hosts folding: p99 15 ms with passes of 500,
        # 8 ms with 150, which fold at half the speed); with nobody waiting, at full speed
        live = self._clients_active()
        raw_batch = min(policy.raw_batch, policy.live_raw_batch) if live else policy.raw_batch
        every: dict[str, Callable[[sa.Connection, float], int]] = {
            "tasks": lambda c, now: RT.prune_tasks(c, policy, now),
            "checkpoints": lambda c, now: RT.prune_checkpoints(c, policy),
            "decisions": lambda c, now: KEEP.prune_decisions(c, policy, now),
            "weights": lambda c, now: KEEP.prune_weights(c, policy),
            "readings": lambda c, now: self.raw_pruner.prune(c, policy, now, raw_batch),
        }
        steps = every if full else {k: v for k, v in every.items() if k in self.prune_busy}
        started = time.perf_counter()

        def prune(c: sa.Connection, _p: Any, env: Q.Env) -> dict[str, int]:
            done, took = {}, {}
            for name, step in steps.items():
                t0 = time.perf_counter()
                done[name] = step(c, env.now)
                took[name] = 1000 * (time.perf_counter() - t0)
            if any(done.values()):
                log.info("retention: %s", ", ".join(f"{done[k]} {k} ({took[k]:.0f} ms)" for k in done
                                                    if done[k] or took[k] > 5))
            return done

        def then(fut: asyncio.Future[Any]) -> None:
            self.prune_running = False
            ok = not fut.cancelled() and fut.exception() is None
            self.prune_busy = {k for k, n in fut.result().items() if n} if ok else set()
            try:  # between transactions: the space deleted rows held goes back to the file system
                free = dbmod.incremental_vacuum(self.db, policy.vacuum_pages)
                if free:
                    self.prune_busy.add("vacuum")
            except Exception:
                log.exception("incremental vacuum failed; will retry")
            if self.prune_busy:
                pause = (time.perf_counter() - started) if self._clients_active() else 0.0
                self.loop.call_later(max(0.005, pause), self._maybe_prune)

        self._await(Op(None, None, "prune", None, prune, reply=False)).add_done_callback(then)

    def _flush_agents_in(self, c: sa.Connection, now: float) -> None:
        seen: dict[int, float] = {}
        for conn in self.connections:
            if conn.agent_id is not None:
                seen[conn.agent_id] = max(seen.get(conn.agent_id, 0.0), conn.last_seen)
        Q.touch_agents(c, [(a, t, True) for a, t in seen.items()], self.me)

    def _flush_agents(self) -> None:
        try:
            with self.db.begin():
                self._flush_agents_in(self.db, time.time())
                Q.disconnect_all(self.db, self.me if self.shared else None)
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
        big = sizes.get("wal_bytes", 0) > self.settings.wal_max_bytes
        if big and self.checkpointer is not None and not self.checkpointer.behind:
            big = False  # the background checkpoint keeps up: the WAL starts over by itself
        if not (due or big):
            return
        self.last_wal_checkpoint = time.monotonic()
        res = dbmod.wal_checkpoint(self.db, "TRUNCATE", busy_timeout_ms=200)
        if res and res[0]:
            log.debug("WAL checkpoint busy (a reader holds an old snapshot); will retry")
