"""Scorer agents over the hub: every new observation scored once, naming its weights."""

from __future__ import annotations

import signal

from kiri.model import synth
from tests.conftest import wait_until
from tests.test_cli import kiri


def _push(hub, series, start: int = 0, end: int | None = None) -> None:
    c = hub.client()
    rows = series.rows[start:end]
    times = series.times[start:end]
    for i in range(0, len(rows), 5000):
        c.call("observe", {"atom": series.atom, "observations": [
            {"values": r, "time": t} for r, t in zip(rows[i:i + 5000], times[i:i + 5000], strict=True)]})
    c.close()


def _all_done(hub) -> bool:
    return hub.sql("select count(*) from tasks where status in ('queued', 'leased')")[0][0] == 0


def test_new_observations_are_scored_and_a_retrain_leaves_out_what_scored_unusual(hub, agents_factory):
    train = synth.generate("pulse", 1, seed=0)
    _push(hub, train)
    trainer = agents_factory(hub, "train", "--lease-ttl", "2")
    scorer = agents_factory(hub, "score", "--lease-ttl", "2")
    kiri(hub, "enqueue", "train", "pulse", "--steps", "300")
    wait_until(lambda: hub.sql("select count(*) from weights where status='active'")[0][0] == 1, 120)
    wait_until(lambda: _all_done(hub), 120, what="the backlog scored")
    n_train = len(train.rows)
    assert hub.sql("select count(*), count(distinct observation_id) from scores")[0] == (n_train, n_train)
    # a new day with anomalies arrives
    test = synth.generate("pulse", 0.5, seed=1, start=synth.EPOCH + synth.DAY, anomalies={"spike": 2})
    _push(hub, test)
    wait_until(lambda: hub.sql("select count(*) from scores")[0][0] == n_train + len(test.rows), 120)
    (wid,) = hub.sql("select id from weights where status='active'")[0]
    assert hub.sql("select count(*) from scores where weights_id != ?", wid)[0][0] == 0
    rows = hub.sql("select o.id, s.score, s.anomalous from scores s join observations o on o.id = s.observation_id "
                   "where o.id > ? order by o.id", n_train)
    spikes = [s for (oid, s, a), lab in zip(rows, test.labels, strict=True) if lab == "spike"]
    normal = [s for (oid, s, a), lab in zip(rows, test.labels, strict=True) if lab is None]
    assert min(spikes) > 3 * (sum(normal) / len(normal))
    flagged = {oid for oid, s, a in rows if a}
    assert sum(1 for (oid, _, _), lab in zip(rows, test.labels, strict=True) if lab == "spike" and oid in flagged) >= 15
    # the scores method pages them in order, each naming observation and weights
    page = hub.client().call("scores", {"atom": "pulse", "limit": 1000})
    assert len(page["scores"]) == 1000 and page["next_after_id"] == page["scores"][-1]["id"]
    assert all(s["weights_id"] == wid and len(s["surprise"]) == 6 for s in page["scores"])
    # per-token surprise (blame) is stored to four decimals, never more
    assert all(round(x, 4) == x for s in page["scores"] for x in s["surprise"])
    assert any(round(x, 3) != x for s in page["scores"] for x in s["surprise"])
    # history shows tokens, score, verdict and blame
    hist = hub.client().call("history", {"atom": "pulse", "n": 5})["observations"]
    assert len(hist) == 5 and all(h["score"] is not None and len(h["blame"]) == 6 for h in hist)
    first_spike = next(i for i, lab in enumerate(test.labels) if lab == "spike")
    spike_id = n_train + 1 + first_spike
    out = kiri(hub, "history", "pulse", "-n", str(n_train + len(test.rows) - spike_id + 1)).stdout
    line = next(x for x in out.splitlines() if x.strip().startswith(str(spike_id)))
    assert "ANOMALY" in line and "C9" in line
    assert "blame:" in out.split(line, 1)[1].splitlines()[1]
    # a retrain does not learn what scored as unusual as normal: every alarm, and of the
    # readings under 5% tail probability the excess over what normal data puts there
    import numpy as np

    from kiri.model.calibrate import alarm_rate
    from kiri.model.robust import suspects

    total = n_train + len(test.rows)
    tail = dict(hub.sql("select observation_id, tail_p from scores"))
    p = np.array([tail[i] for i in range(1, total + 1)])
    share = hub.client().call("weights", {"atom": "pulse", "active": True})["weights"][0]["info"]["suspect_share"]
    unusual = {i + 1 for i in np.flatnonzero(suspects(p, alarm_rate(2.0, 30.0), share))}
    assert sum(1 for i, lab in enumerate(test.labels) if lab == "spike" and n_train + 1 + i in unusual) >= 15
    assert len(unusual) < 0.2 * total  # not the whole history
    tid = hub.client().enqueue("train", "pulse", {"steps": 30, "gate_margin": 1.0})["task_id"]
    wait_until(lambda: hub.sql("select status from tasks where id=?", tid)[0][0] == "done", 120, what="retrained")
    result = hub.client().call("task", {"task_id": tid})["task"]["result"]
    assert result["observations"] == total - len(unusual)
    w = hub.client().call("weights", {"atom": "pulse", "active": True})["weights"][0]
    assert w["task_id"] == tid
    out = kiri(hub, "weights", "show", str(w["id"])).stdout
    assert f"left out {len(unusual)}" in out, out
    # and it is calibrated on the stream's recent scores: every score its readings got while
    # watched, in time order, alarms included (not on the new model's held-out windows)
    from kiri.model.calibrate import Calibration

    got = hub.sql("select score, tail_p from scores where weights_id = ? order by observation_id", wid)
    rate = alarm_rate(2.0, 30.0)
    alarms = [sc for sc, tp in got if tp < rate]
    assert len(alarms) >= 15  # the spikes' alarms are part of it
    assert w["info"]["calibrated_on"] == "recent"
    calib = Calibration.fit(np.array([sc for sc, _tp in got]))
    assert Calibration.from_dict(w["info"]["calibration"]) == calib
    # and the calibration's own first pass set them aside: they alarm under it still
    assert (calib.tail_p(np.array(alarms)) < rate).mean() > 0.8
    trainer.stop()
    scorer.stop()


def test_scorer_killed_midway_loses_nothing_and_scores_nothing_twice(hub, agents_factory):
    data = synth.generate("pulse", 1, seed=0)
    _push(hub, data, 0, 1000)
    trainer = agents_factory(hub, "train", "--lease-ttl", "2")
    kiri(hub, "enqueue", "train", "pulse", "--steps", "20")
    wait_until(lambda: hub.sql("select count(*) from weights where status='active'")[0][0] == 1, 120)
    trainer.stop()
    victim = agents_factory(hub, "score", "--lease-ttl", "1")
    big = synth.generate("pulse", 20, seed=2, start=synth.EPOCH + synth.DAY)  # 57,600 observations
    _push(hub, big)
    wait_until(lambda: hub.sql("select count(*) from scores")[0][0] > 3000, 120, what="scoring under way")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    rescuer = agents_factory(hub, "score", "--lease-ttl", "1")
    total = 1000 + len(big.rows)
    wait_until(lambda: hub.sql("select count(*) from scores")[0][0] == total and _all_done(hub), 180,
               what="all observations scored after the kill")
    assert hub.sql("select count(distinct observation_id) from scores")[0][0] == total
    rescuer.stop()


def test_two_hosts_feeding_one_atom_are_each_scored_as_if_alone(hub_factory, agents_factory):
    import base64
    import re
    import urllib.request

    import numpy as np
    from prometheus_client.parser import text_string_to_metric_families

    from kiri.model.codec import values_of
    from kiri.model.score import Scorer
    from kiri.model.weights import load_weights

    hub = hub_factory(http=True)
    _push(hub, synth.generate("pulse", 1, seed=0))
    trainer = agents_factory(hub, "train", "--lease-ttl", "2")
    kiri(hub, "enqueue", "train", "pulse", "--steps", "200")
    wait_until(lambda: hub.sql("select count(*) from weights where status='active'")[0][0] == 1, 120)
    trainer.stop()
    start = synth.EPOCH + synth.DAY
    a = synth.generate("pulse", 0.3, seed=3, start=start)
    b = synth.generate("pulse", 0.3, seed=4, start=start, anomalies={"spike": 1})
    assert any(b.labels)
    # the two hosts' readings arrive interleaved, and host a's second half before its first
    half = len(a.rows) // 2
    order = [("a", i) for i in range(half, len(a.rows))] + [("a", i) for i in range(half)]
    mixed = [x for pair in zip(order, [("b", i) for i in range(len(b.rows))], strict=False) for x in pair]
    series = {"a": a, "b": b}
    c = hub.client()
    for i in range(0, len(mixed), 1000):
        c.call("observe", {"atom": "pulse", "observations": [
            {"values": series[h].rows[j], "time": series[h].times[j], "host": h} for h, j in mixed[i:i + 1000]]})
    scorer = agents_factory(hub, "score", "--lease-ttl", "2")
    n = hub.sql("select count(*) from observations")[0][0]
    wait_until(lambda: hub.sql("select count(*) from scores")[0][0] == n, 120, what="both hosts scored")
    blob = base64.b64decode(c.call("weights", {"atom": "pulse", "active": True, "blob": True})["weights"][0]["blob"])
    sc = Scorer(load_weights(blob))
    for h, s in series.items():
        got = dict(hub.sql("select o.ts, s.score from scores s join observations o on o.id = s.observation_id "
                           "where o.host = ?", h))
        tails = dict(hub.sql("select o.ts, s.tail_p from scores s join observations o on o.id = s.observation_id "
                             "where o.host = ?", h))
        alone = sc.score(sc.encode(values_of(sc.schema, s.rows))).mean.numpy()
        alone_p = sc.tail_p(alone)
        assert len(got) == len(s.rows)
        # the first readings have the same short context either way; every score matches
        np.testing.assert_allclose([got[t] for t in s.times], alone, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([tails[t] for t in s.times], alone_p, rtol=1e-3, atol=1e-9)
    spikes = [t for t, lab in zip(b.times, b.labels, strict=True) if lab]
    assert min(dict(hub.sql("select o.ts, s.tail_p from scores s join observations o on o.id = s.observation_id "
                            "where o.host = 'b'"))[t] for t in spikes) < 1e-3
    import json

    decided = {json.loads(i).get("host") for (i,) in hub.sql("select inputs from decisions")}
    assert decided & {"a", "b"}  # a decision names the host of the reading it was about
    # status and /metrics have one row, one series, per stream
    out = kiri(hub, "status").stdout
    assert re.search(r"^pulse +a +", out, re.M) and re.search(r"^pulse +b +", out, re.M), out
    with urllib.request.urlopen(hub.url + "/metrics", timeout=10) as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    counts = {(x.labels["atom"], x.labels["host"]): x.value for x in fams["kiri_stream_observations"].samples}
    assert counts == {("pulse", ""): 2880, ("pulse", "a"): len(a.rows), ("pulse", "b"): len(b.rows)}
    assert {x.labels["host"] for x in fams["kiri_atom_score"].samples} == {"", "a", "b"}
    scorer.stop()
    c.close()


def test_scores_as_columns_store_what_one_object_each_stores_and_bad_columns_store_nothing(hub):
    import json

    import pytest

    from kiri.protocol import RpcError
    from tests.test_contract import _weights_blob

    c = hub.client()
    pulse = {"cpu": 50.0, "mem": 40.0, "disk": 30.0, "swap": 0.0, "load": 1.0, "net": 0.0}
    c.call("observe", {"atom": "pulse", "observations": [
        {"time": 1000.0 + i, "host": "h1" if i % 2 else "h2", "values": {**pulse, "cpu": 50.0 + i}}
        for i in range(12)]})
    train = c.call("enqueue", {"kind": "train", "atom": "pulse"})["task_id"]
    tl = c.lease(["train"], ttl=600)
    assert tl["task"]["id"] == train
    wid = c.call("publish_weights", {"task_id": train, "lease_token": tl["lease"]["token"], "atom": "pulse",
                                     "blob": _weights_blob("pulse"), "loss": 0.5,
                                     "info": {"threshold": 3.0}})["weights"]["id"]
    # the same work as objects and as columns
    objects = c.call("scoring_work", {"atom": "pulse", "limit": 12, "context": 0})
    cols = c.call("scoring_work", {"atom": "pulse", "limit": 12, "context": 0, "columns": True})
    got = cols["observations"]
    assert [{"id": i, "time": t, "host": h, "values": v} for i, t, h, v in zip(
        got["id"], got["time"], got["host"], got["values"], strict=True)] == objects["observations"]
    ids = got["id"]
    later = c.call("scoring_work", {"atom": "pulse", "limit": 12, "context": 0, "columns": True,
                                    "after_id": ids[4]})
    assert later["observations"]["id"] == ids[5:]

    lease = c.lease(["score"], ttl=600)
    base = {"task_id": lease["task"]["id"], "lease_token": lease["lease"]["token"], "atom": "pulse",
            "weights_id": wid, "threshold": 3.0, "alarm_rate": 0.01}

    def surprise(k: int) -> list[float]:
        return [0.1 * k + j for j in range(6)]

    before = hub.sql("select count(*) from scores")[0][0]
    for bad in (
        {"columns": {"observation_id": ids[:2], "score": [1.0], "width": 6, "surprise": surprise(0) + surprise(1)}},
        {"columns": {"observation_id": ids[:2], "score": [1.0, 2.0], "width": 6, "surprise": surprise(0)}},
        {"columns": {"observation_id": [ids[0], ids[0]], "score": [1.0, 2.0], "width": 6,
                     "surprise": surprise(0) * 2}},
        {"columns": {"observation_id": ids[:1], "score": [-2e6], "width": 6, "surprise": surprise(0)}},
        {"columns": {"observation_id": ids[:1], "score": [1.0], "width": 6, "surprise": [-1.0, *surprise(0)[1:]]}},
        {"columns": {"observation_id": ids[:1], "score": [1.0], "width": 6, "surprise": surprise(0)},
         "scores": [{"observation_id": ids[0], "score": 1.0, "surprise": surprise(0)}]},
        {},
    ):
        with pytest.raises(RpcError) as e:
            c.call("record_scores", {**base, **bad})
        assert e.value.code == -32602, bad  # invalid params, with nothing stored
    # readings that do not exist, or are another atom's, are named
    other = c.call("observe", {"atom": "drift", "observations": [{"time": 1000.0, "values": {
        "added": 1.0, "completed": 1.0, "switched": 0.0, "hour": 3.0, "weekday": 2.0}}]})["first_id"]
    for stranger in (10**9, other):
        with pytest.raises(RpcError, match=f"{stranger}.* are not 'pulse' observations") as e:
            c.call("record_scores", {**base, "columns": {"observation_id": [ids[0], stranger], "score": [1.0, 1.0],
                                                         "width": 6, "surprise": surprise(0) * 2}})
        assert e.value.code == -32602
    assert hub.sql("select count(*) from scores")[0][0] == before

    # a run of ids (read as a range) and two ids far apart (read as a list); tail_p may be null
    for batch in (ids[:5], [ids[6], ids[11]]):
        ks = [ids.index(i) for i in batch]
        body = {**base, "columns": {"observation_id": batch, "score": [1.0 + k for k in ks], "width": 6,
                                    "surprise": [x for k in ks for x in surprise(k)],
                                    "tail_p": [None if k == 1 else 0.001 * k for k in ks]}}
        res = c.call("record_scores", body)
        assert res["stored"] == len(batch) and res["already"] == 0
        again = c.call("record_scores", body)  # a resend after a lost reply stores nothing twice
        assert again["stored"] == 0 and again["already"] == len(batch)
    # a batch partly stored already: only the new ones are, each with its own values
    ks = list(range(7))
    res = c.call("record_scores", {**base, "columns": {
        "observation_id": ids[:7], "score": [1.0 + k for k in ks], "width": 6,
        "surprise": [x for k in ks for x in surprise(k)], "tail_p": [None if k == 1 else 0.001 * k for k in ks]}})
    assert (res["stored"], res["already"]) == (1, 6)
    rows = hub.sql("select observation_id, score, surprise, tail_p, anomalous from scores order by observation_id")
    assert [r[0] for r in rows] == [*ids[:7], ids[11]]
    for oid, score, sur, tail, anomalous in rows:
        k = ids.index(oid)
        assert score == 1.0 + k and json.loads(sur) == surprise(k)
        assert tail == (None if k == 1 else 0.001 * k)
        # below the alarm rate, or (no tail probability) over the threshold
        assert bool(anomalous) == ((0.001 * k < 0.01) if k != 1 else (1.0 + k > 3.0))
    c.close()


def test_scoring_work_gives_each_batch_the_readings_between_its_own_that_arrived_later(hub):
    """A batch (by id) of a stream whose readings arrived out of time order gets as context its
    stream's readings before it in time and those between its own that it does not hold;
    a batch in time order gets only the readings before it."""
    from tests.test_contract import _weights_blob

    c = hub.client()
    pulse = {"cpu": 50.0, "mem": 40.0, "disk": 30.0, "swap": 0.0, "load": 1.0, "net": 0.0}
    # host a's readings at t0..t9 arrive as t5..t9, then t0..t4; host b's in order
    order = [5, 6, 7, 8, 9, 0, 2, 4, 1, 3]
    ids = {}
    for k in order:
        got = c.call("observe", {"atom": "pulse", "observations": [
            {"time": 1000.0 + 30 * k, "host": "a", "values": {**pulse, "cpu": float(k)}}]})
        ids[k] = got["first_id"]
    train = c.call("enqueue", {"kind": "train", "atom": "pulse"})["task_id"]
    tl = c.lease(["train"], ttl=600)
    assert tl["task"]["id"] == train
    c.call("publish_weights", {"task_id": train, "lease_token": tl["lease"]["token"], "atom": "pulse",
                               "blob": _weights_blob("pulse"), "loss": 0.5, "info": {"threshold": 3.0}})

    def work(after: int, limit: int) -> tuple[list[int], list[int]]:
        w = c.call("scoring_work", {"atom": "pulse", "limit": limit, "context": 2, "columns": True,
                                    "after_id": after})
        return w["observations"]["id"], sorted(w["context"]["id"])

    # t5, t6, t7: in time order; context the two readings before t5 (t3, t4)
    assert work(0, 3) == ([ids[5], ids[6], ids[7]], sorted([ids[3], ids[4]]))
    # t0, t2, t4: t1 and t3 lie between them and arrived later; nothing lies before t0
    assert work(ids[9], 3) == ([ids[0], ids[2], ids[4]], sorted([ids[1], ids[3]]))
    c.close()
