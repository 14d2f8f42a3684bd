"""Asking for an atom to be trained again: one rule, whoever asks.

The nerve's retrain decision, the owner's feedback (the nerve itself), the dashboard's
button and KIRI's ``POST /api/train`` all come here, so every request for the same atom
joins one unfinished training task (deduplicated by ``retrain:<atom>``) at one priority,
above routine scoring and collection.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.protocol import params as P

PRIORITY = 10


def dedupe_key(atom: str) -> str:
    return f"retrain:{atom}"


def request(c: sa.Connection, atom: str, reason: str, env: Q.Env,
            params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Enqueue (or join) the atom's training task; ``deduplicated`` says which."""
    res = Q.enqueue(c, P.Enqueue(kind="train", atom=atom, dedupe_key=dedupe_key(atom), priority=PRIORITY,
                                 params={**(params or {}), "reason": reason}), env)
    return {"atom": atom, **res}


def retrain(c: sa.Connection, p: P.Retrain, env: Q.Env) -> dict[str, Any]:
    """The ``retrain`` protocol method."""
    return request(c, p.atom, p.reason, env, p.params)
