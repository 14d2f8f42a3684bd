"""The learning period: a host's stream is watched by weights that have seen that host.

Weights trained somewhere else (the demo's synthetic week, another machine) do not know
what is normal here, and would cry at the first real readings. So a stream (atom, host) is
*learning* while the atom's active weights were trained on fewer than ``LEARN_MIN`` of that
host's observations and on less than a day of them (the trainer records, per host, how
many and over what span, in the weights' ``hosts``). While a stream learns, its readings
are scored and shown, but never anomalous and never alerted on; once the host has that
much data, the hub asks for training on the host's own data (one deduplicated retrain),
and the new weights end the learning period.

Observations without a host, and weights from before hosts were recorded, are not held
back: there is no host to learn, and an existing installation keeps alarming as before.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.store.schema import streams
from kiri.hub.watch import retrain

LEARN_MIN = 200  # a host's observations its weights must have seen (pulse at 30 s: 100 minutes) ...
LEARN_SPAN = 86400.0  # ... or a day of them, for slow streams (hourly: 24)


def _learned(n: int, span: float) -> bool:
    return n >= LEARN_MIN or (n >= 2 and span >= LEARN_SPAN)


def seen(info: dict[str, Any], host: str | None) -> tuple[int, float] | None:
    """How many of ``host``'s observations the weights were trained on, over how many
    seconds (None: the weights do not record hosts, or the reading has none)."""
    hosts = info.get("hosts")
    if host is None or not isinstance(hosts, dict):
        return None
    h = hosts.get(host)
    if isinstance(h, dict):
        return int(h.get("n", 0)), float(h.get("last", 0.0)) - float(h.get("first", 0.0))
    return (int(h), 0.0) if isinstance(h, int | float) else (0, 0.0)


def is_learning(info: dict[str, Any], host: str | None) -> bool:
    got = seen(info, host)
    return got is not None and not _learned(*got)


def have(c: sa.Connection, atom: str, host: str) -> tuple[int, float]:
    """The host's observations of the atom so far: how many, over how many seconds (its stream)."""
    st = streams.c
    row = c.execute(sa.select(st.n, st.first_ts, st.last_ts).where(st.atom == atom, st.host == host)).first()
    return (0, 0.0) if row is None else (int(row.n), float(row.last_ts - row.first_ts))


def state(c: sa.Connection, atom: str, info: dict[str, Any] | None, host: str | None) -> dict[str, Any] | None:
    """What the dashboard, the API and ``kiri status`` show: None when the stream is not learning."""
    if info is None or not is_learning(info, host):
        return None
    assert host is not None
    n, span = have(c, atom, host)
    return {"host": host, "have": n, "need": LEARN_MIN, "hours": round(span / 3600, 1),
            "need_hours": LEARN_SPAN / 3600, "training": _learned(n, span)}


def learn(c: sa.Connection, atom: str, host: str, env: Q.Env) -> dict[str, Any] | None:
    """Ask for training on the host's own data once it has enough (deduplicated)."""
    n, span = have(c, atom, host)
    if not _learned(n, span):
        return None
    # the gate compares against weights that never saw this host: accept unless worse than nothing
    return retrain.request(c, atom, f"learning {host}: {n} observations of its own", env,
                           params={"host": host, "gate_margin": 1.0})
