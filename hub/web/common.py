"""What every HTTP handler shares: the route table, JSON replies, errors, parameter parsing.

Errors keep the protocol's stable codes, as names (``invalid_params``) with the numeric
JSON-RPC code alongside, so a script can branch the same way over TCP and HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from kiri.protocol import ErrorCode, InvalidParams, RpcError
from kiri.protocol import params as P

if TYPE_CHECKING:
    from kiri.hub.server import Hub

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HUB_KEY: web.AppKey[Hub] = web.AppKey("hub")

HTTP_STATUS = {
    ErrorCode.PARSE_ERROR: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.METHOD_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.LEASE_LOST: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}

# HTTP-only failures, named like the protocol's codes.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
              500: "internal_error", 503: "unavailable"}


class Query(BaseModel):
    """Base of the HTTP-only query models (the protocol's models serve the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoQuery(Query):
    pass


@dataclass(frozen=True)
class Route:
    """One endpoint, with what the OpenAPI description needs to know about it."""

    method: str
    path: str
    handler: Handler
    summary: str
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    tag: str = "api"
    produces: str = "application/json"
    write: bool = False
    path_params: dict[str, str] = field(default_factory=dict)  # name -> JSON type


def hub_of(req: web.Request) -> Hub:
    return req.app[HUB_KEY]


def ok(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                        content_type="application/json")


def error_body(status: int, code: str, message: str, rpc_code: int | None = None, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "status": status, "message": message}
    if rpc_code is not None:
        err["rpc_code"] = rpc_code
    if data is not None:
        err["data"] = data
    return {"error": err}


def rpc_error_response(e: RpcError) -> web.Response:
    status = HTTP_STATUS.get(e.code, 500)
    headers = {"WWW-Authenticate": 'Bearer realm="kiri"'} if status == 401 else None
    body = error_body(status, e.code.name.lower(), e.message, int(e.code), e.data)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def http_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = error_body(status, HTTP_CODES.get(status, "error"), message)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def query(req: web.Request, model: type[M], **path: Any) -> M:
    """Validate the query string (and path parameters) against a model; strings are converted.

    Unknown and repeated parameters are refused rather than ignored: ``?atm=pulse`` silently
    meaning "every atom" would show a user the wrong picture.
    """
    allowed = {f.alias or name for name, f in model.model_fields.items()}
    raw: dict[str, Any] = {}
    for key in req.query:
        if key in raw or len(req.query.getall(key)) > 1:
            raise InvalidParams(f"query parameter {key!r} is given more than once")
        if key not in allowed or key in path:
            raise InvalidParams(f"unknown query parameter {key!r}; this endpoint takes: "
                                f"{', '.join(sorted(allowed - set(path))) or 'none'}")
        raw[key] = req.query[key]
    raw.update(path)
    try:
        return model.model_validate(raw, strict=False)
    except ValidationError as e:
        raise InvalidParams(P.describe(e)) from None


async def body(req: web.Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is an empty object."""
    ctype = req.content_type
    if req.can_read_body and ctype not in ("application/json", "application/octet-stream", ""):
        raise UnsupportedMediaType(f"send JSON (Content-Type: application/json), not {ctype}")
    data = await req.read()
    if not data.strip():
        return {}
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidParams(f"request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidParams("request body must be a JSON object")
    return value


class UnsupportedMediaType(Exception):
    """A body that is not JSON."""


def path_int(req: web.Request, name: str) -> int:
    text = req.match_info[name]
    try:
        value = int(text)
    except ValueError:
        raise InvalidParams(f"{name} must be an integer, not {text!r}") from None
    if not 1 <= value <= 2**63 - 1:
        raise InvalidParams(f"{name} must be a positive integer")
    return value


async def read(req: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a read-only query on the hub's reader (never the writing connection)."""
    return await hub_of(req).reader.run(fn, *args)


async def read_page(req: web.Request, fn: Callable[..., Any], *args: Any) -> web.Response:
    """A heavy read (a chart, the status page) in a read worker process, answered as JSON
    encoded there: the hub's loop only passes the bytes on."""
    body = await hub_of(req).reader.run_json(fn, *args)
    return web.Response(body=body, content_type="application/json")
