"""Running kiri as services and watching it with the tools people already run: the systemd
units verify, the compose monitoring profile is valid, and a real Prometheus scraping a live
hub answers every query of the Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _tool(name: str, package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed; `make test` installs Debian's {package}")
    return exe


def test_systemd_units_verify_with_this_installation(tmp_path):
    bin_dir = Path(sys.executable).parent  # the venv kiri is installed in, in place of /opt/kiri/venv/bin
    assert (bin_dir / "kiri-hub").exists() and (bin_dir / "kiri-agent").exists()
    units = []
    for src, name in [("kiri-hub.service", "kiri-hub.service")] + [
            ("kiri-agent@.service", f"kiri-agent@{role}.service") for role in ("trainer", "scorer", "collector")]:
        text = (DEPLOY / "systemd" / src).read_text()
        assert "/opt/kiri/venv/bin/" in text
        (tmp_path / name).write_text(text.replace("/opt/kiri/venv/bin/", f"{bin_dir}/"))
        units.append(str(tmp_path / name))
    out = subprocess.run([_tool("systemd-analyze", "systemd"), "verify", "--man=no", *units],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr.strip() == "" and out.stdout.strip() == "", out.stderr + out.stdout
    # each role's unit runs that role (the template's %i)
    assert "--role %i" in (DEPLOY / "systemd" / "kiri-agent@.service").read_text()
    env = (DEPLOY / "systemd" / "kiri.env.example").read_text()
    assert "KIRI_TOKEN=" in env and "KIRI_LISTEN" in env and "KIRI_HUB" in env


def test_compose_monitoring_profile_provisions_prometheus_and_the_dashboard():
    out = subprocess.run([_tool("docker-compose", "docker-compose"), "-f", str(ROOT / "docker-compose.yml"),
                          "--profile", "monitoring", "config"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KIRI_TOKEN": "test-secret"})
    assert out.returncode == 0, out.stderr
    assert "prom/prometheus" in out.stdout and "grafana/grafana" in out.stdout
    for mounted in ("deploy/prometheus/prometheus.yml", "deploy/grafana/provisioning", "deploy/grafana/dashboards"):
        assert mounted in out.stdout and (ROOT / mounted).exists()
    provider = (DEPLOY / "grafana/provisioning/dashboards/kiri.yml").read_text()
    assert "/var/lib/grafana/dashboards" in provider  # where compose mounts the dashboard JSON


def _queries() -> list[str]:
    """Every PromQL expression of the dashboard, its variables set to "all"."""
    dash = json.loads((DEPLOY / "grafana/dashboards/kiri.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    out = []
    for e in exprs:
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", e)  # Grafana's variable helper: the series it reads
        series = m.group(1) if m else e
        out.append(series.replace("$atom", ".*").replace("$host", ".*"))
    return out


def test_a_real_prometheus_scraping_a_live_hub_answers_every_dashboard_query(watched, tmp_path):
    prometheus = _tool("prometheus", "prometheus")
    hub = watched.hub
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: kiri\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{hub.http_port}']\n")
    # the shipped config is valid too (its token file is the compose container's: give it one here)
    shipped = (DEPLOY / "prometheus/prometheus.yml").read_text()
    token = tmp_path / "kiri-token"
    token.write_text("secret")
    (tmp_path / "shipped.yml").write_text(shipped.replace("/prometheus/kiri-token", str(token)))
    check = subprocess.run([_tool("promtool", "prometheus"), "check", "config", str(tmp_path / "shipped.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": str(time.time())})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def ready() -> bool:
        try:
            return bool(query('up{job="kiri"} == 1'))
        except OSError:
            return False

    try:
        wait_until(ready, 60, 0.2, what="Prometheus scraping the hub")
        queries = _queries()
        assert len(queries) >= 12

        deadline = time.monotonic() + 60
        while (silent := [q for q in queries if not query(q)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not silent, f"dashboard queries with no data: {silent}"
        # per atom and host (Prometheus keeps no empty label: readings without a host have none)
        streams = {(s["metric"]["atom"], s["metric"].get("host", "")) for s in query("kiri_atom_score")}
        assert streams == {("pulse", "synthetic"), ("drift", "")}
        thr = {s["metric"]["atom"] for s in query("kiri_atom_threshold")}
        assert thr == {"pulse", "drift"}  # the line the score panel draws
    finally:
        proc.terminate()
        proc.wait(20)
