"""The hub's read-worker processes live and die with the hub, however it dies."""

from __future__ import annotations

import signal

import psutil
import pytest

from tests.conftest import wait_until


def _workers(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_read_workers_do_not_outlive_their_hub(hub_factory, sig):
    hub = hub_factory(http=True)
    assert hub.proc is not None
    workers = wait_until(lambda: len(_workers(hub.proc.pid)) >= 2 and _workers(hub.proc.pid),
                         what="the hub's read workers to start")
    hub.proc.send_signal(sig)
    hub.proc.wait(15)

    def gone() -> bool:
        return not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

    wait_until(gone, timeout=30, what="read workers to exit after their hub died")
