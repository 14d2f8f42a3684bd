"""The spelled-out forward (scoring) and hand-derived training step against the reference Atom."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiri.model import schema as S
from kiri.model.gpt import Atom
from kiri.model.score import Scorer
from kiri.model.train_step import TrainStep
from kiri.model.weights import WeightsError
from kiri.model.windows import random_ids

SMALL = S.AtomSchema("tiny", S.PULSE.fields[:3], size=S.ModelSize(n_embd=16, n_head=2, n_layer=1, block_size=10))
DEEP = S.AtomSchema("deep", S.PULSE.fields[:4], size=S.ModelSize(n_embd=24, n_head=3, n_layer=3, block_size=13))


def _pair(schema: S.AtomSchema, seed: int = 1) -> tuple[TrainStep, Atom]:
    model = Atom.for_schema(schema)
    model.init_weights(torch.Generator().manual_seed(seed))
    ref = Atom.for_schema(schema)
    ref.load_state_dict(model.state_dict())
    return TrainStep(model, betas=(0.85, 0.99), eps=1e-8), ref


def _reference_loss(ref: Atom, idx: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = ref(idx, last=y.shape[1])
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    return (per * weight[:, None]).sum()


@pytest.mark.parametrize(("schema", "t", "f", "b"), [
    (S.PULSE, 12, 6, 1),  # the trainer's batch-1 window: one context observation, six targets
    (S.PULSE, 12, 6, 9),
    (S.PULSE, 16, 16, 3),  # every position predicted: the last block is a full block
    (S.RHYTHM, 16, 4, 5),
    (SMALL, 9, 3, 4),  # one layer: the only block is the tail block
    (DEEP, 13, 4, 6),  # three layers, three heads
])
def test_gradient_equals_autograd(schema, t, f, b):
    step, ref = _pair(schema)
    gen = torch.Generator().manual_seed(t * 100 + b)
    idx = torch.randint(0, schema.vocab_size, (b, t), generator=gen)
    y = torch.randint(0, schema.vocab_size, (b, f), generator=gen)
    weight = torch.rand(b, generator=gen)
    weight /= weight.sum() * f  # unequal shares, as deduplicated windows have
    loss = step.loss_and_grad(idx, y, weight)
    expected = _reference_loss(ref, idx, y, weight)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-5)
    for name, p in ref.named_parameters():
        scale = p.grad.abs().max()
        assert scale > 0, name  # every parameter takes part, so a dropped gradient cannot hide
        assert torch.allclose(step.g[name], p.grad, atol=1e-5 * float(scale), rtol=0), name


def test_adam_matches_torch_optim_and_the_model_sees_every_update():
    """Fed the same gradients, the flat fused update equals torch.optim.Adam's, parameter by parameter.

    (Same gradients, because Adam divides by √v: a 1e-9 difference in a near-zero gradient
    becomes a visible step, so two correct gradient paths drift apart under it.)
    """
    step, ref = _pair(S.PULSE)
    opt = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.85, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        idx = torch.randint(0, S.PULSE.vocab_size, (4, 12), generator=gen)
        y = torch.randint(0, S.PULSE.vocab_size, (4, 6), generator=gen)
        w = torch.full((4,), 1 / 24)
        step.loss_and_grad(idx, y, w)
        lr = 0.01 * (1 - i / 10)
        for name, p in ref.named_parameters():
            p.grad = step.g[name].clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        step.adam(lr)
    for (name, p), (_, mine) in zip(ref.named_parameters(), step.model.named_parameters(), strict=True):
        assert torch.allclose(mine, p, atol=1e-6), name
    assert float(step.steps) == 5


def test_adam_state_must_be_whole():
    step, _ = _pair(S.PULSE)
    full = {f"{n}.{k}": torch.zeros_like(p) for n, p in step.p.items() for k in ("exp_avg", "exp_avg_sq")}
    full.update({f"{n}.step": torch.tensor(3.0) for n in step.names})
    step.load_adam(full)
    assert float(step.steps) == 3
    with pytest.raises(WeightsError, match=r"exp_avg_sq for lm_head\.weight"):
        step.load_adam({k: v for k, v in full.items() if k != "lm_head.weight.exp_avg_sq"})
    with pytest.raises(WeightsError, match="wrong shape"):
        step.load_adam({**full, "wte.weight.exp_avg": torch.zeros(3)})


@pytest.mark.parametrize(("schema", "context"), [(S.PULSE, 1), (S.PULSE, 0), (S.RHYTHM, 2), (SMALL, 1), (DEEP, 1)])
def test_scoring_equals_the_reference_atom(schema, context):
    """Scorer's forward (first-layer table, chunks, spelled-out attention) = Atom's log-probs."""
    model = Atom.for_schema(schema)
    model.init_weights(torch.Generator().manual_seed(5))
    scorer = Scorer.from_model(schema, model.eval(), context)
    f = schema.width
    n = 1 + (context + 1) * f
    gen = torch.Generator().manual_seed(context)
    body = random_ids(schema, 1300 * (context + 1), gen).view(1300, n - 1)  # > one chunk of windows
    w = torch.cat([torch.zeros((len(body), 1), dtype=torch.long), body], dim=1)
    with torch.inference_mode():
        logp = torch.log_softmax(model(w[:, :-1], last=f), dim=-1)
        expected = -logp.gather(-1, w[:, -f:].unsqueeze(-1)).squeeze(-1)
        got = scorer._forward(w)
    assert got.shape == expected.shape == (len(w), f)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-5)
