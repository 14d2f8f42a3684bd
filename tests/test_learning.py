"""The learning period: weights that never saw a host do not alarm on it, and the hub has
them trained on that host's own data as soon as it has enough."""

from __future__ import annotations

import base64
import json

import torch

from kiri.hub.watch.learning import LEARN_MIN
from kiri.model import synth
from kiri.model.gpt import Atom
from kiri.model.schema import get as get_schema
from kiri.model.weights import save_weights
from tests.conftest import push, wait_until
from tests.test_contract import Session

PULSE = {"C": 50, "M": 40, "D": 30, "S": 0, "L": 1, "N": 1}


def _weights(hosts: dict[str, int]) -> str:
    schema = get_schema("pulse")
    torch.manual_seed(0)
    blob = save_weights(schema, Atom.for_schema(schema), {"threshold": 3.0, "hosts": hosts})
    return base64.b64encode(blob).decode()


def _publish(s: Session, hosts: dict[str, int]) -> int:
    tid = s("enqueue", kind="train", atom="pulse")["task_id"]
    lease = s("lease", kinds=["train"], ttl=600)
    w = s("publish_weights", task_id=tid, lease_token=lease["lease"]["token"], atom="pulse",
          blob=_weights(hosts), loss=0.5)["weights"]
    s("ack", task_id=tid, lease_token=lease["lease"]["token"])
    return int(w["id"])


def _score_all(s: Session, wid: int, ids: list[int], action: str = "alert") -> dict:
    """Score the observations as a scorer would, every one far in the tail, and decide."""
    lease = s("lease", kinds=["score"], ttl=600)
    return s("record_scores", task_id=lease["task"]["id"], lease_token=lease["lease"]["token"], atom="pulse",
             weights_id=wid, threshold=3.0, alarm_rate=0.01,
             scores=[{"observation_id": i, "score": 30.0, "surprise": [5.0] * 6, "tail_p": 1e-9} for i in ids],
             decision={"observation_id": ids[-1], "inputs": {"pulse": 30.0}, "action": action,
                       "probs": {action: 1.0}, "policy": "rule"})


def test_a_host_the_weights_never_saw_is_scored_but_never_alarmed(hub):
    s = Session(hub.address)
    s("hello", agent="t", role="scorer")
    wid = _publish(s, {"synthetic": 5000})
    got = s("observe", atom="pulse", observations=[{"host": "box", "values": PULSE} for _ in range(5)])
    ids = list(range(got["first_id"], got["last_id"] + 1))
    res = _score_all(s, wid, ids)
    assert res["stored"] == 5 and res["anomalous"] == 0
    assert res["decision"]["alert"] is None  # no alert was recorded, so none is delivered
    dec = s("decisions", limit=1)["decisions"][0]
    assert dec["action"] == "ok" and dec["policy"] == "learning:box" and dec["inputs"]["held_back"] == "alert"
    assert hub.sql("select count(*) from alerts")[0][0] == 0
    pic = s("status")
    pulse = next(a for a in pic["atoms"] if a["name"] == "pulse")
    assert pulse["learning"] == {"host": "box", "have": 5, "need": LEARN_MIN, "hours": 0.0, "need_hours": 24.0,
                                 "training": False}
    assert pulse["latest"]["verdict"] == "learning"
    # nothing to learn yet: no training asked for
    assert hub.sql("select count(*) from tasks where kind = 'train' and status = 'queued'")[0][0] == 0


def test_hosts_the_weights_saw_and_hostless_readings_alarm_as_before(hub):
    s = Session(hub.address)
    s("hello", agent="t", role="scorer")
    # box: enough readings; slow: few, but over two days (an hourly stream); legacy: a bare count
    wid = _publish(s, {"box": {"n": LEARN_MIN, "first": 0.0, "last": 6000.0},
                       "slow": {"n": 48, "first": 0.0, "last": 2 * 86400.0}, "legacy": LEARN_MIN})
    readings = [{"values": PULSE, **({"host": h} if h else {})} for h in ("slow", "legacy", None, "box")]
    got = s("observe", atom="pulse", observations=readings)
    res = _score_all(s, wid, list(range(got["first_id"], got["last_id"] + 1)))
    assert res["anomalous"] == 4 and res["decision"]["alert"]["deliver"] is True
    pulse = next(a for a in s("status")["atoms"] if a["name"] == "pulse")
    assert pulse["learning"] is None and pulse["latest"]["verdict"] == "anomaly"


def test_enough_readings_ask_for_training_on_the_hosts_own_data(hub):
    s = Session(hub.address)
    s("hello", agent="t", role="scorer")
    wid = _publish(s, {"synthetic": 5000})
    got = s("observe", atom="pulse", observations=[{"host": "box", "values": PULSE} for _ in range(LEARN_MIN)])
    _score_all(s, wid, list(range(got["first_id"], got["last_id"] + 1)))
    (params,) = hub.sql("select params from tasks where kind = 'train' and status = 'queued'")[0]
    assert json.loads(params)["host"] == "box"
    again = s("observe", atom="pulse", observations=[{"host": "box", "values": PULSE}])
    _score_all(s, wid, [again["first_id"]])
    assert hub.sql("select count(*) from tasks where kind = 'train' and status = 'queued'")[0][0] == 1  # deduped


def test_the_learning_period_ends_with_weights_trained_on_the_host(hub, agents_factory):
    """Real trainer and scorer: trained on a synthetic host, a new host learns, then is watched."""
    week = synth.generate("pulse", 0.25, seed=0)
    push(hub, "pulse", week.rows[:300], week.times[:300], host="synthetic")
    trainer = agents_factory(hub, "train", "--lease-ttl", "10")
    scorer = agents_factory(hub, "score", "--lease-ttl", "10")
    c = hub.client()
    c.enqueue("train", "pulse", {"steps": 60})
    wait_until(lambda: hub.sql("select count(*) from weights where status = 'active'")[0][0] == 1, 120,
               what="the first weights")
    (info,) = hub.sql("select info from weights where status = 'active'")[0]
    hosts = json.loads(info)["hosts"]
    assert list(hosts) == ["synthetic"] and hosts["synthetic"]["n"] == 300
    assert hosts["synthetic"]["last"] - hosts["synthetic"]["first"] == week.times[299] - week.times[0]
    here = synth.generate("pulse", 0.25, seed=1, start=week.times[-1] + 30)
    push(hub, "pulse", here.rows[:LEARN_MIN + 20], here.times[:LEARN_MIN + 20], host="box")

    def learned() -> bool:
        rows = hub.sql("select info from weights where status = 'active'")
        return bool(rows) and json.loads(rows[0][0]).get("hosts", {}).get("box", {}).get("n", 0) >= LEARN_MIN

    wait_until(learned, 240, what="weights trained on the new host")
    (params,) = hub.sql("select params from tasks where kind = 'train' order by id desc limit 1")[0]
    assert json.loads(params)["host"] == "box"
    push(hub, "pulse", here.rows[LEARN_MIN + 20:LEARN_MIN + 30], here.times[LEARN_MIN + 20:LEARN_MIN + 30],
         host="box")
    wait_until(lambda: next(a for a in c.call("status")["atoms"] if a["name"] == "pulse")["learning"] is None
               and hub.sql("select count(*) from tasks where kind = 'score' and status in ('queued', 'leased')")
               [0][0] == 0, 120, what="the stream watched by its own weights")
    c.close()
    trainer.stop()
    scorer.stop()
