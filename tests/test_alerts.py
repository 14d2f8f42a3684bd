"""Alert sinks, each through its real client code: a webhook and a fake Telegram API over real
HTTP on this machine, and a real command fed the alert on stdin."""

from __future__ import annotations

import json
import sys

from kiri.agents.alerts import AlertConfig, deliver
from tests.test_decisions import Receiver

ALERT = {"alert_id": 7, "decision_id": 3, "atom": "pulse", "observation_id": 42, "time": 1.0, "score": 8.1,
         "threshold": 1.8, "blame": [{"token": "C9", "surprise": 11.4}, {"token": "M9", "surprise": 13.7}],
         "probs": {"ok": 0.0, "alert": 1.0}, "policy": "rule:scaled_sum>=1"}


def test_telegram_sink_posts_to_the_configured_api(tmp_path):
    api = Receiver()
    base = api.url.rsplit("/", 1)[0]
    out = deliver(ALERT, AlertConfig(telegram_token="123:abc", telegram_chat="-1001", telegram_url=base))
    assert out["telegram"] == "sent"
    (msg,) = api.got
    assert msg["chat_id"] == "-1001" and "pulse score 8.10" in msg["text"] and "C9 11.4" in msg["text"]
    deliver({**ALERT, "host": "web-2"}, AlertConfig(telegram_token="123:abc", telegram_chat="-1001", telegram_url=base))
    assert "pulse on web-2 score 8.10" in api.got[-1]["text"]  # a fleet's alert names its host
    api.close()


def test_command_sink_gets_the_alert_json_on_stdin(tmp_path):
    sink = tmp_path / "got.json"
    cmd = f"{sys.executable} -c \"import sys, pathlib; pathlib.Path({str(sink)!r}).write_text(sys.stdin.read())\""
    assert deliver(ALERT, AlertConfig(command=cmd))["command"] == "sent"
    assert json.loads(sink.read_text())["alert_id"] == 7


def test_failing_sinks_are_retried_then_reported_without_leaking_secrets(tmp_path):
    hook = Receiver(fail_first=2)  # two 503s, then success: within 3 attempts
    out = deliver(ALERT, AlertConfig(webhooks=[hook.url]))
    assert out[f"webhook {hook.url}"] == "sent" and len(hook.got) == 1
    dead = Receiver(fail_first=99)
    out = deliver(ALERT, AlertConfig(webhooks=[dead.url], telegram_token="SECRET-TOKEN", telegram_chat="1",
                                     telegram_url=dead.url.rsplit("/", 1)[0], command=f"{sys.executable} -c 'exit(3)'"))
    assert out[f"webhook {dead.url}"].startswith("failed: ") and "503" in out[f"webhook {dead.url}"]
    assert out["command"].startswith("failed: command exited 3")
    assert out["telegram"].startswith("failed") and "SECRET-TOKEN" not in out["telegram"]
    hook.close()
    dead.close()


def test_half_configured_sinks_stop_the_agent_at_start_and_kiris_chat_id_is_read():
    import os
    import subprocess

    def start(**env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KIRI_TELEGRAM")}
        # an unknown kind is refused after the sinks are checked: it ends the run at once
        return subprocess.run([sys.executable, "-m", "kiri.agents.cli", "--role", "scorer", "--hub", "127.0.0.1:1",
                               "--kinds", "nosuch"], capture_output=True, text=True, timeout=60,
                              env={**clean, **env})

    out = start(KIRI_TELEGRAM_TOKEN="123:abc")
    assert out.returncode == 2 and "need a chat id" in out.stderr and "KIRI_TELEGRAM_CHAT_ID" in out.stderr
    out = start(KIRI_TELEGRAM_CHAT="-1001")
    assert out.returncode == 2 and "need a bot token" in out.stderr
    out = start(KIRI_TELEGRAM_TOKEN="123:abc", KIRI_TELEGRAM_CHAT_ID="-1001")  # KIRI's name for the chat
    assert out.returncode == 2 and "no handler for task kind" in out.stderr, out.stderr
    out = start(KIRI_ALERT_WEBHOOK="hooks.example.com/x")
    assert out.returncode == 2 and "not an http" in out.stderr
