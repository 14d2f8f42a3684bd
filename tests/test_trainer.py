"""Trainer agents over the hub: paged data, weights lineage, and resume after SIGKILL."""

from __future__ import annotations

import base64
import signal

import pytest
import torch

from kiri.model import schema as S
from kiri.model import synth
from kiri.model.train import TrainConfig, Trainer
from kiri.model.weights import content_hash, load_weights
from kiri.model.windows import encode_many
from kiri.protocol import LeaseLost
from tests.conftest import wait_until

torch.set_num_threads(1)


def _push(hub, days: float = 1.0, seed: int = 0) -> list[dict]:
    rows = synth.generate("pulse", days, seed=seed).rows
    c = hub.client()
    for i in range(0, len(rows), 5000):
        c.call("observe", {"atom": "pulse", "observations": [{"values": r, "time": 1704067200.0 + 30 * (i + j)}
                                                              for j, r in enumerate(rows[i:i + 5000])]})
    c.close()
    return rows


def _trainer(agents_factory, hub, *extra):
    return agents_factory(hub, "train", "--lease-ttl", "2", *extra)


def test_train_task_publishes_an_active_version_with_lineage(hub, agents_factory):
    rows = _push(hub, 1.0)
    agent = _trainer(agents_factory, hub)
    c = hub.client()
    tid = c.enqueue("train", "pulse", {"steps": 60, "batch_size": 16})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 120,
               what="training done")
    result = c.call("task", {"task_id": tid})["task"]["result"]
    (w,) = c.call("weights", {"atom": "pulse"})["weights"]
    assert w["status"] == "active" and w["version"] == 1 and w["task_id"] == tid
    assert (w["obs_from"], w["obs_to"]) == (1, len(rows)) and result["observations"] == len(rows)
    full = c.call("weights", {"atom": "pulse", "active": True, "blob": True})["weights"][0]
    blob = base64.b64decode(full["blob"])
    assert content_hash(blob) == w["hash"] == result["hash"]
    loaded = load_weights(blob)
    assert loaded.info["task_id"] == tid and loaded.info["steps"] == 60 and loaded.info["threshold"] > 0
    # a second run makes version 2 and takes over; the owner can roll back
    tid2 = c.enqueue("train", "pulse", {"steps": 20, "gate_margin": 1.0})["task_id"]  # no gate here
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid2)[0][0] == "done", 120)
    assert [(x["version"], x["status"]) for x in c.call("weights", {"atom": "pulse"})["weights"]] == [
        (2, "active"), (1, "inactive")]
    c.call("activate_weights", {"atom": "pulse", "version": 1})
    assert c.call("weights", {"atom": "pulse", "active": True})["weights"][0]["version"] == 1
    agent.stop()


def test_publishing_is_fenced_by_the_lease(hub):
    c = hub.client()
    tid = c.enqueue("train", "pulse")["task_id"]
    got = c.lease(["train"])
    t = Trainer(S.PULSE, encode_many(S.PULSE, synth.generate("pulse", 0.1).rows), TrainConfig(steps=2))
    t.run()
    blob = base64.b64encode(t.weights_bytes()).decode()
    with pytest.raises(LeaseLost):
        c.call("publish_weights", {"task_id": tid, "lease_token": "not-the-token", "atom": "pulse", "blob": blob})
    body = {"task_id": tid, "lease_token": got["lease"]["token"], "atom": "pulse", "blob": blob}
    first = c.call("publish_weights", body)
    again = c.call("publish_weights", body)  # resent after a lost reply: the same version, once
    assert again["already"] is True and again["weights"]["id"] == first["weights"]["id"]
    from kiri.protocol import InvalidParams

    drift_task = c.enqueue("train", "drift")["task_id"]
    drift_lease = c.lease(["train"])
    assert drift_lease["task"]["id"] == drift_task
    with pytest.raises(InvalidParams, match="not 'drift'"):  # pulse weights offered as drift's
        c.call("publish_weights", {**body, "task_id": drift_task, "lease_token": drift_lease["lease"]["token"],
                                   "atom": "drift"})
    with pytest.raises(InvalidParams, match="not kiri weights"):
        c.call("publish_weights", {**body, "task_id": drift_task, "lease_token": drift_lease["lease"]["token"],
                                   "atom": "drift", "blob": base64.b64encode(b"junk" * 10).decode()})
    assert hub.sql("select count(*) from weights")[0][0] == 1


def _mark_unusual(hub, agents_factory, ids: list[int]) -> None:
    """Weights v1, and scores under them saying observations ``ids`` were alarms (tail_p 1e-6)."""
    c = hub.client()
    tid = c.enqueue("train", "pulse", {"steps": 5})["task_id"]
    agent = _trainer(agents_factory, hub)
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 120, what="weights v1")
    agent.stop()
    wid = c.call("weights", {"atom": "pulse", "active": True})["weights"][0]["id"]
    c.enqueue("score", "pulse")
    got = c.lease(["score"])
    assert got["task"]["atom"] == "pulse"
    c.call("record_scores", {"task_id": got["task"]["id"], "lease_token": got["lease"]["token"], "atom": "pulse",
                             "weights_id": wid, "threshold": 1.0, "alarm_rate": 1e-3,
                             "scores": [{"observation_id": i, "score": 9.0, "surprise": [9.0] * 6, "tail_p": 1e-6}
                                        for i in ids]})
    c.call("ack", {"task_id": got["task"]["id"], "lease_token": got["lease"]["token"]})
    c.close()


def test_killed_trainer_resumes_from_checkpoint_with_bitwise_the_same_weights(hub, agents_factory):
    rows = _push(hub, 2.0, seed=3)
    unusual = list(range(50, 5000, 97))  # scored as alarms earlier: left out, before and after the kill
    _mark_unusual(hub, agents_factory, unusual)
    cfg = {"steps": 1500, "batch_size": 32, "seed": 5}  # a few seconds: killed well before the end
    c = hub.client()
    tid = c.enqueue("train", "pulse", {**cfg, "checkpoint_every": 0.2, "gate_margin": 1.0})["task_id"]
    first = _trainer(agents_factory, hub)

    def ck_step() -> int:
        r = hub.sql("select step from checkpoints where task_id=?", tid)
        return r[0][0] if r else 0

    wait_until(lambda: ck_step() >= 100, 120, what="a checkpoint at step >= 100")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    resumed_from = ck_step()
    assert 0 < resumed_from < 1500
    second = _trainer(agents_factory, hub)
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 180,
               what="resumed training done")
    task = c.call("task", {"task_id": tid})["task"]
    assert task["attempts"] == 2 and task["expiries"] == 1
    blob = base64.b64decode(c.call("weights", {"atom": "pulse", "active": True, "blob": True})["weights"][0]["blob"])
    through_hub = load_weights(blob).model.state_dict()
    # the same training, uninterrupted, in this process
    from kiri.model.codec import Codec, values_of

    left = set(unusual)
    values = values_of(S.PULSE, [r for i, r in enumerate(rows, start=1) if i not in left])
    assert load_weights(blob).info["left_out"] == len(unusual)
    codec = Codec.fit(S.PULSE, values)  # the trainer fits its tokens' edges to the data
    assert Codec.from_dict(S.PULSE, load_weights(blob).info["codec"]).edges == codec.edges
    ref = Trainer(S.PULSE, codec.encode(values), TrainConfig(**cfg), codec=codec)
    ref.run()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, through_hub[k]), f"{k} differs after a kill and resume through the hub"
    second.stop()


def test_train_task_errors_are_permanent_and_clear(hub, agents_factory):
    agent = _trainer(agents_factory, hub)
    c = hub.client()
    no_data = c.enqueue("train", "rhythm")["task_id"]
    bad = c.enqueue("train", "pulse", {"steps": -3})["task_id"]
    for tid, needle in ((no_data, "push more first"), (bad, "bad train parameters")):
        wait_until(lambda tid=tid: hub.sql("select status from tasks where id=?", tid)[0][0] == "dead", 60)
        t = c.call("task", {"task_id": tid})["task"]
        assert needle in t["error"] and t["attempts"] == 1
    agent.stop()


def test_quality_gate_rejects_a_worse_version_and_keeps_it_with_the_reason(hub, agents_factory):
    _push(hub, 1.0)
    agent = _trainer(agents_factory, hub)
    c = hub.client()
    good = c.enqueue("train", "pulse", {"steps": 300})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", good)[0][0] == "done", 120)
    # two steps of training cannot tell normal from corrupted as well as three hundred
    weak = c.enqueue("train", "pulse", {"steps": 2})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", weak)[0][0] == "done", 120)
    versions = {w["version"]: w for w in c.call("weights", {"atom": "pulse"})["weights"]}
    assert versions[1]["status"] == "active"
    assert versions[2]["status"] == "rejected" and "fails the gate" in versions[2]["reason"]
    q = versions[2]["info"]["quality"]
    assert q["new"]["separation"] < q["active"]["separation"] and q["active"]["version"] == 1
    # a margin of 100% lets anything through
    lax = c.enqueue("train", "pulse", {"steps": 2, "gate_margin": 1.0})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", lax)[0][0] == "done", 120)
    assert c.call("weights", {"atom": "pulse", "active": True})["weights"][0]["version"] == 3
    agent.stop()


def test_quality_gate_judges_both_versions_by_the_same_statistic(hub, agents_factory):
    """The same model as candidate and as active version gets the same separation: the
    candidate is scored as its weights will score, not by plain surprise over every field."""
    from kiri.agents.trainer import quality_gate
    from kiri.model.codec import Codec, values_of

    rows = _push(hub, 1.0)
    agent = _trainer(agents_factory, hub)
    c = hub.client()
    tid = c.enqueue("train", "pulse", {"steps": 60})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 120)
    agent.stop()
    w = load_weights(base64.b64decode(c.call("weights", {"atom": "pulse", "active": True, "blob": True})
                                      ["weights"][0]["blob"]))
    values = values_of(S.PULSE, rows)
    codec = Codec.from_dict(S.PULSE, w.info["codec"])
    twin = Trainer(S.PULSE, codec.encode(values), TrainConfig(steps=1, context=w.info["context"]), codec=codec)
    twin.model.load_state_dict(w.model.state_dict())  # the active version's very model
    gate = quality_gate(c, S.PULSE, twin, values, 0.1)
    assert gate["active"]["version"] == 1 and gate["passed"]
    assert gate["new"]["separation"] == pytest.approx(gate["active"]["separation"], rel=1e-5)
    c.close()


def test_weights_cli_lists_shows_and_rolls_back(hub, agents_factory):
    from tests.test_cli import kiri

    _push(hub, 0.5)
    agent = _trainer(agents_factory, hub)
    for steps in (30, 30):
        tid = kiri(hub, "enqueue", "train", "pulse", "--steps", str(steps), "-p", "gate_margin=1.0").stdout.strip()
        wait_until(lambda tid=tid: hub.sql("select status from tasks where id=?", int(tid))[0][0] == "done", 120)
    listed = kiri(hub, "weights", "list", "pulse").stdout
    assert "pulse:2" in listed and "active" in listed and "inactive" in listed
    shown = kiri(hub, "weights", "show", "pulse:1").stdout
    assert "pulse version 1  [inactive]" in shown and "observations 1..1440" in shown and "separation" in shown
    assert "trained from scratch" in shown and "threshold" in shown and "None" not in shown
    assert "pulse:1 is now active" in kiri(hub, "weights", "activate", "1").stdout
    assert "[active]" in kiri(hub, "weights", "show", "pulse:1").stdout
    out = kiri(hub, "weights", "show", "pulse:x", ok=False)
    assert out.returncode == 2 and "ATOM:VERSION" in out.stderr
    out = kiri(hub, "weights", "show", "pulse:9", ok=False)
    assert out.returncode == 1 and "no such weights" in out.stderr
    agent.stop()


def test_training_reads_each_host_as_its_own_stream_in_time_order(hub, agents_factory):
    from kiri.model.codec import Codec, values_of
    from kiri.model.train import data_fingerprint

    a = synth.generate("pulse", 0.2, seed=1)
    b = synth.generate("pulse", 0.2, seed=2)
    c = hub.client()
    # interleaved hosts, and host b's readings stored newest first
    obs = [{"values": r, "time": t, "host": "a"} for r, t in zip(a.rows, a.times, strict=True)]
    late = [{"values": r, "time": t, "host": "b"} for r, t in zip(b.rows, b.times, strict=True)][::-1]
    mixed = [x for pair in zip(obs, late, strict=True) for x in pair]
    for i in range(0, len(mixed), 1000):
        c.call("observe", {"atom": "pulse", "observations": mixed[i:i + 1000]})
    tid = c.enqueue("train", "pulse", {"steps": 5})["task_id"]
    agent = _trainer(agents_factory, hub)
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 120, what="trained")
    agent.stop()
    blob = base64.b64decode(c.call("weights", {"atom": "pulse", "active": True, "blob": True})["weights"][0]["blob"])
    info = load_weights(blob).info
    streams = values_of(S.PULSE, a.rows + b.rows)  # host a in time order, then host b in time order
    codec = Codec.fit(S.PULSE, streams)
    assert info["fingerprint"] == data_fingerprint(codec.encode(streams))
    stored = values_of(S.PULSE, [o["values"] for o in mixed])
    assert info["fingerprint"] != data_fingerprint(Codec.fit(S.PULSE, stored).encode(stored))
    assert set(info["hosts"]) == {"a", "b"} and info["hosts"]["b"]["n"] == len(b.rows)
    c.close()


def test_training_reads_a_window_of_recent_readings(hub, agents_factory):
    """By default the last 14 days (retention keeps 30 raw), counted back from the newest reading."""
    rows = synth.generate("pulse", 20.0, seed=3, interval=3600.0).rows  # hourly, twenty days
    c = hub.client()
    c.call("observe", {"atom": "pulse", "observations": [{"values": r, "time": 1704067200.0 + 3600 * i}
                                                         for i, r in enumerate(rows)]})
    agent = _trainer(agents_factory, hub)
    got = {}
    for window, params in (("default", {}), ("5 days", {"window": 5 * 86400}), ("all", {"window": "all"})):
        tid = c.enqueue("train", "pulse", {"steps": 5, "gate_margin": 1.0, **params})["task_id"]
        wait_until(lambda tid=tid: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 120,
                   what=f"trained on {window}")
        got[window] = c.call("task", {"task_id": tid})["task"]["result"]["observations"]
    assert got == {"default": 14 * 24 + 1, "5 days": 5 * 24 + 1, "all": len(rows)}
    bad = c.enqueue("train", "pulse", {"steps": 5, "window": "soon"})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", bad)[0][0] == "dead", 60, what="refused")
    assert "window must be seconds" in hub.sql("select error from tasks where id=?", bad)[0][0]
    agent.stop()
    c.close()


def test_weights_whose_info_a_scorer_could_not_use_are_refused_on_publish_and_import(hub):
    """A malformed codec, calibration, routine, threshold or context would be stored and then
    fail every score task of the atom; the hub refuses it in the call that brings it, with
    the part that is wrong, and stores nothing."""
    from kiri.model.gpt import Atom
    from kiri.model.weights import save_weights
    from kiri.protocol import InvalidParams

    c = hub.client()
    model = Atom.for_schema(S.PULSE)
    bad = {
        "codec": {"kind": "fitted/1", "fields": {"cpu": {"edges": [3, 2, 1]}}},
        "calibration": {"kind": "tail/1", "point": {"knots": [1.0], "beta": -1}, "sustained": {}},
        "routine": {"kind": "routine/1", "slot_minutes": 5, "slots": 5},
        "threshold": "high",
        "alarm_rate": 0.7,  # record_scores takes at most 0.5: every batch would be refused
        "context": 10**6,
    }
    for key, value in bad.items():
        blob = base64.b64encode(save_weights(S.PULSE, model, {"context": 2, key: value})).decode()
        with pytest.raises(InvalidParams, match=f"weights info '{key}' cannot be used"):
            c.call("import_weights", {"atom": "pulse", "blob": blob})
        tid = c.enqueue("train", "pulse")["task_id"]
        lease = c.lease(["train"])
        assert lease["task"]["id"] == tid
        with pytest.raises(InvalidParams, match=f"weights info '{key}' cannot be used"):
            c.call("publish_weights", {"task_id": tid, "lease_token": lease["lease"]["token"], "atom": "pulse",
                                       "blob": blob})
        c.call("ack", {"task_id": tid, "lease_token": lease["lease"]["token"]})
    # the same checks pass what training writes
    t = Trainer(S.PULSE, encode_many(S.PULSE, synth.generate("pulse", 0.5).rows), TrainConfig(steps=2))
    t.run()
    good = base64.b64encode(t.weights_bytes()).decode()
    assert c.call("import_weights", {"atom": "pulse", "blob": good})["weights"]["version"] == 1
    assert hub.sql("select count(*) from weights") == [(1,)]


def test_a_first_training_leaves_out_a_cluster_apart_from_the_rest(hub, agents_factory):
    """A history nobody has scored yet, with a runaway job pinning the machine in 2% of it:
    the first weights must not learn it as a second normal (``robust.beyond_gap``)."""
    import numpy as np

    rows = synth.generate("pulse", 1.0, seed=4, event_list=[]).rows
    rng = np.random.default_rng(4)
    wild = sorted(rng.choice(np.arange(100, len(rows)), 60, replace=False).tolist())
    for i in wild:
        rows[i].update(cpu=rng.uniform(95, 100), mem=rng.uniform(92, 99), swap=rng.uniform(85, 100),
                       load=rng.uniform(17, 20))
    c = hub.client()
    c.call("observe", {"atom": "pulse", "observations": [{"values": r, "time": 1704067200.0 + 30 * i}
                                                          for i, r in enumerate(rows)]})
    agent = _trainer(agents_factory, hub)
    tid = c.enqueue("train", "pulse", {"steps": 20, "gate_margin": 1.0})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 120, what="trained")
    agent.stop()
    blob = base64.b64decode(c.call("weights", {"atom": "pulse", "active": True, "blob": True})["weights"][0]["blob"])
    info = load_weights(blob).info
    assert info["left_out"] == len(wild) and info["observations"] == len(rows) - len(wild)
    assert info["codec"]["fields"]["cpu"]["edges"][-1] < 95  # the cluster lies beyond every bucket it learned
    c.close()
