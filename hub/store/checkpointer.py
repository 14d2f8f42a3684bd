"""Copies SQLite's WAL back into the database file from a thread of its own, so that no
commit on the hub's loop ever does.

By default SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages: that
commit then copies about 4 MB into the database file and syncs it. Measured while
retention folded a ten-host backlog, such a commit held the hub's loop for 195 ms, and an
enqueue waited 233 ms behind it. The hub's writer connection turns that off
(``wal_autocheckpoint=0``, see ``detach_autocheckpoint``) and this thread runs a PASSIVE
checkpoint every ``interval`` seconds instead: PASSIVE never waits for, nor blocks, the
writer or the readers, and sqlite3 lets go of the GIL while it copies. The loop's periodic
TRUNCATE checkpoint (``Hub._maybe_checkpoint_wal``) stays for what PASSIVE cannot do, reset
a WAL that readers keep from starting over; it runs every 30 s, and sooner only when the WAL
is over its limit *and* this thread is behind (``behind``). Triggered by size alone, it ran
every half second while retention folded (the file does not shrink by itself), 15 ms each.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("kiri.hub")


def detach_autocheckpoint(dbapi_conn: Any) -> int:
    """Stop this (the writer's) connection from checkpointing in its commits; returns its
    ``synchronous`` setting, which the checkpointer's connection then uses too."""
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")
    return int(dbapi_conn.execute("PRAGMA synchronous").fetchone()[0])


class WalCheckpointer:
    def __init__(self, path: Path, synchronous: int, interval: float = 0.1) -> None:
        self.path = path
        self.synchronous = synchronous
        self.interval = interval
        self.stopped = threading.Event()
        self.checkpoints = 0  # PASSIVE checkpoints that copied pages
        # the last one left frames behind (a reader's snapshot still needs them): the WAL
        # cannot start over, and only the loop's TRUNCATE (which waits for readers) resets it
        self.behind = False
        self.thread = threading.Thread(target=self._run, name="kiri-wal-checkpoint", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            while not self.stopped.wait(self.interval):
                try:
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as e:  # a locked or busy moment: the next turn tries again
                    log.debug("background WAL checkpoint failed: %s", e)
                    continue
                self.behind = bool(busy) or copied < frames
                if copied > 0:
                    self.checkpoints += 1
        except Exception:
            log.exception("the background WAL checkpointer stopped; commits will grow the WAL until the "
                          "hub's periodic checkpoint")
        finally:
            if conn is not None:
                conn.close()
