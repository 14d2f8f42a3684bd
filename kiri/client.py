"""``kiri.Client``: enqueue work from Python and wait for its result.

    from kiri import Client

    with Client() as hub:                                  # KIRI_HUB, else 127.0.0.1:7746
        tid = hub.enqueue("resize", {"w": 640})
        print(hub.wait(tid, timeout=60))                   # the handler's result, or TaskFailed
        parts = [hub.enqueue("thumb", {"i": i}, parent=tid) for i in range(8)]
        print(hub.wait_all(parts))                         # map-reduce: every child's result

A thin layer over the JSON-RPC protocol (the same ``HubClient`` the CLI and agents use):
waiting reads the task until it ends, backing off from 20 ms to half a second, so a short
task returns at once and a long one costs the hub two reads a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from kiri import config
from kiri.agents.client import HubClient

ENDED = ("done", "dead", "cancelled")


class TaskFailed(RuntimeError):
    """The task ended dead or cancelled; ``task`` is its final state (``task["error"]``)."""

    def __init__(self, task: dict[str, Any]) -> None:
        super().__init__(f"task {task['id']} ({task['kind']}) is {task['status']}: {task.get('error') or '-'}")
        self.task = task


class Client:
    """A connection to a hub for enqueueing and waiting (module doc)."""

    def __init__(self, hub: str | None = None, token: str | None = None, name: str | None = None) -> None:
        address = config.parse_addresses(hub) if hub else config.hub_addresses()
        self.hub = HubClient(address, token=token, agent=name, role="cli")

    def enqueue(self, kind: str, params: dict[str, Any] | None = None, *, atom: str | None = None,
                priority: int | None = None, delay: float | None = None, max_attempts: int | None = None,
                dedupe_key: str | None = None, parent: int | None = None, deadline: float | None = None) -> int:
        """Queue a task; its id (an existing one's, when ``dedupe_key`` matches an unfinished task).
        ``deadline``: seconds one attempt may run before its agent stops it (default: the kind's)."""
        res = self.hub.enqueue(kind, atom=atom, params=params, priority=priority, delay=delay,
                               max_attempts=max_attempts, dedupe_key=dedupe_key, parent_id=parent,
                               deadline=deadline)
        return int(res["task_id"])

    def task(self, task_id: int) -> dict[str, Any]:
        """The task as the hub has it now (status, attempts, progress, result, error, ...)."""
        return self.hub.call("task", {"task_id": task_id})["task"]

    def updates(self, task_id: int, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The task each time its status or progress changes, ending with its final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause, last = 0.02, None
        while True:
            t = self.task(task_id)
            seen = (t["status"], t.get("attempts"), repr(t.get("progress")))
            if seen != last:
                last, pause = seen, 0.02
                yield t
            if t["status"] in ENDED:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} is still {t['status']} after {timeout:g} s")
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(0.5, pause * 1.5)

    def wait(self, task_id: int, timeout: float | None = None) -> Any:
        """Block until the task ends: its result when done; ``TaskFailed`` when it died or was
        cancelled; ``TimeoutError`` when ``timeout`` seconds pass first (the task goes on)."""
        for t in self.updates(task_id, timeout):
            if t["status"] == "done":
                return t.get("result")
            if t["status"] in ENDED:
                raise TaskFailed(t)
        raise AssertionError("unreachable: updates() ends with an ended task")  # pragma: no cover

    def wait_all(self, task_ids: Sequence[int], timeout: float | None = None) -> list[Any]:
        """Every task's result, in order (a parent waiting for its children); the first
        that failed raises ``TaskFailed``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for tid in task_ids:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(self.wait(tid, left))
        return out

    def pause(self, kind: str) -> dict[str, Any]:
        """Lease no task of ``kind`` until ``resume``; those running go on. The kind's settings."""
        return self.hub.call("set_kind", {"kind": kind, "paused": True})["kind"]

    def resume(self, kind: str) -> dict[str, Any]:
        return self.hub.call("set_kind", {"kind": kind, "paused": False})["kind"]

    def limit(self, kind: str, concurrency: int | None) -> dict[str, Any]:
        """At most ``concurrency`` tasks of ``kind`` leased at once, across all agents (None: no limit)."""
        return self.hub.call("set_kind", {"kind": kind, "concurrency": concurrency})["kind"]

    def kinds(self) -> list[dict[str, Any]]:
        """Every kind with settings or unfinished tasks: paused, concurrency, deadline, counts."""
        return list(self.hub.call("kinds")["kinds"])

    def close(self) -> None:
        self.hub.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
