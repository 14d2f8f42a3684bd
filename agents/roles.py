"""What each agent role serves, and the handlers that do it, assembled explicitly.

``kiri-agent --role scorer`` reads three hops deep: the CLI asks ``handlers(sinks)`` for the
kinds' functions, hands them to ``Agent``, and the agent calls ``handlers[kind](ctx)``.
Nothing registers itself at import time; the alert sinks are passed to the scorer here.
"""

from __future__ import annotations

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
