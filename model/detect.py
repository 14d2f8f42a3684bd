"""kiri's detection as a library: fit on a stream's history, score what follows.

    from kiri.model.detect import Detector

    det = Detector().fit(history)            # [N] or [N, F] numbers, or dicts of fields
    out = det.score(new_values, times=ts)    # per observation: surprise, tail_p, anomalous, blame
    out.anomalous.nonzero()

It runs the code the agents run: ``Codec.fit`` for the tokens, ``Trainer`` (sized training,
early stopping on the latest windows, trimmed likelihood) for the model, ``Scorer`` for the
ordinal surprise and ``Calibration`` for the tail probability, and an alarm budget for the
verdict. While scoring it behaves like a hub left running: every ``retrain_every``
observations it retrains, warm-started, on the most recent ``window`` observations (edges
re-fitted, calibration re-estimated), so a stream that drifts keeps being scored against its
own recent normal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kiri.model import calibrate as cal
from kiri.model import robust
from kiri.model.codec import values_of
from kiri.model.schema import AtomSchema, Field, ModelSize
from kiri.model.score import Scorer
from kiri.model.train import TrainConfig
from kiri.model.weights import load_weights

DEFAULT_BUCKETS = 32


@dataclass(frozen=True)
class Detection:
    """Per scored observation: its surprise, calibrated tail probability and verdict."""

    schema: AtomSchema
    surprise: np.ndarray  # [N] the score: mean ordinal surprise beyond what the model expected (nats)
    tail_p: np.ndarray  # [N] P(normal looks at least this unusual), point or sustained
    anomalous: np.ndarray  # [N] bool: an alarm, the first flagged reading of an incident (``onsets``)
    flagged: np.ndarray  # [N] bool: every reading whose tail_p is under the alarm rate
    token_surprise: np.ndarray  # [N, F] per field: the plain surprise (blame)
    tokens: np.ndarray  # [N, F] token ids
    alarm_rate: float

    def __len__(self) -> int:
        return len(self.surprise)

    def blame(self, i: int) -> list[dict[str, Any]]:
        """Which fields made observation i surprising, most surprising first."""
        toks = self.schema.tokens(self.tokens[i].tolist())
        rows = [{"field": f.name, "token": t, "surprise": float(s), "prob": math.exp(-float(s))}
                for f, t, s in zip(self.schema.fields, toks, self.token_surprise[i].tolist(), strict=True)]
        return sorted(rows, key=lambda r: -r["surprise"])


def schema_for(values: np.ndarray, names: Sequence[str] | None = None, buckets: int = DEFAULT_BUCKETS,
               name: str = "series") -> AtomSchema:
    """A custom atom for data with no declared ranges: one field per column, 32 buckets each.

    The declared range only matters to the fixed codec; fitted edges come from the data.
    """
    values = np.asarray(values, dtype=np.float64)
    cols = values.shape[1]
    if cols > 26:
        raise ValueError(f"at most 26 fields per atom, got {cols}")
    names = list(names) if names is not None else [f"x{i}" for i in range(cols)]
    fields = []
    for i in range(cols):
        lo, hi = float(np.min(values[:, i])), float(np.max(values[:, i]))
        if hi <= lo:
            hi = lo + 1.0
        fields.append(Field(chr(ord("A") + i), names[i], lo, hi, buckets))
    block = max(16, cols + 1)
    return AtomSchema(name, tuple(fields), size=ModelSize(block_size=block))


def as_values(schema: AtomSchema | None, data: Any) -> tuple[np.ndarray, list[str] | None]:
    """[N, F] floats from numbers, rows of numbers, or mappings of field to value.

    Refuses what is not a finite number, naming the row: a NaN would otherwise land in an
    edge bucket and score as an anomaly, or poison the fitted edges.
    """
    names = None
    if isinstance(data, np.ndarray | torch.Tensor):
        arr = np.asarray(data, dtype=np.float64)
    else:
        data = list(data)
        if data and isinstance(data[0], Mapping):
            if schema is not None:
                return values_of(schema, data), None
            names = list(data[0])
            data = [[r.get(k) for k in names] for r in data]
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"values must be numbers: {e}") from None
    arr = arr.reshape(-1, 1) if arr.ndim <= 1 else arr
    if arr.ndim != 2 or (schema is not None and arr.shape[1] != schema.width):
        want = schema.width if schema is not None else "F"
        raise ValueError(f"values must be [N, {want}] numbers, got shape {tuple(arr.shape)}")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if len(bad):
        raise ValueError(f"row {int(bad[0])}: {arr[bad[0]].tolist()} is not all finite numbers")
    return arr, names


def onsets(flagged: np.ndarray, gap: int) -> np.ndarray:
    """Alarms from raw flags: only the first flag of each incident, where an incident is flags
    less than ``gap`` readings apart.

    An alarm is what the owner is told, so it counts what they bear: a new level holding
    for an hour is one event, not twelve, and a stretch of odd readings with a normal one
    among them is one too. (The hub's alert cool-down does the same to its notifications.)
    """
    f = np.asarray(flagged, dtype=bool)
    out = np.zeros(len(f), dtype=bool)
    idx = np.flatnonzero(f)
    if len(idx):
        out[idx[np.concatenate([[True], np.diff(idx) >= gap])]] = True
    return out


class Detector:
    """Fit on history, score new observations (module doc). Defaults are kiri's defaults."""

    def __init__(self, schema: AtomSchema | None = None, *, alarms_per_week: float = cal.DEFAULT_ALARMS_PER_WEEK,
                 interval: float | None = None, config: TrainConfig | None = None,
                 retrain_every: int | None = None, window: int | None = None, learn: bool = True,
                 buckets: int = DEFAULT_BUCKETS, seed: int = 0) -> None:
        self.schema = schema
        self.alarms_per_week = alarms_per_week
        self.interval = interval
        self.config = config or TrainConfig(seed=seed)
        self.retrain_every = retrain_every
        self.window = window
        self.learn = learn
        self.buckets = buckets
        self.scorer: Scorer | None = None
        self.history = np.empty((0, 0))
        self.flags = np.zeros(0, dtype=bool)  # each history row: judged anomalous (context looked past)?
        self.history_p = np.empty(0)  # each history row's tail probability (what retrains leave out)
        self.normal_share = cal.SUSPECT_P  # share of normal readings the current model puts under SUSPECT_P
        self.alarmed = np.zeros(0, dtype=bool)  # the latest rows' raw alarm flags (for onsets)
        self.past_scores = np.empty(0)
        self.scores = np.empty(0)  # scores given while watching (out of sample), newest last
        self.blob: bytes | None = None
        self.retrains = 0

    # --- fitting ----------------------------------------------------------------------------

    @property
    def alarm_rate(self) -> float:
        return cal.alarm_rate(self.alarms_per_week, self.interval or 300.0)

    def fit(self, data: Any, times: Sequence[float] | None = None) -> Detector:
        """Learn this stream's normal from its history (which may hold a few anomalies)."""
        values, names = as_values(self.schema, data)
        if self.schema is None:
            self.schema = schema_for(values, names, self.buckets)
        if self.interval is None:
            self.interval = cal.typical_interval(times)
        self._train(values, init=None, flagged=None)
        self.history = values
        return self

    @property
    def window_size(self) -> int:
        """Observations a retrain learns from: the latest week (at least the history fitted on)."""
        return min(20000, self.window or max(len(self.history), int(7 * 86400.0 / (self.interval or 300.0)), 500))

    @property
    def every(self) -> int:
        """Observations between retrains: a day's worth (at least 100)."""
        return self.retrain_every or max(100, int(86400.0 / (self.interval or 300.0)))

    @property
    def persist(self) -> int:
        """An hour of readings (a 24th of the retrain interval, at least 6). A run of flags
        longer than this is a change of regime, which the next retrain learns as the new
        normal instead of leaving it out; flags closer than this are one incident (one alarm)."""
        return max(6, self.every // 24)

    def _train(self, values: np.ndarray, init: bytes | None, flagged: np.ndarray | None) -> None:
        assert self.schema is not None
        config = self.config
        if init is not None and config.steps is None:  # a warm start needs a fraction of a fresh run
            config = replace(config, patience=2)
        # Calibrated on this stream's recent scores once there are enough of them: every
        # score it got while being watched (each from a model that had not seen it), alarms
        # included, as a hub's retrain does (``Trainer.weights_bytes``, ``cal.RECENT_MIN``).
        fitted = robust.fit(self.schema, values, config, self.alarm_rate, init=init, flagged=flagged,
                            persist=self.persist, horizon=self.every if self.learn else 0,
                            recent=self.scores)
        self.blob = fitted.blob
        weights = load_weights(self.blob)
        self.scorer = Scorer(weights)
        if flagged is None:
            self.flags = fitted.flagged
            self.history_p = np.where(fitted.flagged, 0.0, np.nan)  # the fit's own verdicts; not scored
        self.normal_share = float(weights.info.get("suspect_share", cal.SUSPECT_P))

    # --- scoring ----------------------------------------------------------------------------

    def score(self, data: Any, times: Sequence[float] | None = None) -> Detection:
        """Score observations in time order, each against the observations before it.

        With ``learn`` (the default) the model is retrained every ``retrain_every``
        observations on the latest ``window`` ones, as a hub's periodic retraining would.
        """
        if self.scorer is None or self.schema is None:
            raise RuntimeError("fit the detector on some history first")
        values, _ = as_values(self.schema, data)
        n = len(values)
        every = self.every
        window = self.window_size
        parts: list[tuple[np.ndarray, ...]] = []
        at = 0
        while at < n:
            end = min(n, at + every) if self.learn else n
            parts.append(self._score_chunk(values[at:end]))
            at = end
            if self.learn and at < n:
                self._train(self.history[-window:], init=self.blob,
                            flagged=robust.suspects(self.history_p[-window:], self.alarm_rate, self.normal_share))
                self.retrains += 1
        surprise, tail_p, verdict, flagged, tok_s, toks = (np.concatenate([p[i] for p in parts]) for i in range(6))
        return Detection(self.schema, surprise, tail_p, verdict, flagged, tok_s, toks, self.alarm_rate)

    def _score_chunk(self, values: np.ndarray) -> tuple[np.ndarray, ...]:
        sc = self.scorer
        assert sc is not None
        ctx = self.history[len(self.history) - sc.k:] if sc.k else self.history[:0]
        rows = np.concatenate([ctx, values]) if len(ctx) else values
        result = sc.score(sc.encode(rows), start=len(ctx), flagged=self.flags[len(self.flags) - len(ctx):],
                          values=rows)
        mean = result.mean.numpy().astype(np.float64)
        tail_p = sc.tail_p(mean, prefix=self.past_scores)
        assert tail_p is not None
        self.history = np.concatenate([self.history, values]) if len(self.history) else values
        flags = tail_p < self.alarm_rate
        self.flags = np.concatenate([self.flags, tail_p < max(self.alarm_rate, robust.SUSPECT_P)])
        self.history_p = np.concatenate([self.history_p, tail_p])
        verdict = onsets(np.concatenate([self.alarmed, flags]), self.persist)[len(self.alarmed):]
        self.alarmed = np.concatenate([self.alarmed, flags])[-self.persist:]
        self.past_scores = np.concatenate([self.past_scores[-64:], mean])
        self.scores = np.concatenate([self.scores, mean])[-self.window_size:]
        return mean, tail_p, verdict, flags, result.surprise.numpy(), result.token_ids.numpy()
