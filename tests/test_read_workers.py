"""The hub's read-worker processes live and die with the hub, however it dies."""

from __future__ import annotations

import signal

import psutil
import pytest

from tests.conftest import wait_until


def _workers(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _read_workers(pid: int) -> list[psutil.Process]:
    """The hub's read worker processes alone (not multiprocessing's resource tracker)."""
    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_read_workers_do_not_outlive_their_hub(hub_factory, sig):
    hub = hub_factory("--read-processes", "2", http=True)  # (not the default on two cores)
    assert hub.proc is not None
    workers = wait_until(lambda: len(_workers(hub.proc.pid)) >= 2 and _workers(hub.proc.pid),
                         what="the hub's read workers to start")
    hub.proc.send_signal(sig)
    hub.proc.wait(15)

    def gone() -> bool:
        return not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

    wait_until(gone, timeout=30, what="read workers to exit after their hub died")


@pytest.mark.parametrize(("cores", "quota", "workers"), [
    (1, None, 0), (2, None, 0), (3, None, 2), (16, None, 2),
    (16, "max 100000", 2), (16, "200000 100000", 0), (16, "250000 100000", 2), (2, "800000 100000", 0),
    (16, "garbage", 2), (16, "", 2)])
def test_reads_run_in_worker_processes_only_where_there_are_cores_to_spare(monkeypatch, tmp_path, cores, quota,
                                                                           workers):
    # on two cores a worker is one more process wanting a core the queue needs (bench/year.py:
    # enqueue p99 4.3-5.0 ms with two workers, 2.4-2.8 ms with threads); a container's CPU
    # quota counts as well as the cores it may run on
    from kiri.hub.store import reader

    monkeypatch.setattr(reader.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    cpu_max = tmp_path / "cpu.max"
    if quota is not None:
        cpu_max.write_text(quota + "\n")
    monkeypatch.setattr(reader, "CGROUP_CPU_MAX", cpu_max)
    assert reader.default_processes() == workers


def test_a_hub_without_the_flag_starts_the_machines_default_and_serves_reads(hub_factory):
    from kiri.hub.store.reader import default_processes
    from tests.http_client import request

    hub = hub_factory(http=True)
    # the hub starts its workers, where it has any, as its HTTP face opens
    wait_until(lambda: len(_read_workers(hub.proc.pid)) >= default_processes(), 60, what="the read workers to start")
    for path in ("/api/v1/status", "/api/v1/series?atom=pulse&points=100"):
        assert request(hub.url, "GET", path).status == 200
    assert len(_read_workers(hub.proc.pid)) == default_processes()
