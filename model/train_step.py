"""One training step of an atom, forward and backward derived by hand, over flat buffers.

An atom is so small that a training step's cost is the number of operations, not their
arithmetic: through autograd and ``torch.optim.Adam`` a batch-1 step is hundreds of dispatched ops
at a few microseconds each plus the autograd graph's bookkeeping. Here the same math is
written out once, forward then backward, with no graph: every parameter and every gradient
is a view into one flat buffer, so Adam updates the whole model in one fused op and no
gradient is ever zeroed or gathered. The forward pass is ``forward.Forward``, shared with
scoring; ``Atom`` (``gpt.py``) stays the definition, and ``tests/test_forward.py`` holds
this file to autograd on it.

Notation: B windows of t input tokens, of which the last f are predicted; d = n_embd,
h heads of size hd.
"""

from __future__ import annotations

import math

import torch

from kiri.model.forward import NAMES, Forward
from kiri.model.gpt import Atom
from kiri.model.weights import WeightsError


def _rms_back(n: torch.Tensor, r: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
    """d/dx of n = x·r(x): r·(dn - n·mean(dn·n))."""
    return torch.addcmul(dn, n, (dn * n).sum(-1, keepdim=True), value=-1.0 / n.shape[-1]).mul_(r)


def trimmed(logp: torch.Tensor, weight: torch.Tensor, share: float, floor: float = math.inf) -> torch.Tensor:
    """``weight`` with the least likely windows (by ``logp`` [B]) worth up to ``share`` of it zeroed,
    the rest scaled back to the same total.

    Only windows less likely than ``floor`` (log-probability) are ever left out: the
    trainer passes what knowing nothing would score (uniform over each field's buckets).
    A window the model finds worse than a blind guess is one it is being taught against
    its grain (a history's anomaly); the merely hard windows of a noisy but normal stretch
    (an owner's daytime activity beside a predictable night) stay in, however many there are.
    """
    order = torch.argsort(logp, stable=True)  # most surprising first
    cum = torch.cumsum(weight[order], 0)
    total = cum[-1]
    drop = order[(cum <= share * total) & (logp[order] < -floor)]
    if len(drop) == 0:
        return weight
    out = weight.clone()
    out[drop] = 0.0
    return out.mul_(total / out.sum())


class TrainStep:
    """Forward, backward and Adam for an ``Atom`` whose parameters it moves into one buffer.

    After construction the model's parameters are views of ``self.flat``: the module still
    scores, saves and loads as before, and an update here is an update there.
    """

    def __init__(self, model: Atom, betas: tuple[float, float], eps: float) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
        total = sum(p.numel() for p in params)
        self.flat = torch.empty(total)
        self.grad = torch.zeros(total)
        self.exp_avg = torch.zeros(total)
        self.exp_avg_sq = torch.zeros(total)
        self.steps = torch.zeros((), dtype=torch.float32)  # Adam's step count, as torch.optim keeps it
        self.betas, self.eps = betas, eps
        self.spans: list[tuple[int, int, torch.Size]] = []
        off = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                self.flat[off: off + k].copy_(p.reshape(-1))
                p.data = self.flat[off: off + k].view(p.shape)
                self.spans.append((off, k, p.shape))
                off += k
        self.p = dict(zip(self.names, (self.view(self.flat, i) for i in range(len(params))), strict=True))
        self.g = dict(zip(self.names, (self.view(self.grad, i) for i in range(len(params))), strict=True))
        self.fwd = Forward(self.p, model.size)
        self.layer_grads = [tuple(self.g[f"blocks.{i}.{n}.weight"] for n in NAMES) for i in range(self.fwd.n_layer)]
        self._zero = torch.zeros(())

    def view(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        off, k, shape = self.spans[i]
        return buf[off: off + k].view(shape)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """``buf`` (a flat buffer like ``exp_avg``) split per parameter name."""
        return {name: self.view(buf, i) for i, name in enumerate(self.names)}

    # --- forward + backward -----------------------------------------------------------------

    @torch.no_grad()
    def loss_and_grad(self, idx: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                      trim: float = 0.0, floor: float = math.inf) -> torch.Tensor:
        """Weighted cross-entropy of ``targets`` [B, f] after inputs ``idx`` [B, t]; fills ``self.grad``.

        ``weight`` [B] is each window's share of the loss per predicted token (1/(B·f) for a
        plain mean; count/(N·f) when a window stands for ``count`` identical ones). With
        ``trim``, the most surprising windows holding up to that share of the weight are left
        out and the rest re-weighted to the same total (a trimmed likelihood: anomalies in
        the training data do not pull the model towards themselves); only windows whose
        surprise exceeds ``floor`` nats count as surprising (``trimmed``).
        """
        g, fwd = self.g, self.fwd
        b, t = idx.shape
        f = targets.shape[1]
        d, h = fwd.d, fwd.h
        hd, nh = d // h, b * h
        saved: list = []
        x, n0, r0 = fwd.hidden(idx, f, saved)
        xf = x.reshape(-1, d)
        logits = torch.mm(xf, fwd.lm_head.t())
        logp = torch.log_softmax(logits, dim=-1)
        tgt = targets.reshape(-1, 1)
        if trim > 0.0 and b > 1:
            weight = trimmed(logp.gather(1, tgt).view(b, f).sum(1), weight, trim, floor)
        w = weight.repeat_interleave(f).unsqueeze(1)  # [B·f, 1]
        loss = -torch.dot(logp.gather(1, tgt).view(-1), w.view(-1))

        # backward: d loss / d logits = weight · (softmax - onehot)
        dlogits = logp.exp_().mul_(w).scatter_add_(1, tgt, w.neg())
        torch.mm(dlogits.t(), xf, out=g["lm_head.weight"])
        dx = torch.mm(dlogits, fwd.lm_head).view(b, f, d)
        for layer in reversed(range(fwd.n_layer)):
            w_qkv, w_proj, w_fc1, w_fc2 = fwd.layers[layer]
            g_qkv, g_proj, g_fc1, g_fc2 = self.layer_grads[layer]
            n1, r1, q, k, v, a, o, n2, r2, u, tq = saved[layer]
            dxf = dx.reshape(-1, d)
            torch.mm(dxf.t(), u, out=g_fc2)
            du = torch.ops.aten.threshold_backward(torch.mm(dxf, w_fc2), u, 0)  # 7x faster than mul_(u > 0)
            n2f = n2.view(-1, d)
            torch.mm(du.t(), n2f, out=g_fc1)
            dxm = _rms_back(n2, r2, torch.mm(du, w_fc1).view(b, tq, d)).add_(dx)
            dxmf = dxm.view(-1, d)
            torch.mm(dxmf.t(), o, out=g_proj)
            do = torch.mm(dxmf, w_proj).view(b, tq, h, hd).transpose(1, 2).reshape(nh, tq, hd)
            dv = torch.bmm(a.transpose(1, 2), do)
            ad = torch.bmm(do, v.transpose(1, 2)).mul_(a)  # softmax backward: a·da - a·Σ(a·da)
            ds = torch.addcmul(ad, a, ad.sum(-1, keepdim=True), value=-1)
            dq = torch.baddbmm(self._zero, ds, k, beta=0, alpha=fwd.scale)
            dk = torch.baddbmm(self._zero, ds.transpose(1, 2), q, beta=0, alpha=fwd.scale)
            n1f = n1.view(-1, d)
            if tq == t:
                dqkv = torch.stack((dq, dk, dv)).view(3, b, h, t, hd).permute(1, 3, 0, 2, 4).reshape(b * t, 3 * d)
                torch.mm(dqkv.t(), n1f, out=g_qkv)
                dn1 = torch.mm(dqkv, w_qkv).view(b, t, d)
            else:
                dkv = torch.stack((dk, dv)).view(2, b, h, t, hd).permute(1, 3, 0, 2, 4).reshape(b * t, 2 * d)
                dqf = dq.view(b, h, tq, hd).transpose(1, 2).reshape(b * tq, d)
                torch.mm(dkv.t(), n1f, out=g_qkv[d:])
                torch.mm(dqf.t(), n1[:, t - tq:].reshape(-1, d), out=g_qkv[:d])
                dn1 = torch.mm(dkv, w_qkv[d:]).view(b, t, d)
                dn1[:, t - tq:] += torch.mm(dqf, w_qkv[:d]).view(b, tq, d)
            dx = _rms_back(n1, r1, dn1)
            dx[:, t - tq:] += dxm
        de = _rms_back(n0, r0, dx)
        g["wte.weight"].zero_().index_add_(0, idx.reshape(-1), de.view(-1, d))
        torch.sum(de, dim=0, out=g["wpe.weight"][:t])
        if t < g["wpe.weight"].shape[0]:
            g["wpe.weight"][t:].zero_()
        return loss

    def load_adam(self, state: dict[str, torch.Tensor]) -> None:
        """Adam's moments and step from ``{"<param>.exp_avg" | ".exp_avg_sq" | ".step": tensor}``.

        An empty dict is a run that has not stepped yet; anything partial or misshapen is
        refused, since resuming with wrong moments would silently train a different model.
        """
        if not state:
            return
        m, v = self.views(self.exp_avg), self.views(self.exp_avg_sq)
        for name in self.names:
            for key, dst in (("exp_avg", m[name]), ("exp_avg_sq", v[name])):
                src = state.get(f"{name}.{key}")
                if src is None or src.shape != dst.shape:
                    raise WeightsError(f"training state: Adam's {key} for {name} is missing or has the wrong shape")
                dst.copy_(src)
        step = state.get(f"{self.names[0]}.step")
        if step is None or step.numel() != 1:
            raise WeightsError("training state: Adam's step count is missing")
        self.steps.fill_(float(step))

    # --- optimiser --------------------------------------------------------------------------

    @torch.no_grad()
    def adam(self, lr: float) -> None:
        """Adam (torch's fused kernel, the one ``torch.optim.Adam(fused=True)`` calls) on the flat buffers.

        The one call into torch's private API: ``tests/test_forward.py`` holds it to
        ``torch.optim.Adam`` bitwise, so a torch upgrade that changes it fails there.
        """
        self.steps += 1
        torch._fused_adam_([self.flat], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps],
                           lr=lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps,
                           amsgrad=False, maximize=False)
