"""What each agent role serves, and the handlers that do it, assembled explicitly.

``kiri-agent --role scorer`` reads three hops deep: the CLI asks ``handlers(sinks)`` for the
kinds' functions, hands them to ``Agent``, and the agent calls ``handlers[kind](ctx)``.
Nothing registers itself at import time; the alert sinks are passed to the scorer here.
"""

from __future__ import annotations

import importlib
import logging
import threading

from kiri.agents import collector, scorer, trainer
from kiri.agents.alerts import AlertConfig
from kiri.agents.handlers import BUILTIN, Handler

ROLE_KINDS: dict[str, list[str]] = {
    "trainer": ["train"],
    "collector": ["collect"],
    "scorer": ["score"],  # scoring ends with the nerve's decision
}


def handlers(sinks: AlertConfig) -> dict[str, Handler]:
    """Every task kind an agent of this installation can serve, by kind."""
    return {**BUILTIN, "train": trainer.train, "collect": collector.collect, "score": scorer.handler(sinks)}


# the heavy modules (torch) each kind's handler imports on its first task
HEAVY: dict[str, str] = {"train": "kiri.model.train", "score": "kiri.model.score"}


def warm_up(kinds: list[str]) -> threading.Thread | None:
    """Import the served kinds' heavy modules in the background, so the first task does not
    wait seconds for torch (a task that comes sooner waits on the same import)."""
    modules = sorted({HEAVY[k] for k in kinds if k in HEAVY})
    if not modules:
        return None

    def load() -> None:
        for m in modules:
            try:
                importlib.import_module(m)
            except Exception:  # the task that needs it will report the error
                logging.getLogger("kiri.agent").exception("could not import %s ahead of its first task", m)

    t = threading.Thread(target=load, name="kiri-warm-up", daemon=True)
    t.start()
    return t
