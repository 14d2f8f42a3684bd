"""The owner's CLI, run as a real process against a real hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import free_port


def kiri(hub, *args: str, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KIRI_HUB": f"127.0.0.1:{hub.port}" if hub else "127.0.0.1:1"}
    out = subprocess.run([sys.executable, "-m", "kiri.cli", *args], capture_output=True, text=True,
                         timeout=60, env=env, input=stdin)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def test_enqueue_list_show_cancel_retry_stats(hub):
    tid = kiri(hub, "enqueue", "train", "pulse", "--steps", "500", "-p", "lr=0.01", "-p", "note=hi").stdout.strip()
    assert tid == "1"
    data = json.loads(kiri(hub, "--json", "task", tid).stdout)["task"]
    assert data["kind"] == "train" and data["atom"] == "pulse"
    assert data["params"] == {"steps": 500, "lr": 0.01, "note": "hi"}
    assert "train" in kiri(hub, "tasks").stdout
    shown = kiri(hub, "task", tid).stdout
    assert "task 1: train pulse  [queued]" in shown and "attempts     0/5" in shown
    assert kiri(hub, "enqueue", "train", "pulse", "--dedupe-key", "k").stdout.strip() == "2"
    assert "deduplicated" in kiri(hub, "enqueue", "train", "pulse", "--dedupe-key", "k").stdout
    assert "cancelled" in kiri(hub, "cancel", tid).stdout
    assert "queued" in kiri(hub, "retry", tid).stdout
    listed = json.loads(kiri(hub, "--json", "tasks", "--status", "queued", "--kind", "train").stdout)
    assert {t["id"] for t in listed["tasks"]} == {1, 2}
    budget = kiri(hub, "enqueue", "train", "drift", "--alarms-per-week", "0.5").stdout.strip()
    assert json.loads(kiri(hub, "--json", "task", budget).stdout)["task"]["params"] == {"alarms_per_week": 0.5}
    stats = kiri(hub, "stats").stdout
    assert "QUEUED" in stats and "train" in stats
    assert json.loads(kiri(hub, "--json", "stats").stdout)["tasks"]


def test_cli_errors_are_clear_and_change_nothing(hub):
    out = kiri(hub, "task", "abc", ok=False)
    assert out.returncode == 2 and "not a valid integer" in out.stderr
    out = kiri(hub, "task", "12345", ok=False)
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = kiri(hub, "enqueue", "bad kind!", ok=False)
    assert out.returncode == 1 and "kind" in out.stderr
    out = kiri(hub, "enqueue", "echo", "-p", "novalue", ok=False)
    assert out.returncode == 2 and "key=value" in out.stderr
    out = kiri(hub, "enqueue", "echo", "--priority", "99999", ok=False)
    assert out.returncode == 2
    out = kiri(hub, "cancel", "0", ok=False)
    assert out.returncode == 2
    for bad in ("0", "-1", "abc", "nan"):
        out = kiri(hub, "enqueue", "train", "pulse", "--alarms-per-week", bad, ok=False)
        assert out.returncode == 2 and "--alarms-per-week" in out.stderr
    assert hub.sql("select count(*) from tasks")[0][0] == 0


def test_cli_without_a_hub_says_so(tmp_path):
    out = kiri(None, "stats", ok=False)
    assert out.returncode == 1
    assert "cannot reach the kiri hub" in out.stderr and "kiri-hub serve" in out.stderr


def test_cli_bad_hub_address():
    out = subprocess.run([sys.executable, "-m", "kiri.cli", "--hub", "localhost:notaport", "stats"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a number" in out.stderr
    from kiri.config import parse_addresses

    assert parse_addresses("a:1, b:2,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]
    for bad, says in (("a:1,,b:2", "an empty entry"), ("a:1,", "an empty entry"), ("a:1,b:0", "1-65535")):
        with pytest.raises(ValueError, match=says):
            parse_addresses(bad)


def test_the_cli_tries_each_hub_of_its_list_in_turn(hub):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    out = subprocess.run([sys.executable, "-m", "kiri.cli", "--hub", f"{dead},127.0.0.1:{hub.port}", "enqueue", "echo"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    out = kiri(None, "--hub", f"{dead},{dead}", "stats", ok=False)
    assert out.returncode == 1 and f"cannot reach the kiri hub at {dead}, {dead}" in out.stderr


def test_synth_is_byte_reproducible_and_labels_anomalies():
    a = kiri(None, "synth", "pulse", "--days", "1", "--seed", "4", "--anomaly", "spike=2").stdout
    b = kiri(None, "synth", "pulse", "--days", "1", "--seed", "4", "--anomaly", "spike=2").stdout
    assert a == b and len(a.splitlines()) == 2880
    rows = [json.loads(line) for line in a.splitlines()]
    assert sum(1 for r in rows if r.get("label") == "spike") == 20
    assert set(rows[0]) >= {"time", "cpu", "mem", "disk", "swap", "load", "net"}
    assert kiri(None, "synth", "pulse", "--days", "1", "--seed", "5").stdout != a
    bad = kiri(None, "synth", "pulse", "--anomaly", "meteor", ok=False)
    assert bad.returncode == 1 and "unknown anomaly class" in bad.stderr
    bad = kiri(None, "synth", "pulse", "--anomaly", "spike=x", ok=False)
    assert bad.returncode == 2


def test_retry_dead_requeues_every_dead_task_of_a_kind_in_one_go(hub):
    c = hub.client()

    def dead(kind: str, key: str | None = None) -> int:
        tid = c.enqueue(kind, dedupe_key=key)["task_id"] if key else c.enqueue(kind)["task_id"]
        got = c.lease([kind], ttl=30)
        assert got["task"]["id"] == tid
        c.call("fail", {"task_id": tid, "lease_token": got["lease"]["token"], "error": "bug", "retry": False})
        return tid

    resize = [dead("resize") for _ in range(3)]
    keyed = dead("resize", "nightly")
    pending = c.enqueue("resize", dedupe_key="nightly")["task_id"]  # the same work, queued anew
    other = dead("other")
    out = kiri(hub, "retry", "--dead", "--kind", "resize")
    assert "queued 3 dead resize task(s) again" in out.stdout and "1 stay dead" in out.stdout
    status = dict(hub.sql("select id, status from tasks"))
    assert [status[t] for t in resize] == ["queued"] * 3 and status[keyed] == "dead"
    assert status[pending] == "queued" and status[other] == "dead"
    assert hub.sql("select attempts from tasks where id = ?", resize[0])[0][0] == 0  # fresh attempts
    res = json.loads(kiri(hub, "--json", "retry", "--dead").stdout)
    assert res["retried"] == [other] and res["skipped"] == [keyed]
    for args, says in ((["retry"], "TASK_ID or --dead"), (["retry", "1", "--dead"], "not both"),
                       (["retry", "1", "--kind", "x"], "--kind goes with --dead")):
        out = kiri(hub, *args, ok=False)
        assert out.returncode == 2 and says in out.stderr
    c.close()


def test_stats_show_the_last_hours_throughput_durations_and_error_rate(hub):
    c = hub.client()
    for i in range(3):
        tid = c.enqueue("resize", params={"i": i})["task_id"]
        got = c.lease(["resize"], ttl=30)
        c.call("ack", {"task_id": tid, "lease_token": got["lease"]["token"], "result": {}})
    tid = c.enqueue("resize")["task_id"]
    got = c.lease(["resize"], ttl=30)
    c.call("fail", {"task_id": tid, "lease_token": got["lease"]["token"], "error": "bug", "retry": False})
    c.enqueue("resize")  # still queued: not in the hour's figures
    (row,) = json.loads(kiri(hub, "--json", "stats").stdout)["throughput"]
    assert row["kind"] == "resize" and (row["done"], row["dead"], row["cancelled"]) == (3, 1, 0)
    assert row["error_rate"] == 0.25 and row["per_minute"] == 3 / 60
    assert 0 <= row["mean_s"] <= row["p95_s"] < 60
    out = kiri(hub, "stats").stdout
    assert "last hour:" in out and "ERROR RATE" in out and "25.0%" in out
    c.close()


def test_one_config_file_for_hub_and_agents_with_flags_and_env_overriding_it(tmp_path):
    import socket

    from kiri.agents.client import HubClient
    from tests.conftest import free_port, wait_until

    def agent(*args: str, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("KIRI_TELEGRAM", "KIRI_HUB"))}
        return subprocess.run([sys.executable, "-m", "kiri.agents.cli", *args], capture_output=True, text=True,
                              timeout=60, env={**clean, **env})

    cfg = tmp_path / "k.toml"
    cfg.write_text('[agent]\nrole = "scorer"\nhub = "127.0.0.1:1"\nkinds = "nosuch"\n'
                   '[alerts]\ntelegram-token = "1:x"\ntelegram_chat_id = "-100"\n')
    out = agent("--config", str(cfg))  # the file's sinks are whole, so it gets as far as the unknown kind
    assert out.returncode == 2 and "no handler for task kind(s) nosuch" in out.stderr, out.stderr
    out = agent("--kinds", "other", KIRI_CONFIG=str(cfg))  # a flag overrides the file
    assert "no handler for task kind(s) other" in out.stderr
    for body, says in (('[agent]\nrole = "scorer"\ncolour = 3\n', "[agent] unknown key 'colour'; keys are"),
                       ('[agent]\nlease-ttl = "soon"\n', "[agent] lease-ttl: 'soon' is not a valid"),
                       ('[agents]\nrole = 1\n', "unknown table [agents]"), ("[agent\n", "not valid TOML")):
        cfg.write_text(body)
        out = agent("--config", str(cfg))
        assert out.returncode == 2 and f"{cfg}: " in out.stderr and says in out.stderr, out.stderr
    # the hub finds kiri.toml in its data dir
    port = free_port()
    (tmp_path / "kiri.toml").write_text(f'[hub]\nport = {port}\nno-http = true\nkeep-raw = "60d"\n')
    env = {**os.environ, "KIRI_DATA_DIR": str(tmp_path)}
    hub = subprocess.Popen([sys.executable, "-m", "kiri.hub.cli", "serve"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, 60, what="the hub on the config file's port")
        with HubClient(("127.0.0.1", port)) as c:
            assert c.call("status")["retention"]["raw_seconds"] == 60 * 86400
        assert (tmp_path / "kiri.db").exists()
    finally:
        hub.terminate()
        hub.wait(30)


def test_atoms_lists_presets_and_validates_custom_files(tmp_path):
    out = kiri(None, "atoms").stdout
    assert "pulse: vocab 43" in out and "rhythm: vocab 30" in out and "retrain" in out
    good = tmp_path / "a.toml"
    good.write_text('name = "tank"\nfields = [{letter = "L", name = "level", low = 0, high = 10, buckets = 4}]\n')
    assert "tank: vocab 5" in kiri(None, "atoms", "--file", str(good)).stdout
    bad = tmp_path / "b.toml"
    bad.write_text('name = "tank"\nfields = [{letter = "L", name = "level", low = 10, high = 0, buckets = 4}]\n')
    out = kiri(None, "atoms", "--file", str(bad), ok=False)
    assert out.returncode == 1 and "must be below high" in out.stderr


def test_pause_resume_limit_and_deadlines_of_a_kind(hub):
    tid = kiri(hub, "enqueue", "resize", "--deadline", "90s").stdout.strip()
    assert json.loads(kiri(hub, "--json", "task", tid).stdout)["task"]["deadline"] == 90.0
    assert "resize: PAUSED, no limit, no deadline; 1 queued, 0 leased" in kiri(hub, "pause", "resize").stdout
    assert "(unchanged)" in kiri(hub, "pause", "resize").stdout
    c = hub.client()
    assert c.lease(["resize"]) == {"task": None}
    out = kiri(hub, "kind", "resize", "--concurrency", "2", "--deadline", "5m").stdout
    assert "at most 2 at once, deadline 300 s" in out
    listed = kiri(hub, "kinds").stdout
    assert "resize" in listed and "paused" in listed and "300 s" in listed
    assert "running" in kiri(hub, "resume", "resize").stdout
    assert c.lease(["resize"])["task"]["id"] == int(tid)
    out = kiri(hub, "kind", "resize", "--concurrency", "none", "--deadline", "none").stdout
    assert "no limit, no deadline; 0 queued, 1 leased" in out
    for args in (["--concurrency", "0"], ["--concurrency", "x"], ["--deadline", "-1s"], ["--deadline", "8d"]):
        bad = kiri(hub, "kind", "resize", *args, ok=False)
        assert bad.returncode == 2 and args[0] in bad.stderr
    bad = kiri(hub, "enqueue", "resize", "--deadline", "0", ok=False)
    assert bad.returncode == 2 and "--deadline" in bad.stderr
    row = json.loads(kiri(hub, "--json", "kinds").stdout)["kinds"][0]
    assert (row["paused"], row["concurrency"], row["deadline"]) == (False, None, None)
