"""One hub per SQLite file: an exclusive lock that dies with the process.

Two hubs on one SQLite file would each run a reaper and a scheduler and hand the same
expired lease out twice. The lock is ``flock`` on a ``<db>.lock`` file beside the
database: the kernel drops it when the process exits, however it exits (SIGKILL included),
so a crashed hub never leaves a stale lock behind. The file's text names the holder, so
the refusal can say which hub is running.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from kiri.hub.store.db import sqlite_path


class StoreLocked(Exception):
    """Another live hub serves this database."""


class StoreLock:
    """Held for the life of a hub process; ``None`` path means nothing to lock."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None

    @classmethod
    def for_url(cls, url: str) -> StoreLock:
        db = sqlite_path(url)
        return cls(None if db is None else db.with_name(db.name + ".lock"))

    def acquire(self) -> None:
        """Take the lock or raise StoreLocked naming the hub that holds it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise StoreLocked(
                f"another kiri hub is already serving this database ({holder}); stop it first, "
                f"or give this hub its own database with --db or --data-dir (lock: {self.path})"
            ) from None
        self._file = f
        self.describe()

    def describe(self, address: str | None = None) -> None:
        """Write who holds the lock (and, once listening, where) into the lock file."""
        if self._file is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        if address:
            info["address"] = address
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(info))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        where = f", listening on {info['address']}" if info.get("address") else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on {info['host']}{where}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "a hub whose lock file is unreadable"
