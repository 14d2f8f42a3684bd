"""What a weights version's ``info`` must hold to be scored, checked where weights enter the hub.

A scorer builds its codec, calibration and routine from the info stored with the weights
(``Scorer.__init__``). A malformed part would be stored without a word and then fail every
score task of the atom, so the hub refuses it up front, on publish and on import, with the
part and the reason. This module reads the parts with the same parsers the scorer uses and
needs no torch, which the hub never loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kiri.model.calibrate import Calibration
from kiri.model.codec import Codec
from kiri.model.routine import Routine
from kiri.model.schema import AtomSchema, resolve_context


def check_info(schema: AtomSchema, info: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first part of ``info`` a scorer could not use."""
    checks = (
        ("codec", lambda v: Codec.from_dict(schema, v)),
        ("calibration", Calibration.from_dict),
        ("routine", Routine.from_dict),
        # as record_scores takes them: a threshold from 0 to 1e6 nats, a rate above 0 and at most 0.5
        ("threshold", lambda v: _number(v, 0.0, 1e6, low_ok=True)),
        ("alarm_rate", lambda v: _number(v, 0.0, 0.5, low_ok=False)),
        ("context", lambda v: _context(schema, v)),
    )
    for key, check in checks:
        if info.get(key) is None:
            continue
        try:
            check(info[key])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"weights info {key!r} cannot be used: {e}") from None


def _number(v: Any, lo: float, hi: float, low_ok: bool) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and (lo <= v if low_ok else lo < v) and v <= hi
    if not ok:
        raise ValueError(f"expected a number from {lo:g} ({'included' if low_ok else 'excluded'}) to {hi:g}, "
                         f"got {v!r}")


def _context(schema: AtomSchema, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected a whole number of observations, got {v!r}")
    resolve_context(schema, v)
