"""The wire contract shared by the hub and every client.

One JSON-RPC 2.0 object per line, UTF-8. Error codes are stable numbers: clients
branch on them, so a code never changes meaning once released.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson


class ErrorCode(enum.IntEnum):
    """Stable JSON-RPC error codes (standard ones first, then kiri's own)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    UNAUTHORIZED = -32001
    NOT_FOUND = -32002
    LEASE_LOST = -32003
    CONFLICT = -32004
    PAYLOAD_TOO_LARGE = -32005
    UNAVAILABLE = -32006


class RpcError(Exception):
    """An error that travels over the wire as ``{code, message, data}``."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, data: Any = None, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles whole (a read worker process raises it; the hub answers with it)."""
        return self.__class__, (self.message, self.data, self.__dict__.get("code"))

    def to_wire(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": int(self.code), "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    @classmethod
    def from_wire(cls, err: Any) -> RpcError:
        """Rebuild the most specific exception class for a received error object."""
        if not isinstance(err, dict):
            return RpcError(f"malformed error object from hub: {err!r}")
        code = err.get("code")
        message = str(err.get("message", "unknown error"))
        data = err.get("data")
        klass = _BY_CODE.get(code, RpcError) if isinstance(code, int) else RpcError
        exc = klass(message, data)
        if klass is RpcError and isinstance(code, int):
            try:
                exc.code = ErrorCode(code)
            except ValueError:
                exc.code = ErrorCode.INTERNAL_ERROR
        return exc


class ParseError(RpcError):
    code = ErrorCode.PARSE_ERROR


class InvalidRequest(RpcError):
    code = ErrorCode.INVALID_REQUEST


class MethodNotFound(RpcError):
    code = ErrorCode.METHOD_NOT_FOUND


class InvalidParams(RpcError):
    code = ErrorCode.INVALID_PARAMS


class InternalError(RpcError):
    code = ErrorCode.INTERNAL_ERROR


class Unauthorized(RpcError):
    code = ErrorCode.UNAUTHORIZED


class NotFound(RpcError):
    code = ErrorCode.NOT_FOUND


class LeaseLost(RpcError):
    code = ErrorCode.LEASE_LOST


class Conflict(RpcError):
    code = ErrorCode.CONFLICT


class PayloadTooLarge(RpcError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class Unavailable(RpcError):
    code = ErrorCode.UNAVAILABLE


_BY_CODE: dict[int, type[RpcError]] = {
    int(k.code): k
    for k in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        Unauthorized,
        NotFound,
        LeaseLost,
        Conflict,
        PayloadTooLarge,
        Unavailable,
    )
}

TASK_STATES = ("queued", "leased", "done", "dead", "cancelled")


def encode(obj: Any) -> bytes:
    """Serialize one message as a single line (newline included); numpy arrays go out as
    lists (a scorer's columns), without a Python object per value."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def request(req_id: int | str, method: str, params: dict[str, Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    return encode(msg)


def reply_ok(req_id: Any, result: Any) -> bytes:
    return encode({"jsonrpc": "2.0", "id": req_id, "result": result})


def reply_err(req_id: Any, err: RpcError) -> bytes:
    return encode({"jsonrpc": "2.0", "id": req_id, "error": err.to_wire()})
