"""How a score is explained: its verdict, and which tokens the model blames.

``verdict`` is the one word for a scored observation ("anomaly" / "normal", "unscored"
before any weights scored it), used by the API, the dashboard, ``/metrics`` and the CLI.

One shape everywhere (history, the dashboard, alerts, the API): one entry per token in the
atom's field order, with the token, its surprise in nats and the probability the model
gave it. Readers that want the worst first sort by surprise themselves (``worst_first``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def verdict(anomalous: bool | None) -> str:
    """The word for a score's finding; ``None`` means not scored yet."""
    if anomalous is None:
        return "unscored"
    return "anomaly" if anomalous else "normal"


def blame(tokens: Sequence[str], surprise: Sequence[float]) -> list[dict[str, Any]]:
    """Per-token blame in field order; extra surprise values (or tokens) are ignored."""
    return [{"token": t, "surprise": float(s), "probability": math.exp(-float(s))}
            for t, s in zip(tokens, surprise, strict=False)]


def worst_first(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda b: -b["surprise"])
