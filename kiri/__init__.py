"""kiri: a local-first anomaly watcher.

The hub (``kiri.hub``) owns the database and serves JSON-RPC over TCP; agents
(``kiri.agents``) lease work from it; atoms (``kiri.model``) are the tiny
transformers that do the watching. This package holds what both sides share.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
