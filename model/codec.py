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


@dataclass(frozen=True)
class Codec:
    """Per field, the sorted inner edges: bucket = number of edges <= value."""

    schema: AtomSchema
    edges: tuple[tuple[float, ...], ...]
    fitted: tuple[bool, ...]

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
        for i, f in enumerate(schema.fields):
            col = values[:, i]
            if f.buckets < FIT_MIN_BUCKETS or len(col) < FIT_MIN_VALUES:
                continue
            edges[i] = fit_edges(col, f.buckets, (f.high - f.low) / f.buckets, trend_reach(col, horizon))
            fitted[i] = True
        return cls(schema, tuple(edges), tuple(fitted))

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

    def ranges(self, field: int) -> list[tuple[float, float]]:
        """Each bucket's value range of one field (outer ones open: -inf / inf)."""
        e = [-math.inf, *self.edges[field], math.inf]
        return list(itertools.pairwise(e))

    # --- storage -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fitted/1", "fields": {
            f.name: {"edges": list(e), "fitted": fit}
            for f, e, fit in zip(self.schema.fields, self.edges, self.fitted, strict=True)}}

    @classmethod
    def from_dict(cls, schema: AtomSchema, d: Mapping[str, Any] | None) -> Codec:
        """The codec stored with weights, or the fixed one for weights that carry none."""
        if not d:
            return cls.fixed(schema)
        if d.get("kind") != "fitted/1" or not isinstance(d.get("fields"), Mapping):
            raise ValueError(f"unknown codec {d.get('kind')!r}")
        edges, fitted = [], []
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
        return cls(schema, tuple(edges), tuple(fitted))


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
    if len(uniq) <= inner:  # discrete: one bucket per seen value, cut halfway between them
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
