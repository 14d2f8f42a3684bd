"""Scoring: an observation's anomaly score is the model's mean surprise at its tokens.

Each target observation is scored with the previous observations of the same atom as
context (the windows training used) and only its own tokens count. Scoring is batched: a
whole stream of observations goes through the model in large chunks under inference mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiri.model.forward import Forward
from kiri.model.gpt import Atom
from kiri.model.schema import AtomSchema
from kiri.model.weights import Weights
from kiri.model.windows import random_ids, resolve_context, short_window, windows

CHUNK = 512


@dataclass(frozen=True)
class Scores:
    """Scores of observations ``start`` … N-1 of a stream: mean and per-token surprise (nats)."""

    schema: AtomSchema
    token_ids: torch.Tensor  # [M, F]
    surprise: torch.Tensor  # [M, F]  -log p(token)

    @property
    def mean(self) -> torch.Tensor:
        return self.surprise.mean(dim=1)

    def breakdown(self, i: int) -> list[dict[str, float | str]]:
        """Per-token blame for one scored observation: token, surprise, probability."""
        toks = self.schema.tokens(self.token_ids[i].tolist())
        return [
            {"token": t, "surprise": float(s), "prob": math.exp(-float(s))}
            for t, s in zip(toks, self.surprise[i].tolist(), strict=True)
        ]


class Scorer:
    def __init__(self, weights: Weights, context: int | None = None) -> None:
        self.schema = weights.schema
        self.model = weights.model.eval()
        default = weights.info.get("context")
        self.k = resolve_context(self.schema, context if context is not None else default)
        self.threshold = float(weights.info.get("threshold", 1.5))

    @classmethod
    def from_model(cls, schema: AtomSchema, model: Atom, context: int) -> Scorer:
        self = cls.__new__(cls)
        self.schema, self.model, self.k, self.threshold = schema, model, context, 1.5
        return self

    @torch.inference_mode()
    def _surprise(self, w: torch.Tensor) -> torch.Tensor:
        """Surprise at the last F tokens of each window, each distinct window computed once.

        Quantized streams repeat themselves (a quiet night is the same few windows over and
        over) and the model is deterministic per window, so scoring distinct windows and
        scattering the results back is exact and often hundreds of times less work.
        """
        if len(w) > 64:
            keys = window_keys(self.schema, w)
            if keys is not None:
                uniq, inverse = torch.unique(keys, return_inverse=True)
            else:
                uniq, inverse = torch.unique(w, dim=0, return_inverse=True)
            if len(uniq) < 0.8 * len(w):
                rep = torch.empty(len(uniq), dtype=torch.long).scatter_(0, inverse, torch.arange(len(w)))
                return self._forward(w[rep])[inverse]
        return self._forward(w)

    def _forward(self, w: torch.Tensor) -> torch.Tensor:
        """Surprise at each window's last F tokens, in chunks small enough to stay in cache."""
        f = self.schema.width
        fwd = Forward({n: p.detach() for n, p in self.model.named_parameters()}, self.model.size)
        out = torch.empty((len(w), f))
        table = fwd.first_layer_table(w.shape[1] - 1)
        for i in range(0, len(w), CHUNK):
            chunk = w[i: i + CHUNK]
            x = fwd.hidden(chunk[:, :-1], f, table=table)[0]
            logp = torch.log_softmax(torch.mm(x.view(-1, x.shape[-1]), fwd.lm_head.t()), dim=-1)
            torch.gather(logp, 1, chunk[:, -f:].reshape(-1, 1), out=out[i: i + len(chunk)].view(-1, 1)).neg_()
        return out

    def score(self, ids: torch.Tensor, start: int = 0) -> Scores:
        """Score observations ``start`` … N-1 of ``ids`` [N, F], each given up to k predecessors."""
        n = len(ids)
        if not 0 <= start <= n:
            raise ValueError(f"start {start} outside 0..{n}")
        f = self.schema.width
        head = range(start, min(self.k, n))  # too few predecessors for a full window
        parts = [self._surprise(short_window(ids, i, self.k)) for i in head]
        full = windows(ids, self.k, start)
        if len(full):
            parts.append(self._surprise(full))
        surprise = torch.cat(parts) if parts else torch.empty((0, f))
        return Scores(self.schema, ids[start:], surprise)


def window_keys(schema: AtomSchema, w: torch.Tensor) -> torch.Tensor | None:
    """One int64 per window (mixed radix over its fields' buckets), or None if it would overflow."""
    f = schema.width
    n = w.shape[1] - 1  # tokens after BOS
    buckets = [fl.buckets for fl in schema.fields] * (n // f)
    mult, total = [], 1
    for b in buckets:
        mult.append(total)
        total *= b
        if total >= 2**62:
            return None
    digits = w[:, 1:] - torch.tensor(schema.offsets() * (n // f))
    return (digits * torch.tensor(mult)).sum(dim=1)


def calibrate(scores: torch.Tensor, floor: float = 1.5, factor: float = 2.0) -> dict[str, float]:
    """An atom's default threshold from scores on normal data, never from labels.

    ``max(floor, factor * p99)``: the 99th percentile is stable from a few hundred scores
    (the 99.9th swings with single outliers), and the factor leaves headroom for days the
    model has not seen.
    """
    if len(scores) == 0:
        return {"threshold": floor}
    q = torch.quantile(scores.float(), torch.tensor([0.5, 0.99, 0.999])).tolist()
    return {"threshold": max(floor, factor * q[1]), "score_p50": q[0], "score_p99": q[1], "score_p999": q[2]}


def separation(scorer: Scorer, ids: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """How far a model's scores set corrupted observations apart from real ones (nats).

    A label-free quality figure: the held-out targets are scored as they are, and again with
    every token replaced by a random bucket of its field; separation is the difference of
    the mean scores. Comparing two versions on the same targets says which tells normal
    from abnormal better.
    """
    if len(targets) == 0:
        return {"separation": 0.0, "normal_mean": 0.0, "corrupt_mean": 0.0, "n": 0}
    normal = scorer.score(ids).mean[targets]
    gen = torch.Generator().manual_seed(seed)
    corrupt = ids.clone()
    corrupt[targets] = random_ids(scorer.schema, len(targets), gen)
    bad = scorer.score(corrupt).mean[targets]
    n_mean, c_mean = float(normal.mean()), float(bad.mean())
    return {"separation": c_mean - n_mean, "normal_mean": n_mean, "corrupt_mean": c_mean, "n": len(targets)}
