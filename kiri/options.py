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
