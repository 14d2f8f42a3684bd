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

import numpy as np
import torch

from kiri.model.calibrate import Calibration, suspect_share
from kiri.model.codec import Codec
from kiri.model.gpt import Atom
from kiri.model.routine import Routine, beyond
from kiri.model.schema import AtomSchema, resolve_context
from kiri.model.score import EXCESS, window_keys
from kiri.model.train_step import TrainStep
from kiri.model.weights import WeightsError, load_weights, pack, save_weights, unpack
from kiri.model.windows import windows

STATE_FORMAT = "kiri.train-state/1"
TRIM_WARMUP = 20  # steps before the trimmed likelihood starts (the model first learns the bulk)


@dataclass(frozen=True)
class TrainConfig:
    # None: sized to the data (see ``auto_steps``) and stopped early when held-out windows,
    # later in time than the training ones, stop improving. A number: exactly that many steps.
    steps: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    lr_floor: float = 0.1  # linear decay stops at 10% of lr
    beta1: float = 0.85
    beta2: float = 0.99
    eps: float = 1e-8
    seed: int = 0
    context: int | None = None  # previous observations per window; None = sized to the data
    # Fraction of windows kept out of training, in contiguous blocks spread over the span and
    # ending with the newest (``held_blocks``): early stopping watches their loss and the
    # calibration is fitted on their scores (data the model has not fitted, never labels).
    holdout: float = 0.2
    # Share of each batch's loss, its most surprising windows', left out after the first
    # ``TRIM_WARMUP`` steps (a trimmed likelihood): a history's own anomalies are never
    # learned as normal. It must start early: anomalies that recur (a spike every few
    # hours) are learned within the first tenth of a run, and once learned they are no
    # longer the worst of a batch (a start at 10% of the run, or a 5% share, measured no
    # better than none). 10% is above the contamination kiri promises to survive (a few
    # percent), and costs a clean history little: the calibration is measured on
    # held-out windows, which are never trimmed.
    trim: float = 0.1
    patience: int = 4  # evaluations without a better held-out loss before stopping (auto steps)

    def __post_init__(self) -> None:
        checks = [
            (self.steps is None or (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                    and 1 <= self.steps <= 10_000_000), "steps must be 1..10,000,000"),
            (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 65536, "batch_size must be 1..65536"),
            (0 < self.lr <= 10 and math.isfinite(self.lr), "lr must be in (0, 10]"),
            (0 <= self.lr_floor <= 1, "lr_floor must be in [0, 1]"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed must be a non-negative integer"),
            (0 <= self.holdout < 1, "holdout must be in [0, 1)"),
            (0 <= self.trim < 0.5, "trim must be in [0, 0.5)"),
            (isinstance(self.patience, int) and 1 <= self.patience <= 1000, "patience must be 1..1000"),
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


HOLD_BLOCKS = 4


def held_blocks(n: int, n_hold: int) -> torch.Tensor:
    """Window indices held out: ``HOLD_BLOCKS`` contiguous blocks spread over the span, the last
    one ending at the newest window.

    Contiguous, so a held-out window's context is held out too (a random window shares all
    but one of its context rows with training windows, and so cannot show overfitting);
    spread, so the calibration sees every kind of day (the last 20% of a week is a weekend);
    and always the newest data, which is what the model will meet next.
    """
    if n_hold <= 0:
        return torch.empty(0, dtype=torch.long)
    size = max(1, n_hold // HOLD_BLOCKS)
    ends = [round(n * (i + 1) / HOLD_BLOCKS) for i in range(HOLD_BLOCKS)]
    idx = torch.cat([torch.arange(max(0, e - size), e) for e in ends])
    return torch.unique(idx)


def auto_context(schema: AtomSchema, n_obs: int) -> int:
    """Context rows that a history of ``n_obs`` observations can teach: about log2(n/100).

    Each context row multiplies the patterns a model can tell apart; with a few hundred
    observations, a long context only lets it memorise them (held-out surprise explodes).
    """
    want = max(1, int(math.log2(max(n_obs, 2) / 100))) if n_obs >= 200 else 1
    return min(schema.max_context(), want)


def auto_steps(n_windows: int, batch_size: int) -> int:
    """The step budget of a sized run: about 30 passes over the data, 300 to 3,000 steps."""
    return int(min(3000, max(300, math.ceil(30 * n_windows / max(1, batch_size)))))


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
    codec: Codec | None = None  # how raw values became ``ids`` (None: the schema's fixed buckets)
    split: str = "time"  # held-out windows: the latest ("time"), or seeded spread ("random", old states)

    def __post_init__(self) -> None:
        c = self.config
        n_obs = len(self.ids)
        self.k = resolve_context(self.schema, c.context if c.context is not None or self.examples is not None
                                 else auto_context(self.schema, n_obs))
        self.held = torch.empty(0, dtype=torch.long)  # target indices kept out: early stopping, calibration
        if self.examples is None:
            all_w = windows(self.ids, self.k)
            n_hold = int(len(all_w) * c.holdout) if len(all_w) >= 20 else 0
            if self.split == "time":
                held = held_blocks(len(all_w), n_hold)
                mask = torch.ones(len(all_w), dtype=torch.bool)
                mask[held] = False
                keep = mask.nonzero().view(-1)
                self.held = held + self.k
            else:
                order = torch.randperm(len(all_w), generator=torch.Generator().manual_seed(c.seed + 2))
                keep = order[n_hold:].sort().values
                self.held = order[:n_hold].sort().values + self.k
            self.windows = all_w[keep]
            self.val_windows = all_w[self.held[-2048:] - self.k] if len(self.held) else all_w[:0]
        else:
            self.windows = self.examples
            self.val_windows = self.examples[:0]
        self.predict = self.predict or self.schema.width
        if len(self.windows) == 0:
            raise ValueError(
                f"atom {self.schema.name!r}: need at least {self.k + 1} observations to train, have {len(self.ids)}"
            )
        # Sized runs stop early on held-out loss; an explicit step count runs exactly that long.
        self.auto = c.steps is None
        self.total_steps = c.steps if c.steps is not None else auto_steps(len(self.windows), c.batch_size)
        self.early = self.auto and len(self.val_windows) >= 10
        self.eval_every = max(10, self.total_steps // 40)
        # a window's surprise if the model knew nothing (uniform over each field's buckets)
        self.blind = sum(math.log(fl.buckets) for fl in self.schema.fields[-self.predict:])
        self.trim_from = self.total_steps + 1 if self.examples is not None else min(TRIM_WARMUP, self.total_steps // 10)
        self.fingerprint = data_fingerprint(self.ids)
        self.model = Atom.for_schema(self.schema)
        gen = torch.Generator().manual_seed(c.seed)
        self.model.init_weights(gen)
        if self.init is not None:
            warm = load_weights(self.init)
            if warm.schema.to_dict() != self.schema.to_dict():
                raise WeightsError("warm-start weights were trained for a different schema")
            self.model.load_state_dict(warm.model.state_dict())
        self.model.train()
        # Hand-derived forward/backward and fused Adam over flat buffers (see train_step.py).
        self.fast = TrainStep(self.model, betas=(c.beta1, c.beta2), eps=c.eps)
        self.shuffle = torch.Generator().manual_seed(c.seed + 1)
        self.perm = torch.randperm(len(self.windows), generator=self.shuffle)
        self.pos = 0
        self.epoch = 0
        self.step_no = 0
        self.last_loss = float("nan")
        self.elapsed = 0.0
        # early stopping: the best held-out loss so far, the weights that had it, and since when
        self.best_loss = math.inf
        self.best_step = 0
        self.best_flat: torch.Tensor | None = None
        self.bad_evals = 0
        self.stopped = False

    # --- one step --------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        c = self.config
        return c.lr * max(c.lr_floor, 1.0 - step / self.total_steps)

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
        trim = self.config.trim if self.step_no >= self.trim_from else 0.0
        loss = self.fast.loss_and_grad(w[:, :-1], w[:, -f:], weight, trim=trim, floor=self.blind)
        self.fast.adam(self.lr_at(self.step_no))
        self.step_no += 1
        self.last_loss = loss.item()

        if self.early and (self.step_no % self.eval_every == 0 or self.step_no >= self.total_steps):
            self._evaluate()
        return self.last_loss

    def held_out_loss(self) -> float:
        """Mean surprise (nats per token) of the held-out windows under the current weights."""
        from kiri.model.score import Scorer

        return float(Scorer.from_model(self.schema, self.model, self.k, ordinal=False)
                     ._surprise(self.val_windows).mean())

    def _evaluate(self) -> None:
        """Early stopping: keep the best weights; stop after ``patience`` evaluations without better."""
        val = self.held_out_loss()
        if val < self.best_loss - 1e-4:
            self.best_loss, self.best_step, self.bad_evals = val, self.step_no, 0
            self.best_flat = self.fast.flat.clone()
        else:
            self.bad_evals += 1
        if self.bad_evals >= self.config.patience or self.step_no >= self.total_steps:
            self.stopped = True
            if self.best_flat is not None:
                self.fast.flat.copy_(self.best_flat)

    def run(self, until: int | None = None, on_progress: Callable[[Progress], None] | None = None,
            every: int = 10, should_stop: Callable[[], bool] | None = None) -> Progress:
        """Train up to step ``until`` (default: the configured steps), reporting progress."""
        end = min(self.total_steps, until if until is not None else self.total_steps)
        t0 = time.perf_counter()
        while self.step_no < end and not self.stopped:
            self.step()
            if on_progress and (self.step_no % every == 0 or self.step_no == end):
                on_progress(self.progress(t0))
            if should_stop and should_stop():
                break
        self.elapsed += time.perf_counter() - t0
        return self.progress(time.perf_counter())

    def progress(self, t0: float) -> Progress:
        return Progress(self.step_no, self.total_steps, self.last_loss, self.lr_at(self.step_no),
                        self.elapsed + time.perf_counter() - t0)

    @property
    def finished(self) -> bool:
        return self.stopped or self.step_no >= self.total_steps

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
        if self.best_flat is not None:
            tensors["early.best"] = self.best_flat
        meta = {
            "format": STATE_FORMAT, "schema": self.schema.to_dict(), "config": asdict(self.config),
            "step": self.step_no, "pos": self.pos, "epoch": self.epoch, "loss": self.last_loss,
            "elapsed": self.elapsed, "fingerprint": self.fingerprint, "split": self.split,
            "codec": self.codec.to_dict() if self.codec is not None else None,
            "early": {"best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
                      "best_step": self.best_step, "bad_evals": self.bad_evals, "stopped": self.stopped},
        }
        return pack(tensors, meta)

    @staticmethod
    def state_codec(schema: AtomSchema, state: bytes) -> Codec | None:
        """The codec a training state's data was encoded with (to encode the same raw values again)."""
        _, meta = unpack(state)
        d = meta.get("codec")
        return Codec.from_dict(schema, d) if d else None

    @classmethod
    def resume(cls, schema: AtomSchema, ids: torch.Tensor, state: bytes) -> Trainer:
        tensors, meta = unpack(state)
        if meta.get("format") != STATE_FORMAT:
            raise WeightsError(f"not a kiri training state (format {meta.get('format')!r})")
        if meta.get("schema") != schema.to_dict():
            raise WeightsError("training state belongs to a different atom schema")
        # states written before sized training had no trimming and a seeded random hold-out
        config = TrainConfig(**{"trim": 0.0, **meta["config"]})
        codec = Codec.from_dict(schema, meta["codec"]) if meta.get("codec") else None
        t = cls(schema, ids, config, codec=codec, split=meta.get("split", "random"))
        if meta.get("fingerprint") != t.fingerprint:
            raise WeightsError("training state was made from different data; restart training instead")
        t.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        t.fast.load_adam({k.removeprefix("adam."): v for k, v in tensors.items() if k.startswith("adam.")})
        t.shuffle.set_state(tensors["rng.shuffle"])
        t.perm = tensors["data.perm"].clone()
        t.pos, t.epoch, t.step_no = int(meta["pos"]), int(meta["epoch"]), int(meta["step"])
        t.last_loss, t.elapsed = float(meta["loss"]), float(meta["elapsed"])
        early = meta.get("early") or {}
        t.best_loss = math.inf if early.get("best_loss") is None else float(early["best_loss"])
        t.best_step, t.bad_evals = int(early.get("best_step", 0)), int(early.get("bad_evals", 0))
        t.stopped = bool(early.get("stopped", False))
        t.best_flat = tensors["early.best"].clone() if "early.best" in tensors else None
        return t

    def newest_held(self, least: int = 20) -> torch.Tensor:
        """The held-out block that ends at the newest data: what a candidate is judged on,
        since it is what the model will meet next (all held-out targets if that is too few)."""
        block = self.held[-max(1, len(self.held) // HOLD_BLOCKS):]
        return block if len(block) >= least else self.held

    def weights_bytes(self, info: dict[str, Any] | None = None, calibrate: bool = True,
                      alarm_rate: float | None = None, recent: np.ndarray | None = None,
                      window: np.ndarray | None = None, kept: np.ndarray | None = None) -> bytes:
        """Weights with their lineage facts and, for observation atoms, codec and calibration.

        The calibration is fitted on ``recent`` when it holds at least ``RECENT_MIN`` scores
        (the stream's recent scores: every score it got while being watched, alarms
        included, which the tail's own first pass sets aside when they lie far out),
        else on the held-out windows' scores (the latest data, which the model has not
        fitted) when there are enough of them, else on every window's. The
        threshold is the point score that alone spends the alarm budget (``alarm_rate``
        alarms per observation); ``judged_anomalous`` is the share of the training data whose
        own tail probability falls under it: how much of its history kiri found anomalous.

        ``window``: the raw values [W, F] of the whole window trained from, rows left out
        included, and ``kept`` [W] which of them this model trained on (in order: the
        ``ids``). With them the weights learn the stream's routine (``routine.Routine``,
        from this model's scores of the whole window: the readings a routine change
        surprises are often the ones a first fit left out), and the calibration measures
        scores beyond it.
        """
        from kiri.model import calibrate as cal

        base: dict[str, Any] = {"steps": self.step_no, "loss": self.last_loss, "context": self.k,
                                "config": asdict(self.config), "fingerprint": self.fingerprint,
                                "observations": len(self.ids)}
        if self.early:
            base.update(best_step=self.best_step, held_out_loss=self.best_loss)
        if calibrate and self.examples is None:
            from kiri.model import score

            rate = alarm_rate if alarm_rate is not None else cal.alarm_rate(cal.DEFAULT_ALARMS_PER_WEEK, 300.0)
            self.model.eval()
            codec = self.codec or Codec.fixed(self.schema)
            scorer = score.Scorer.from_model(self.schema, self.model, self.k, excess=True, codec=codec)
            all_scores = scorer.score(self.ids).mean.numpy()
            held = len(self.held) >= 50
            ref = all_scores[self.held.numpy()] if held else all_scores
            on = "holdout" if held else "all"
            if recent is not None and len(recent) >= cal.RECENT_MIN:
                ref, on = np.asarray(recent, dtype=np.float64), "recent"
            calib = Calibration.fit(ref)
            learned = self._routine(scorer, codec, window, kept, all_scores, calib.point.knots[-1])
            if learned is not None:
                routine, mine = learned
                base["routine"] = routine.to_dict()
                all_scores = beyond(torch.from_numpy(all_scores), torch.from_numpy(mine)).numpy()
                if on != "recent":  # (recent scores were recorded beyond the routine they were scored with)
                    ref = all_scores[self.held.numpy()] if held else all_scores
                calib = Calibration.fit(ref)
            p = calib.tail_p(all_scores)
            q = [float(x) for x in torch.quantile(torch.from_numpy(ref).float(), torch.tensor([0.5, 0.99, 0.999]))]
            base.update(threshold=calib.threshold(rate), alarm_rate=rate, calibration=calib.to_dict(),
                        calibrated_on=on, held_out=len(self.held),
                        score_p50=q[0], score_p99=q[1], score_p999=q[2], scoring=EXCESS,
                        judged_anomalous=float((p < rate).mean()) if len(p) else 0.0,
                        suspect_share=suspect_share(calib, ref),
                        codec=codec.to_dict())
            self.model.train()
        return save_weights(self.schema, self.model, {**base, **(info or {})})

    def _routine(self, scorer: Any, codec: Codec, window: np.ndarray | None, kept: np.ndarray | None,
                 scores: np.ndarray, floor: float) -> tuple[Routine, np.ndarray] | None:
        """The routine of ``window`` as this model scores it (``weights_bytes``) and each
        trained row's routine surprise, or None. ``scores``: the trained rows' scores, which
        are the window's own when no row was left out."""
        if window is None or kept is None:
            return None
        window, kept = np.asarray(window, dtype=np.float64), np.asarray(kept, dtype=bool)
        if len(window) != len(kept) or int(kept.sum()) != len(self.ids):
            raise ValueError(f"window of {len(window)} rows with {int(kept.sum())} kept, "
                             f"for {len(self.ids)} trained on")
        if not kept.all():  # the left-out rows in their places, as context too
            scores = scorer.score(codec.encode(window), values=window).mean.numpy()
        routine = Routine.fit(self.schema, window, scores, floor)
        return None if routine is None else (routine, routine.expected(self.schema, window[kept]))
