"""Start a throwaway hub for a benchmark and wait until it listens."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_hub(*extra: str, root: Path | None = None) -> Iterator[tuple[int, Path]]:
    """A hub on a fresh data folder: this checkout's, or ``root``'s (a folder holding ``kiri/``)."""
    with tempfile.TemporaryDirectory(prefix="kiri-bench-") as tmp:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiri.hub.cli", "serve", "--data-dir", tmp, "--port", str(port), "--no-http",
             "--log-level", "warning", *extra],
            **({"cwd": root, "env": {**os.environ, "PYTHONPATH": str(root)}} if root else {}),  # type: ignore[arg-type]
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("hub did not start") from None
                    time.sleep(0.05)
            yield port, Path(tmp)
        finally:
            proc.terminate()
            proc.wait(30)
