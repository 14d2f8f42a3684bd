"""The watch loop's end: the nerve decides, the owner is alerted once per incident and teaches it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kiri.model import synth
from tests.conftest import wait_until
from tests.test_cli import kiri
from tests.test_scorer import _all_done, _push


class Receiver:
    """A local webhook endpoint (the third party we stand in for), over real HTTP."""

    def __init__(self, fail_first: int = 0) -> None:
        self.got: list[dict] = []
        self.fail_first = fail_first
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(503)
                else:
                    outer.got.append(body)
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _trained(hub, agents_factory) -> None:
    _push(hub, synth.generate("pulse", 1, seed=0))
    trainer = agents_factory(hub, "train", "--lease-ttl", "2")
    kiri(hub, "enqueue", "train", "pulse", "--steps", "300")
    wait_until(lambda: hub.sql("select count(*) from weights where status='active'")[0][0] == 1, 120)
    trainer.stop()


SPIKE = {"cpu": 99, "mem": 97, "disk": 45, "swap": 95, "load": 19, "net": 1}
CALM = {"cpu": 12, "mem": 48, "disk": 45, "swap": 26, "load": 1, "net": 1}


def _observe(hub, values: dict, t: float) -> None:
    c = hub.client()
    c.call("observe", {"atom": "pulse", "observations": [{"values": values, "time": t}]})
    c.close()


def test_an_incident_alerts_the_webhook_exactly_once_and_calm_data_does_not(hub, agents_factory):
    _trained(hub, agents_factory)
    hook = Receiver(fail_first=1)  # the first POST fails: the sink retries
    broken = Receiver(fail_first=10**6)  # a second sink that never delivers
    scorer = agents_factory(hub, "score", "--lease-ttl", "2", "--alert-webhook", hook.url,
                            "--alert-webhook", broken.url, "--alert-cooldown", "3600")
    wait_until(lambda: _all_done(hub), 60, what="backlog scored")
    import time

    base = time.time() - 300  # live data (the training backlog is from 2024: stale, never alerted)
    for i in range(3):
        _observe(hub, CALM, base + 30 * i)
        wait_until(lambda: _all_done(hub), 60)
    for i in range(4):  # one incident: four anomalous readings in a row
        _observe(hub, SPIKE, base + 100 + 30 * i)
        wait_until(lambda: _all_done(hub), 60)
    wait_until(lambda: len(hook.got) >= 1, 30, what="the alert")
    assert len(hook.got) == 1, hook.got
    alert = hook.got[0]
    assert alert["atom"] == "pulse" and alert["score"] > alert["threshold"]
    assert {b["token"][0] for b in alert["blame"][:3]} <= {"C", "M", "S", "L"}
    rows = hub.sql("select action from decisions order by id")
    assert rows.count(("alert",)) >= 2  # the nerve kept deciding alert ...
    # every batch of scores has its decision, stored with it
    assert hub.sql("select count(*) from decisions where observation_id is null")[0][0] == 0
    statuses = [r[0] for r in hub.sql("select status from alerts order by id")]
    live = [s for s in statuses if s != "stale"]  # the backlog's alarms were recorded, not sent
    # ... but the owner heard once, and sees that one of the two sinks failed
    assert live[0] == "partial" and set(live[1:]) == {"cooled"}
    (detail,) = hub.sql("select detail from alerts where status = 'partial'")[0]
    assert f'"webhook {hook.url}": "sent"' in detail and f'"webhook {broken.url}": "failed' in detail
    out = kiri(hub, "decisions").stdout
    assert "alert" in out and "cooled" in out and "partial" in out and "rule:" in out
    assert "partial" in {d["alert"] for d in hub.client().call("decisions", {"limit": 100})["decisions"]}
    scorer.stop()
    hook.close()
    broken.close()


def test_the_nerve_budget_sets_how_readily_its_rule_alerts(hub, agents_factory):
    import subprocess
    import sys

    from kiri.model.calibrate import alarm_rate

    bad = subprocess.run([sys.executable, "-m", "kiri.agents.cli", "--role", "scorer", "--alarms-per-week", "nan"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a finite number" in bad.stderr
    _trained(hub, agents_factory)
    # a generous budget: ten thousand alarms a week, at pulse's 30 s
    scorer = agents_factory(hub, "score", "--lease-ttl", "2", "--alarms-per-week", "10000")
    wait_until(lambda: _all_done(hub), 60, what="backlog scored")
    import time

    base = time.time() - 300
    for i, v in enumerate([CALM, {**CALM, "cpu": 30}, {**CALM, "cpu": 45, "load": 3}, CALM]):
        _observe(hub, v, base + 30 * i)
        wait_until(lambda: _all_done(hub), 60)
    rate = alarm_rate(10000, 30.0)
    rows = [(a, json.loads(i)) for a, i in hub.sql("select action, inputs from decisions order by id")]
    assert len(rows) >= 5
    for action, inputs in rows:
        assert inputs["alarm_rate"] == pytest.approx(rate)  # the owner's budget, not the atom's 2 a week
        assert action == ("alert" if inputs["tail_p"] < rate else "ok")
    assert any(a == "alert" for a, _ in rows)  # a budget that generous is spent
    scorer.stop()


def test_retrain_decision_gives_one_train_task_and_feedback_teaches_the_nerve(hub, agents_factory):
    _trained(hub, agents_factory)
    c = hub.client()
    # a retrain decision recorded twice (a burst) makes one deduplicated train job
    tid = c.enqueue("score", "pulse")["task_id"]
    # this lease is held while the CLI runs 22 times below: a TTL that fits that work (the
    # hub's 2 s default expired under a loaded CPU)
    got = c.lease(["score"], ttl=600)
    assert got["task"]["id"] == tid or got["task"]["kind"] == "score"
    tok, task_id = got["lease"]["token"], got["task"]["id"]
    inputs = {"pulse": 3.0, "rhythm": 0.0, "drift": 0.0, "hour": 3.0, "weekday": 6}
    probs = {"ok": 0.1, "alert": 0.1, "suppress": 0.1, "retrain": 0.7}
    first = c.call("record_decision", {"task_id": task_id, "lease_token": tok, "atom": "pulse", "observation_id": 1,
                                       "inputs": inputs, "action": "retrain", "probs": probs, "policy": "model:x"})
    second = c.call("record_decision", {"task_id": task_id, "lease_token": tok, "atom": "pulse",
                                        "observation_id": 2, "inputs": inputs, "action": "retrain", "probs": probs,
                                        "policy": "model:x"})
    assert first["retrain_task_id"] == second["retrain_task_id"]
    assert hub.sql("select count(*) from tasks where kind='train' and status='queued'")[0][0] == 1
    # the owner labels 20 night-time pulse alarms as "suppress" (backups) -> the nerve retrains on them
    ids = []
    for i in range(20):
        r = c.call("record_decision", {"task_id": task_id, "lease_token": tok, "atom": "pulse",
                                       "observation_id": 3 + i, "inputs": {**inputs, "pulse": 6.0 + i % 3},
                                       "action": "alert", "probs": probs, "policy": "rule:scaled_sum>=1"})
        ids.append(r["decision_id"])
    from click.testing import CliRunner

    from kiri.cli import main

    for k, d in enumerate(ids):
        if k == 0:  # the CLI as a user runs it; the rest in this process (no interpreter to start each time)
            res = kiri(hub, "feedback", str(d), "suppress").stdout
        else:
            got = CliRunner().invoke(main, ["feedback", str(d), "suppress"], env={"KIRI_HUB": f"127.0.0.1:{hub.port}"})
            assert got.exit_code == 0, got.stderr
            res = got.stdout
        assert "labelled suppress" in res
    assert "nerve retraining" in res
    listed = {d["id"]: d["label"] for d in c.call("decisions", {"limit": 100})["decisions"]}
    assert all(listed[d] == {"verdict": "suppress", "action": "suppress"} for d in ids)

    day = c.call("record_decision", {"task_id": task_id, "lease_token": tok, "atom": "pulse", "observation_id": 30,
                                     "inputs": {**inputs, "pulse": 0.2, "hour": 14.0, "weekday": 2}, "action": "ok",
                                     "probs": probs, "policy": "rule:scaled_sum>=1"})["decision_id"]
    assert "labelled ok" in kiri(hub, "feedback", str(day), "approve").stdout
    kiri(hub, "feedback", str(day), "ok")  # relabelled: the newest label is the one listed
    listed = {d["id"]: d["label"] for d in c.call("decisions", {"limit": 100})["decisions"]}
    assert listed[day] == {"verdict": "ok", "action": "ok"}
    trainer = agents_factory(hub, "train", "--lease-ttl", "2")
    wait_until(lambda: hub.sql("select count(*) from weights where atom='nerve' and status='active'")[0][0] == 1,
               120, what="the nerve trained on the labels")
    # labels are kept apart from the model's decisions, and the nerve now suppresses night alarms
    assert hub.sql("select count(*) from labels")[0][0] == 22
    import base64

    from kiri.model.nerve import Nerve

    blob = base64.b64decode(c.call("weights", {"atom": "nerve", "active": True, "blob": True})["weights"][0]["blob"])
    assert Nerve(blob).decide({"pulse": 7.0}, 3.0, 6).action == "suppress"
    shown = kiri(hub, "weights", "show", "nerve:1").stdout  # the nerve's facts, not an atom's
    assert "22 labels from the owner" in shown and "trained from scratch" in shown
    assert "None" not in shown and "threshold" not in shown
    # and the live loop follows it: a later weekend-night spike, scored by a real scorer, is suppressed
    c.call("cancel", {"task_id": task_id})
    c.call("fail", {"task_id": task_id, "lease_token": tok, "error": "test done with it"})
    import time

    sunday_3am = time.mktime((2026, 11, 15, 3, 0, 0, 0, 0, -1))  # weekday 6 in local time
    assert time.localtime(sunday_3am).tm_wday == 6
    scorer = agents_factory(hub, "score", "--lease-ttl", "2")
    _observe(hub, SPIKE, sunday_3am)
    spike_id = hub.sql("select max(id) from observations")[0][0]
    wait_until(lambda: hub.sql("select count(*) from decisions where observation_id=?", spike_id)[0][0] == 1, 60,
               what="the scorer's decision on the new spike")
    action, policy = hub.sql("select action, policy from decisions where observation_id=?", spike_id)[0]
    assert policy.startswith("model:") and action == "suppress"
    trainer.stop()
    scorer.stop()


def test_scores_and_their_decision_are_atomic_and_orphaned_alerts_are_redelivered(hub, agents_factory):
    import time

    _trained(hub, agents_factory)
    c = hub.client()
    wid = hub.sql("select id from weights where status='active'")[0][0]
    _observe(hub, SPIKE, time.time())
    oid = hub.sql("select max(id) from observations")[0][0]
    task = c.lease(["score"], ttl=600)
    while task["task"] is not None and task["task"]["atom"] != "pulse":
        task = c.lease(["score"], ttl=600)
    tok, tid = task["lease"]["token"], task["task"]["id"]
    body = {"task_id": tid, "lease_token": tok, "atom": "pulse", "weights_id": wid, "threshold": 1.5,
            "scores": [{"observation_id": oid, "score": 9.0, "surprise": [9.0] * 6}],
            "decision": {"observation_id": oid, "inputs": {"pulse": 9.0, "hour": 3, "weekday": 1}, "action": "alert",
                         "probs": {"ok": 0.0, "alert": 1.0}, "policy": "rule:scaled_sum>=1", "cooldown": 3600}}
    first = c.call("record_scores", body)
    again = c.call("record_scores", body)  # a resend after a lost reply
    assert first["stored"] == 1 and again["stored"] == 0 and again["already"] == 1
    assert again["decision"]["decision_id"] == first["decision"]["decision_id"]
    assert hub.sql("select count(*) from decisions")[0][0] == 1 and hub.sql("select count(*) from alerts")[0][0] == 1
    # the "scorer" dies here, before delivering: the alert stays pending ...
    from kiri.hub.store.db import make_engine

    eng = make_engine(f"sqlite:///{hub.db_path}")
    with eng.begin() as conn:  # ... for longer than the redelivery grace
        conn.exec_driver_sql("update alerts set created_at = created_at - 60")
    eng.dispose()
    hook = Receiver()
    scorer = agents_factory(hub, "score", "--lease-ttl", "2", "--alert-webhook", hook.url)
    c.call("fail", {"task_id": tid, "lease_token": tok, "release": True})
    wait_until(lambda: len(hook.got) == 1, 60, what="the orphaned alert delivered")
    assert hook.got[0]["alert_id"] == first["decision"]["alert"]["id"] and hook.got[0]["redelivery"] is True
    wait_until(lambda: hub.sql("select status from alerts")[0][0] == "sent", 30)
    scorer.stop()
    hook.close()
