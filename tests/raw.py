"""A bare socket speaking lines: for sending what no well-behaved client would."""

from __future__ import annotations

import json
import socket


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def code(reply: dict) -> int:
    assert "error" in reply, reply
    return reply["error"]["code"]


class Raw:
    def __init__(self, address: tuple[str, int], source: str | None = None) -> None:
        self.sock = socket.create_connection(address, timeout=10,
                                             source_address=(source, 0) if source else None)
        self.rfile = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict:
        got = self.rfile.readline()
        assert got, "connection closed"
        return json.loads(got)

    def call(self, obj: object) -> dict:
        self.send(line(obj))
        return self.recv()

    def hello(self, token: str | None = None) -> dict:
        return self.call({"jsonrpc": "2.0", "id": 0, "method": "hello",
                          "params": {"agent": "raw", "role": "cli", "token": token}})

    def alive(self) -> bool:
        return self.call({"jsonrpc": "2.0", "id": "p", "method": "ping"}).get("result", {}).get("pong") is True

    def closed(self, timeout: float = 10) -> bool:
        """True once the hub has closed the connection (whatever it said first)."""
        self.sock.settimeout(timeout)
        try:
            while self.rfile.readline():
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
