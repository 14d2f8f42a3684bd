"""Limits that hold without a token, and no in-memory state ahead of its transaction.

Every test here attacks a real hub over real sockets, the way a hostile client would, and
then checks that the hub still serves its agents and that its database says what happened.
Tests that need limits the CLI does not expose run the hub in this process (the same Hub
object, a real SQLite file, a real listening socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiri.agents.client import HubClient
from kiri.hub.core.transport import Limits
from kiri.hub.server import Hub, HubSettings
from kiri.hub.store import migrate as mig
from kiri.hub.store.db import make_engine
from kiri.protocol import ErrorCode
from kiri.protocol import params as P
from tests.conftest import wait_until
from tests.raw import Raw, code, line


@contextmanager
def inproc_hub(db: Path, **limits: object) -> Iterator[tuple[tuple[str, int], Hub]]:
    """The real Hub on its own event loop thread, over a real SQLite file and socket."""
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    mig.upgrade(engine)
    box: dict = {}
    ready = threading.Event()

    def run() -> None:
        async def main() -> None:
            hub = Hub(HubSettings(db_url=url, port=0, limits=Limits(**limits), tick=0.05), engine)
            await hub.start()
            box.update(hub=hub, loop=asyncio.get_running_loop(), stop=asyncio.Event())
            ready.set()
            await box["stop"].wait()
            await hub.stop()

        asyncio.run(main())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(30), "in-process hub did not start"
    try:
        yield ("127.0.0.1", box["hub"].bound_port), box["hub"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(30)


def count(db: Path, query: str) -> int:
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as c:
            return int(c.execute(sa.text(query)).scalar_one())
    finally:
        engine.dispose()


TANK = {"name": "tank2", "fields": [{"letter": "L", "name": "level", "low": 0, "high": 10, "buckets": 4}]}


def nested(depth: int) -> dict:
    value: object = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return value  # type: ignore[return-value]


# --- no state outside the database before its transaction commits ----------------------


def test_a_defined_atom_survives_a_batch_that_rolled_back(tmp_path):
    """define_atom shares a batch with a request that blows up: the batch is replayed one
    request at a time, and the atom must be stored, not only remembered in memory."""
    db = tmp_path / "kiri.db"

    def boom(_c, _p, _env):
        raise RuntimeError("injected fault")

    with inproc_hub(db) as (address, hub):
        hub.methods["explode"] = (P.Empty, boom)  # a fault injected into the real hub
        r = Raw(address)
        r.hello()
        r.send(line({"jsonrpc": "2.0", "id": 1, "method": "define_atom", "params": {"schema": TANK}})
               + line({"jsonrpc": "2.0", "id": 2, "method": "explode", "params": {}})
               + line({"jsonrpc": "2.0", "id": 3, "method": "observe",
                       "params": {"atom": "tank2", "observations": [{"values": {"L": 3}}]}}))
        replies = {x["id"]: x for x in (r.recv(), r.recv(), r.recv())}
        assert replies[1]["result"] == {"atom": "tank2", "created": True}
        assert code(replies[2]) == ErrorCode.INTERNAL_ERROR
        assert replies[3]["result"]["stored"] == 1
        r.close()
    assert count(db, "select count(*) from atoms where name = 'tank2'") == 1
    with inproc_hub(db) as (address, _hub):  # a restart reads the atom back
        r = Raw(address)
        r.hello()
        names = [a["name"] for a in r.call({"jsonrpc": "2.0", "id": 1, "method": "atoms"})["result"]["atoms"]]
        assert "tank2" in names
        got = r.call({"jsonrpc": "2.0", "id": 2, "method": "observations", "params": {"atom": "tank2"}})
        assert len(got["result"]["observations"]) == 1


def test_deep_params_beside_define_atom_lose_nothing(hub_factory):
    """The hostile client's original recipe: one write, an atom and a 300-deep enqueue."""
    h = hub_factory()
    r = Raw(h.address)
    r.hello()
    r.send(line({"jsonrpc": "2.0", "id": 1, "method": "define_atom", "params": {"schema": TANK}})
           + line({"jsonrpc": "2.0", "id": 2, "method": "enqueue",
                   "params": {"kind": "echo", "params": nested(300)}}))
    replies = {x["id"]: x for x in (r.recv(), r.recv())}
    assert replies[1]["result"]["created"] is True
    assert code(replies[2]) == ErrorCode.INVALID_PARAMS and "levels deep" in replies[2]["error"]["message"]
    r.close()
    assert h.terminate() == 0
    assert "Traceback" not in h.log()
    h.start()
    r = Raw(h.address)
    r.hello()
    names = [a["name"] for a in r.call({"jsonrpc": "2.0", "id": 1, "method": "atoms"})["result"]["atoms"]]
    assert "tank2" in names
    assert h.sql("select count(*) from tasks")[0][0] == 0


# --- malformed input gets a reply, without a traceback ---------------------------------


@pytest.mark.parametrize("depth, expected", [(65, ErrorCode.INVALID_PARAMS), (254, ErrorCode.INVALID_PARAMS),
                                             (600, ErrorCode.INVALID_PARAMS), (5000, ErrorCode.PARSE_ERROR)])
def test_nesting_is_checked_at_parse_time(hub, depth, expected):
    r = Raw(hub.address)
    r.hello()
    # written by hand: Python's json refuses to write this deep
    r.send(b'{"jsonrpc": "2.0", "id": 7, "method": "enqueue", "params": {"kind": "echo", "params": '
           + b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1) + b"}}\n")
    reply = r.recv()
    assert code(reply) == expected and reply["id"] in (7, None)
    assert r.call({"jsonrpc": "2.0", "id": "p", "method": "ping"})["result"]["pong"] is True
    assert hub.sql("select count(*) from tasks")[0][0] == 0
    assert "Traceback" not in hub.log()


def test_observe_is_not_walked_for_depth_yet_refuses_deep_values_cleanly(hub):
    r = Raw(hub.address)
    r.hello()
    deep = b"[" * 900 + b"1" + b"]" * 900  # within orjson's limit, far past the hub's
    row = b'{"values": {"cpu": 1, "mem": 1, "disk": 1, "swap": 1, "load": 1, "net": ' + deep + b"}}"
    r.send(b'{"jsonrpc": "2.0", "id": 3, "method": "observe", "params": {"atom": "pulse", "observations": ['
           + row + b"]}}\n")
    reply = r.recv()
    assert code(reply) == ErrorCode.INVALID_PARAMS and "'net': a list is not a number" in reply["error"]["message"]
    assert hub.sql("select count(*) from observations")[0][0] == 0
    assert r.call({"jsonrpc": "2.0", "id": "p", "method": "ping"})["result"]["pong"] is True
    assert "Traceback" not in hub.log()


def test_the_fast_bracket_count_agrees_with_walking_the_value() -> None:
    import json
    import random

    rng = random.Random(3)
    tricky = ['"', "\\", "{", "}", "[", "]", "\\\"", "{[", "]}"]

    def value(depth: int):
        if depth == 0 or rng.random() < 0.2:
            return rng.choice([1, 2.5, None, True, "".join(rng.choices(tricky, k=rng.randint(0, 6)))])
        if rng.random() < 0.5:
            return [value(depth - 1) for _ in range(rng.randint(0, 3))]
        return {"".join(rng.choices(tricky, k=3)) + str(i): value(depth - 1) for i in range(rng.randint(0, 3))}

    for _ in range(500):
        v = value(rng.randint(0, 12))
        line = json.dumps(v).encode()
        assert P.bracket_depth(line, 100) == (P.nesting_depth(v, 100) if isinstance(v, dict | list) else 0), line


def test_nesting_within_the_limit_is_stored_and_read_back(hub):
    r = Raw(hub.address)
    r.hello()
    task = r.call({"jsonrpc": "2.0", "id": 1, "method": "enqueue",
                   "params": {"kind": "echo", "params": nested(60)}})["result"]["task_id"]
    got = r.call({"jsonrpc": "2.0", "id": 2, "method": "task", "params": {"task_id": task}})
    assert got["result"]["task"]["params"] == nested(60)


@pytest.mark.parametrize("raw", [b"{}", b'{"jsonrpc": "1.0", "method": "ping"}', b'{"method": "ping"}',
                                 b'{"jsonrpc": "2.0"}', b'{"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}'])
@pytest.mark.parametrize("after_hello", [False, True])
def test_invalid_requests_without_an_id_get_an_error_with_id_null(hub, raw, after_hello):
    r = Raw(hub.address)
    if after_hello:
        r.hello()
    r.send(raw + b"\n")
    reply = r.recv()
    assert code(reply) == ErrorCode.INVALID_REQUEST and reply["id"] is None
    assert r.hello()["result"]["protocol"] == 1  # and the connection lives


# --- before hello: small lines, a short deadline, a budget of its own ------------------


def test_before_hello_lines_are_short(hub):
    r = Raw(hub.address)
    r.send(b'{"jsonrpc": "2.0", "id": 1, "method": "hello", "params": {"agent": "' + b"x" * 200_000 + b'"}}\n')
    assert code(r.recv()) == ErrorCode.PAYLOAD_TOO_LARGE
    assert r.closed()
    r2 = Raw(hub.address)  # no newline at all: cut off just as well
    r2.send(b"x" * 200_000)
    assert code(r2.recv()) == ErrorCode.PAYLOAD_TOO_LARGE
    assert r2.closed()
    ok = Raw(hub.address)
    ok.hello()
    big = ok.call({"jsonrpc": "2.0", "id": 1, "method": "enqueue",
                   "params": {"kind": "echo", "params": {"x": "y" * 200_000}}})
    assert big["result"]["task_id"] >= 1  # after hello the full line limit applies


def test_silent_connections_are_closed_at_the_hello_deadline(hub_factory):
    h = hub_factory("--hello-timeout", "0.5")
    r = Raw(h.address)
    reply = r.recv()
    assert code(reply) == ErrorCode.UNAUTHORIZED and "hello" in reply["error"]["message"]
    assert r.closed()


def test_requests_before_hello_three_strikes(hub):
    r = Raw(hub.address)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert code(r.call(ping)) == ErrorCode.UNAUTHORIZED
    assert code(r.call(ping)) == ErrorCode.UNAUTHORIZED
    assert code(r.call(ping)) == ErrorCode.UNAUTHORIZED
    assert r.closed()


def test_a_flood_of_silent_connections_keeps_no_agent_out(tmp_path):
    """Hundreds of connections that never say hello, from many addresses (the agents' own
    among them), pushing bytes: a connected agent keeps working, and a new agent gets in and
    is served."""
    with inproc_hub(tmp_path / "kiri.db", max_unauthenticated=32, max_unauthenticated_per_address=8,
                    hello_timeout=30.0) as (address, hub):
        agent = HubClient(address, agent="worker", role="trainer")
        agent.connect()
        socks: list[Raw] = []
        for i in range(200):
            s = Raw(address, source=f"127.0.0.{1 + i % 20}")
            with contextlib.suppress(OSError):  # an evicted one may be closed already
                s.send(b'{"jsonrpc": "2.0", "method": "hello", "params": {"agent": "' + b"z" * 30_000)
            socks.append(s)
            if i % 50 == 0:  # the agent works on through the flood
                agent.enqueue("echo")
        wait_until(lambda: len(hub.connections.waiting_hello) <= 32, what="the hello budget to hold")
        assert len(hub.connections.waiting_hello) <= 32
        assert hub.connections.evicted > 0
        assert hub.connections.buffered <= 32 * (64 << 10)
        newcomer = HubClient(address, agent="newcomer", role="trainer", reconnect_for=10)
        newcomer.connect()
        leased = newcomer.lease(["echo"])
        assert leased["task"] is not None
        newcomer.call("ack", {"task_id": leased["task"]["id"], "lease_token": leased["lease"]["token"],
                              "result": {"ok": True}})
        done = [t for t in agent.call("stats")["tasks"] if t["status"] == "done"]
        assert done == [{"kind": "echo", "status": "done", "count": 1}]
        assert agent.call("ping")["pong"] is True
        agent.close()
        newcomer.close()
        for s in socks:
            s.close()
    assert count(tmp_path / "kiri.db", "select count(*) from tasks") == 4


def test_one_address_cannot_take_every_slot(tmp_path):
    """Idle connections that did say hello (there is no token) from one address stop at
    that address's limit; another address still gets in."""
    with inproc_hub(tmp_path / "kiri.db", max_per_address=20, max_connections=40,
                    max_unauthenticated_per_address=5) as (address, _hub):
        held = []
        for _ in range(20):
            s = Raw(address, source="127.0.0.2")
            s.hello()
            held.append(s)
        extra = Raw(address, source="127.0.0.2")
        reply = extra.recv()
        assert code(reply) == ErrorCode.UNAVAILABLE and "127.0.0.2" in reply["error"]["message"]
        assert extra.closed()
        other = Raw(address, source="127.0.0.3")
        assert other.hello()["result"]["agent_id"] >= 1
        silent = [Raw(address, source="127.0.0.4") for _ in range(5)]
        sixth = Raw(address, source="127.0.0.4")  # makes room: the oldest silent one goes
        reply = silent[0].recv()
        assert code(reply) == ErrorCode.UNAVAILABLE and "waiting to say hello" in reply["error"]["message"]
        assert silent[0].closed()
        assert sixth.hello()["result"]["agent_id"] >= 1 and silent[1].hello()["result"]["agent_id"] >= 1
        for s in held:
            s.close()


def test_a_full_hub_makes_room_by_closing_the_longest_idle(tmp_path):
    with inproc_hub(tmp_path / "kiri.db", max_connections=10, idle_evict_after=0.2) as (address, hub):
        idle = []
        for i in range(10):
            s = Raw(address, source=f"127.0.0.{10 + i}")
            s.hello()
            idle.append(s)
        time.sleep(0.3)
        fresh = Raw(address, source="127.0.0.99")
        assert fresh.hello()["result"]["agent_id"] >= 1
        evicted = [s for s in idle if s.closed(timeout=0.5)]
        assert len(evicted) == 1
        assert len(hub.connections) == 10


def test_buffered_bytes_are_bounded_across_connections(tmp_path):
    with inproc_hub(tmp_path / "kiri.db", max_buffered=1 << 20) as (address, hub):
        conns = []
        for _ in range(3):
            c = Raw(address)
            c.hello()
            c.send(b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"x": "' + b"a" * 300_000)
            conns.append(c)
        wait_until(lambda: hub.connections.buffered >= 900_000, what="the partial lines to arrive")
        last = Raw(address)
        last.hello()
        last.send(b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"x": "' + b"a" * 300_000)
        reply = last.recv()
        assert code(reply) == ErrorCode.PAYLOAD_TOO_LARGE and "unfinished" in reply["error"]["message"]
        assert last.closed()
        assert hub.connections.buffered <= 1 << 20
        conns[0].send(b'"}}\n')  # the others are untouched and finish their lines
        assert code(conns[0].recv()) == ErrorCode.INVALID_PARAMS  # no kind: a parameter error


# --- one hub per SQLite file -----------------------------------------------------------


def test_a_second_hub_on_the_same_file_is_refused(hub_factory):
    first = hub_factory()
    second = subprocess.run(
        [sys.executable, "-m", "kiri.hub.cli", "serve", "--data-dir", str(first.data_dir), "--port", "0",
         "--no-http"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "another kiri hub is already serving this database" in second.stderr
    assert f"pid {first.proc.pid}" in second.stderr and f"127.0.0.1:{first.port}" in second.stderr
    assert Raw(first.address).hello()["result"]  # the first is untouched
    first.kill()  # SIGKILL: the lock dies with the process
    first.start()
    assert Raw(first.address).hello()["result"]
