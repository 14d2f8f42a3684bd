"""The hub's HTTP face against real hub processes: every endpoint, bad input, auth, streams.

Read endpoints run against the shared ``watched`` hub (trained atoms, scored anomalies);
cases that must see an untouched database get a fresh hub of their own.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from kiri.hub.store.reader import Reader
from tests.conftest import push, wait_until
from tests.http_client import request, sse_events, stream


def get(hub, path, **kw):
    return request(hub.url, "GET", path, **kw)


def post(hub, path, body=None, **kw):
    return request(hub.url, "POST", path, body=body if body is not None else {}, **kw)


# --- reads on a watched hub ------------------------------------------------------------

def test_status_shows_every_atom_and_agent(watched):
    r = get(watched.hub, "/api/v1/status")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    st = r.json
    atoms = {a["name"]: a for a in st["atoms"]}
    assert set(atoms) == {"pulse", "rhythm", "drift"}
    pulse = atoms["pulse"]["latest"]
    assert len(pulse["tokens"]) == 6 and pulse["tokens"][0].startswith("C")
    # (a score is nats beyond what the model expected: below zero for a reading duller than usual)
    assert math.isfinite(pulse["score"]) and pulse["verdict"] in ("normal", "anomaly")
    assert [b["token"] for b in pulse["blame"]] == pulse["tokens"]
    assert all(0 <= b["probability"] <= 1 for b in pulse["blame"])
    assert atoms["pulse"]["weights"]["version"] >= 1 and atoms["pulse"]["weights"]["threshold"] > 0
    assert atoms["rhythm"]["latest"] is None and atoms["rhythm"]["weights"] is None
    agents = {a["name"]: a for a in st["agents"]}
    assert {"trainer-0", "scorer-0"} <= set(agents)
    for a in agents.values():
        assert a["role"] and a["host"] and a["health"] == "up" and a["last_seen"] > time.time() - 120
        assert isinstance(a["tasks"], list)
    assert st["queue"]["by_state"]["done"] >= 2


def test_history_series_and_one_observation(watched):
    hub = watched.hub
    h = get(hub, "/api/v1/history?atom=pulse&n=5").json
    assert h["atom"] == "pulse" and len(h["observations"]) == 5
    assert all(o["score"] is not None and len(o["blame"]) == 6 for o in h["observations"])
    latest_t = h["observations"][-1]["time"]
    since = get(hub, f"/api/v1/history?atom=pulse&n=1000&since={latest_t - 60}").json["observations"]
    assert since and all(o["time"] >= latest_t - 60 for o in since)

    n_obs = hub.sql("select count(*) from observations where atom = 'pulse'")[0][0]
    newest = dict(hub.sql("select s.observation_id, s.score from scores s where s.atom = 'pulse' and s.weights_id = "
                          "(select max(weights_id) from scores x where x.observation_id = s.observation_id)"))
    small = get(hub, "/api/v1/series?atom=pulse&points=100").json
    assert small["count"] == n_obs and len(small["t"]) <= 100 and small["bucket"] > 0
    assert sum(small["n"]) == n_obs and small["t"] == sorted(small["t"])
    # downsampling keeps the worst score, and its observation, in every bucket
    best = max(newest.values())
    top = max(range(len(small["score"])), key=lambda i: small["score"][i] or -1.0)
    assert small["score"][top] == best and newest[small["id"][top]] == best  # ties: identical windows
    assert sum(small["anomalous"]) >= 1 and set(small["values"]) == {"cpu", "mem", "disk", "swap", "load", "net"}
    # a short range comes at full resolution, each point its own observation
    times = [t for (t,) in hub.sql("select ts from observations where atom = 'pulse' order by ts")]
    t0, t1 = times[100], times[1099]
    window = get(hub, f"/api/v1/series?atom=pulse&since={t0}&until={t1}&points=5000").json
    assert window["count"] == 1000 and len(window["t"]) == 1000 and window["bucket"] is None
    assert window["t"][0] == t0 and window["t"][-1] == t1 and set(window["n"]) == {1}
    assert all(window["score"][i] == newest.get(oid) for i, oid in enumerate(window["id"]))

    spike = get(hub, f"/api/v1/observations/{watched.spike_ids[0]}").json["observation"]
    assert spike["atom"] == "pulse" and spike["anomalous"] is True and spike["verdict"] == "anomaly"
    assert spike["score"] > spike["threshold"]


def test_tasks_agents_weights_decisions_and_atoms(watched):
    hub = watched.hub
    tasks = get(hub, "/api/v1/tasks?kind=train&limit=5").json["tasks"]
    assert tasks and all(t["kind"] == "train" for t in tasks)
    done = get(hub, "/api/v1/tasks?status=done&limit=2").json
    assert len(done["tasks"]) == 2 and done["next_before_id"] == done["tasks"][-1]["id"]
    one = get(hub, f"/api/v1/tasks/{tasks[-1]['id']}").json["task"]
    assert one["id"] == tasks[-1]["id"] and "lease_token" not in one
    agents = get(hub, "/api/v1/agents").json["agents"]
    assert {a["name"] for a in agents} >= {"trainer-0", "scorer-0"}
    weights = get(hub, "/api/v1/weights?atom=pulse").json["weights"]
    assert weights and all(w["atom"] == "pulse" and not w.get("blob") for w in weights)
    assert {"version", "status", "parent_id", "obs_from", "obs_to", "loss", "info"} <= set(weights[0])
    decisions = get(hub, "/api/v1/decisions?limit=3").json["decisions"]
    assert decisions and {"id", "atom", "action", "policy", "probs", "label"} <= set(decisions[0])
    atoms = get(hub, "/api/v1/atoms").json["atoms"]
    assert {a["name"] for a in atoms} >= {"pulse", "rhythm", "drift", "nerve"}


def test_openapi_describes_every_route(watched):
    from kiri.hub.web.app import all_routes

    doc = get(watched.hub, "/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")
    for r in all_routes():
        op = doc["paths"][r.path][r.method.lower()]
        assert op["summary"] and op["responses"]["400"]
    series = doc["paths"]["/api/v1/series"]["get"]["parameters"]
    assert {p["name"] for p in series} == {"atom", "since", "until", "points", "host"}
    enqueue = doc["paths"]["/api/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert enqueue["$ref"].endswith("/Enqueue") and "kind" in doc["components"]["schemas"]["Enqueue"]["required"]


def test_kiri_aliases_keep_their_shapes(watched):
    hub = watched.hub
    st = get(hub, "/api/status").json
    for atom in ("pulse", "drift"):
        a = st[atom]
        assert set(a) >= {"metrics", "tokens", "score", "per_token", "verdict", "params"}
        assert isinstance(a["tokens"], str) and a["tokens"].split() == list(a["per_token"])
        # KIRI's bands on the score, and kiri's own learned verdict beside them
        band = "normal" if a["score"] < 2 else "elevated" if a["score"] < 5 else "anomaly"
        assert a["verdict"] == band and a["kiri_verdict"] in ("normal", "anomaly") and a["threshold"] > 0
    assert set(st["pulse"]["metrics"]) == {"C", "M", "D", "S", "L", "N"}  # KIRI's monitor reads metrics.C
    assert set(st["drift"]["metrics"]) == {"T", "C", "S", "H", "W"}
    assert st["pulse"]["params"] == 27840  # KIRI's pulse atom, parameter for parameter
    assert st["rhythm"]["verdict"] == "not_trained"
    assert st["stats"]["total_observations"] == hub.sql("select count(*) from observations")[0][0]
    hist = get(hub, "/api/history?atom=pulse&n=3").json
    assert isinstance(hist, list) and len(hist) == 3
    assert set(hist[0]) == {"timestamp", "tokens", "score", "verdict", "metrics", "per_token", "kiri_verdict",
                            "threshold"}
    assert hist[0]["metrics"]["C"] >= 0 and hist[0]["verdict"] in ("normal", "elevated", "anomaly")
    latest = get(hub, "/api/collect").json
    assert latest["pulse"]["metrics"] and latest["rhythm"] is None


def test_task_stats_give_the_last_hours_throughput(watched):
    r = get(watched.hub, "/api/v1/tasks/stats")
    assert r.status == 200
    kinds = {row["kind"]: row for row in r.json["last_hour"]}
    assert kinds["train"]["done"] >= 1 and kinds["train"]["mean_s"] > 0 and kinds["train"]["error_rate"] == 0
    assert {(x["kind"], x["status"]) for x in r.json["counts"]} >= {("train", "done")}
    text = get(watched.hub, "/metrics").raw.decode()
    assert 'kiri_tasks_completed_last_hour{kind="train"}' in text
    assert 'kiri_task_duration_p95_seconds{kind="train"}' in text and 'kiri_task_error_ratio{kind="train"} 0.0' in text


def test_metrics_parse_and_carry_the_series(watched):
    from prometheus_client.parser import text_string_to_metric_families

    r = get(watched.hub, "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.raw.decode())}

    def samples(name):
        return [s for s in fams[name].samples]

    tasks = {(s.labels["kind"], s.labels["state"]): s.value for s in samples("kiri_tasks")}
    assert tasks[("train", "done")] >= 2 and tasks[("score", "done")] >= 1
    outcomes = {(s.labels["kind"], s.labels["outcome"]): s.value for s in samples("kiri_task_outcomes")
                if s.name.endswith("_total")}
    assert fams["kiri_task_outcomes"].type == "counter" and outcomes[("train", "done")] >= 2
    assert ("score", "lease_expired") in outcomes
    wait = [s for s in samples("kiri_lease_wait_seconds") if s.name.endswith("_count")]
    assert fams["kiri_lease_wait_seconds"].type == "histogram" and sum(s.value for s in wait) >= 3
    assert sum(s.value for s in samples("kiri_agents_connected")) >= 2
    score = {s.labels["atom"]: s.value for s in samples("kiri_atom_score")}
    assert set(score) == {"pulse", "drift"} and all(math.isfinite(v) for v in score.values())
    assert {s.labels["atom"] for s in samples("kiri_atom_threshold")} == {"pulse", "drift"}
    tail = {s.labels["atom"]: s.value for s in samples("kiri_atom_tail_probability")}
    assert set(tail) == {"pulse", "drift"} and all(0 < p <= 1 for p in tail.values())  # calibrated weights
    verdicts = [s for s in samples("kiri_atom_verdict") if s.labels["atom"] == "pulse" and s.value == 1]
    assert len(verdicts) == 1 and verdicts[0].labels["verdict"] in ("normal", "anomaly")
    assert samples("kiri_db_bytes")[0].value > 0 and "kiri_wal_bytes" in fams
    assert sum(s.value for s in samples("kiri_nerve_decision")) == 1
    assert "kiri_leases" in fams
    # a running training shows its progress
    tid = post(watched.hub, "/api/v1/tasks", {"kind": "train", "atom": "drift", "params": {"steps": 100000}}).json
    try:
        def training():
            text = get(watched.hub, "/metrics").raw.decode()
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            return [s for s in fams["kiri_train_step"].samples if s.labels == {"task_id": str(tid["task_id"]),
                                                                              "atom": "drift"} and s.value > 0]
        wait_until(training, 60, interval=0.2, what="training progress in /metrics")
    finally:
        assert post(watched.hub, f"/api/v1/tasks/{tid['task_id']}/cancel").status == 200
    wait_until(lambda: watched.hub.sql("select status from tasks where id = ?", tid["task_id"])[0][0] == "cancelled",
               60, what="the long training cancelled")


def test_training_progress_streams_as_ndjson_and_sse(watched):
    hub = watched.hub
    # long enough (~8 s) for the trainer's heartbeats (every 2 s) to carry progress
    r = post(hub, "/api/v1/tasks", {"kind": "train", "atom": "drift", "params": {"steps": 5000}})
    assert r.status == 201
    tid = r.json["task_id"]
    sse_lines: list[bytes] = []
    t = threading.Thread(target=lambda: sse_lines.extend(
        stream(hub.url, f"/api/v1/tasks/{tid}/progress", headers={"Accept": "text/event-stream"})))
    t.start()
    lines = [json.loads(x) for x in stream(hub.url, f"/api/v1/tasks/{tid}/progress") if x]
    t.join(60)
    assert lines[0]["type"] == "state" and lines[0]["task"]["id"] == tid
    steps = [x["progress"]["step"] for x in lines if x["type"] == "progress"]
    assert steps and steps == sorted(steps) and all(0 < s <= 5000 for s in steps)
    assert lines[-1]["type"] == "end" and lines[-1]["task"]["status"] == "done"
    assert lines[-1]["task"]["result"]["version"] >= 2
    events = list(sse_events(iter(sse_lines)))
    assert events[0][0] == "state" and events[-1][0] == "end" and events[-1][1]["task"]["status"] == "done"
    # a finished task's stream says so at once
    again = [json.loads(x) for x in stream(hub.url, f"/api/v1/tasks/{tid}/progress?format=ndjson") if x]
    assert [x["type"] for x in again] == ["state", "end"]


def test_kiri_train_alias_streams_its_lines(watched):
    # one line per step, as KIRI sent them, however fast the run (300 steps, KIRI's default,
    # take well under a second, less than one heartbeat)
    lines = [json.loads(x) for x in stream(watched.hub.url, "/api/train?atom=drift&steps=300", method="POST") if x]
    assert "info" in lines[0]
    steps = [x for x in lines if "step" in x]
    assert all(set(x) == {"step", "loss", "lr", "total"} and x["total"] == 300 for x in steps)
    assert [x["step"] for x in steps] == list(range(1, 301))
    done = lines[-1]
    assert done["done"] is True and done["final_loss"] > 0
    # and it says whether the new weights were taken (the quality gate may refuse them)
    assert done["accepted"] == (done["weights_status"] == "active") and done["reason"]
    lines = [json.loads(x) for x in stream(watched.hub.url, "/api/train?atom=drift&steps=300&every=100",
                                           method="POST") if x]
    assert [x["step"] for x in lines if "step" in x] == [100, 200, 300]


def test_kiri_train_alias_refuses_at_once_when_no_trainer_is_connected(hub_factory):
    hub = hub_factory(http=True)
    r = post(hub, "/api/train?atom=pulse&steps=10")
    assert r.status == 503 and "no trainer agent is connected" in r.json["error"]["message"]
    assert hub.sql("select count(*) from tasks")[0][0] == 0  # nothing was queued


def test_weights_activate_rolls_back_and_rescoring_follows(watched):
    hub = watched.hub
    versions = {w["version"]: w for w in get(hub, "/api/v1/weights?atom=drift").json["weights"]}
    assert len(versions) >= 2, "the streaming tests trained drift again"
    active = next(v for v, w in versions.items() if w["status"] == "active")
    older = min(versions)
    r = post(hub, f"/api/v1/weights/drift/{older}/activate")
    assert r.status == 200 and r.json == {"atom": "drift", "version": older, "status": "active"}
    now = {w["version"]: w["status"] for w in get(hub, "/api/v1/weights?atom=drift").json["weights"]}
    assert now[older] == "active" and (active == older or now[active] == "inactive")
    wait_until(lambda: hub.sql("select count(*) from scores s join weights w on w.id = s.weights_id "
                               "where w.atom = 'drift' and w.version = ?", older)[0][0] > 0, 60,
               what="drift scored again")


def test_retrain_and_feedback_write_through_the_protocol(watched):
    hub = watched.hub
    r = post(hub, "/api/v1/atoms/pulse/retrain", {"steps": 50})
    assert r.status in (200, 201) and r.json["atom"] == "pulse"
    row = hub.sql("select kind, atom, params from tasks where id = ?", r.json["task_id"])[0]
    assert row[:2] == ("train", "pulse") and json.loads(row[2])["steps"] == 50
    dup = post(hub, "/api/v1/atoms/pulse/retrain")
    if hub.sql("select status from tasks where id = ?", r.json["task_id"])[0][0] in ("queued", "leased"):
        assert dup.status == 200 and dup.json["deduplicated"] and dup.json["task_id"] == r.json["task_id"]
    d = hub.sql("select max(id) from decisions")[0][0]
    fb = post(hub, "/api/v1/feedback", {"decision_id": d, "verdict": "dismiss"})
    assert fb.status == 201 and fb.json["label_id"] > 0
    assert hub.sql("select verdict from labels where id = ?", fb.json["label_id"])[0][0] == "dismiss"
    kiri = post(hub, "/api/feedback", {"action": "suppress"})
    assert kiri.status == 200 and kiri.json["ok"] and kiri.json["decision_id"] == d
    assert hub.sql("select action from labels where id = ?", kiri.json["label_id"])[0][0] == "suppress"


# --- a fresh hub of its own -------------------------------------------------------------

@pytest.fixture
def web_hub(hub_factory):
    # raw readings kept forever: these tests post readings at any time, and retention's own
    # deletes (tested in test_retention.py) would make "a GET changed nothing" untestable
    return hub_factory("--lease-ttl", "2", "--tick", "0.05", "--keep-raw", "forever", http=True)


def _db_digest(path) -> dict[str, str]:
    """A digest per table, but of the rollups, which the hub keeps up to date in the background
    (a mismatch then names the table that changed)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {}
        for (name,) in con.execute("select name from sqlite_master where type='table' "
                                   "and name not in ('rollups', 'rollup_dirty') order by name"):
            h = hashlib.sha256()
            for row in con.execute(f'select * from "{name}" order by rowid'):
                h.update(repr(row).encode())
            out[name] = h.hexdigest()[:16]
        return out
    finally:
        con.close()


def _settled(hub) -> None:
    """The pushing client's goodbye is written in the background (its connection closed):
    wait for it before a digest, or a slow machine sees it land between two."""
    wait_until(lambda: hub.sql("select count(*) from agents where connected")[0][0] == 0, 20,
               what="the pushing client recorded as gone")


def test_observations_and_tasks_through_http(web_hub, agents_factory):
    hub = web_hub
    r = post(hub, "/api/v1/observations", {"atom": "drift", "values": {"added": 3, "completed": 1, "switched": 2},
                                           "time": 1_700_000_000.0, "host": "laptop"})
    assert r.status == 201 and r.json["stored"] == 1
    r = post(hub, "/api/v1/observations", {"atom": "drift", "observations": [
        {"values": {"added": 1, "completed": 0, "switched": 0}},
        {"values": {"added": 2, "completed": 2, "switched": 1}}]})
    assert r.status == 201 and r.json["stored"] == 2
    hist = get(hub, "/api/v1/history?atom=drift&n=10").json["observations"]
    assert [o["values"]["added"] for o in hist] == [3, 1, 2] and hist[0]["host"] == "laptop"

    t = post(hub, "/api/v1/tasks", {"kind": "echo", "params": {"x": 1}, "max_attempts": 1})
    assert t.status == 201
    tid = t.json["task_id"]
    assert get(hub, f"/api/v1/tasks/{tid}").json["task"]["status"] == "queued"
    assert post(hub, f"/api/v1/tasks/{tid}/cancel").json["status"] == "cancelled"
    assert post(hub, f"/api/v1/tasks/{tid}/retry").json["status"] == "queued"
    dead = post(hub, "/api/v1/tasks", {"kind": "fail", "max_attempts": 1}).json["task_id"]
    agents_factory(hub, "echo,fail")
    wait_until(lambda: get(hub, f"/api/v1/tasks/{dead}").json["task"]["status"] == "dead", 30, what="dead")
    wait_until(lambda: get(hub, f"/api/v1/tasks/{tid}").json["task"]["status"] == "done", 30, what="echo done")
    assert post(hub, f"/api/v1/tasks/{dead}/retry").json["status"] == "queued"


def test_kinds_are_paused_limited_and_listed_through_http(web_hub):
    hub = web_hub
    post(hub, "/api/v1/tasks", {"kind": "resize", "deadline": 60.0})
    r = post(hub, "/api/v1/kinds/resize", {"paused": True, "concurrency": 2})
    assert r.status == 200 and r.json["changed"] and r.json["kind"]["queued"] == 1
    r = post(hub, "/api/v1/kinds/resize", {"concurrency": None})  # left out stays, null clears
    assert (r.json["kind"]["paused"], r.json["kind"]["concurrency"]) == (True, None)
    listed = {k["kind"]: k for k in get(hub, "/api/v1/kinds").json["kinds"]}
    assert listed["resize"]["paused"] is True and listed["resize"]["queued"] == 1
    post(hub, "/api/v1/kinds/echo", {"concurrency": 3})
    text = get(hub, "/metrics").raw.decode()
    assert 'kiri_kind_paused{kind="resize"} 1.0' in text and 'kiri_kind_concurrency_limit{kind="echo"} 3.0' in text


def test_events_feed_pushes_changes(web_hub):
    hub = web_hub
    got: list[tuple[str, object]] = []

    def listen() -> None:
        for ev in sse_events(stream(hub.url, "/api/v1/events", timeout=20)):
            got.append(ev)
            if ev[0] == "changed" and "observations" in ev[1]["topics"]:
                return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    wait_until(lambda: got and got[0][0] == "hello", 10, what="the feed to open")
    post(hub, "/api/v1/observations", {"atom": "drift", "values": {"added": 1, "completed": 1, "switched": 1}})
    t.join(15)
    assert got[-1][0] == "changed" and {"observations", "tasks"} <= set(got[-1][1]["topics"])


BAD = [
    ("GET", "/api/v1/history", None, {}, 400, "atom"),
    ("GET", "/api/v1/history?atom=nosuch", None, {}, 400, "nosuch"),
    ("GET", "/api/v1/history?atom=pulse&n=0", None, {}, 400, "n:"),
    ("GET", "/api/v1/history?atom=pulse&n=abc", None, {}, 400, "n:"),
    ("GET", "/api/v1/history?atom=pulse&n=1&n=2", None, {}, 400, "more than once"),
    ("GET", "/api/v1/history?atom=pulse&atm=x", None, {}, 400, "unknown query parameter 'atm'"),
    ("GET", "/api/v1/series?atom=pulse&since=5&until=1", None, {}, 400, "until"),
    ("GET", "/api/v1/series?atom=pulse&points=1", None, {}, 400, "points"),
    ("GET", "/api/v1/series?atom=pulse&since=nan", None, {}, 400, "since"),
    ("GET", "/api/v1/tasks?status=nope", None, {}, 400, "status"),
    ("POST", "/api/v1/kinds/resize", b'{"concurrency": 0}', {"Content-Type": "application/json"}, 400, "concurrency"),
    ("POST", "/api/v1/kinds/resize", b'{"paused": "yes"}', {"Content-Type": "application/json"}, 400, "paused"),
    ("POST", "/api/v1/kinds/resize", b'{"limit": 3}', {"Content-Type": "application/json"}, 400, "limit"),
    ("POST", "/api/v1/kinds/bad%20kind", b'{"paused": true}', {"Content-Type": "application/json"}, 400, "kind"),
    ("GET", "/api/v1/tasks?limit=100000", None, {}, 400, "limit"),
    ("GET", "/api/v1/tasks/abc", None, {}, 400, "integer"),
    ("GET", "/api/v1/tasks/0", None, {}, 400, "positive"),
    ("GET", "/api/v1/tasks/99999999999999999999999", None, {}, 400, "positive"),
    ("GET", "/api/v1/tasks/424242", None, {}, 404, "424242"),
    ("GET", "/api/v1/tasks/424242/progress", None, {}, 404, "424242"),
    ("GET", "/api/v1/tasks/1/progress?format=xml", None, {}, 400, "format"),
    ("GET", "/api/v1/observations/424242", None, {}, 404, "424242"),
    ("GET", "/api/v1/nope", None, {}, 404, "/api/v1/nope"),
    ("DELETE", "/api/v1/tasks", None, {}, 405, "DELETE"),
    ("POST", "/api/v1/tasks", b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    ("POST", "/api/v1/tasks", b"[1, 2]", {"Content-Type": "application/json"}, 400, "JSON object"),
    ("POST", "/api/v1/tasks", b"{}", {"Content-Type": "application/json"}, 400, "kind"),
    ("POST", "/api/v1/tasks", b'{"kind": "x", "priority": "high"}', {"Content-Type": "application/json"}, 400,
     "priority"),
    ("POST", "/api/v1/tasks", b"kind=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "JSON"),
    ("POST", "/api/v1/observations", b'{"atom": "pulse", "values": {"cpu": "high", "mem": 1, "disk": 1, "swap": 1, '
     b'"load": 1, "net": 1}}', {"Content-Type": "application/json"}, 400, "cpu"),
    ("POST", "/api/v1/observations", b'{"atom": "drift", "values": {}, "observations": []}',
     {"Content-Type": "application/json"}, 400, "either"),
    ("POST", "/api/v1/observations", b'{"atom": "drift", "observations": [], "import_id": "abcdefgh12"}',
     {"Content-Type": "application/json"}, 400, "import"),
    ("POST", "/api/v1/feedback", b'{"decision_id": 424242, "verdict": "approve"}', {"Content-Type": "application/json"},
     404, "424242"),
    ("POST", "/api/v1/feedback", b'{"decision_id": 1, "verdict": "maybe"}', {"Content-Type": "application/json"}, 400,
     "verdict"),
    ("POST", "/api/v1/weights/pulse/9/activate", b"", {}, 404, "version 9"),
    ("POST", "/api/v1/weights/nosuch/1/activate", b"", {}, 404, "nosuch"),
    ("POST", "/api/v1/weights/pulse/abc/activate", b"", {}, 400, "version"),
    ("POST", "/api/v1/atoms/nosuch/retrain", b"", {}, 404, "nosuch"),
    ("POST", "/api/v1/atoms/pulse/retrain", b'{"steps": 0}', {"Content-Type": "application/json"}, 400, "steps"),
    ("POST", "/api/v1/atoms/pulse/retrain", b'{"stepz": 5}', {"Content-Type": "application/json"}, 400, "stepz"),
    ("POST", "/api/train?atom=nosuch", b"", {}, 404, "nosuch"),
    ("POST", "/api/feedback", b'{"action": "maybe"}', {"Content-Type": "application/json"}, 400, "action"),
    ("POST", "/api/feedback", b'{"action": "ok"}', {"Content-Type": "application/json"}, 404, "no decision"),
    ("POST", "/api/v1/tasks", b'{"kind": "echo"}', {"Content-Type": "application/json",
                                                   "Origin": "http://evil.example"}, 403, "cross-site"),
    ("GET", "/api/v1/status", None, {"Host": "evil.example"}, 403, "evil.example"),
    ("GET", "/static/../../hub.log", None, {}, 404, ""),
    ("POST", "/api/v1/tasks", b'{"kind": "echo", "params": {"x": "' + b"a" * (17 << 20) + b'"}}',
     {"Content-Type": "application/json"}, 413, "limit"),
]


def test_bad_input_gets_a_clear_error_and_changes_nothing(web_hub):
    hub = web_hub
    push(hub, "drift", [{"added": 1, "completed": 1, "switched": 1, "hour": 9, "weekday": 2}], [1_700_000_000.0])
    _settled(hub)  # nothing else moves without agents
    before = _db_digest(hub.db_path)
    for method, path, raw, headers, status, words in BAD:
        r = request(hub.url, method, path, raw=raw, headers=headers)
        assert r.status == status, (method, path, r.status, r.raw[:300])
        if r.headers.get("content-type", "").startswith("application/json"):
            err = r.error
            assert words.lower() in err["message"].lower(), (path, err)
        else:
            assert status == 404  # a path the static handler refused
    assert get(hub, "/healthz").json["status"] == "ok"
    assert _db_digest(hub.db_path) == before


def test_gets_never_write(web_hub):
    hub = web_hub
    push(hub, "drift", [{"added": i, "completed": 1, "switched": 1, "hour": 9, "weekday": 2} for i in range(5)],
         [1_700_000_000.0 + i for i in range(5)])
    _settled(hub)
    before = _db_digest(hub.db_path)
    for path in ("/api/v1/status", "/api/v1/atoms", "/api/v1/history?atom=drift", "/api/v1/series?atom=drift",
                 "/api/v1/observations/1", "/api/v1/tasks", "/api/v1/tasks/1", "/api/v1/agents", "/api/v1/weights",
                 "/api/v1/decisions", "/api/v1/openapi.json", "/api/status", "/api/history?atom=drift",
                 "/api/collect", "/metrics", "/healthz", "/"):
        assert get(hub, path).status == 200, path
    assert _db_digest(hub.db_path) == before
    # and the readers could not write even if a handler tried
    reader = Reader(f"sqlite:///{hub.db_path}")
    try:
        with pytest.raises(sa.exc.OperationalError, match="readonly"):
            reader.query(lambda c: c.exec_driver_sql("delete from observations"))
    finally:
        reader.close()
    assert hub.sql("select count(*) from observations")[0][0] == 5


def test_token_rule(hub_factory):
    hub = hub_factory(token="t0ken", http=True)
    for path in ("/api/v1/status", "/api/status", "/metrics", "/api/v1/openapi.json"):
        r = get(hub, path)
        assert r.status == 401 and r.error["code"] == "unauthorized", path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert get(hub, path, token="wrong").status == 401
        assert get(hub, path, token="t0ken").status == 200
    assert post(hub, "/api/v1/tasks", {"kind": "echo"}).status == 401
    assert hub.sql("select count(*) from tasks")[0][0] == 0
    assert post(hub, "/api/v1/tasks", {"kind": "echo"}, token="t0ken").status == 201
    # the page itself and the health check carry no secrets and need no token
    assert get(hub, "/").status == 200 and b"kiri" in get(hub, "/").raw
    assert get(hub, "/static/app.js").status == 200 and get(hub, "/healthz").json["status"] == "ok"
    # with a token the hub may be reached under any name
    assert get(hub, "/api/v1/status", token="t0ken", headers={"Host": "kiri.lan:7745"}).status == 200


def test_no_http_and_port_conflicts(hub_factory):
    from tests.conftest import HubProc, free_port

    hub = hub_factory(http=True)
    assert get(hub, "/healthz").status == 200
    clash = HubProc(hub.data_dir.parent / "clash", free_port(), "--http-port", str(hub.http_port))
    clash.data_dir.mkdir(parents=True)
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "kiri.hub.cli", "serve", "--data-dir", str(clash.data_dir),
                          "--port", str(clash.port), "--http-port", str(hub.http_port)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--no-http" in out.stderr and "Traceback" not in out.stderr


def test_random_requests_never_crash_the_http_face_or_half_write(web_hub):
    """Property-based: any path, query and body get a JSON answer below 500, and an error writes nothing."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from kiri.hub.web.app import all_routes
    from tests.test_fuzz import json_values

    hub = web_hub
    push(hub, "drift", [{"added": 1, "completed": 1, "switched": 1, "hour": 9, "weekday": 2}], [1_700_000_000.0])
    _settled(hub)
    # streams that last until a task ends, or forever, are tested on their own above
    streaming = ("/api/train", "/api/collect", "/api/v1/events", "/api/v1/tasks/{id}/progress")
    templates = sorted({(r.method, r.path) for r in all_routes() if r.path not in streaming})
    segment = st.sampled_from(["1", "0", "-1", "pulse", "nosuch", "99999999999999999999", "%00", "..", "x" * 300])
    query_keys = st.sampled_from(["atom", "n", "since", "until", "points", "limit", "status", "kind", "format",
                                  "before_id", "x"]) | st.text(max_size=6)
    query_vals = (st.sampled_from(["pulse", "drift", "1", "0", "-5", "nan", "inf", "1e400", "", "[]"])
                  | st.text(max_size=8))

    def fill(path: str, data) -> str:
        while "{" in path:
            a, _, rest = path.partition("{")
            path = a + data.draw(segment) + rest.partition("}")[2]
        return path

    from urllib.parse import quote, urlencode

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data) -> None:
        method, template = data.draw(st.sampled_from(templates))
        path = quote(fill(template, data), safe="/%")
        q = data.draw(st.lists(st.tuples(query_keys, query_vals), max_size=4))
        if q:
            path += "?" + urlencode(q)
        body = data.draw(st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=5) | json_values)
        raw = None if method == "GET" or body is None else json.dumps(body).encode()
        before = _db_digest(hub.db_path)
        r = request(hub.url, method, path, raw=raw, headers={"Content-Type": "application/json"} if raw else {},
                    timeout=30)
        assert r.status < 500, (method, path, body, r.raw[:300])
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            r.error  # noqa: B018 - asserts the error's shape
        if r.status >= 400 or method == "GET":
            assert _db_digest(hub.db_path) == before, (method, path, body)

    statuses: dict[int, int] = {}
    one()
    assert statuses.get(200, 0) + statuses.get(201, 0) > 10 and statuses.get(400, 0) > 10, statuses
    assert get(hub, "/healthz").json["status"] == "ok"
    assert "Traceback" not in hub.log()
