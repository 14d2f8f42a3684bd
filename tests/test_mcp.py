"""``kiri mcp`` driven by the MCP SDK's own client over stdio, against a real hub."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.conftest import push

TOOLS = {"status", "history", "decisions", "feedback", "enqueue", "tasks", "task"}


def _session(hub_address: str, steps: Callable[[ClientSession], Awaitable[Any]]) -> Any:
    """Start `kiri mcp` as an MCP host would and run ``steps(session)`` against it."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("PATH", "PYTHON", "HOME"))}
    params = StdioServerParameters(command=sys.executable, args=["-m", "kiri.cli", "--hub", hub_address, "mcp"],
                                   env=env)

    async def run() -> Any:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.server_info.name == "kiri"
            return await steps(session)

    return asyncio.run(asyncio.wait_for(run(), 120))


def _data(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content or json.loads(result.content[0].text)


def test_an_mcp_client_sees_status_and_history_and_drives_the_queue(hub):
    push(hub, "pulse", [{"C": 50 + i, "M": 40, "D": 30, "S": 0, "L": 1, "N": 0} for i in range(3)],
         [1_700_000_000.0 + 30 * i for i in range(3)])

    async def steps(s: ClientSession) -> None:
        listed = await s.list_tools()
        assert {t.name for t in listed.tools} == TOOLS
        assert all(t.description for t in listed.tools)
        status = _data(await s.call_tool("status", {}))
        assert any(a["name"] == "pulse" and a["latest"] for a in status["atoms"])
        hist = _data(await s.call_tool("history", {"atom": "pulse", "n": 2}))
        assert [o["values"]["cpu"] for o in hist["observations"]] == [51, 52]  # the latest two, oldest first
        tid = _data(await s.call_tool("enqueue", {"kind": "echo", "params": {"x": 1}, "deadline": 30}))["task_id"]
        task = _data(await s.call_tool("task", {"task_id": tid}))["task"]
        assert (task["kind"], task["status"], task["params"], task["deadline"]) == ("echo", "queued", {"x": 1}, 30.0)
        page = _data(await s.call_tool("tasks", {"status": "queued", "kind": "echo"}))
        assert [t["id"] for t in page["tasks"]] == [tid]
        assert _data(await s.call_tool("decisions", {"limit": 5}))["decisions"] == []

    _session(f"127.0.0.1:{hub.port}", steps)
    assert hub.sql("select kind, deadline from tasks where kind = 'echo'") == [("echo", 30.0)]


def test_bad_tool_calls_are_tool_errors_that_change_nothing(hub):
    async def steps(s: ClientSession) -> list[str]:
        out = []
        for name, args in (("task", {"task_id": 99}), ("history", {"atom": "nosuch"}),
                           ("enqueue", {"kind": "bad kind!"}), ("feedback", {"decision_id": 1, "verdict": "meh"}),
                           ("tasks", {"limit": 0}), ("task", {"task_id": "x"})):
            r = await s.call_tool(name, args)
            assert r.is_error, (name, r)
            out.append(r.content[0].text)
        # the server lives on after every refusal
        assert _data(await s.call_tool("tasks", {}))["tasks"] == []
        return out

    errors = _session(f"127.0.0.1:{hub.port}", steps)
    assert "does not exist" in errors[0] and "nosuch" in errors[1] and "kind" in errors[2]
    assert hub.sql("select count(*) from tasks") == [(0,)]


def test_an_unreachable_hub_is_a_tool_error_naming_it(tmp_path):
    from tests.conftest import free_port

    port = free_port()

    async def steps(s: ClientSession) -> str:
        r = await s.call_tool("status", {})
        assert r.is_error
        return r.content[0].text

    assert f"cannot reach the kiri hub at 127.0.0.1:{port}" in _session(f"127.0.0.1:{port}", steps)
