"""What changed, pushed to whoever watches: the dashboard's live updates and progress streams.

After each committed batch the hub publishes one ``changed`` event naming the topics its
operations touched (tasks, observations, scores, decisions, weights, agents) and one
``progress`` event per heartbeat that carried training progress. Watchers re-read what
they show only when a topic they care about changed, so an idle hub costs an open page
nothing. A watcher that falls behind loses events, never blocks the hub: it is told to
resynchronise instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from kiri.protocol.methods import TOPICS  # which parts of the picture each method can change

QUEUE_SIZE = 512

# A task leaves the running state through these; a progress stream then reports the end.
TASK_ENDS = frozenset({"ack", "fail", "cancel", "retry", "reap"})


class Subscriber:
    """One watcher's mailbox."""

    def __init__(self, task_id: int | None = None) -> None:
        self.task_id = task_id
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False

    def offer(self, event: dict[str, Any] | None) -> None:
        if self.task_id is not None and event is not None and event.get("task_id") not in (None, self.task_id):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, ``{"type": "resync"}`` after an overflow, or ``{"type": "idle"}``."""
        if self.overflowed:
            self.overflowed = False
            while not self.queue.empty():
                if self.queue.get_nowait() is None:
                    return None
            return {"type": "resync"}
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return {"type": "idle"}


class EventBus:
    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.closed = False

    def subscribe(self, task_id: int | None = None) -> Subscriber:
        sub = Subscriber(task_id)
        if self.closed:
            sub.offer(None)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(self, event: dict[str, Any]) -> None:
        for sub in self.subscribers:
            sub.offer(event)

    def close(self) -> None:
        """End every stream (the hub is stopping)."""
        self.closed = True
        for sub in self.subscribers:
            sub.offer(None)


def _task_ids(method: str, params: Any, result: Any) -> Iterable[int]:
    if method == "reap":
        return [tid for tid, _status in result or ()]
    tid = getattr(params, "task_id", None)
    return [tid] if tid is not None else []


def publish_batch(bus: EventBus, results: Iterable[tuple[Any, Any, Any]]) -> None:
    """Turn one committed batch's outcomes into events."""
    topics: set[str] = set()
    for op, result, err in results:
        if err is not None:
            continue
        method = op.method
        if method == "lease" and (result is None or result.get("task") is None):
            continue
        if method == "reap" and not result:
            continue
        topics.update(TOPICS.get(method, ()))
        if method == "heartbeat" and op.params.progress:
            bus.publish({"type": "progress", "task_id": op.params.task_id, "progress": op.params.progress})
        elif method in TASK_ENDS:
            for tid in _task_ids(method, op.params, result):
                bus.publish({"type": "task", "task_id": tid, "method": method})
    if topics:
        bus.publish({"type": "changed", "topics": sorted(topics)})
