"""Read-only queries off the event loop, on connections that cannot write.

The dashboard's reads (a year's chart, a status page) would stall the queue if they ran on
the hub's one writing connection. They run instead on their own connections, where WAL
lets them read a committed snapshot while the hub writes, and ``PRAGMA query_only`` makes
a GET that tries to write fail loudly instead of writing.

Two places to run them:

- ``run``: a worker thread of the hub. Cheap to call; for small reads.
- ``run_json``: a worker *process* (``processes``, 2 by default on more than two cores:
  ``default_processes``), which also encodes the
  answer as JSON. Parsing a chart's readings and encoding its columns holds the GIL for
  milliseconds at a time; in a thread that time is taken from the event loop, and a
  request that should take a millisecond waits behind it. In another process it costs the
  loop only the bytes it sends on. The pool starts in the background when the hub starts;
  until its workers are up, a thread serves, so no chart waits for Python to start.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.context
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa

from kiri.hub.store.db import make_read_engine

T = TypeVar("T")
log = logging.getLogger("kiri.hub")

_ENGINE: sa.Engine | None = None  # a worker process's own read engine


WORKER_NICE = 10  # read workers yield the CPU to the hub's loop, from their start-up on


class _NiceProcess(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        super().start()
        try:  # at once, so even the worker's start-up (imports: 0.5 s of CPU) waits for the loop
            assert self.pid is not None
            os.setpriority(os.PRIO_PROCESS, self.pid, WORKER_NICE)
        except (OSError, AttributeError):  # not on this platform, or not allowed: full priority
            pass


class _NiceSpawn(multiprocessing.context.SpawnContext):
    """Spawn, not fork (the hub has threads, and a forked copy of its locks can deadlock),
    at a lower CPU priority than the hub: on a small machine a chart read in a worker then
    never takes a core the queue wants. It remembers the processes it started (one context
    per pool), so a closing hub can kill them (``Reader.close``)."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[_NiceProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> _NiceProcess:  # (the name the context API calls)
        p = _NiceProcess(*args, **kwargs)
        self.started.append(p)
        return p


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # a container's CPU quota (cgroup v2)


def usable_cores() -> float:
    """The cores this process may use: those it may run on (a cpuset), and no more than a
    container's CPU quota (``docker run --cpus 2`` on a 16-core host is two)."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        cores = float(os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]  # "max 100000" or "200000 100000"
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 quota here
        pass
    return cores


def default_processes() -> int:
    """How many read worker processes a hub starts when none are asked for: 2 where this
    process may use more than two cores, none (reads in hub threads) on two or fewer.

    A worker keeps a chart's parsing and encoding off the loop's GIL, but it is one more
    process wanting a core. On two cores the hub, its workers and the dashboard's client
    then take turns, and the queue waits for its turn: with a client reading charts, status
    and /metrics in a loop, enqueue round trips had a p99 of 4.3-5.0 ms with two workers
    against 2.4-2.8 with threads (a year of ten hosts, ``bench/year.py``; one host 3.6-4.7
    against 2.6-2.75), and the charts answered faster from threads too."""
    return 2 if usable_cores() > 2 else 0


PARENT_POLL_S = 0.5  # how often a read worker checks that its hub is still alive


def _exit_with(parent: int) -> None:
    """Exit this worker once ``parent`` is gone.

    A pool worker blocks on its task pipe, and it holds that pipe's writing end itself, so a
    hub killed with SIGKILL never closes it: without this watch its workers would live on
    as orphans, each holding a read engine and ~45 MB, one pair per killed hub.
    ``PR_SET_PDEATHSIG`` is no substitute: it fires when the *thread* that spawned the
    worker exits, and the pool spawns from a thread of its own."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _init_worker(db_url: str, parent: int) -> None:
    global _ENGINE
    threading.Thread(target=_exit_with, args=(parent,), name="kiri-parent-watch",
                     daemon=True).start()
    _ENGINE = make_read_engine(db_url)


def _ready() -> bool:
    return _ENGINE is not None


def _run_json(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """In a worker process: ``fn(connection, *args)`` in one read transaction, as JSON."""
    assert _ENGINE is not None
    with _ENGINE.connect() as c, c.begin():
        return orjson.dumps(fn(c, *args), option=orjson.OPT_SERIALIZE_NUMPY)


class Reader:
    def __init__(self, db_url: str, workers: int = 2, processes: int | None = None) -> None:
        self.db_url = db_url
        self.engine = make_read_engine(db_url)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="kiri-read")
        self.processes = default_processes() if processes is None else processes  # None: this machine's
        self.procs: ProcessPoolExecutor | None = None
        self.spawner: _NiceSpawn | None = None  # the current pool's context: its processes
        self.warming: list[Any] = []  # futures of the workers' first task; ready when all are done

    def _procs(self) -> ProcessPoolExecutor:
        if self.procs is None:
            self.spawner = _NiceSpawn()
            self.procs = ProcessPoolExecutor(self.processes, mp_context=self.spawner,
                                             initializer=_init_worker, initargs=(self.db_url, os.getpid()))
        return self.procs

    def warm(self) -> None:
        """Start the worker processes now (in the background), not at the first chart."""
        if self.processes:
            procs = self._procs()
            self.warming = [procs.submit(_ready) for _ in range(self.processes)]

    def _warm(self) -> bool:
        return all(f.done() for f in self.warming)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in one read transaction, in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._run, fn, args)

    async def run_json(self, fn: Callable[..., Any], *args: Any) -> bytes:
        """``fn(connection, *args)`` in a worker process, its answer JSON-encoded there.
        ``fn`` and ``args`` must pickle: a module-level function and plain values."""
        if not self.processes or not self._warm():  # until the workers are up, a thread serves
            return orjson.dumps(await self.run(fn, *args), option=orjson.OPT_SERIALIZE_NUMPY)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._procs(), _run_json, fn, args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): a fresh pool, once
            log.warning("a read worker process died; starting new ones")
            old, self.procs = self.procs, None
            if old is not None:
                old.shutdown(wait=False, cancel_futures=True)
            return await loop.run_in_executor(self._procs(), _run_json, fn, args)

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.engine.connect() as c, c.begin():
            return fn(c, *args)

    def query(self, fn: Callable[[sa.Connection], T]) -> T:
        """The same, on the calling thread (for tests and tools)."""
        return self._run(fn, ())

    def close(self) -> None:
        """Stop the read threads and processes (the hub's HTTP face is already closed).

        The worker processes only read, so they are killed, not waited for: a hub told
        to stop while they are still starting (their imports run at a low priority, and on a
        busy machine take tens of seconds) would otherwise wait for their start-up, and the
        interpreter's exit for them too."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.procs is not None:
            procs, self.procs = self.procs, None
            workers = [w for w in (self.spawner.started if self.spawner else []) if w.pid is not None]
            procs.shutdown(wait=False, cancel_futures=True)
            for w in workers:
                w.kill()  # (SIGKILL: a worker the kernel has stopped or starved still goes)
            for w in workers:
                w.join(10)
        self.engine.dispose()
