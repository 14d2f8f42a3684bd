"""Windows over an atom's token stream: the one definition training and scoring share.

The window for observation i is ``[BOS] + obs[i-k] … obs[i-1] + obs[i]``: k previous
observations of the same atom as context (as many as fit the block), and only obs[i]'s
tokens are predicted. Training on exactly the windows scoring uses is what makes a score
mean "surprise given what came just before", not "surprise somewhere in a sequence".
"""

from __future__ import annotations

import torch

from kiri.model.schema import AtomSchema


def encode_many(schema: AtomSchema, observations: list[dict]) -> torch.Tensor:
    """[N, F] token ids; raises ObservationError naming the field (and the row) on bad data."""
    rows = []
    for i, obs in enumerate(observations):
        try:
            rows.append(schema.encode(obs))
        except ValueError as e:
            raise type(e)(f"observation {i}: {e}", *(getattr(e, "field", None),)) from None
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), schema.width)


def random_ids(schema: AtomSchema, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, F] token ids of uniformly random valid observations: corrupted data, worst-case benches."""
    buckets = torch.tensor([f.buckets for f in schema.fields])
    return (torch.rand(n, schema.width, generator=generator) * buckets).long() + torch.tensor(schema.offsets())


def windows(ids: torch.Tensor, k: int, start: int | None = None) -> torch.Tensor:
    """Windows with exactly k context observations for targets ``max(k, start)`` … N-1.

    Returns [M, 1 + (k+1)·F] with BOS (id 0) first.
    """
    n, f = ids.shape
    first = k if start is None else max(k, start)
    if n - first <= 0:
        return torch.empty((0, 1 + (k + 1) * f), dtype=torch.long)
    span = ids[first - k:].unfold(0, k + 1, 1)  # [M, F, k+1]
    body = span.permute(0, 2, 1).reshape(-1, (k + 1) * f)
    bos = torch.zeros((body.shape[0], 1), dtype=torch.long)
    return torch.cat([bos, body], dim=1)


def short_window(ids: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """The window for target i when fewer than k observations precede it."""
    ctx = ids[max(0, i - k): i + 1].reshape(1, -1)
    return torch.cat([torch.zeros((1, 1), dtype=torch.long), ctx], dim=1)
