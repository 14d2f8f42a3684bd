"""docker-compose.yml and the Dockerfile stay valid (checked statically: no engine here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed; `make test` installs Debian's docker-compose")
    return exe


def test_compose_file_is_valid_and_runs_hub_and_each_role():
    out = subprocess.run([_compose(), "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "KIRI_TOKEN": "test-secret"})
    assert out.returncode == 0, out.stderr
    for service in ("hub:", "trainer:", "collector:", "scorer:"):
        assert service in out.stdout
    assert "kiri-data" in out.stdout and "--role" in out.stdout
    assert "7745:7745" in out.stdout and "/healthz" in out.stdout  # the HTTP face, and health from it


def test_compose_refuses_to_run_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "KIRI_TOKEN"}
    out = subprocess.run([_compose(), "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode != 0 and "KIRI_TOKEN" in out.stderr


def test_dockerfile_installs_the_package_and_what_it_copies_exists():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert "-c constraints.txt" in text and 'CMD ["kiri-hub", "serve"' in text


def test_the_ha_profile_runs_postgresql_two_hubs_and_agents_that_know_both():
    out = subprocess.run([_compose(), "-f", str(ROOT / "docker-compose.yml"), "--profile", "ha", "config"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KIRI_TOKEN": "test-secret", "KIRI_PG_PASSWORD": "pg-secret"})
    assert out.returncode == 0, out.stderr
    for service in ("postgres:", "hub-a:", "hub-b:", "ha-trainer:", "ha-scorer:"):
        assert service in out.stdout
    assert out.stdout.count("postgresql://kiri:pg-secret@postgres/kiri") == 2  # both hubs, one database
    assert "hub-a:7746,hub-b:7746" in out.stdout and "hub-b:7746,hub-a:7746" in out.stdout
    assert "service_healthy" in out.stdout and "pg_isready" in out.stdout
    assert "[postgresql]" in (ROOT / "Dockerfile").read_text()  # the image carries the driver
