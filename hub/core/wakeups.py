"""Wake-ups: waiting leases get work the moment it exists, and the hub keeps time.

``LongPoll`` holds the ``lease`` requests that found nothing and may still wait: a batch
that made tasks available re-runs one waiter per new task (of a kind it asked for), and a
waiter whose time is up is answered ``task: null``. ``Timers`` wakes the hub for what is
due later (a delayed task, a schedule) with one timer armed at the earliest due time, and
ticks the reaper at a fixed interval. Neither touches the database itself: they only
decide *when* ops are submitted to the group commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from kiri.hub.core.commit import Op
from kiri.protocol import reply_ok

log = logging.getLogger("kiri.hub")


class LongPoll:
    def __init__(self, loop: asyncio.AbstractEventLoop, submit: Callable[[Op], None]) -> None:
        self.loop = loop
        self.submit = submit
        self.waiters: list[Op] = []

    def __len__(self) -> int:
        return len(self.waiters)

    def wait(self, op: Op) -> None:
        """Park a lease that found nothing until work arrives or its deadline passes."""
        self.waiters.append(op)
        if op.timer is None:
            op.timer = self.loop.call_at(self.loop.time() + max(0.0, op.deadline - time.time()), self._timeout, op)

    def _timeout(self, op: Op) -> None:
        op.timer = None
        if op in self.waiters:
            self.waiters.remove(op)
            self.answer_empty(op)

    def answer_empty(self, op: Op) -> None:
        if op.timer:
            op.timer.cancel()
            op.timer = None
        if op.conn is not None and op.reply:
            op.conn.send(reply_ok(op.req_id, {"task": None}))

    def wake(self, kinds: list[str] | None) -> None:
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
            self.submit(w)

    def waiting_kinds(self) -> list[str]:
        return [k for w in self.waiters for k in w.kinds]

    def holds(self, conn: Any) -> bool:
        return any(w.conn is conn for w in self.waiters)

    def drop(self, conn: Any) -> None:
        """The connection closed: its waiters wait no more."""
        keep = []
        for w in self.waiters:
            if w.conn is conn:
                if w.timer:
                    w.timer.cancel()
            else:
                keep.append(w)
        self.waiters = keep

    def answer_all(self) -> None:
        """Shutting down: every waiter gets ``task: null`` now."""
        for op in self.waiters:
            self.answer_empty(op)
        self.waiters.clear()


class Timers:
    """One timer at the earliest due time, and a periodic tick."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float,
                 on_due: Callable[[], None], on_tick: Callable[[], None]) -> None:
        self.loop = loop
        self.tick = tick
        self.on_due = on_due
        self.on_tick = on_tick
        self.due_timer: asyncio.TimerHandle | None = None
        self.due_at = float("inf")
        self.task: asyncio.Task[None] | None = None
        self.stopped = False

    def start(self) -> None:
        self.task = self.loop.create_task(self._ticker())

    def stop(self) -> None:
        self.stopped = True
        if self.task:
            self.task.cancel()
        if self.due_timer:
            self.due_timer.cancel()

    def arm(self, t: float | None) -> None:
        """Wake at ``t`` (epoch seconds) unless an earlier wake-up is already armed."""
        if t is None or t >= self.due_at:
            return
        if self.due_timer:
            self.due_timer.cancel()
        self.due_at = t
        self.due_timer = self.loop.call_at(self.loop.time() + max(0.0, t - time.time()), self._fire)

    def _fire(self) -> None:
        self.due_timer = None
        self.due_at = float("inf")
        if not self.stopped:
            self.on_due()

    async def _ticker(self) -> None:
        while not self.stopped:
            await asyncio.sleep(self.tick)
            try:
                self.on_tick()
            except Exception:
                log.exception("hub tick failed; will try again")
