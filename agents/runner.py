"""The agent loop: lease -> run the handler (heartbeating) -> ack or fail, until stopped.

The main thread runs the handler; a heartbeat thread keeps the lease alive, carries
progress, and learns of cancels and lost leases. A task with a deadline is interrupted
when it passes (``DeadlinePassed`` raised in the handler by SIGALRM) and fails like any
failure; a handler that will not stop even then (it swallows the interrupt, or is stuck in
C code) is failed by the heartbeat thread, and the agent process exits so that it really
stops: its service manager starts a fresh one. On SIGTERM/SIGINT the agent stops
leasing, tells the handler to stop at its next check, and hands the task back at once
(a release) so another agent can continue from the last checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from kiri.agents.client import HubClient, HubUnreachable
from kiri.agents.handlers import Checkpoint, DeadlinePassed, Handler, TaskContext, TaskError, TaskInterrupted
from kiri.protocol import LeaseLost, RpcError

log = logging.getLogger("kiri.agent")

DEADLINE_GRACE = 5.0  # seconds a handler interrupted at its deadline has to stop before the agent exits
EXIT_HUNG = 3  # the agent's exit status when a handler would not stop at its deadline


class _Stop(BaseException):
    """Raised by the signal handler to break out of an idle long-poll."""


@contextlib.contextmanager
def _interrupt_at(seconds: float | None) -> Iterator[None]:
    """Raise ``DeadlinePassed`` in this (the main) thread once ``seconds`` have passed.
    Python runs signal handlers between bytecodes and retries an interrupted sleep or read
    only after running them, so a handler sleeping, waiting on I/O or looping in Python is
    stopped where it stands. Elsewhere than the main thread no signal can reach it: the
    heartbeat thread's hard stop is then the only one."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = True

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        nonlocal armed
        if armed:
            armed = False
            raise DeadlinePassed(f"deadline passed: the attempt ran longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Agent:
    def __init__(self, client: HubClient, handlers: dict[str, Handler], kinds: list[str], *,
                 wait: float = 30.0, ttl: float | None = None, max_tasks: int | None = None,
                 journal: Path | None = None) -> None:
        unknown = [k for k in kinds if k not in handlers]
        if unknown:
            raise ValueError(
                f"no handler for task kind(s) {', '.join(unknown)}; known: {', '.join(sorted(handlers))}"
            )
        self.client = client
        self.handlers = handlers
        self.kinds = kinds
        self.wait = wait
        self.ttl = ttl
        self.max_tasks = max_tasks
        self.journal = journal.open("a", buffering=1) if journal else None
        self.stopping = threading.Event()
        self.idle = False
        self.current: TaskContext | None = None
        self.done = 0  # tasks acked
        self.handled = 0  # tasks worked to an end of any kind (acked, failed, lease lost): what max_tasks counts
        self._signals = 0
        self.beater = Heartbeater(client)

    # --- signals -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now; the lease will expire and the task retry")
            raise SystemExit(1)
        log.info("signal %d: finishing up", signum)
        self.stop()
        if self.idle:
            raise _Stop

    def stop(self) -> None:
        self.stopping.set()
        ctx = self.current
        if ctx is not None:
            ctx.stop_event.set()

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        """Work until stopped (or ``max_tasks`` worked, whether they succeeded or failed);
        returns the number of tasks acked."""
        self.beater.start()
        reply: dict[str, Any] | None = None
        try:
            while not self.stopping.is_set():
                if self.max_tasks is not None and self.handled >= self.max_tasks:
                    break
                if reply is None or reply.get("task") is None:
                    reply = self._lease()
                    if reply is None or reply.get("task") is None:
                        continue
                reply = self._work(reply["task"], reply["lease"])
        except _Stop:
            pass
        finally:
            if reply is not None and reply.get("task") is not None:
                self._release(reply)
            self.beater.close()
            self.client.close()
            if self.journal is not None:
                self.journal.close()
        log.info("agent stopped after %d task(s), %d acked", self.handled, self.done)
        return self.done

    def _lease(self) -> dict[str, Any] | None:
        self.idle = True
        try:
            if self.stopping.is_set():
                return None
            return self.client.lease(self.kinds, wait=self.wait, ttl=self.ttl)
        except HubUnreachable as e:
            log.warning("%s", e)
            return None
        finally:
            self.idle = False

    def _release(self, reply: dict[str, Any]) -> None:
        """Hand back a task leased but never started (we are stopping)."""
        try:
            self.client.call("fail", {"task_id": reply["task"]["id"], "lease_token": reply["lease"]["token"],
                                      "error": "agent stopping", "release": True})
        except (RpcError, HubUnreachable) as e:
            log.warning("could not release task %s: %s", reply["task"]["id"], e)

    def _work(self, task: dict[str, Any], lease: dict[str, Any]) -> dict[str, Any] | None:
        """Run one task to its end; returns the next task's lease when the hub handed one over."""
        token = lease["token"]
        task_id = task["id"]
        ck = task.get("checkpoint")

        def save(step: int, data: bytes) -> None:
            self.client.call("checkpoint", {
                "task_id": task_id, "lease_token": token, "step": step,
                "data": base64.b64encode(data).decode(),
            })

        ctx = TaskContext(
            task_id=task_id, kind=task["kind"], atom=task.get("atom"),
            params=task.get("params") or {}, attempt=task.get("attempt", 1),
            checkpoint_in=Checkpoint(ck["step"], base64.b64decode(ck["data"])) if ck else None,
            save=save, hub=self.client, lease_token=token,
        )
        self.current = ctx
        if self.stopping.is_set():
            ctx.stop_event.set()
        ttl = float(lease.get("ttl") or max(1.0, lease["expires_at"] - time.time()))
        deadline = task.get("deadline")
        if deadline is not None:
            ctx.deadline_at = time.time() + deadline
        ctx.beat = lambda: self.beater.beat(ctx, token, ttl)
        self.beater.watch(ctx, token, ttl)
        log.debug("task %s (%s) attempt %s started", task_id, ctx.kind, ctx.attempt)
        outcome: tuple[str, dict[str, Any]]
        try:
            with _interrupt_at(deadline):
                result = self.handlers[ctx.kind](ctx)
            outcome = ("ack", {"result": result if isinstance(result, dict) else {"value": result}})
        except DeadlinePassed as e:
            ctx.deadline_seen = True
            log.warning("task %s: %s; stopped", task_id, e)
            self.client.reset()  # the interrupt may have cut one of the handler's calls in half
            outcome = ("fail", {"error": str(e), "retry": True})
        except TaskInterrupted as e:
            outcome = ("fail", {"error": f"interrupted: {e}", "retry": True,
                                "release": not ctx.cancelled})
        except TaskError as e:
            outcome = ("fail", {"error": str(e), "retry": e.retry})
        except LeaseLost:
            ctx.lease_lost = True
            outcome = ("none", {})
        except Exception as e:
            log.exception("task %s crashed", task_id)
            tb = traceback.format_exc(limit=5)
            outcome = ("fail", {"error": f"{type(e).__name__}: {e}\n{tb}", "retry": True})
        finally:
            self.beater.unwatch()
            self.current = None
            self.handled += 1
        return self._finish(task_id, token, ctx, *outcome)

    def _finish(self, task_id: int, token: str, ctx: TaskContext, what: str,
                body: dict[str, Any]) -> dict[str, Any] | None:
        if what == "none" or ctx.lease_lost:
            log.warning("task %s: lease lost; dropping its result", task_id)
            return None
        more = what == "ack" and not self.stopping.is_set() and (
            self.max_tasks is None or self.handled < self.max_tasks)
        if more:
            body["next"] = {"kinds": self.kinds, **({"ttl": self.ttl} if self.ttl else {})}
        if what == "fail":
            body["error"] = clip_error(body.get("error", "failed"))
        try:
            reply = self.client.call(what, {"task_id": task_id, "lease_token": token, **body})
        except LeaseLost:
            log.warning("task %s: lease lost before %s; another agent has it", task_id, what)
            return None
        except (RpcError, HubUnreachable) as e:
            log.error("task %s: %s refused: %s", task_id, what, e)
            return None
        if what == "ack":
            self.done += 1
        if self.journal is not None:
            self.journal.write(orjson.dumps({
                "task_id": task_id, "kind": ctx.kind, "attempt": ctx.attempt, "call": what,
                "status": reply.get("status"), "agent": self.client.agent, "time": time.time(),
            }).decode() + "\n")
        log.debug("task %s: %s -> %s", task_id, what, reply.get("status"))
        return reply.get("next")



MAX_ERROR = 8000  # characters of a failure's message sent to the hub (its limit is 65,536)


def clip_error(text: str, limit: int = MAX_ERROR) -> str:
    """A failure's message cut to ``limit`` characters, keeping its start and its end (where
    a traceback names the line): an exception whose message is huge (a hub's refusal listing
    thousands of bad values) must still fail its task, not have the failure refused too."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit + 40
    return f"{text[:limit // 2]}\n[... {cut} characters cut ...]\n{text[len(text) - (limit // 2 - 40):]}"


@dataclass
class _Watched:
    """The lease the heartbeat thread keeps alive, and when it beats next."""

    ctx: TaskContext
    token: str
    ttl: float
    interval: float  # also how fast a cancel is noticed
    due: float  # time.monotonic() of the next beat


class Heartbeater:
    """One thread per agent that keeps the current lease alive and carries progress.

    It also learns of cancels and lost leases and tells the handler through its context.
    One long-lived thread costs nothing per task, unlike a thread started for each. Nor is
    it woken per task: a task's start wakes it only when its first beat is due before the
    thread's next wake-up anyway (and its end never), so an agent running short tasks back
    to back wakes it once per beat interval, not twice per task (two thread switches and
    two GIL hand-overs each).
    """

    def __init__(self, client: HubClient) -> None:
        self.client = client
        self._cond = threading.Condition()
        self._job: _Watched | None = None
        self._last_due = 0.0  # the latest watched lease's next beat: the thread waits till then even once it ended
        self._wake_at: float | None = None  # when the waiting thread wakes by itself; None: never, or not waiting
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, ctx: TaskContext, token: str, ttl: float) -> None:
        interval = max(0.02, min(ttl / 3, 2.0))
        job = _Watched(ctx, token, ttl, interval, time.monotonic() + interval)
        with self._cond:
            self._job = job
            self._last_due = job.due
            if self._wake_at is None or job.due < self._wake_at:
                self._cond.notify()

    def unwatch(self) -> None:
        with self._cond:
            self._job = None  # the thread finds out when it wakes

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    job, now = self._job, time.monotonic()
                    if job is not None and now >= job.due:
                        break
                    # between two short tasks, wait on as if the last one still ran: the next
                    # one's start then finds the thread waking in time and need not wake it
                    until = job.due if job is not None else self._last_due if self._last_due > now else None
                    self._wake_at = until
                    self._cond.wait(None if until is None else until - now)
                    self._wake_at = None
                job.due = now + job.interval
            ctx = job.ctx
            if ctx.deadline_at is not None and not ctx.deadline_seen and time.time() > ctx.deadline_at + DEADLINE_GRACE:
                self._give_up(ctx, job.token)
            self.beat(ctx, job.token, job.ttl)

    def _give_up(self, ctx: TaskContext, token: str) -> None:
        """The handler ran past its deadline and did not stop when interrupted: fail the task
        (it retries or dies like any failure) and end this process, the one sure way to stop
        a thread that will not stop."""
        log.critical("task %s ran past its deadline and did not stop within %g s of the interrupt; "
                     "failing it and exiting (status %d) so it really stops", ctx.task_id, DEADLINE_GRACE, EXIT_HUNG)
        with contextlib.suppress(RpcError, HubUnreachable):
            self.client.call("fail", {"task_id": ctx.task_id, "lease_token": token, "retry": True,
                                      "error": "deadline passed, and the handler did not stop when interrupted: "
                                               "its agent exited to stop it"})
        logging.shutdown()
        os._exit(EXIT_HUNG)

    def beat(self, ctx: TaskContext, token: str, _ttl: float) -> None:
        """One heartbeat for ctx's lease now (from this thread or the handler's: the client is
        shared and locked); a lost lease or a cancel stops the handler at its next check."""
        try:
            reply = self.client.call("heartbeat", {
                "task_id": ctx.task_id, "lease_token": token,
                "progress": ctx.progress_snapshot() or None,
            })
        except LeaseLost:
            ctx.lease_lost = True
            ctx.stop_event.set()
            return
        except (RpcError, HubUnreachable) as e:
            log.warning("heartbeat for task %s failed: %s", ctx.task_id, e)
            return
        if reply.get("cancel") and not ctx.cancelled:
            log.info("task %s cancelled by its owner", ctx.task_id)
            ctx.cancelled = True
            ctx.stop_event.set()
