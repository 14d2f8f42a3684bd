"""Every kind of bad input gets the right error; the connection lives where it can."""

from __future__ import annotations

import json

import pytest

from kiri.protocol import ErrorCode
from tests.raw import Raw, code


def test_request_before_hello_is_refused(hub):
    r = Raw(hub.address)
    reply = r.call({"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"kind": "echo"}})
    assert code(reply) == ErrorCode.UNAUTHORIZED and "hello" in reply["error"]["message"]
    assert hub.sql("select count(*) from tasks")[0][0] == 0
    assert r.hello()["result"]["protocol"] == 1
    assert r.alive()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json", ErrorCode.PARSE_ERROR),
        (b"\xff\xfe\x00garbage", ErrorCode.PARSE_ERROR),
        (b"[1, 2, 3]", ErrorCode.INVALID_REQUEST),
        (b'"just a string"', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 42}', ErrorCode.INVALID_REQUEST),
        (b'{"id": 1, "method": "ping"}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "nope"}', ErrorCode.METHOD_NOT_FOUND),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": [1]}', ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {}}', ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"kind": 5}}', ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"kind": "x", "priority": "9"}}',
         ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"kind": "x", "delay": -1}}',
         ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"kind": "x", "max_attempts": 1e99}}',
         ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "lease", "params": {"kinds": []}}', ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "lease", "params": {"kinds": ["a"], "wait": true}}',
         ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ack", "params": {"task_id": 1}}', ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "task", "params": {"task_id": 99999999999999999999999}}',
         ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "task", "params": {"task_id": -3}}', ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "task", "params": {"task_id": 77}}', ErrorCode.NOT_FOUND),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "checkpoint", "params": {"task_id": 1, "lease_token": "t",'
         b' "step": 1, "data": "***not base64***"}}', ErrorCode.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "heartbeat", "params": {"task_id": 1, "lease_token": "t"}}',
         ErrorCode.NOT_FOUND),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"kind": "x", "params": {"v": NaN}}}',
         ErrorCode.PARSE_ERROR),
    ],
)
def test_bad_requests_get_the_right_error_and_the_connection_lives(hub, line, expected):
    r = Raw(hub.address)
    r.hello()
    r.send(line + b"\n")
    reply = r.recv()
    assert code(reply) == expected, reply
    assert reply["error"]["message"]
    assert r.alive()
    assert hub.sql("select count(*) from tasks")[0][0] == 0


def test_param_errors_name_the_field(hub):
    r = Raw(hub.address)
    r.hello()
    reply = r.call({"jsonrpc": "2.0", "id": 1, "method": "enqueue",
                    "params": {"kind": "echo", "priority": 5000}})
    assert code(reply) == ErrorCode.INVALID_PARAMS and "priority" in reply["error"]["message"]


def test_notifications_get_no_reply_but_are_applied(hub):
    r = Raw(hub.address)
    r.hello()
    r.send(b'{"jsonrpc": "2.0", "method": "enqueue", "params": {"kind": "echo"}}\n')
    r.send(b'{"jsonrpc": "2.0", "method": "enqueue", "params": {"kind": 5}}\n')  # bad, silent
    assert r.alive()  # the next line read is the ping's reply, nothing in between
    assert hub.sql("select count(*) from tasks")[0][0] == 1


def test_oversized_line_is_refused_and_the_connection_closed(hub_factory):
    h = hub_factory("--max-line", "4096")
    r = Raw(h.address)
    r.hello()
    r.send(b'{"jsonrpc": "2.0", "id": 1, "method": "enqueue", "params": {"kind": "echo", "params": {"x": "'
           + b"a" * 10000 + b'"}}}\n')
    reply = r.recv()
    assert code(reply) == ErrorCode.PAYLOAD_TOO_LARGE
    assert r.closed()
    assert h.sql("select count(*) from tasks")[0][0] == 0
    # an endless line with no newline at all is cut off too
    r2 = Raw(h.address)
    r2.hello()
    r2.send(b"x" * 20000)
    assert code(r2.recv()) == ErrorCode.PAYLOAD_TOO_LARGE
    assert r2.closed()
    assert Raw(h.address).hello()["result"]  # the hub is fine


def test_token_required_and_compared(hub_factory):
    h = hub_factory(token="s3cret")
    r = Raw(h.address)
    assert code(r.hello()) == ErrorCode.UNAUTHORIZED
    assert code(r.hello("wrong")) == ErrorCode.UNAUTHORIZED
    assert code(r.hello("also wrong")) == ErrorCode.UNAUTHORIZED
    assert r.closed()  # three strikes
    r2 = Raw(h.address)
    assert r2.hello("s3cret")["result"]["agent_id"] >= 1
    assert r2.alive()


def test_pipelined_requests_after_hello_in_one_packet(hub):
    r = Raw(hub.address)
    lines = [{"jsonrpc": "2.0", "id": 0, "method": "hello", "params": {"agent": "p", "role": "cli"}}]
    lines += [{"jsonrpc": "2.0", "id": i, "method": "enqueue", "params": {"kind": "echo"}} for i in range(1, 50)]
    r.send(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    replies = [r.recv() for _ in lines]
    assert all("result" in x for x in replies), replies
    assert sorted(x["id"] for x in replies) == list(range(50))
    assert hub.sql("select count(*) from tasks")[0][0] == 49


def test_hub_refuses_public_bind_without_token(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kiri.hub.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "without a token" in out.stderr
    assert not (tmp_path / "kiri.db").exists()
