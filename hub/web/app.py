"""The HTTP server inside the hub process: same loop, same database, no extra service.

aiohttp runs on the hub's own asyncio loop. Two middlewares guard everything: one turns
every failure into a JSON error with a stable code (the hub never answers with a stack
trace or an HTML page), one enforces the token rule and keeps other web sites from using
the browser of someone who has the dashboard open (Origin and Host checks).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kiri import __version__
from kiri.hub.watch import views as V
from kiri.hub.web import api, compat, openapi
from kiri.hub.web.common import (
    HUB_KEY,
    Handler,
    NoQuery,
    Route,
    UnsupportedMediaType,
    http_error,
    hub_of,
    ok,
    query,
    read,
    rpc_error_response,
)
from kiri.protocol import RpcError

if TYPE_CHECKING:
    from kiri.hub.server import Hub

log = logging.getLogger("kiri.hub.http")

STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 << 20
OPEN_PATHS = ("/healthz",)  # container health checks carry no token
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


@web.middleware
async def errors(req: web.Request, handler: Handler) -> web.StreamResponse:
    resp = await _answer(req, handler)
    if not resp.prepared:  # a stream has already sent its headers
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
    return resp


async def _answer(req: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(req)
    except RpcError as e:
        return rpc_error_response(e)
    except UnsupportedMediaType as e:
        return http_error(415, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {404: f"no such path: {req.path}", 405: f"{req.method} is not allowed on {req.path}",
                   413: f"request body is larger than the limit of {MAX_BODY} bytes"}.get(e.status, e.reason)
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return http_error(e.status, message, headers)
    except (ConnectionError, TimeoutError) as e:
        log.debug("client went away: %s", e)
        raise
    except Exception:
        log.exception("HTTP %s %s failed", req.method, req.path)
        return http_error(500, "internal error; the hub's log has the details")


def _host_ok(req: web.Request, hub: Hub) -> bool:
    """Without a token, only loopback names: a DNS-rebinding page cannot reach the API."""
    if hub.settings.token:
        return True
    host = req.host or ""
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:  # a literal address only: resolving the name is exactly what a rebinding attack abuses
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def guard(req: web.Request, handler: Handler) -> web.StreamResponse:
    hub = hub_of(req)
    if not _host_ok(req, hub):
        return http_error(403, f"Host {req.host!r} is not this hub's loopback address; "
                               "start the hub with a token to serve other names")
    origin = req.headers.get("Origin")
    if req.method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
        expected = {f"{req.scheme}://{req.host}"}
        if origin not in expected:
            return http_error(403, f"cross-site request from {origin} refused")
    want = hub.settings.token
    protected = req.path.startswith("/api/") or req.path == "/metrics"
    if want and protected and req.path not in OPEN_PATHS:
        got = req.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), want.encode()):
            return http_error(401, "this hub needs its token: send Authorization: Bearer <token>"
                                   if not got else "wrong token", {"WWW-Authenticate": 'Bearer realm="kiri"'})
    return await handler(req)


async def index(req: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache",
                                                            "Content-Security-Policy": CSP})


CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'")


async def healthz(req: web.Request) -> web.Response:
    """Alive when the loop answers and a write transaction can begin on the database."""
    hub = hub_of(req)
    try:
        await hub.ping(timeout=5.0)
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", with its reason
        return ok({"status": "unhealthy", "reason": f"{type(e).__name__}: {e}"}, status=503)
    return ok({"status": "ok", "version": __version__, "uptime": time.time() - hub.started_at})


async def metrics(req: web.Request) -> web.Response:
    query(req, NoQuery)
    hub = hub_of(req)
    snap = await read(req, V.metrics_snapshot, hub.atoms, hub.settings.db_url, time.time())
    return web.Response(body=hub.metrics.render(snap),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi_doc(req: web.Request) -> web.Response:
    query(req, NoQuery)
    hub = hub_of(req)
    return ok(openapi.spec(all_routes(), bool(hub.settings.token)))


def all_routes() -> list[Route]:
    return [
        *api.routes(),
        Route("GET", "/api/v1/openapi.json", openapi_doc, "This description", NoQuery),
        *compat.routes(),
        Route("GET", "/metrics", metrics, "Prometheus metrics", NoQuery, tag="ops",
              produces="text/plain; version=0.0.4"),
        Route("GET", "/healthz", healthz, "Health check for containers (no token needed)", tag="ops"),
    ]


def make_app(hub: Hub) -> web.Application:
    app = web.Application(middlewares=[errors, guard], client_max_size=MAX_BODY)
    app[HUB_KEY] = hub
    for r in all_routes():
        app.router.add_route(r.method, r.path, r.handler)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, append_version=False)
    return app


class HttpFace:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(make_app(self.hub), access_log=None, handle_signals=False)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port, shutdown_timeout=2.0, reuse_address=True)
        await self.site.start()
        server: Any = self.site._server
        self.port = int(server.sockets[0].getsockname()[1]) if server and server.sockets else port
        log.info("dashboard and JSON API on http://%s:%d/", host if ":" not in host else f"[{host}]", self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
