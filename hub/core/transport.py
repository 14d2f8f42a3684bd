"""The hub's TCP transport: connections, line framing and the limits that hold without a token.

Everything a stranger can do before ``hello`` is bounded here, so that no client, with or
without the token, can make the hub buffer without bound or keep agents out:

- a connection that has not said hello may send lines of at most ``hello_line`` bytes and
  must say hello within ``hello_timeout`` seconds;
- connections waiting to say hello have their own small budget (``max_unauthenticated``
  in all, ``max_unauthenticated_per_address`` per peer address). When either is in use the
  oldest waiting connection (of all, or of that address) makes room: it had the longest to
  say hello, so a flood of silent connections, even from the agent's own address, cannot
  keep a real agent, which says hello at once, out;
- every connection counts toward ``max_connections`` and ``max_per_address``; when the
  hub is full, the longest-idle authenticated connection that holds no waiting lease and
  has been silent for ``idle_evict_after`` seconds makes room (its agent reconnects);
- all connections together may buffer at most ``max_buffered`` bytes of unfinished lines;
  the connection whose data would cross that bound is closed with an error.

The transport knows nothing of methods or the database: complete lines go to a handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kiri.protocol import PayloadTooLarge, RpcError, Unauthorized, Unavailable, reply_err

log = logging.getLogger("kiri.hub.core.transport")


@dataclass(frozen=True)
class Limits:
    max_line: int = 16 << 20  # after hello
    hello_line: int = 64 << 10  # before hello: a hello is a few hundred bytes
    hello_timeout: float = 5.0
    max_connections: int = 1024
    max_per_address: int = 256
    max_unauthenticated: int = 64
    max_unauthenticated_per_address: int = 16
    max_buffered: int = 256 << 20
    idle_evict_after: float = 60.0


class LineHandler(Protocol):
    def handle_line(self, conn: Connection, line: bytes) -> None: ...

    def connection_closed(self, conn: Connection) -> None: ...

    def is_busy(self, conn: Connection) -> bool:
        """Whether the connection has work in the hub (a waiting lease): never evicted."""
        ...


class Connections:
    """The live connections and their admission rules (see the module docstring)."""

    def __init__(self, limits: Limits, handler: LineHandler, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.handler = handler
        self.loop = loop
        self.all: set[Connection] = set()
        self.waiting_hello: dict[Connection, None] = {}  # insertion order = oldest first
        self.per_address: dict[str, int] = {}
        self.buffered = 0
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.all)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.all))

    def factory(self) -> Callable[[], Connection]:
        return lambda: Connection(self)

    # --- admission -----------------------------------------------------------------------

    def admit(self, conn: Connection) -> RpcError | None:
        """Take a new connection in, making room if the rules allow; or say why not."""
        lim = self.limits
        addr = conn.address
        if self.per_address.get(addr, 0) >= lim.max_per_address:
            return Unavailable(f"too many connections from {addr} (limit {lim.max_per_address}); try again later")
        waiting_here = [c for c in self.waiting_hello if c.address == addr]
        if len(waiting_here) >= lim.max_unauthenticated_per_address:
            # the address's oldest silent connection makes room: a flood from the agent's own
            # address cannot keep it out, since a real client says hello at once
            self._evict(waiting_here[0], Unavailable(
                f"too many connections from {addr} waiting to say hello "
                f"(limit {lim.max_unauthenticated_per_address}); this one waited longest"))
        if len(self.waiting_hello) >= lim.max_unauthenticated:
            oldest = next(iter(self.waiting_hello))
            self._evict(oldest, Unavailable("too many connections waiting to say hello; this one waited longest"))
        if len(self.all) >= lim.max_connections and not self._evict_idle():
            return Unavailable(f"the hub is at its limit of {lim.max_connections} connections; try again later")
        self.all.add(conn)
        self.waiting_hello[conn] = None
        self.per_address[addr] = self.per_address.get(addr, 0) + 1
        return None

    def _evict_idle(self) -> bool:
        now = time.time()
        idle = [c for c in self.all
                if c.authenticated and now - c.last_seen >= self.limits.idle_evict_after
                and not self.handler.is_busy(c)]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_seen)
        self._evict(victim, Unavailable("the hub is full and this connection was idle longest; reconnect"))
        return True

    def _evict(self, conn: Connection, err: RpcError) -> None:
        self.evicted += 1
        log.info("evicting connection from %s: %s", conn.peer, err)
        conn.send(reply_err(None, err))
        conn.close()
        self.forget(conn)  # connection_lost comes later; its slot is free now

    def authenticated(self, conn: Connection) -> None:
        conn.authenticated = True
        self.waiting_hello.pop(conn, None)
        if conn.hello_timer:
            conn.hello_timer.cancel()
            conn.hello_timer = None

    def forget(self, conn: Connection) -> None:
        if conn not in self.all:
            return
        self.all.discard(conn)
        self.waiting_hello.pop(conn, None)
        n = self.per_address.get(conn.address, 1) - 1
        if n > 0:
            self.per_address[conn.address] = n
        else:
            self.per_address.pop(conn.address, None)
        self.buffered -= conn.held
        conn.held = 0

    def close_all(self) -> None:
        for conn in list(self.all):
            conn.close()


class Connection(asyncio.Protocol):
    """One client's byte stream, cut into lines for the handler."""

    def __init__(self, table: Connections) -> None:
        self.table = table
        self.buf = bytearray()
        self.held = 0  # bytes of this buffer counted in table.buffered
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self.agent: str | None = None
        self.role: str | None = None
        self.agent_id: int | None = None
        self.address = "?"
        self.peer = "?"
        self.bad_tokens = 0
        self.refused_before_hello = 0
        self.closed = False
        self.last_seen = time.time()
        self.hello_timer: asyncio.TimerHandle | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.address, self.peer = str(peer[0]), f"{peer[0]}:{peer[1]}"
        refusal = self.table.admit(self)
        if refusal is not None:
            self.table.refused += 1
            self.send(reply_err(None, refusal))
            self.closed = True
            transport.close()
            return
        self.hello_timer = self.table.loop.call_later(self.table.limits.hello_timeout, self._hello_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.hello_timer:
            self.hello_timer.cancel()
        if self in self.table.all:
            self.table.forget(self)
        self.table.handler.connection_closed(self)

    def pause_writing(self) -> None:
        # A client that does not read its replies stops being read from.
        if self.transport:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport and not self.closed:
            self.transport.resume_reading()

    @property
    def line_limit(self) -> int:
        lim = self.table.limits
        return lim.max_line if self.authenticated else lim.hello_line

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        start = len(self.buf)
        self.buf += data
        limit = self.line_limit
        handle = self.table.handler.handle_line
        while True:
            nl = self.buf.find(b"\n", start)
            if nl < 0:
                if len(self.buf) > limit:
                    self._too_long(limit)
                else:
                    self._account()
                return
            if nl > limit:
                self._too_long(limit)
                return
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            start = 0
            self.last_seen = time.time()
            authenticated = self.authenticated
            handle(self, line)
            if self.closed:
                return
            if self.authenticated != authenticated:  # a hello in this packet: the next line may be longer
                limit = self.line_limit

    # helpers
    def _account(self) -> None:
        """Count this connection's unfinished line against the hub-wide buffer bound."""
        table = self.table
        table.buffered += len(self.buf) - self.held
        self.held = len(self.buf)
        if table.buffered > table.limits.max_buffered:
            self.send(reply_err(None, PayloadTooLarge(
                f"the hub is holding {table.buffered} bytes of unfinished lines (limit "
                f"{table.limits.max_buffered}); closing this connection")))
            self.close()

    def _too_long(self, limit: int) -> None:
        what = "line" if self.authenticated else "line before hello"
        self.send(reply_err(None, PayloadTooLarge(f"{what} longer than the hub's limit of {limit} bytes; closing")))
        self.close()

    def _hello_timeout(self) -> None:
        self.hello_timer = None
        if not self.authenticated and not self.closed:
            self.send(reply_err(None, Unauthorized("no hello within the time limit; closing")))
            self.close()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.buf = bytearray()
        if self.held:
            self.table.buffered -= self.held
            self.held = 0
