"""Wake-ups across hubs that share one PostgreSQL database: ``NOTIFY`` out, ``LISTEN`` in.

A hub wakes its own waiting leases the moment a batch makes work available (``LongPoll``),
but an agent long-polling on hub A knows nothing of a task enqueued through hub B. So every
batch that made tasks leasable, freed room under a concurrency limit or set a future due
time also sends a notification, in its own transaction: PostgreSQL delivers it when (and
only if) the transaction commits, so a peer never wakes for work that rolled back. Each hub
listens on a connection of its own, in a thread, and hands what it hears to its loop. This
is pgqueuer's and procrastinate's approach; there is no polling in the hot path.

SQLite has one hub per database file, so none of this runs there.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from kiri.hub.core.queue import Env
from kiri.hub.store.db import LEADER_LOCK

log = logging.getLogger("kiri.hub")

CHANNEL = "kiri_wake"
MAX_PAYLOAD = 7000  # PostgreSQL's limit is 8000 bytes; beyond it, "wake every waiter"


def hub_id() -> str:
    """This hub's name on the channel (its own notifications come back to it, and are ignored)."""
    return uuid.uuid4().hex


def announce(c: sa.Connection, me: str, env: Env) -> None:
    """Tell the other hubs what this transaction made leasable (before it commits)."""
    if c.dialect.name != "postgresql" or not (env.available or env.freed or env.due):
        return
    kinds = env.available + env.freed  # one entry per task: each wakes one waiter, as on this hub
    due = min(env.due) if env.due else None
    payload = orjson.dumps({"hub": me, "kinds": kinds, "due": due})
    if len(payload) > MAX_PAYLOAD:
        payload = orjson.dumps({"hub": me, "kinds": None, "due": due})
    c.exec_driver_sql("SELECT pg_notify(%(channel)s, %(payload)s)", {"channel": CHANNEL, "payload": payload.decode()})


def vacuum_tasks_if_due(conn: Any, dead_rows: int) -> bool:
    """VACUUM the tasks table if at least ``dead_rows`` of its rows are dead; whether it did.

    Every lease and every ack leaves the task's previous row version dead, and its entry in
    the ready index (ordered like the queue) stays until a vacuum removes it: each lease's
    probe steps over the entries of all tasks leased since. PostgreSQL's autovacuum visits
    a table at most once a minute (``autovacuum_naptime``), 180,000 leases at 3,000 tasks/s;
    measured here, a lease's cost on the server doubled within 10,000 tasks. So the upkeep
    hub vacuums the table itself once that many rows are dead (about 20 ms for tens of
    thousands of rows; it blocks no reads or writes). ``conn``: a psycopg connection in
    autocommit, as VACUUM runs outside any transaction. 0: leave it to autovacuum."""
    if dead_rows <= 0:
        return False
    row = conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass").fetchone()
    if row is None or row[0] < dead_rows:
        return False
    conn.execute("VACUUM tasks")
    log.debug("vacuumed the tasks table (%d dead rows)", row[0])
    return True


APP_PREFIX = "kiri-hub:"  # each hub's listener connects as application_name kiri-hub:<hub id>

_forget_gone = sa.text(
    "UPDATE agents SET connected = false WHERE connected AND (hub IS NULL OR hub NOT IN ("
    " SELECT substr(application_name, :from_char) FROM pg_stat_activity WHERE application_name LIKE :pattern))"
)


def forget_gone(c: sa.Connection) -> int:
    """Mark disconnected the agents listed as connected to a hub that is gone; how many.

    A hub is alive while its listener's session is (PostgreSQL ends the session of a
    process that died, SIGKILL included); the session names the hub (``APP_PREFIX``), so
    ``pg_stat_activity`` is the list of live hubs. Run by the hub that does the upkeep, at
    its tick. An agent that moved to another hub meanwhile is that hub's again at its next
    tick, and a hub whose listener is reconnecting reclaims its agents the same way."""
    if c.dialect.name != "postgresql":
        return 0
    return int(c.execute(_forget_gone, {"from_char": len(APP_PREFIX) + 1, "pattern": APP_PREFIX + "%"}).rowcount)


def conninfo(url: str) -> dict[str, Any]:
    """psycopg's connection arguments from the hub's SQLAlchemy URL."""
    u = make_url(url)
    args: dict[str, Any] = u.translate_connect_args(username="user", database="dbname")
    args.update({k: v for k, v in u.query.items() if isinstance(v, str)})
    return args


class Listener:
    """A thread that listens for the other hubs' notifications and hands each to ``on_wake``
    (``kinds``: the kinds to wake waiters of, None for all; ``due``: a time to wake at).
    A lost connection is made again after a pause; waiters it missed meanwhile are found by
    the hub's periodic tick, as before there was a channel.

    It also elects the hub that does the background upkeep (rollups, retention, moving
    committed imports): whoever holds a session advisory lock, on a second connection of
    this thread. The leader also vacuums the tasks table once ``vacuum_after`` of its rows
    are dead (``vacuum_tasks_if_due``). Requests are served by every hub; the upkeep by one at a time, so two hubs
    never fold or recompute the same buckets at once. When the leader's connection dies,
    PostgreSQL drops its lock and another hub takes it within a second (Oban and River elect
    their leader the same way)."""

    def __init__(self, url: str, me: str, on_wake: Callable[[list[str] | None, float | None], None],
                 vacuum_after: int = 0) -> None:
        self.vacuum_after = vacuum_after
        self.vacuums = 0  # how many times this hub vacuumed the tasks table
        self.args = {**conninfo(url), "application_name": APP_PREFIX + me}  # how others see this hub is alive
        self.me = me
        self.on_wake = on_wake
        self.stopped = threading.Event()
        self.listening = threading.Event()  # set once LISTEN is in place (tests and start-up wait on it)
        self.leader = threading.Event()  # set while this hub holds the upkeep lock
        self.thread = threading.Thread(target=self._run, name="kiri-listen", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)

    def _run(self) -> None:
        import psycopg  # the [postgresql] extra: only a hub on PostgreSQL gets here

        while not self.stopped.is_set():
            try:
                with psycopg.connect(**self.args, autocommit=True) as conn, \
                        psycopg.connect(**self.args, autocommit=True) as lock:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    while not self.stopped.is_set():
                        if not self.leader.is_set() and lock.execute(
                                "SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0]:
                            log.info("this hub now does the background upkeep")
                            self.leader.set()
                        if self.leader.is_set() and vacuum_tasks_if_due(lock, self.vacuum_after):
                            self.vacuums += 1
                        for note in conn.notifies(timeout=0.5):
                            self._heard(note.payload)
            except psycopg.Error as e:
                self.listening.clear()
                self.leader.clear()
                log.warning("listening for other hubs failed (%s); again in 1 s", e)
                self.stopped.wait(1.0)
        self.leader.clear()

    def _heard(self, payload: str) -> None:
        try:
            msg = orjson.loads(payload)
            if msg.get("hub") == self.me:
                return
            self.on_wake(msg.get("kinds"), msg.get("due"))
        except Exception:  # a stranger's payload on our channel must not stop the thread
            log.exception("could not read a notification from another hub: %.200r", payload)
