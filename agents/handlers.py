"""Task handlers: plain callables, one per task kind, handed to the agent explicitly.

A handler receives a ``TaskContext`` and returns a JSON object (the task's result). It
reports progress with ``ctx.progress``, saves resumable state with ``ctx.checkpoint``,
and should call ``ctx.raise_if_stopping()`` between steps so a shutdown or a cancel
interrupts it at a clean point. Raising ``TaskError(retry=False)`` fails it for good.
"""

from __future__ import annotations

import collections
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class TaskError(Exception):
    """A handler's failure, with whether trying again could help."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class TaskInterrupted(Exception):
    """Raised inside a handler when it must stop now (shutdown, cancel, or lease lost)."""


class DeadlinePassed(BaseException):
    """Raised inside a handler whose attempt ran past the task's deadline. A BaseException
    (as KeyboardInterrupt is), so a handler's ``except Exception`` cannot swallow it."""


TRAIL = 500  # training steps a heartbeat carries one by one


@dataclass
class Checkpoint:
    step: int
    data: bytes


@dataclass
class TaskContext:
    task_id: int
    kind: str
    atom: str | None
    params: dict[str, Any]
    attempt: int
    checkpoint_in: Checkpoint | None
    save: Callable[[int, bytes], None]
    hub: Any = None  # the agent's HubClient, for handlers that read or publish through the hub
    lease_token: str = ""  # for calls fenced by the lease (publishing results)
    beat: Callable[[], None] | None = None  # send a heartbeat now (set by the agent running the task)
    stop_event: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    lease_lost: bool = False
    deadline_at: float | None = None  # epoch seconds this attempt must end by (the task's deadline)
    deadline_seen: bool = False  # the handler was interrupted at its deadline and stopped
    _progress: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # the latest steps one by one (step, loss, lr), for clients that plot every step
    _trail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TRAIL))

    def progress(self, **fields: Any) -> None:
        """Record progress; the heartbeat thread sends the latest with its next beat."""
        with self._lock:
            self._progress.update(fields)

    def step(self, step: int, loss: float, lr: float) -> None:
        """Record one training step; the next beats carry the latest ``TRAIL`` of them as
        ``trail`` (so a client that wants every step, like KIRI's monitor page, gets them)."""
        with self._lock:
            self._trail.append((step, loss, lr))

    def progress_snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._progress)
            if self._trail:
                steps, losses, lrs = zip(*self._trail, strict=True)
                out["trail"] = {"step": list(steps), "loss": list(losses), "lr": list(lrs)}
            return out

    def report(self) -> None:
        """Send the progress now rather than with the next beat (up to 2 s away): a run
        shorter than one beat still shows every step it took. The agent's own heartbeat
        (``beat``), so a lost lease or a cancel is noticed here as there."""
        if self.beat is not None:
            self.beat()

    def checkpoint(self, step: int, data: bytes) -> None:
        """Store resumable state at the hub now; the next attempt starts from it."""
        self.save(step, data)

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def raise_if_stopping(self) -> None:
        if self.stop_event.is_set():
            why = "lease lost" if self.lease_lost else "cancelled" if self.cancelled else "agent stopping"
            raise TaskInterrupted(why)

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once and raise when the task must stop."""
        if self.stop_event.wait(seconds):
            self.raise_if_stopping()


Handler = Callable[[TaskContext], dict[str, Any] | None]


# --- built-in kinds, for smoke tests and for testing the queue itself ------------------

def _number(params: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise TaskError(f"param {key!r} must be a number in [{lo}, {hi}], got {value!r}", retry=False)
    return float(value)


def echo(ctx: TaskContext) -> dict[str, Any]:
    """Return the params unchanged: the cheapest possible task."""
    return {"echo": ctx.params}


def sleep(ctx: TaskContext) -> dict[str, Any]:
    """Sleep ``seconds``, reporting progress; interruptible."""
    seconds = _number(ctx.params, "seconds", 1.0, 0, 86400)
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        ctx.progress(elapsed=round(elapsed, 3), seconds=seconds)
        ctx.sleep(min(0.05, seconds - elapsed))
    return {"slept": seconds}


def count(ctx: TaskContext) -> dict[str, Any]:
    """Count to ``n`` one step per ``interval`` seconds, checkpointing every ``every`` steps.

    Exists to prove resumption: the result says which step the attempt started from.
    """
    n = int(_number(ctx.params, "n", 10, 0, 10**9))
    interval = _number(ctx.params, "interval", 0.01, 0, 60)
    every = int(_number(ctx.params, "every", 1, 1, 10**9))
    step, total = 0, 0
    if ctx.checkpoint_in is not None:
        step = ctx.checkpoint_in.step
        (total,) = struct.unpack("<q", ctx.checkpoint_in.data)
    resumed_from = step
    while step < n:
        ctx.sleep(interval)
        step += 1
        total += step
        ctx.progress(step=step, of=n)
        if step % every == 0:
            ctx.checkpoint(step, struct.pack("<q", total))
    return {"resumed_from": resumed_from, "steps_run": n - resumed_from, "sum": total}


def fail(ctx: TaskContext) -> dict[str, Any]:
    """Fail on purpose (``retry`` param: whether it is worth retrying)."""
    raise TaskError(str(ctx.params.get("message", "failed on purpose")),
                    retry=bool(ctx.params.get("retry", True)))


# The kinds every agent can serve (``kiri-agent --kinds echo,sleep``), with no model code.
BUILTIN: dict[str, Handler] = {"echo": echo, "sleep": sleep, "count": count, "fail": fail}
