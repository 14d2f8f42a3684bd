"""The protocol's method table is the truth: the hub, the client, the events and the
specification all follow it, and every real reply has the shape the table promises."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from kiri.agents.client import resendable
from kiri.hub.core.events import TOPICS
from kiri.model.gpt import Atom
from kiri.model.schema import get as get_schema
from kiri.model.weights import save_weights
from kiri.protocol import methods as M
from kiri.protocol.docs import render
from tests.raw import Raw

ROOT = Path(__file__).resolve().parent.parent


def test_docs_protocol_md_is_generated_from_the_table():
    text = (ROOT / "docs" / "protocol.md").read_text()
    assert text == render(), "docs/protocol.md is stale: run `python -m kiri.protocol.docs > docs/protocol.md`"
    for m in M.TABLE:
        assert f"### `{m.name}`" in text


@pytest.mark.parametrize("method", M.TABLE, ids=lambda m: m.name)
def test_every_example_is_valid_against_its_models(method):
    assert method.example is not None, f"{method.name} has no example exchange"
    req, res = method.example
    method.params.model_validate(req)
    method.result.model_validate(res)


def test_fenced_methods_and_only_they_take_a_lease_token():
    for m in M.TABLE:
        fields = m.params.model_fields
        has_fence = "lease_token" in fields and fields["lease_token"].is_required() and "task_id" in fields
        assert has_fence == m.fenced, m.name


def test_client_retries_and_events_come_from_the_table():
    for m in M.TABLE:
        assert resendable(m.name) == m.idempotent, m.name
    for m in M.TABLE:
        assert TOPICS.get(m.name, ()) == m.events, m.name
    assert not resendable("enqueue") and not resendable("lease")  # a resend would duplicate work


class Session:
    """One raw connection recording each reply by method, to check it against the table.

    Leases are taken with a long ttl: the test holds them across several calls, and a
    loaded machine must not let one expire in between."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.raw = Raw(address)
        self.ids = 0
        self.seen: dict[str, list[dict]] = {}

    def __call__(self, method: str, **params: object) -> dict:
        self.ids += 1
        reply = self.raw.call({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})
        assert reply["id"] == self.ids
        assert "result" in reply, (method, reply)
        self.seen.setdefault(method, []).append(reply["result"])
        return reply["result"]


def _weights_blob(atom: str) -> str:
    schema = get_schema(atom)
    torch.manual_seed(0)
    return base64.b64encode(save_weights(schema, Atom.for_schema(schema), {"threshold": 3.0})).decode()


def test_every_method_answers_in_the_shape_the_table_promises(hub):
    s = Session(hub.address)
    s("hello", agent="contract", role="scorer")
    s("ping")
    # the queue
    tid = s("enqueue", kind="echo", params={"x": 1}, dedupe_key="k1")["task_id"]
    s("enqueue", kind="echo", dedupe_key="k1")
    got = s("lease", kinds=["echo"], ttl=600)
    tok = got["lease"]["token"]
    s("heartbeat", task_id=tid, lease_token=tok, progress={"step": 1})
    s("checkpoint", task_id=tid, lease_token=tok, step=1, data=base64.b64encode(b"state").decode())
    s("ack", task_id=tid, lease_token=tok, result={"ok": True}, next={"kinds": ["echo"]})
    s("ack", task_id=tid, lease_token=tok)  # a repeat: already_done
    t2 = s("enqueue", kind="echo")["task_id"]
    l2 = s("lease", kinds=["echo"], ttl=600)
    s("fail", task_id=t2, lease_token=l2["lease"]["token"], error="boom", retry=False)
    s("retry", task_id=t2)
    s("cancel", task_id=t2)
    s("task", task_id=tid)
    s("tasks", limit=1)
    s("lease", kinds=["nothing-here"], ttl=600)
    # atoms and observations
    s("atoms")
    s("define_atom", schema={"name": "tank", "fields": [
        {"letter": "L", "name": "level", "low": 0, "high": 10, "buckets": 4}]})
    pulse = {"C": 50, "M": 40, "D": 30, "S": 0, "L": 1, "N": 0}
    s("observe", atom="pulse", observations=[{"time": 1000.0 + i, "host": "h1", "values": {**pulse, "C": 50 + i}}
                                             for i in range(5)])
    s("observe", atom="tank", import_id="imp-aaaaaaaa", observations=[{"values": {"L": 3}}])
    s("commit_import", import_id="imp-aaaaaaaa")
    s("observe", atom="tank", import_id="imp-bbbbbbbb", observations=[{"values": {"L": 4}}])
    s("abort_import", import_id="imp-bbbbbbbb")
    s("observations", atom="pulse", limit=2)
    # weights: published by the training task that made them
    train = s("enqueue", kind="train", atom="pulse")["task_id"]
    tl = s("lease", kinds=["train"], ttl=600)
    w = s("publish_weights", task_id=train, lease_token=tl["lease"]["token"], atom="pulse",
          blob=_weights_blob("pulse"), loss=0.5, info={"threshold": 3.0})["weights"]
    s("ack", task_id=train, lease_token=tl["lease"]["token"])
    s("weights", atom="pulse", active=True)
    s("activate_weights", atom="pulse", version=w["version"])
    imported = s("import_weights", atom="pulse", blob=_weights_blob("pulse"), reason="contract")
    assert imported["weights"]["atom"] == "pulse"
    s("retrain", atom="pulse", reason="contract test")
    s("retrain", atom="pulse", reason="again")  # joins the first
    # scoring, with the nerve's decision in the same call
    s("scoring_work", atom="pulse", limit=5, context=0)
    s("scoring_work", atom="pulse", limit=3, context=1, columns=True, after_id=1)
    score = s("lease", kinds=["score"], ttl=600)
    sid, stok = score["task"]["id"], score["lease"]["token"]
    obs = s("observations", atom="pulse")["observations"]
    s("record_scores", task_id=sid, lease_token=stok, atom="pulse", weights_id=w["id"], threshold=3.0,
      alarm_rate=0.01, scores=[{"observation_id": o["id"], "score": 1.0, "surprise": [0.5] * 6, "tail_p": 0.5}
                               for o in obs[:-1]],
      decision={"observation_id": obs[0]["id"], "inputs": {"pulse": 0.5}, "action": "ok", "probs": {"ok": 1.0},
                "policy": "rule"})
    dec = s("record_decision", task_id=sid, lease_token=stok, atom="pulse", observation_id=obs[-1]["id"],
            inputs={"pulse": 0.001}, action="alert", probs={"alert": 1.0}, policy="rule")
    s("alert_result", alert_id=dec["alert"]["id"], status="sent")
    s("pending_alerts", older_than=0)
    s("history", atom="pulse", n=5)
    s("scores", atom="pulse", limit=2)
    s("nerve_inputs")
    s("decisions", limit=5)
    s("feedback", decision_id=dec["decision_id"], verdict="dismiss")
    s("labels")
    # schedules
    sched = s("schedule_add", kind="echo", every=60)["schedule_id"]
    s("schedules")
    s("schedule_rm", schedule_id=sched)
    t3 = s("enqueue", kind="echo3")["task_id"]  # (after the lease calls checked by position below)
    l3 = s("lease", kinds=["echo3"], ttl=600)
    s("fail", task_id=t3, lease_token=l3["lease"]["token"], error="boom", retry=False)
    assert s("retry_dead", kind="echo3") == {"retried": [t3], "skipped": []}
    assert s("set_kind", kind="echo3", paused=True, deadline=30)["kind"]["queued"] == 1
    assert {k["kind"]: k["paused"] for k in s("kinds")["kinds"]}["echo3"] is True
    # the pictures
    s("stats")
    s("status")

    missing = [m.name for m in M.TABLE if m.name not in s.seen]
    assert not missing, f"the contract test never called {missing}"
    for m in M.TABLE:
        for result in s.seen[m.name]:
            _strict(m.result).model_validate(result)
    assert s.seen["ack"][1]["status"] == "already_done"
    assert s.seen["retrain"][1]["deduplicated"] is True
    assert s.seen["lease"][2]["task"] is None  # nothing of that kind


def _strict(model: type[BaseModel]) -> type[BaseModel]:
    """Results are validated as they are declared: unknown keys at the top are an error."""
    assert model.model_config.get("extra") == "forbid", model
    return model
