"""Human-readable rendering for the CLI: aligned tables and relative times."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def ago(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "-"
    d = (now or time.time()) - t
    future = d < 0
    d = abs(d)
    if d < 1:
        text = "now"
        return text
    if d < 90:
        text = f"{d:.0f}s"
    elif d < 5400:
        text = f"{d / 60:.0f}m"
    elif d < 172800:
        text = f"{d / 3600:.0f}h"
    else:
        text = f"{d / 86400:.0f}d"
    return f"in {text}" if future else f"{text} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def clip(text: str | None, n: int = 60) -> str:
    if not text:
        return "-"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= n else first[: n - 1] + "…"
