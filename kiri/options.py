"""Checks for command-line options that every kiri command shares."""

from __future__ import annotations

import math

import click


def finite(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    """A click callback refusing NaN and infinity (``FloatRange`` lets NaN through: every
    comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(value: str, least: float, most: float = 366 * 86400) -> float:
    """A duration like ``30s``, ``5m``, ``1h``, ``7d`` (a bare number is seconds; ``now`` is 0
    where 0 is allowed), between ``least`` and ``most`` seconds."""
    text = value.strip().lower()
    if least == 0 and text == "now":
        return 0.0
    unit = UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        out = float(number) * (unit or 1)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a duration like 30s, 5m, 1h or 1d") from None
    if not least <= out <= most:
        low = "0" if least == 0 else "1 second" if least == 1 else f"{least:g} seconds"
        high = "a year" if most == 366 * 86400 else f"{most / 86400:g} days"
        raise click.BadParameter(f"{value!r}: must be between {low} and {high}")
    return out
