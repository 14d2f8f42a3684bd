"""The atom: KIRI's seed architecture as a torch module.

Token + position embeddings, RMSNorm (no learned scale), then per layer pre-norm causal
self-attention and a ReLU MLP (4x), each with a residual; no biases anywhere. Q, K and V
live in one matrix so a forward does one matmul for them: the same 3·d² parameters as
three, one op instead of three (per-op overhead, not FLOPs, is what a model this small
pays for).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiri.model.schema import AtomSchema, ModelSize


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-5)


class Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 4 * d, bias=False)
        self.fc2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Causal block; with ``last``, outputs only the last positions (keys still see all)."""
        b, t, d = x.shape
        h = self.n_head
        if last is None or last >= t:
            q, k, v = self.qkv(rms_norm(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        else:
            w_q, w_kv = self.qkv.weight[:d], self.qkv.weight[d:]
            n = rms_norm(x)
            k, v = F.linear(n, w_kv).view(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
            q = F.linear(n[:, -last:], w_q).view(b, last, h, d // h).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=tail_mask(last, t))
            x = x[:, -last:] + self.proj(a.transpose(1, 2).reshape(b, last, d))
        return x + self.fc2(F.relu(self.fc1(rms_norm(x))))


_MASKS: dict[tuple[int, int], torch.Tensor] = {}


def tail_mask(last: int, t: int) -> torch.Tensor:
    """Causal mask for the last ``last`` queries of a length-t sequence (True = may attend)."""
    m = _MASKS.get((last, t))
    if m is None:
        m = _MASKS[(last, t)] = torch.ones(t, t, dtype=torch.bool).tril()[t - last:]
    return m


class Atom(nn.Module):
    def __init__(self, vocab_size: int, size: ModelSize) -> None:
        super().__init__()
        self.size = size
        self.wte = nn.Embedding(vocab_size, size.n_embd)
        self.wpe = nn.Embedding(size.block_size, size.n_embd)
        self.blocks = nn.ModuleList(Block(size.n_embd, size.n_head) for _ in range(size.n_layer))
        self.lm_head = nn.Linear(size.n_embd, vocab_size, bias=False)

    @classmethod
    def for_schema(cls, schema: AtomSchema) -> Atom:
        return cls(schema.vocab_size, schema.size)

    def init_weights(self, generator: torch.Generator) -> None:
        """Seeded init (N(0, 0.08) as in KIRI's seed), independent of global RNG state."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.08)

    def forward(self, idx: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Logits for every position, or only for the last ``last`` positions."""
        t = idx.shape[1]
        if t > self.size.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block size {self.size.block_size}")
        x = rms_norm(self.wte(idx) + self.wpe.weight[:t])
        for blk in self.blocks[:-1]:
            x = blk(x)
        # Only the last positions are predicted, so the final block computes only those.
        return self.lm_head(self.blocks[-1](x, last))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
