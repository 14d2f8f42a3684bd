"""The atom's forward pass spelled out over plain tensors: one definition for training and scoring.

``Atom`` (``gpt.py``) is the readable definition, and autograd's reference. This is the same
math written for speed on a model this small, where the cost is the number of dispatched
operations and how torch's CPU kernels treat rows of a dozen elements, not arithmetic:

- attention runs as 3-D batched matmuls over (window, head), scale and causal mask fused
  into the first one (``baddbmm``);
- softmax is spelled out, because torch's fused kernel is ~3x slower on rows of 12;
- the last block computes queries, MLP and output only for the f predicted positions (keys
  and values still cover all t), exactly as ``Atom.forward(last=f)``.

``TrainStep`` (``train_step.py``) adds the hand-derived backward, which needs the
intermediates this pass can save; scoring (``score.py``) runs it without saving.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from kiri.model.gpt import tail_mask
from kiri.model.schema import ModelSize

EPS = 1e-5  # F.rms_norm's eps in gpt.rms_norm
NAMES = ("qkv", "proj", "fc1", "fc2")


def rms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm without a scale, returning the normalised x and 1/rms (what backward needs)."""
    # (float scalars throughout: an int operand costs a dtype conversion per call)
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().mul_(1.0 / x.shape[-1]).add_(EPS).rsqrt_()
    return x * r, r


def softmax2(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of scores in log2 units (in place on ``s``).

    exp2 rather than exp: in this torch build exp runs ~3x slower, and ~6x on the -inf of
    masked positions, while exp2 costs the same either way; the scores arrive pre-scaled by
    log2(e) (folded into the attention scale), so the result is the same softmax.
    """
    e = s.sub_(s.amax(-1, keepdim=True)).exp2_()
    return e.div_(e.sum(-1, keepdim=True))


class Forward:
    """An atom's weights, by role, and the forward pass over them.

    ``params`` maps ``Atom``'s parameter names to tensors (views of the module's own storage,
    so an update to the module is an update here).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], size: ModelSize) -> None:
        self.wte, self.wpe, self.lm_head = params["wte.weight"], params["wpe.weight"], params["lm_head.weight"]
        self.n_layer, self.d, self.h = size.n_layer, size.n_embd, size.n_head
        self.layers = [tuple(params[f"blocks.{i}.{n}.weight"] for n in NAMES) for i in range(self.n_layer)]
        self.scale = 1.0 / math.sqrt(self.d // self.h)
        self.scale2 = self.scale * math.log2(math.e)  # scores in log2 units, for softmax2
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def mask(self, q: int, t: int) -> torch.Tensor:
        """Additive causal mask for the last q queries over t keys (0 = may attend, -inf = may not)."""
        m = self._masks.get((q, t))
        if m is None:
            m = self._masks[(q, t)] = torch.zeros(q, t).masked_fill_(~tail_mask(q, t), float("-inf"))
        return m

    def first_layer_table(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding output [t·V, d] and first-block q·k·v [3·h, t·V, hd] of every (position, token).

        Until the first attention mixes positions, a token's vector depends on nothing but the
        token and its position, so with fixed weights (scoring) those rows are computed once
        per (position, token) and gathered, instead of once per window.
        """
        v, h = self.wte.shape[0], self.h
        n0 = rms((self.wte.unsqueeze(0) + self.wpe[:t].unsqueeze(1)).reshape(t * v, self.d))[0]
        qkv = torch.mm(rms(n0)[0], self.layers[0][0].t())
        # head-major [3·h, t·V, hd]: one gather then yields q, k, v as contiguous (head, window) batches
        return n0, qkv.view(t * v, 3 * h, self.d // h).transpose(0, 1).contiguous()

    def hidden(self, idx: torch.Tensor, f: int, saved: list | None = None,
               table: tuple[torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The final hidden states [B, f, d] of the last f positions of ``idx`` [B, t].

        Also returns the embedding's normalised output and 1/rms; with ``saved``, appends
        each block's intermediates for the backward pass. ``table`` is
        ``first_layer_table(t)``, for scoring with fixed weights (it leaves 1/rms empty).
        """
        if table is not None and saved is not None:
            raise ValueError("the first-layer table is for scoring: training needs the intermediates it skips")
        b, t = idx.shape
        d, h = self.d, self.h
        hd, nh = d // h, b * h
        qkv0 = None
        if table is None:
            n0, r0 = rms(torch.embedding(self.wte, idx).add_(self.wpe[:t]))
        else:
            rows = idx + torch.arange(0, t * self.wte.shape[0], self.wte.shape[0])
            n0, r0 = torch.embedding(table[0], rows), torch.empty(0)
            if f == t or self.n_layer > 1:  # the first block is a full block
                qkv0 = torch.index_select(table[1], 1, rows.view(-1))
        x = n0
        for layer, (w_qkv, w_proj, w_fc1, w_fc2) in enumerate(self.layers):
            tq = f if layer == self.n_layer - 1 else t
            head_major = layer == 0 and qkv0 is not None  # batches ordered (head, window), not (window, head)
            if head_major:
                n1 = r1 = torch.empty(0)
                q, k, v = qkv0.view(3, nh, t, hd)
            elif tq == t:  # [3, b·h, t, hd]: one copy puts every head's q, k and v in contiguous blocks
                n1, r1 = rms(x)
                q, k, v = torch.mm(n1.view(-1, d), w_qkv.t()).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4) \
                    .reshape(3, nh, t, hd)
            else:  # the last block: queries for the predicted positions only
                n1, r1 = rms(x)
                k, v = torch.mm(n1.view(-1, d), w_qkv[d:].t()).view(b, t, 2, h, hd).permute(2, 0, 3, 1, 4) \
                    .reshape(2, nh, t, hd)
                q = torch.mm(n1[:, t - tq:].reshape(-1, d), w_qkv[:d].t()).view(b, tq, h, hd).transpose(1, 2) \
                    .reshape(nh, tq, hd)
            # q [b·h, tq, hd], k and v [b·h, t, hd] (head-major: [h·b, ...])
            attn = torch.baddbmm(self.mask(tq, t), q, k.transpose(1, 2), alpha=self.scale2)  # [b·h, tq, t]
            a = softmax2(attn)  # attention weights, [b·h, tq, t]
            heads = torch.bmm(a, v)  # [b·h, tq, hd]
            o = (heads.view(h, b, tq, hd).permute(1, 2, 0, 3) if head_major
                 else heads.view(b, h, tq, hd).transpose(1, 2)).reshape(b * tq, d)  # heads side by side, [b·tq, d]
            residual = x[:, t - tq:]  # [b, tq, d]
            xm = torch.mm(o, w_proj.t()).view(b, tq, d).add_(residual)  # after attention, [b, tq, d]
            n2, r2 = rms(xm)
            u = torch.relu_(torch.mm(n2.view(-1, d), w_fc1.t()))  # MLP hidden, [b·tq, 4d]
            x = torch.mm(u, w_fc2.t()).view(b, tq, d).add_(xm)  # the block's output, [b, tq, d]
            if saved is not None:
                saved.append((n1, r1, q, k, v, a, o, n2, r2, u, tq))
        return x, n0, r0
