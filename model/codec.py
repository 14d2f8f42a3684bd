"""How raw values become bucket tokens for one weights version: edges learned from the data.

An atom's schema fixes each field's vocabulary (its bucket count) and declares a range;
equal-width buckets over that range are the *fixed* codec, which is what weights made
before codecs existed use. A declared range is a guess, though: a stream that lives in 3% of
it gets two buckets of resolution, and one that leaves it is clamped into an edge bucket.

A *fitted* codec learns each field's edges from the values a model is trained on:

- the two outer buckets are kept for values **beyond what training saw** (below its minimum
  or above its maximum by a margin), so a level never seen before is a token the model has
  never seen, and scores as such;
- the inner buckets split the seen values half at their **quantiles** (resolution where the
  data lives, whatever its scale or tails) and half at **equal widths** over the seen
  range (so its sparse reaches, where a history's own anomalies sit, are not lumped in
  with the highest normal readings); a field with fewer distinct values than inner buckets
  (counts, flags, states) gets one bucket per value.

Beyond the seen range one token covers everything, so the codec also keeps each fitted field's
**tail scales** (``FieldTail``): how fast its values thin out towards each end. A score reads
them to tell a reading just past the highest seen (a heavy tail's next extreme) from one far
past it (``score.Scorer``): the token alone cannot.

Retraining fits the edges again from the raw values the hub keeps, so a stream whose level
drifts is re-encoded rather than clamped. The codec travels inside the weights' metadata, so
a score is always computed with exactly the edges its model was trained with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri.model.schema import AtomSchema, ObservationError

if TYPE_CHECKING:
    import torch

FIT_MIN_BUCKETS = 5  # a field with fewer buckets keeps its declared edges (flags, tiny enums)
FIT_MIN_VALUES = 10
MARGIN = 0.1  # beyond-range buckets start this fraction of the seen span outside it
# A fitted field's tail scale is read between these quantiles of its values (mirrored at the
# bottom): near the top, where extrapolation starts (a Gaussian's tail thins there, a heavy
# one's does not), once there are enough values for a 99th percentile; else lower down.
TAIL_LEVELS = (0.95, 0.99)
TAIL_LEVELS_FEW = (0.8, 0.95)
TAIL_MIN_VALUES = 500  # values needed for TAIL_LEVELS (five above the 99th percentile)


def is_discrete(col: np.ndarray, buckets: int) -> bool:
    """Whether a fitted field gets one bucket per seen value (counts, states): fewer distinct
    values than its inner buckets (``fit_edges``)."""
    return len(np.unique(col)) <= buckets - 2


def tail_space(col: np.ndarray) -> tuple[np.ndarray, bool]:
    """The values on the scale their tails are measured on: log when all are positive
    (latencies, sizes and rates have tails that are exponential there), else as they are."""
    col = np.asarray(col, dtype=np.float64)
    return (np.log(col), True) if len(col) and col.min() > 0 else (col, False)


def tail_scale(y: np.ndarray, levels: tuple[float, float]) -> float:
    """Scale of an exponential upper tail of ``y`` read between two of its quantiles: the
    distance over which the share of values above falls by e (0 where they coincide)."""
    lo, hi = np.quantile(y, levels)
    return float(hi - lo) / math.log((1.0 - levels[0]) / (1.0 - levels[1]))


@dataclass(frozen=True)
class FieldTail:
    """How a fitted field's values thin out past its seen extremes: the extremes and the tail
    scale on each side (``tail_scale``; None where it cannot be measured), on the log scale
    or the plain one (``tail_space``)."""

    log: bool
    seen: tuple[float, float]  # lowest and highest value trained on
    low: float | None
    high: float | None

    @classmethod
    def fit(cls, col: np.ndarray) -> FieldTail | None:
        col = np.asarray(col, dtype=np.float64)
        col = col[np.isfinite(col)]
        y, log = tail_space(col)
        if len(y) < FIT_MIN_VALUES:
            return None
        levels = TAIL_LEVELS if len(y) >= TAIL_MIN_VALUES else TAIL_LEVELS_FEW
        up, down = tail_scale(y, levels), tail_scale(-y, levels)
        if not up > 0 and not down > 0:
            return None
        return cls(log, (float(col.min()), float(col.max())), down if down > 0 else None, up if up > 0 else None)

    def beyond(self, values: np.ndarray, low_edge: float, high_edge: float) -> np.ndarray:
        """[N] for values past the beyond-range edges, how many tail scales past the seen
        extreme on that side they lie (inf on a side without a scale, or below zero on the
        log scale); 0 for the others."""
        v = np.asarray(values, dtype=np.float64)
        out = np.zeros(len(v))
        for past, extreme, scale, sign in ((v >= high_edge, self.seen[1], self.high, 1.0),
                                           (v < low_edge, self.seen[0], self.low, -1.0)):
            if not past.any():
                continue
            if scale is None:
                out[past] = math.inf
                continue
            x = v[past]
            if self.log:
                with np.errstate(divide="ignore", invalid="ignore"):
                    d = sign * (np.log(np.where(x > 0, x, np.nan)) - math.log(extreme))
            else:
                d = sign * (x - extreme)
            out[past] = np.where(np.isfinite(d), np.maximum(d, 0.0) / scale, math.inf)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"log": self.log, "seen": list(self.seen), "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: Any, name: str) -> FieldTail | None:
        if d is None:
            return None
        bad = f"codec tail for field {name!r}: expected seen [low, high] and positive scales (or null)"
        if not isinstance(d, Mapping):
            raise ValueError(bad)
        seen, scales = d.get("seen"), [d.get("low"), d.get("high")]
        numbers = [*(seen if isinstance(seen, list) else []), *(x for x in scales if x is not None)]
        if (not isinstance(seen, list) or len(seen) != 2
                or any(isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) for x in numbers)
                or any(x is not None and not x > 0 for x in scales) or seen[1] < seen[0]
                or (d.get("log") and seen[0] <= 0)):
            raise ValueError(bad)
        return cls(bool(d.get("log", False)), (float(seen[0]), float(seen[1])),
                   *(None if x is None else float(x) for x in scales))


@dataclass(frozen=True)
class Codec:
    """Per field, the sorted inner edges: bucket = number of edges <= value."""

    schema: AtomSchema
    edges: tuple[tuple[float, ...], ...]
    fitted: tuple[bool, ...]
    tails: tuple[FieldTail | None, ...] | None = None  # codecs fitted before tails: None

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def fixed(cls, schema: AtomSchema) -> Codec:
        """The schema's own equal-width buckets over [low, high], edge buckets clamping."""
        edges = []
        for f in schema.fields:
            step = (f.high - f.low) / f.buckets
            edges.append(tuple(f.low + step * i for i in range(1, f.buckets)))
        return cls(schema, tuple(edges), (False,) * schema.width)

    @classmethod
    def fit(cls, schema: AtomSchema, values: np.ndarray, horizon: int = 0) -> Codec:
        """Edges learned from ``values`` [N, F] (see the module doc); fields too small keep fixed edges.

        ``horizon``: readings these edges must serve before the next fit. A field that is
        trending gets its beyond-range edge on that side pushed out by the distance the
        trend covers in twice that time, so steady growth (a disk filling) is not a new
        level every day.
        """
        values = np.asarray(values, dtype=np.float64).reshape(-1, schema.width)
        base = cls.fixed(schema)
        edges, fitted = list(base.edges), [False] * schema.width
        tails: list[FieldTail | None] = [None] * schema.width
        for i, f in enumerate(schema.fields):
            col = values[:, i]
            if f.buckets < FIT_MIN_BUCKETS or len(col) < FIT_MIN_VALUES:
                continue
            edges[i] = fit_edges(col, f.buckets, (f.high - f.low) / f.buckets, trend_reach(col, horizon))
            fitted[i] = True
            if not is_discrete(col, f.buckets):  # a count past any seen is a new value, not a tail's next step
                tails[i] = FieldTail.fit(col)
        return cls(schema, tuple(edges), tuple(fitted), tuple(tails))

    # --- use ----------------------------------------------------------------------------------

    def buckets(self, values: np.ndarray) -> np.ndarray:
        """[N, F] bucket numbers (0-based within each field) of raw values [N, F]."""
        values = np.asarray(values, dtype=np.float64).reshape(-1, self.schema.width)
        out = np.empty(values.shape, dtype=np.int64)
        for i, e in enumerate(self.edges):
            out[:, i] = np.searchsorted(np.asarray(e, dtype=np.float64), values[:, i], side="right")
        return out

    def encode(self, values: np.ndarray) -> torch.Tensor:
        """[N, F] token ids of raw values [N, F] (floats, already checked finite)."""
        ids = self.buckets(values) + np.asarray(self.schema.offsets(), dtype=np.int64)
        import torch  # here: the hub reads codecs (``kiri.model.info``) and never loads torch

        return torch.from_numpy(ids)

    def encode_one(self, obs: Mapping[str, Any]) -> list[int]:
        return self.encode(values_of(self.schema, [obs]))[0].tolist()

    def beyond(self, values: np.ndarray) -> np.ndarray:
        """[N, F] for values in a beyond-range bucket, how many tail scales past the seen
        extreme they lie (``FieldTail.beyond``); 0 for the others, inf where the field has no
        tail scale on that side (older codecs, fixed fields) and the token is all there is."""
        values = np.asarray(values, dtype=np.float64).reshape(-1, self.schema.width)
        out = np.zeros(values.shape)
        for i, e in enumerate(self.edges):
            tail = self.tails[i] if self.tails is not None else None
            if tail is not None:
                out[:, i] = tail.beyond(values[:, i], e[0], e[-1])
            else:
                out[:, i] = np.where((values[:, i] < e[0]) | (values[:, i] >= e[-1]), math.inf, 0.0)
        return out

    def ranges(self, field: int) -> list[tuple[float, float]]:
        """Each bucket's value range of one field (outer ones open: -inf / inf)."""
        e = [-math.inf, *self.edges[field], math.inf]
        return list(itertools.pairwise(e))

    # --- storage -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        tails = self.tails if self.tails is not None else (None,) * self.schema.width
        fields: dict[str, Any] = {}
        for f, e, fit, tail in zip(self.schema.fields, self.edges, self.fitted, tails, strict=True):
            fields[f.name] = {"edges": list(e), "fitted": fit}
            if tail is not None:
                fields[f.name]["tail"] = tail.to_dict()
        return {"kind": "fitted/1", "fields": fields}

    @classmethod
    def from_dict(cls, schema: AtomSchema, d: Mapping[str, Any] | None) -> Codec:
        """The codec stored with weights, or the fixed one for weights that carry none."""
        if not d:
            return cls.fixed(schema)
        if d.get("kind") != "fitted/1" or not isinstance(d.get("fields"), Mapping):
            raise ValueError(f"unknown codec {d.get('kind')!r}")
        edges, fitted, tails = [], [], []
        for f in schema.fields:
            spec = d["fields"].get(f.name)
            if not isinstance(spec, Mapping) or not isinstance(spec.get("edges"), list):
                raise ValueError(f"codec has no edges for field {f.name!r}")
            e = [float(x) for x in spec["edges"]]
            if len(e) > f.buckets - 1 or any(not math.isfinite(x) for x in e) or any(
                    b <= a for a, b in itertools.pairwise(e)):
                raise ValueError(f"codec edges for field {f.name!r}: expected at most {f.buckets - 1} "
                                 "increasing numbers")
            edges.append(tuple(e))
            fitted.append(bool(spec.get("fitted", True)))
            tails.append(FieldTail.from_dict(spec.get("tail"), f.name))
        return cls(schema, tuple(edges), tuple(fitted), tuple(tails) if any(tails) else None)


def trend_reach(col: np.ndarray, horizon: int) -> tuple[float, float]:
    """How far (down, up) a steady trend in ``col`` (time-ordered) carries it in 2·horizon readings.

    The slope is the change between the medians of the first and last fifths, over the
    readings between them: robust to spikes, and zero for a stream that only wanders.
    """
    n = len(col)
    if horizon <= 0 or n < 50:
        return 0.0, 0.0
    fifth = n // 5
    slope = (float(np.median(col[-fifth:])) - float(np.median(col[:fifth]))) / (n - fifth)
    reach = abs(slope) * 2 * horizon
    return (reach, 0.0) if slope < 0 else (0.0, reach)


def fit_edges(col: np.ndarray, buckets: int, declared: float = 0.0,
              reach: tuple[float, float] = (0.0, 0.0)) -> tuple[float, ...]:
    """Inner edges for one field: [beyond-min | quantile buckets of the seen values | beyond-max].

    ``declared`` is the schema's own bucket width: the resolution its author said matters.
    Fitted buckets may be finer, but not by more than 4x, and "beyond what was seen" starts
    at least half a declared bucket out, so a field that only wobbles (a disk at 45.2%
    versus 45.6%) is not cut into noise whose every drift reads as a new level.
    """
    col = np.sort(col[np.isfinite(col)])
    lo, hi = float(col[0]), float(col[-1])
    inner = buckets - 2
    uniq = np.unique(col)
    if is_discrete(col, buckets):  # one bucket per seen value, cut halfway between them
        cuts = list((uniq[:-1] + uniq[1:]) / 2)
        gaps = np.diff(uniq)
        span = float(gaps.min()) if len(gaps) else max(abs(lo) * 0.1, 1.0)
        margin = span / 2
    else:
        n_cuts = inner - 1
        n_q = (n_cuts + 1) // 2
        qs = np.quantile(col, np.linspace(0.0, 1.0, n_q + 1)[1:-1]) if n_q > 0 else np.empty(0)
        eq = np.linspace(lo, hi, n_cuts - n_q + 2)[1:-1]
        span = hi - lo
        cuts = []
        # (a cut at the minimum would leave a bucket empty)
        for q in sorted({float(x) for x in np.concatenate([qs, eq])} - {lo}):
            if not cuts or q - cuts[-1] >= max(declared / 4, 1e-9 * span):
                cuts.append(q)
        margin = max(MARGIN * span, declared / 2)
    low_edge, high_edge = lo - max(margin, reach[0]), hi + max(margin, reach[1])
    if high_edge <= low_edge:  # a constant field: any change leaves the middle bucket
        margin = max(abs(lo) * 1e-6, 1e-9)
        low_edge, high_edge = lo - max(margin, reach[0]), hi + max(margin, reach[1])
    inner_cuts = [c for c in cuts if low_edge < c < high_edge]
    edges = [low_edge, *inner_cuts, high_edge]
    return tuple(float(e) for e in edges)


def values_of(schema: AtomSchema, observations: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """[N, F] float64 raw values of observations keyed by field name or letter (checked like encode)."""
    fast = _common_shape(schema, observations)
    if fast is not None:
        return fast
    out = np.empty((len(observations), schema.width), dtype=np.float64)
    for r, obs in enumerate(observations):
        try:
            out[r] = schema.values(obs)  # the one check: unknown, missing and non-numeric fields
        except ObservationError as e:
            raise ObservationError(f"observation {r}: {e}", e.field) from None
    return out


def _common_shape(schema: AtomSchema, observations: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
    """The values of a batch in which every observation has the common shape (exactly the
    field names, every value a finite float), checked as a whole in a few C-level passes; None
    if any does not, and ``AtomSchema.values`` then checks row by row (and names the row).

    A scorer turns every reading of a backfill into values here: the row-by-row check cost
    about a fifth of its time."""
    width, n = schema.width, len(observations)
    if not n or any(type(o) is not dict for o in observations) or set(map(len, observations)) != {width}:
        return None
    get = itemgetter(*schema.names)
    try:
        rows = list(map(get, observations)) if width > 1 else [(get(o),) for o in observations]
    except KeyError:
        return None
    if set(map(type, itertools.chain.from_iterable(rows))) != {float}:
        return None
    out = np.array(rows, dtype=np.float64).reshape(n, width)
    return out if np.isfinite(out).all() else None
