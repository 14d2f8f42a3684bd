"""Property-based fuzzing of the wire: nothing a client sends kills the hub, and a request
that gets an error changes nothing in the database."""

from __future__ import annotations

import hashlib
import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiri.protocol.methods import NAMES as METHODS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["kind", "atom", "params", "priority", "delay", "max_attempts", "dedupe_key",
                               "kinds", "wait", "ttl", "task_id", "lease_token", "step", "data", "result",
                               "error", "retry", "release", "status", "limit", "parent_id", "observations",
                               "import_id", "schema", "after_id", "since", "until"]) | st.text(max_size=6)
requests = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0", 2]), "id": st.integers(1, 10**6) | st.text(max_size=5),
     "method": st.sampled_from([*METHODS, "nope", ""]) | st.text(max_size=10)},
    optional={"params": st.dictionaries(field_names, json_values, max_size=6) | json_values},
)
lines = (
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" "))
    | requests.map(lambda r: json.dumps(r).encode())
    | st.text(max_size=200).map(lambda t: t.replace("\n", " ").encode("utf-8", "surrogatepass"))
)


def _db_digest(hub) -> str:
    rows = []
    for table, key in (("tasks", "id"), ("checkpoints", "task_id"), ("observations", "id"),
                       ("staged_chunks", "id"), ("atoms", "name")):
        rows += hub.sql(f"select * from {table} order by {key}")
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def test_random_lines_never_kill_the_hub_or_half_write(hub):
    sock = socket.create_connection(hub.address, timeout=10)
    rfile = sock.makefile("rb")
    sock.sendall(b'{"jsonrpc":"2.0","id":"h","method":"hello","params":{"agent":"fuzz","role":"cli"}}\n')
    assert b'"result"' in rfile.readline()
    # one real task so that task ids and tokens have something to hit
    sock.sendall(b'{"jsonrpc":"2.0","id":"e","method":"enqueue","params":{"kind":"echo"}}\n')
    rfile.readline()
    seen = {"errors": 0, "ok": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(line=lines)
    def one(line: bytes) -> None:
        before = _db_digest(hub)
        sock.sendall(line + b"\n" + b'{"jsonrpc":"2.0","id":"sentinel","method":"ping"}\n')
        replies = []
        while True:
            raw = rfile.readline()
            assert raw, f"hub closed the connection after {line!r}"
            msg = json.loads(raw)
            if msg.get("id") == "sentinel":
                assert msg["result"]["pong"] is True
                break
            replies.append(msg)
        assert len(replies) <= 1
        if replies and "error" in replies[0]:
            seen["errors"] += 1
            err = replies[0]["error"]
            assert isinstance(err["code"], int) and err["message"]
            assert _db_digest(hub) == before, f"an error reply changed the database: {line!r} -> {err}"
        else:
            seen["ok"] += 1

    one()
    assert seen["errors"] > 100
    assert hub.proc.poll() is None
