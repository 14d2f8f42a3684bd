"""The learning period: a host's stream is watched by weights that have seen that host.

Weights trained somewhere else (the demo's synthetic week, another machine) do not know
what is normal here, and would cry at the first real readings. So a stream (atom, host) is
*learning* while the atom's active weights were trained on fewer than ``LEARN_MIN`` of that
host's observations (the trainer records how many per host, in the weights' ``hosts``).
While a stream learns, its readings are scored and shown, but never anomalous and never
alerted on; once it has ``LEARN_MIN`` observations, the hub asks for training on that
host's own data (one deduplicated retrain), and the new weights end the learning period.

Observations without a host, and weights from before hosts were recorded, are not held
back: there is no host to learn, and an existing installation keeps alarming as before.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.store.schema import observations
from kiri.hub.watch import retrain

LEARN_MIN = 200  # a host's observations its weights must have seen (pulse at 30 s: 100 minutes)


def seen(info: dict[str, Any], host: str | None) -> int | None:
    """How many of ``host``'s observations the weights were trained on (None: not recorded)."""
    hosts = info.get("hosts")
    if host is None or not isinstance(hosts, dict):
        return None
    n = hosts.get(host, 0)
    return int(n) if isinstance(n, int | float) else 0


def is_learning(info: dict[str, Any], host: str | None) -> bool:
    n = seen(info, host)
    return n is not None and n < LEARN_MIN


def state(info: dict[str, Any] | None, host: str | None) -> dict[str, Any] | None:
    """What the dashboard, the API and ``kiri status`` show: None when the stream is not learning."""
    if info is None or not is_learning(info, host):
        return None
    return {"host": host, "seen": seen(info, host), "need": LEARN_MIN}


def have(c: sa.Connection, atom: str, host: str) -> int:
    """The host's observations of the atom, counted up to LEARN_MIN (enough to know)."""
    o = observations.c
    first = sa.select(o.id).where(o.atom == atom, o.host == host).limit(LEARN_MIN).subquery()
    return int(c.execute(sa.select(sa.func.count()).select_from(first)).scalar() or 0)


def learn(c: sa.Connection, atom: str, host: str, env: Q.Env) -> dict[str, Any] | None:
    """Ask for training on the host's own data once it has enough (deduplicated)."""
    n = have(c, atom, host)
    if n < LEARN_MIN:
        return None
    # the gate compares against weights that never saw this host: accept unless worse than nothing
    return retrain.request(c, atom, f"learning {host}: {n} observations of its own", env,
                           params={"host": host, "gate_margin": 1.0})
