"""Group commit: the requests that arrive together run in one transaction.

Everything runs on the event loop thread that owns the single writer connection. Requests
queued in one turn of the loop form a batch; the batch runs in one transaction, and its
replies are released only after that transaction commits, so one fsync serves many
requests and no reply ever describes state that could still roll back.

Consecutive requests of one method that has a run form (``runs``: enqueue, which a client
pipelines) are handed to it together, so on PostgreSQL they share a round trip.

A batch that fails as a whole (a constraint, a full disk, a handler's bug) is rolled back
and replayed one request per transaction, so only the culprit gets the error. In-memory
state that mirrors the database (the atom registry) joins in through ``Transactional``:
it is told when a transaction commits or rolls back, and never changes before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.protocol import InternalError, RpcError

log = logging.getLogger("kiri.hub")

Handler = Callable[[sa.Connection, Any, Q.Env], Any]
# A handler's run form: several of its requests that arrived one after another, in one call
# (their answers in order, each a result or an error), so a backend with round trips can
# send them together. It must do exactly what the handler would, one request after another.
RunHandler = Callable[[sa.Connection, list[Any], Q.Env], list[tuple[Any, RpcError | None]]]


class Transactional(Protocol):
    """In-memory state that follows the database's transactions."""

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class Op:
    """One request waiting for the next batch (or, for a lease, for work to arrive)."""

    __slots__ = ("conn", "deadline", "func", "fut", "kinds", "method", "params", "reply", "req_id", "timer")

    def __init__(self, conn: Any, req_id: Any, method: str, params: Any,
                 func: Handler, reply: bool = True) -> None:
        self.conn = conn  # the transport's Connection, or None for the hub's own work
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


Outcome = tuple[Op, Any, RpcError | None]


class GroupCommit:
    """Collects ops and runs each turn's ops in one transaction (see the module docstring)."""

    def __init__(self, db: sa.Connection, settings: Q.QueueSettings, loop: asyncio.AbstractEventLoop,
                 done: Callable[[list[Outcome], Q.Env], None], caches: list[Transactional],
                 before_commit: Callable[[sa.Connection, Q.Env], None] | None = None,
                 runs: dict[Handler, RunHandler] | None = None,
                 alone: Callable[[sa.Connection, str, Any, float], bool] | None = None) -> None:
        self.db = db
        self.runs = runs or {}
        # PostgreSQL: whether a request alone in its batch is one statement (see _alone)
        self.alone = alone
        self.before_commit = before_commit  # last words inside each transaction (other hubs' wake-up)
        self.settings = settings
        self.loop = loop
        self.done = done  # answers the batch after it committed
        self.caches = caches
        self.pending: list[Op] = []
        self.scheduled = False
        self.counters: dict[str, int] = {"batches": 0, "ops": 0}
        self.last_client = 0.0  # time.monotonic() of the last batch with a client's op in it

    def submit(self, op: Op) -> None:
        self.pending.append(op)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        """Run every pending op: one transaction, or one each after a failure."""
        self.scheduled = False
        ops, self.pending = self.pending, []
        if not ops:
            return
        now = time.time()
        env = Q.Env(now=now, settings=self.settings)
        try:
            results = self._alone(ops[0], env) if len(ops) == 1 and self.alone is not None else None
            if results is None:
                with self.db.begin():
                    results = self._exec_all(ops, env)
                    if self.before_commit is not None:
                        self.before_commit(self.db, env)
            self._committed()
        except Exception:
            self._rolled_back()
            log.exception("batch of %d failed; retrying its operations one by one", len(ops))
            results, env = self._replay(ops, now)
        self.counters["batches"] += 1
        self.counters["ops"] += len(ops)
        if any(op.conn is not None for op in ops):
            self.last_client = time.monotonic()
        self.done(results, env)

    def _alone(self, op: Op, env: Q.Env) -> list[Outcome] | None:
        """Run a request that is alone in its batch and is one statement (``alone`` says which:
        on PostgreSQL an agent's ack-and-lease, or a lease) in autocommit, so that no BEGIN
        and COMMIT round trips go around it: one round trip instead of three, for most of a
        busy agent's turns. A single statement is atomic by itself. Anything the request reads
        besides (a lost lease's state) is its own statement, as it would see committed state
        anyway. The other hubs hear of the work after it committed, as they do after a
        transaction. None: the request is not one statement; the caller runs it as usual."""
        assert self.alone is not None
        raw = self.db.connection.dbapi_connection
        raw.autocommit = True  # type: ignore[union-attr]
        ok = False
        try:
            if not self.alone(self.db, op.method, op.params, env.now):
                return None
            out = [self._exec(op, env)]
            if self.before_commit is not None:
                self.before_commit(self.db, env)
            ok = True
            return out
        finally:
            if self.db.in_transaction():  # SQLAlchemy began one for a read on its own path
                (self.db.commit if ok else self.db.rollback)()
            raw.autocommit = False  # type: ignore[union-attr]

    def _replay(self, ops: list[Op], now: float) -> tuple[list[Outcome], Q.Env]:
        env = Q.Env(now=now, settings=self.settings)
        results: list[Outcome] = []
        for op in ops:
            one_env = Q.Env(now=now, settings=self.settings)
            try:
                with self.db.begin():
                    res = self._exec(op, one_env)
                    if self.before_commit is not None:
                        self.before_commit(self.db, one_env)
                self._committed()
                env.available += one_env.available
                env.freed += one_env.freed
                env.due += one_env.due
            except Exception as e:
                self._rolled_back()
                log.exception("operation %s failed", op.method)
                res = (op, None, InternalError(f"internal error in {op.method}: {type(e).__name__}"))
            results.append(res)
        return results, env

    def _exec_all(self, ops: list[Op], env: Q.Env) -> list[Outcome]:
        """Every op in order; a stretch of one method with a run form, in one call to it."""
        out: list[Outcome] = []
        i = 0
        while i < len(ops):
            run = self.runs.get(ops[i].func)
            j = i + 1
            while run is not None and j < len(ops) and ops[j].func is ops[i].func:
                j += 1
            if run is None or j - i == 1:
                out.append(self._exec(ops[i], env))
            else:
                env.agent = None  # a run form serves several callers: it must not need one
                answers = run(self.db, [op.params for op in ops[i:j]], env)
                out.extend((op, res, err) for op, (res, err) in zip(ops[i:j], answers, strict=True))
            i = j
        return out

    def _exec(self, op: Op, env: Q.Env) -> Outcome:
        env.agent = op.conn.agent if op.conn is not None else None
        try:
            return op, op.func(self.db, op.params, env), None
        except RpcError as e:
            return op, None, e

    def _committed(self) -> None:
        for cache in self.caches:
            cache.commit()

    def _rolled_back(self) -> None:
        for cache in self.caches:
            cache.rollback()

    def query(self, fn: Callable[[sa.Connection], Any]) -> Any:
        """A read on the writer connection, outside any batch (start-up, timers)."""
        with self.db.begin():
            return fn(self.db)
