"""kiri: a local-first anomaly watcher.

The hub (``kiri.hub``) owns the database and serves JSON-RPC over TCP; agents
(``kiri.agents``) lease work from it; atoms (``kiri.model``) are the tiny
transformers that do the watching. This package holds what both sides share.
"""

from typing import Any

__version__ = "0.1.0"
PROTOCOL_VERSION = 1


def __getattr__(name: str) -> Any:
    """``kiri.Client`` and ``kiri.TaskFailed``, imported on first use (``import kiri`` stays light)."""
    if name in ("Client", "TaskFailed"):
        from kiri import client

        return getattr(client, name)
    raise AttributeError(f"module 'kiri' has no attribute {name!r}")
