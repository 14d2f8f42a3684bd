"""Deterministic, resumable training of an atom.

Everything a run depends on — weights, Adam's moments, the step, the shuffle generator,
the current epoch's order and the position in it — serializes to bytes, so a run stopped
at step k and resumed in a fresh process ends with bitwise the weights of a run that never
stopped (given the same data and torch thread count).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kiri.model.gpt import Atom
from kiri.model.schema import AtomSchema
from kiri.model.score import window_keys
from kiri.model.train_step import TrainStep
from kiri.model.weights import WeightsError, load_weights, pack, save_weights, unpack
from kiri.model.windows import resolve_context, windows

STATE_FORMAT = "kiri.train-state/1"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    batch_size: int = 32
    lr: float = 0.01
    lr_floor: float = 0.1  # linear decay stops at 10% of lr
    beta1: float = 0.85
    beta2: float = 0.99
    eps: float = 1e-8
    seed: int = 0
    context: int | None = None  # previous observations per window; None = as many as fit
    # Fraction of windows (seeded, spread over the whole span) kept out of training and used
    # to set the atom's default threshold: scores on data the model has not fitted, never labels.
    holdout: float = 0.2

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.steps, int) and 1 <= self.steps <= 10_000_000, "steps must be 1..10,000,000"),
            (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 65536, "batch_size must be 1..65536"),
            (0 < self.lr <= 10 and math.isfinite(self.lr), "lr must be in (0, 10]"),
            (0 <= self.lr_floor <= 1, "lr_floor must be in [0, 1]"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed must be a non-negative integer"),
            (0 <= self.holdout < 1, "holdout must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"train config: {msg}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(params) - names
        if unknown:
            raise ValueError(f"train config: unknown parameter(s) {', '.join(sorted(unknown))}")
        return cls(**params)


@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    lr: float
    seconds: float


def data_fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:32]


@dataclass
class Trainer:
    schema: AtomSchema
    ids: torch.Tensor  # [N, F] token ids, time-ordered
    config: TrainConfig = field(default_factory=TrainConfig)
    init: bytes | None = None  # weights to warm-start from
    # For models whose examples are not observation streams (the nerve): ready-made windows
    # and how many final tokens each is scored on.
    examples: torch.Tensor | None = None
    predict: int | None = None

    def __post_init__(self) -> None:
        self.k = resolve_context(self.schema, self.config.context)
        self.held = torch.empty(0, dtype=torch.long)  # target indices kept for calibration
        if self.examples is None:
            all_w = windows(self.ids, self.k)
            n_hold = int(len(all_w) * self.config.holdout) if len(all_w) >= 20 else 0
            order = torch.randperm(len(all_w), generator=torch.Generator().manual_seed(self.config.seed + 2))
            self.held = order[:n_hold].sort().values + self.k
            self.windows = all_w[order[n_hold:].sort().values]
        else:
            self.windows = self.examples
        self.predict = self.predict or self.schema.width
        if len(self.windows) == 0:
            raise ValueError(
                f"atom {self.schema.name!r}: need at least {self.k + 1} observations to train, have {len(self.ids)}"
            )
        self.fingerprint = data_fingerprint(self.ids)
        self.model = Atom.for_schema(self.schema)
        gen = torch.Generator().manual_seed(self.config.seed)
        self.model.init_weights(gen)
        if self.init is not None:
            warm = load_weights(self.init)
            if warm.schema.to_dict() != self.schema.to_dict():
                raise WeightsError("warm-start weights were trained for a different schema")
            self.model.load_state_dict(warm.model.state_dict())
        self.model.train()
        c = self.config
        # Hand-derived forward/backward and fused Adam over flat buffers (see train_step.py).
        self.fast = TrainStep(self.model, betas=(c.beta1, c.beta2), eps=c.eps)
        self.shuffle = torch.Generator().manual_seed(c.seed + 1)
        self.perm = torch.randperm(len(self.windows), generator=self.shuffle)
        self.pos = 0
        self.epoch = 0
        self.step_no = 0
        self.last_loss = float("nan")
        self.elapsed = 0.0

    # --- one step --------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        c = self.config
        return c.lr * max(c.lr_floor, 1.0 - step / c.steps)

    def _next_batch(self) -> torch.Tensor:
        b = self.config.batch_size
        parts = []
        need = b
        while need:
            take = self.perm[self.pos: self.pos + need]
            parts.append(take)
            self.pos += len(take)
            need -= len(take)
            if self.pos >= len(self.perm):
                self.epoch += 1
                self.pos = 0
                self.perm = torch.randperm(len(self.windows), generator=self.shuffle)
        return self.windows[torch.cat(parts) if len(parts) > 1 else parts[0]]

    def _distinct(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as its distinct windows and each one's share of the mean loss per token.

        Quantized streams repeat: a batch often holds the same window many times. The mean
        over the batch equals the count-weighted mean over its distinct windows, so forward
        and backward run only on those (same gradient, a fraction of the work).
        """
        n, f = len(w), self.predict
        if self.examples is None and n > 1:
            keys = window_keys(self.schema, w)
            uniq, inverse, counts = (torch.unique(keys, return_inverse=True, return_counts=True) if keys is not None
                                     else torch.unique(w, dim=0, return_inverse=True, return_counts=True))
            if len(uniq) < n:
                rep = torch.empty(len(uniq), dtype=torch.long).scatter_(0, inverse, torch.arange(n))
                return w[rep], counts.to(torch.float32).div_(n * f)
        return w, torch.full((n,), 1.0 / (n * f))

    def step(self) -> float:
        w, weight = self._distinct(self._next_batch())
        f = self.predict
        loss = self.fast.loss_and_grad(w[:, :-1], w[:, -f:], weight)
        self.fast.adam(self.lr_at(self.step_no))
        self.step_no += 1
        self.last_loss = loss.item()
        return self.last_loss

    def run(self, until: int | None = None, on_progress: Callable[[Progress], None] | None = None,
            every: int = 10, should_stop: Callable[[], bool] | None = None) -> Progress:
        """Train up to step ``until`` (default: the configured steps), reporting progress."""
        end = min(self.config.steps, until if until is not None else self.config.steps)
        t0 = time.perf_counter()
        while self.step_no < end:
            self.step()
            if on_progress and (self.step_no % every == 0 or self.step_no == end):
                on_progress(self.progress(t0))
            if should_stop and should_stop():
                break
        self.elapsed += time.perf_counter() - t0
        return self.progress(time.perf_counter())

    def progress(self, t0: float) -> Progress:
        return Progress(self.step_no, self.config.steps, self.last_loss, self.lr_at(self.step_no),
                        self.elapsed + time.perf_counter() - t0)

    @property
    def finished(self) -> bool:
        return self.step_no >= self.config.steps

    # --- state -----------------------------------------------------------------------------

    def state_bytes(self) -> bytes:
        """The complete training state (weights, Adam, RNG, data order) as safetensors bytes."""
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.step_no:  # per-parameter Adam state, as torch.optim.Adam's state_dict holds it
            fast = self.fast
            for name, m, v in zip(fast.names, fast.views(fast.exp_avg).values(), fast.views(fast.exp_avg_sq).values(),
                                  strict=True):
                tensors.update({f"adam.{name}.step": fast.steps.clone(), f"adam.{name}.exp_avg": m,
                                f"adam.{name}.exp_avg_sq": v})
        tensors["rng.shuffle"] = self.shuffle.get_state()
        tensors["data.perm"] = self.perm
        meta = {
            "format": STATE_FORMAT, "schema": self.schema.to_dict(), "config": asdict(self.config),
            "step": self.step_no, "pos": self.pos, "epoch": self.epoch, "loss": self.last_loss,
            "elapsed": self.elapsed, "fingerprint": self.fingerprint,
        }
        return pack(tensors, meta)

    @classmethod
    def resume(cls, schema: AtomSchema, ids: torch.Tensor, state: bytes) -> Trainer:
        tensors, meta = unpack(state)
        if meta.get("format") != STATE_FORMAT:
            raise WeightsError(f"not a kiri training state (format {meta.get('format')!r})")
        if meta.get("schema") != schema.to_dict():
            raise WeightsError("training state belongs to a different atom schema")
        t = cls(schema, ids, TrainConfig(**meta["config"]))
        if meta.get("fingerprint") != t.fingerprint:
            raise WeightsError("training state was made from different data; restart training instead")
        t.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        t.fast.load_adam({k.removeprefix("adam."): v for k, v in tensors.items() if k.startswith("adam.")})
        t.shuffle.set_state(tensors["rng.shuffle"])
        t.perm = tensors["data.perm"].clone()
        t.pos, t.epoch, t.step_no = int(meta["pos"]), int(meta["epoch"]), int(meta["step"])
        t.last_loss, t.elapsed = float(meta["loss"]), float(meta["elapsed"])
        return t

    def weights_bytes(self, info: dict[str, Any] | None = None, calibrate: bool = True) -> bytes:
        """Weights with their lineage facts and, for observation atoms, a default threshold."""
        base: dict[str, Any] = {"steps": self.step_no, "loss": self.last_loss, "context": self.k,
                                "config": asdict(self.config), "fingerprint": self.fingerprint,
                                "observations": len(self.ids)}
        if calibrate and self.examples is None:
            from kiri.model import score

            self.model.eval()
            all_scores = score.Scorer.from_model(self.schema, self.model, self.k).score(self.ids).mean
            # Held-out windows when there are enough for a stable p99; else all of them.
            held = len(self.held) >= 200
            scores = all_scores[self.held] if held else all_scores
            base.update(score.calibrate(scores), calibrated_on="holdout" if held else "all",
                        held_out=len(self.held))
            self.model.train()
        return save_weights(self.schema, self.model, {**base, **(info or {})})
