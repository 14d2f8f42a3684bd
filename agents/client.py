"""A blocking JSON-RPC client for the hub that survives hub restarts.

Calls are serialized on one socket (a lock), which is all an agent needs: its main
thread works while a heartbeat thread pings. When the connection drops, the client
reconnects with exponential backoff and jitter, says hello again, and resends the call.
Every method an agent resends is idempotent under fencing (heartbeat, checkpoint, ack and
fail carry the lease token), so a resend can never apply a change twice.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any

import orjson
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    stop_when_event_set,
    wait_exponential_jitter,
)

from kiri import PROTOCOL_VERSION, __version__, config
from kiri.protocol import RpcError, request

log = logging.getLogger("kiri.client")

def resendable(method: str) -> bool:
    """Whether the contract lets a client send ``method`` again after a dropped connection.

    Read from the method table on first need: the table's models pull in pydantic, which a
    short-lived CLI process should not pay for unless a connection actually drops.
    """
    from kiri.protocol.methods import IDEMPOTENT

    return method in IDEMPOTENT


def schema_from_atoms(atoms: list[dict[str, Any]], name: str) -> Any:
    """The named atom's schema out of the hub's ``atoms`` reply; SchemaError if unknown."""
    from kiri.model.schema import AtomSchema, SchemaError

    known = {a["name"]: a for a in atoms}
    if name not in known:
        raise SchemaError(f"unknown atom {name!r}; known atoms: {', '.join(sorted(known))}")
    return AtomSchema.from_dict({k: v for k, v in known[name].items() if k != "preset"})


class HubUnreachable(ConnectionError):
    """The hub could not be reached within the client's reconnect budget."""


class HubClient:
    def __init__(
        self,
        address: tuple[str, int] | list[tuple[str, int]] | None = None,
        *,
        token: str | None = None,
        agent: str | None = None,
        role: str = "cli",
        kinds: list[str] | None = None,
        connect_timeout: float = 5.0,
        reconnect_for: float | None = 10.0,
        max_line: int = 64 << 20,
    ) -> None:
        # one hub, or several sharing one PostgreSQL: a connection that cannot be made (or is
        # lost) moves on to the next, and a lease taken through one is kept through another
        self.addresses: list[tuple[str, int]] = (list(address) if isinstance(address, list)
                                                 else [address] if address else config.hub_addresses())
        self._at = 0
        # set by an agent told to stop: reconnecting gives up at once (the lease expires and
        # the task is retried) instead of outliving SIGTERM while its hub is gone
        self.stopping: threading.Event | None = None
        self.token = token if token is not None else os.environ.get("KIRI_TOKEN")
        self.role = role
        self.agent = agent or f"{role}-{socket.gethostname()}-{os.getpid()}"
        self.kinds = kinds
        self.connect_timeout = connect_timeout
        self.reconnect_for = reconnect_for  # None: keep trying forever (agents)
        self.max_line = max_line
        self.agent_id: int | None = None
        self.hub_version: str | None = None
        self._sock: socket.socket | None = None
        self._rfile: Any = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self.closed = False

    # --- connection --------------------------------------------------------------------

    def connect(self) -> None:
        with self._lock:
            if self._sock is None:
                self._retrying(self._connect_once)

    @property
    def address(self) -> tuple[str, int]:
        """The hub this client talks to now."""
        return self.addresses[self._at]

    def _next_hub(self) -> None:
        if len(self.addresses) > 1:
            self._at = (self._at + 1) % len(self.addresses)
            log.info("trying the next hub, %s:%s", *self.address)

    def _retrying(self, fn: Any) -> Any:
        stop = stop_never if self.reconnect_for is None else stop_after_delay(self.reconnect_for)
        stopping = self.stopping
        if stopping is not None:
            stop = stop | stop_when_event_set(stopping)
        retryer = Retrying(
            retry=retry_if_exception_type(OSError),
            wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.25),
            stop=stop,
            reraise=True,
            before_sleep=before_sleep_log(log, logging.INFO),
            sleep=stopping.wait if stopping is not None else time.sleep,
        )
        try:
            return retryer(fn)
        except OSError as e:
            where = ", ".join(f"{h}:{p}" for h, p in self.addresses)
            raise HubUnreachable(
                f"cannot reach the kiri hub at {where} ({e.strerror or e}); "
                "is `kiri-hub serve` running? (set KIRI_HUB=host:port to point elsewhere)"
            ) from e

    def _connect_once(self) -> None:
        if self.closed:
            raise HubUnreachable("client is closed")
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        except OSError:
            self._next_hub()  # the retry that follows tries the next hub
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._rfile = sock.makefile("rb")
        try:
            res = self._roundtrip("hello", {
                "token": self.token, "agent": self.agent, "role": self.role,
                "version": __version__, "host": socket.gethostname(), "pid": os.getpid(),
                "kinds": self.kinds,
            }, timeout=self.connect_timeout)
        except OSError:
            self._drop()
            self._next_hub()
            raise
        except BaseException:
            self._drop()
            raise
        if res.get("protocol") != PROTOCOL_VERSION:
            log.warning("hub speaks protocol %s, this client %s", res.get("protocol"), PROTOCOL_VERSION)
        self.agent_id = res.get("agent_id")
        self.hub_version = res.get("hub")

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._rfile = None

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._drop()

    def reset(self) -> None:
        """Drop the connection; the next call opens a fresh one. For after an interrupt that
        may have cut a call in half, leaving half a request sent or a reply unread."""
        with self._lock:
            self._drop()

    # --- calls -------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             timeout: float = 30.0) -> Any:
        """Send one request and return its result; raise the hub's error as RpcError."""
        with self._lock:
            if self._sock is None:
                self.connect()
            try:
                return self._roundtrip(method, params, timeout)
            except OSError:
                self._drop()
                if not resendable(method):
                    raise HubUnreachable(
                        f"connection to the hub dropped during {method}; it may or may not have "
                        "been applied (use a dedupe key to make retries safe)"
                    ) from None
                log.info("connection lost during %s; reconnecting", method)

                def again() -> Any:
                    self._drop()
                    self._connect_once()
                    return self._roundtrip(method, params, timeout)

                return self._retrying(again)

    def _roundtrip(self, method: str, params: dict[str, Any] | None, timeout: float) -> Any:
        assert self._sock is not None and self._rfile is not None
        req_id = next(self._ids)
        self._sock.settimeout(timeout)
        self._sock.sendall(request(req_id, method, params))
        while True:
            line = self._rfile.readline(self.max_line + 1)
            if not line:
                raise ConnectionResetError("hub closed the connection")
            if not line.endswith(b"\n"):
                raise ConnectionResetError("reply line too long or truncated")
            msg = orjson.loads(line)
            if msg.get("id") != req_id:
                if msg.get("id") is None and "error" in msg:
                    raise RpcError.from_wire(msg["error"])
                continue  # a stale reply from before a timeout; skip it
            if "error" in msg:
                raise RpcError.from_wire(msg["error"])
            return msg.get("result")

    # --- convenience -------------------------------------------------------------------

    def enqueue(self, kind: str, atom: str | None = None, params: dict[str, Any] | None = None,
                **opts: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "params": params or {}}
        if atom is not None:
            body["atom"] = atom
        body.update({k: v for k, v in opts.items() if v is not None})
        return self.call("enqueue", body)

    def lease(self, kinds: list[str], wait: float = 0.0, ttl: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"kinds": kinds, "wait": wait}
        if ttl is not None:
            body["ttl"] = ttl
        return self.call("lease", body, timeout=wait + 30.0)

    def __enter__(self) -> HubClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
