"""A tiny HTTP client for the tests (stdlib only, so it cannot share a bug with the server)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def error(self) -> dict[str, Any]:
        body = self.json
        assert set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["status"] == self.status
        return err


def request(base: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            raw: bytes | None = None, token: str | None = None, timeout: float = 30.0) -> Reply:
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    hdrs = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def stream(base: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
           timeout: float = 60.0) -> Iterator[bytes]:
    """The reply's lines as they arrive (NDJSON lines, or SSE lines including blank ones)."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        assert r.status == 200, (r.status, r.read())
        while True:
            line = r.readline()
            if not line:
                return
            yield line.rstrip(b"\r\n")
    finally:
        conn.close()


def sse_events(lines: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    event, data = "message", b""
    for line in lines:
        if not line:
            if data:
                yield event, json.loads(data)
            event, data = "message", b""
        elif line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data += line[6:]
