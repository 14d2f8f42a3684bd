"""``kiri mcp``: a Model Context Protocol server on stdio, so an assistant can watch and steer kiri.

An MCP client (Claude Desktop, an IDE, the ``mcp`` SDK's own client) starts ``kiri mcp`` as a
subprocess and calls its tools over stdin/stdout. Each tool is one call of the hub's JSON-RPC
protocol through the same ``HubClient`` the CLI uses, so the hub validates every argument
exactly as it does for ``kiri``; a refused call or an unreachable hub comes back to the model
as a tool error with the hub's message, never as a crash of the server. The server is the
SDK's ``MCPServer`` (tool schemas from the type hints, the wire protocol, the stdio
transport); this module only says which tools there are and what each one calls.

Nothing is written to stdout but MCP messages: logging goes to stderr.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from kiri import __version__
from kiri.agents.client import HubClient, HubUnreachable
from kiri.protocol import RpcError

log = logging.getLogger("kiri.mcp")

INSTRUCTIONS = (
    "kiri watches machines with tiny transformers. `status` shows every atom (pulse, rhythm, "
    "drift, ...) with its latest score and verdict; `history` an atom's recent readings; "
    "`decisions` what the nerve decided (ok, alert, suppress, retrain), and `feedback` teaches it. "
    "`enqueue`, `tasks` and `task` drive kiri's task queue."
)

Limit = Annotated[int, Field(ge=1, le=1000)]


def build(hub: HubClient) -> MCPServer:
    """The MCP server, its tools bound to ``hub`` (connected at the first call)."""
    server = MCPServer("kiri", version=__version__, instructions=INSTRUCTIONS)

    def call(method: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(hub.call(method, {k: v for k, v in params.items() if v is not None}))
        except RpcError as e:
            raise ToolError(f"the hub refused {method}: {e.message}") from None
        except HubUnreachable as e:
            raise ToolError(str(e)) from None

    @server.tool()
    def status() -> dict[str, Any]:
        """Every atom's latest reading (overall and per host) with its anomaly score, threshold and
        verdict; the nerve's latest decision; the agents; the queue; the retention policy."""
        return call("status", {})

    @server.tool()
    def history(atom: str, n: Limit = 20) -> dict[str, Any]:
        """An atom's latest `n` observations, oldest first, with tokens, score, verdict and
        which fields were most surprising (blame)."""
        return call("history", {"atom": atom, "n": n})

    @server.tool()
    def decisions(limit: Limit = 20, before_id: int | None = None) -> dict[str, Any]:
        """The nerve's decisions newest first (ok / alert / suppress / retrain), with the alert's
        delivery state and the owner's latest label; page with `before_id`."""
        return call("decisions", {"limit": limit, "before_id": before_id})

    @server.tool()
    def feedback(decision_id: int, verdict: str) -> dict[str, Any]:
        """Label a decision: `approve` or `dismiss` it, or name the right action (`ok`, `alert`,
        `suppress`, `retrain`). Enough labels retrain the nerve."""
        return call("feedback", {"decision_id": decision_id, "verdict": verdict})

    @server.tool()
    def enqueue(kind: str, atom: str | None = None, params: dict[str, Any] | None = None, priority: int = 0,
                delay: float = 0.0, max_attempts: int = 5, dedupe_key: str | None = None,
                deadline: float | None = None) -> dict[str, Any]:
        """Queue a task of `kind` (train, collect, score, or a kind the user's agents serve) for
        `atom`; returns its id. `dedupe_key` returns the unfinished task with the same key
        instead of adding one; `deadline` bounds each attempt in seconds."""
        return call("enqueue", {"kind": kind, "atom": atom, "params": params or {}, "priority": priority,
                                "delay": delay, "max_attempts": max_attempts, "dedupe_key": dedupe_key,
                                "deadline": deadline})

    @server.tool()
    def tasks(status: str | None = None, kind: str | None = None, atom: str | None = None,
              limit: Limit = 20) -> dict[str, Any]:
        """Tasks newest first, filtered by state (queued, leased, done, dead, cancelled), kind or atom."""
        return call("tasks", {"status": status, "kind": kind, "atom": atom, "limit": limit})

    @server.tool()
    def task(task_id: int) -> dict[str, Any]:
        """One task: state, attempts, progress, result or error, timings, and its checkpoint."""
        return call("task", {"task_id": task_id})

    return server


def serve(hub: HubClient) -> None:
    """Serve MCP on stdin/stdout until the client closes it."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        build(hub).run("stdio")
    finally:
        hub.close()
