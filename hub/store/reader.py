"""Read-only queries off the event loop, on connections that cannot write.

The dashboard's reads (a month of points, a status page) would stall the queue if they ran
on the hub's one writing connection. They run instead in worker threads on their own
connections: WAL lets them read a committed snapshot while the hub writes, and
``PRAGMA query_only`` makes a GET that tries to write fail loudly instead of writing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy as sa

from kiri.hub.store.db import make_read_engine

T = TypeVar("T")


class Reader:
    def __init__(self, db_url: str, workers: int = 2) -> None:
        self.engine = make_read_engine(db_url)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="kiri-read")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in one read transaction, in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._run, fn, args)

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.engine.connect() as c, c.begin():
            return fn(c, *args)

    def query(self, fn: Callable[[sa.Connection], T]) -> T:
        """The same, on the calling thread (for tests and tools)."""
        return self._run(fn, ())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.engine.dispose()
