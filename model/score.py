"""Scoring: an observation's anomaly score is the model's mean surprise at its tokens.

Each target observation is scored with the previous observations of the same atom as
context (the windows training used) and only its own tokens count. Scoring is batched: a
whole stream of observations goes through the model in large chunks under inference mode.

Buckets are ordered, so surprise is too (weights made since codecs, ``scoring: ordinal/1``):
a fitted field's token probability is read through a kernel over its neighbouring buckets,
``p~(b) = sum_j p(j)·exp(-|b-j| / (0.05·B))``, so landing one bucket off a confident
prediction costs little (0.6 nats at 32 buckets) while a jump across the range costs what an
unseen token does; the two beyond-the-seen-range buckets stand alone.

Weights made since ``scoring: excess/1`` are scored by how much more surprising each
observation is than the model itself expected in that context: the ordinal surprise minus
its expectation under the model's own prediction, ``sum_b p(b)·(-log p~(b))``, per field. A
field the model cannot predict (daytime activity) no longer outscores one it predicts with
confidence and finds wrong (activity at 3am): raw surprise ranks a busy afternoon like an
anomaly at night, and a history that holds a few such anomalies teaches the model to
expect them a little, which raw surprise cannot tell from an ordinary afternoon. On
bench/detect.py, same run (3 seeds; single streams 2): composition F1 0.914 -> 0.942 with a
clean week and 0.517 -> 0.649 with 5% anomalies in it, best-threshold F1 0.930 -> 0.952 and
0.648 -> 0.778; single streams F1 0.423 -> 0.438 (clean) and 0.479 -> 0.489 (5%), anomaly-free
alarms 6.42 -> 6.18 a week. The per-token breakdown (blame) stays the plain surprise.

Weights made since ``scoring: excess/2`` leave the clock fields (``schema.CLOCK_FIELDS``:
hour, weekday) out of that mean. The model still reads them, so a reading is judged for its
hour, but a clock token is never the anomaly: before, every midnight, every new weekday
and every step of a coarse hour bucket scored like one, because a context of a few rows
cannot tell when the clock's bucket turns over. Older weights score exactly as before.

Weights whose codec carries its fields' tail scales (``codec.FieldTail``) grade a reading
beyond the seen range by how far beyond it is, when the caller gives the raw values: its
surprise is that of the nearest seen bucket plus one nat per tail scale past the most
extreme value trained on, or the beyond token's own surprise if that is less. The token
alone says only "higher than anything trained on", which a model that never saw it prices
at 10-18 nats; on a heavy-tailed stream every new extreme (one reading in a few hundred)
then scored like a runaway and alarmed (bench/detect.py, anomaly-free heavy tails: 16.9
alarms a week against a budget of 2, 13.3 graded).

Weights that learned their stream's routine (``routine.Routine``: surprise that recurs at
the same time on most days, such as getting up at 8:00) score a reading by how far it
exceeds its slot's routine, when the caller gives the raw values (``score(values=...)``,
which the hour and weekday are read from). Without them the score is the plain statistic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kiri.model.calibrate import Calibration
from kiri.model.codec import Codec
from kiri.model.forward import Forward
from kiri.model.gpt import Atom
from kiri.model.routine import Routine, beyond
from kiri.model.schema import AtomSchema, resolve_context
from kiri.model.weights import Weights
from kiri.model.windows import random_ids, short_window, windows

CHUNK = 512
# Distinct windows a Scorer made from weights remembers across calls, per window length.
# A backfill asks for the same windows batch after batch: 120 days of 30 s pulse are 345,599
# windows, 68,496 distinct within their 5,000-row batches, and 6,430 distinct in all.
# At pulse's size a remembered window is ~150 bytes: at most ~10 MB per atom a scorer serves.
MEMO_WINDOWS = 1 << 16
ORDINAL = "ordinal/1"
EXCESS_ALL = "excess/1"  # ordinal surprise minus the model's own expectation of it, over every field
EXCESS = "excess/2"  # the same over the fields judged (clock fields left out; module doc)
KERNEL_WIDTH = 0.05  # of a field's bucket count: a neighbour counts 0.54 at 32 buckets, 0.14 at 10


def ordinal_kernels(codec: Codec) -> list[torch.Tensor]:
    """Per field, [B, B] weights exp(-|b - j| / (KERNEL_WIDTH·B)) of bucket j's probability at bucket b.

    Only fitted fields are ordinal here, and their two beyond-the-seen-range buckets stand
    alone: "above anything seen" is not one step from the highest normal bucket, however
    close their numbers are. Other fields keep plain surprise.
    """
    out = []
    for f, edges, fitted in zip(codec.schema.fields, codec.edges, codec.fitted, strict=True):
        k = torch.eye(f.buckets)
        if fitted:
            d = (torch.arange(f.buckets)[:, None] - torch.arange(f.buckets)[None, :]).abs().float()
            k = torch.exp(-d / (KERNEL_WIDTH * f.buckets))
            for b in (0, len(edges)):
                k[b, :] = 0.0
                k[:, b] = 0.0
                k[b, b] = 1.0
        out.append(k)
    return out


def score_of(surprise: torch.Tensor, expected: torch.Tensor | None,
             judged: Sequence[int] | None = None) -> torch.Tensor:
    """Each row's score from its per-field surprise [n, F]: the mean, or for ``excess``
    weights (``expected`` given) how far it exceeds the mean surprise the model expected;
    over the ``judged`` fields only when given (``excess/2``), else over all of them."""
    if judged is not None and len(judged) < surprise.shape[1]:
        cols = torch.tensor(judged, dtype=torch.long)
        surprise = surprise.index_select(1, cols)
        expected = None if expected is None else expected.index_select(1, cols)
    if expected is None:
        return surprise.mean(dim=1)
    return surprise.mean(dim=1) - expected.mean(dim=1)


@dataclass(frozen=True)
class Scores:
    """Scores of observations ``start`` … N-1 of a stream: the score and per-token surprise (nats)."""

    schema: AtomSchema
    token_ids: torch.Tensor  # [M, F]
    surprise: torch.Tensor  # [M, F]  -log p(token)
    expected: torch.Tensor | None = None  # [M, F]  the surprise the model expected (``excess`` weights)
    judged: tuple[int, ...] | None = None  # the fields the score averages (None: all)
    routine: torch.Tensor | None = None  # [M] each observation's routine surprise (``routine``)

    @property
    def mean(self) -> torch.Tensor:
        """Each observation's score (``score_of``), beyond its routine when there is one."""
        return beyond(score_of(self.surprise, self.expected, self.judged), self.routine)

    def breakdown(self, i: int) -> list[dict[str, float | str]]:
        """Per-token blame for one scored observation: token, surprise, probability."""
        toks = self.schema.tokens(self.token_ids[i].tolist())
        return [
            {"token": t, "surprise": float(s), "prob": math.exp(-float(s))}
            for t, s in zip(toks, self.surprise[i].tolist(), strict=True)
        ]


class Scorer:
    """Scores observations with one weights version: its codec, context, surprise and calibration."""

    def __init__(self, weights: Weights, context: int | None = None) -> None:
        info = weights.info
        self.schema = weights.schema
        self.model = weights.model.eval()
        default = info.get("context")
        self.k = resolve_context(self.schema, context if context is not None else default)
        self.threshold = float(info.get("threshold", 1.5))
        self.codec = Codec.from_dict(self.schema, info.get("codec"))
        scoring = info.get("scoring")
        self.excess = scoring in (EXCESS, EXCESS_ALL)
        self.judged = self.schema.judged if scoring == EXCESS else None
        self.ordinal = self.excess or scoring == ORDINAL
        self.calibration = Calibration.from_dict(info.get("calibration"))
        self.routine = Routine.from_dict(info.get("routine"))
        self.alarm_rate = float(info["alarm_rate"]) if "alarm_rate" in info else None
        self._kernels = ordinal_kernels(self.codec) if self.ordinal else None
        self.graded = self.excess and self.codec.tails is not None
        # weights never change, so a window's surprise stays what it was (from_model: a model
        # that may still train gets none)
        self._memo: dict[int, WindowMemo] | None = {}

    @classmethod
    def from_model(cls, schema: AtomSchema, model: Atom, context: int, ordinal: bool = False,
                   codec: Codec | None = None, excess: bool = False) -> Scorer:
        self = cls.__new__(cls)
        self.schema, self.model, self.k, self.threshold = schema, model, context, 1.5
        self.codec = codec or Codec.fixed(schema)
        self.excess = excess
        self.judged = schema.judged if excess else None  # as ``excess/2`` weights score
        self.ordinal, self.calibration, self.alarm_rate = ordinal or excess, None, None
        self.routine = None
        self._kernels = ordinal_kernels(self.codec) if self.ordinal else None
        self.graded = self.excess and self.codec.tails is not None
        self._memo = None
        return self

    def encode(self, values: np.ndarray) -> torch.Tensor:
        """[N, F] token ids of raw values [N, F], with this version's codec."""
        return self.codec.encode(values)

    def tail_p(self, scores: torch.Tensor | np.ndarray, prefix: np.ndarray | None = None) -> np.ndarray | None:
        """Calibrated tail probabilities of scores (None for weights made before calibration)."""
        if self.calibration is None:
            return None
        return self.calibration.tail_p(np.asarray(scores, dtype=np.float64), prefix=prefix)

    def verdicts(self, scores: torch.Tensor | np.ndarray, tail_p: np.ndarray | None,
                 alarm_rate: float | None = None) -> np.ndarray:
        """Anomalous or not: tail probability under the alarm rate, or (old weights) score over threshold."""
        rate = alarm_rate if alarm_rate is not None else self.alarm_rate
        if tail_p is not None and rate is not None:
            return np.asarray(tail_p) < rate
        return np.asarray(scores) > self.threshold

    def _stat(self, out: torch.Tensor) -> torch.Tensor:
        """Each row's score from [n, F] surprise, or for ``excess`` [n, 2F], the surprise and
        then the surprise expected (``_surprise``'s rows once ``_graded``)."""
        f = self.schema.width
        return score_of(out[:, :f], out[:, f: 2 * f] if self.excess else None, self.judged)

    @property
    def _width(self) -> int:
        """Columns of a ``_surprise`` row: surprise, then (``excess``) the surprise expected,
        then (``graded``) the surprise at the nearest seen bucket."""
        f = self.schema.width
        return 3 * f if self.graded else 2 * f if self.excess else f

    def _graded(self, out: torch.Tensor, targets: torch.Tensor, values: np.ndarray | None) -> torch.Tensor:
        """``_surprise`` rows with each beyond-range token's surprise graded by how far beyond
        its raw value is (module doc): at most the nearest seen bucket's plus a nat per tail
        scale. ``targets`` [n, F]: the rows' token ids; ``values`` [n, F] their raw values.
        Without values (or for weights without tail scales) the rows as they are."""
        if not self.graded:
            return out
        f = self.schema.width
        plain = out[:, : 2 * f]
        if values is None:
            return plain
        past = self._beyond_token[targets]  # [n, F]: beyond tokens of the fields with tail scales
        rows = torch.nonzero(past.any(dim=1)).squeeze(1)
        if not len(rows):  # the usual case: every reading inside the seen range
            return plain
        idx = rows.numpy()
        far = torch.from_numpy(self.codec.beyond(np.asarray(values, dtype=np.float64).reshape(-1, f)[idx]))
        s = out[rows, :f]
        graded = plain.clone()
        graded[rows, :f] = torch.where(past[rows], torch.minimum(s, out[rows, 2 * f:] + far.to(out.dtype)), s)
        return graded

    @functools.cached_property
    def _beyond_token(self) -> torch.Tensor:
        """[vocabulary] bool: the token ids that are a beyond-range bucket of a field with tail scales."""
        vocab = max(off + fl.buckets for off, fl in zip(self.schema.offsets(), self.schema.fields, strict=True))
        out = torch.zeros(vocab, dtype=torch.bool)
        assert self.codec.tails is not None  # (only graded scorers ask)
        for off, edges, tail in zip(self.schema.offsets(), self.codec.edges, self.codec.tails, strict=True):
            if tail is not None:
                out[off] = out[off + len(edges)] = True
        return out

    @torch.inference_mode()
    def _surprise(self, w: torch.Tensor) -> torch.Tensor:
        """Surprise at the last F tokens of each window, each distinct window computed once
        (with ``excess``, [n, 2F]: then the surprise the model expected at each).

        Quantized streams repeat themselves (a quiet night is the same few windows over and
        over) and the model is deterministic per window, so scoring distinct windows and
        scattering the results back is exact and often hundreds of times less work. A Scorer
        made from weights also remembers the windows it has computed (``WindowMemo``), so a
        backfill's next batch computes only the windows no earlier batch had.
        """
        if len(w) <= 64 and self._memo is None:
            return self._forward(w)
        keys = window_keys(self.schema, w)
        if keys is None:
            if len(w) > 64:
                uniq, inverse = torch.unique(w, dim=0, return_inverse=True)
                if len(uniq) < 0.8 * len(w):
                    return self._forward(w[_first_of(inverse, len(uniq))])[inverse]
            return self._forward(w)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        rep = _first_of(inverse, len(uniq))
        if self._memo is not None:
            memo = self._memo.setdefault(w.shape[1], WindowMemo(MEMO_WINDOWS))
            return memo.get(uniq, lambda missing: self._forward(w[rep[missing]]))[inverse]
        if len(uniq) < 0.8 * len(w):
            return self._forward(w[rep])[inverse]
        return self._forward(w)

    def _forward(self, w: torch.Tensor) -> torch.Tensor:
        """Surprise at each window's last F tokens, in chunks small enough to stay in cache."""
        f = self.schema.width
        fwd = Forward({n: p.detach() for n, p in self.model.named_parameters()}, self.model.size)
        out = torch.empty((len(w), self._width))
        table = fwd.first_layer_table(w.shape[1] - 1)
        for i in range(0, len(w), CHUNK):
            chunk = w[i: i + CHUNK]
            x = fwd.hidden(chunk[:, :-1], f, table=table)[0]
            logp = torch.log_softmax(torch.mm(x.view(-1, x.shape[-1]), fwd.lm_head.t()), dim=-1)
            if self._kernels is None:
                torch.gather(logp, 1, chunk[:, -f:].reshape(-1, 1), out=out[i: i + len(chunk)].view(-1, 1)).neg_()
            else:
                self._ordinal(logp.view(len(chunk), f, -1), chunk[:, -f:], out[i: i + len(chunk)])
        return out

    def _ordinal(self, logp: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> None:
        """Ordinal surprise (module doc) of targets [n, f] under log-probabilities [n, f, V],
        into out [n, f]; with ``excess``, out is [n, 2f] and its second half gets each field's
        expected ordinal surprise under the same prediction; ``graded``, [n, 3f], and the third
        gets the surprise at the seen bucket nearest the target (``_graded``)."""
        assert self._kernels is not None
        f = targets.shape[1]
        for j, (off, kern, edges) in enumerate(zip(self.schema.offsets(), self._kernels, self.codec.edges,
                                                   strict=True)):
            nb = kern.shape[0]
            p = logp[:, j, off: off + nb].exp()  # [n, B]
            smooth = torch.mm(p, kern)  # [n, B]: p~ at every bucket
            b = (targets[:, j] - off).clamp_(0, nb - 1).unsqueeze(1)
            if not self.excess:
                out[:, j] = smooth.gather(1, b).squeeze(1).clamp_min_(1e-30).log_().neg_()
                continue
            logs = smooth.clamp_min_(1e-30).log_()  # [n, B]: log p~ at every bucket
            out[:, j] = logs.gather(1, b).squeeze(1).neg_()
            out[:, f + j] = (p * logs).sum(dim=1).neg_()
            if self.graded:  # the beyond buckets are 0 and len(edges): their seen neighbours
                near = b.clamp(1, max(1, len(edges) - 1))
                out[:, 2 * f + j] = logs.gather(1, near).squeeze(1).neg_()

    def score(self, ids: torch.Tensor, start: int = 0, flagged: Sequence[bool] | None = None,
              values: np.ndarray | None = None) -> Scores:
        """Score observations ``start`` … N-1 of ``ids`` [N, F], each given up to k predecessors.

        ``values``: the raw values [N, F] the ids encode; with weights that learned a
        routine, each score is then taken beyond its slot's routine surprise, and with
        weights whose codec has tail scales a reading beyond the seen range is graded by how
        far beyond it is (module doc).

        Calibrated weights (and ``k > 0``) also look past anomalies in the context: an
        observation right after a spike is scored against what came before the spike too,
        and keeps the lower of the two surprises. Otherwise the return to normal after every
        anomaly reads as a second anomaly ("the model expected the spike to go on").
        ``flagged`` marks context rows (before ``start``) already judged anomalous.
        """
        n = len(ids)
        if not 0 <= start <= n:
            raise ValueError(f"start {start} outside 0..{n}")
        if values is not None and len(values) != n:
            raise ValueError(f"values has {len(values)} rows for {n} observations")
        f = self.schema.width
        head = range(start, min(self.k, n))  # too few predecessors for a full window
        parts = [self._surprise(short_window(ids, i, self.k)) for i in head]
        full = windows(ids, self.k, start)
        if len(full):
            parts.append(self._surprise(full))
        surprise = torch.cat(parts) if parts else torch.empty((0, self._width))
        scored = None if values is None else np.asarray(values)[start:]
        surprise = self._graded(surprise, ids[start:], scored)
        routine = None
        if self.routine is not None and scored is not None:
            routine = torch.from_numpy(self.routine.expected(self.schema, scored))
        if self.calibration is not None and self.k and n > start:
            surprise = self._past_anomalies(ids, start, surprise, flagged, routine, values)
        if self.excess:
            return Scores(self.schema, ids[start:], surprise[:, :f], surprise[:, f:], self.judged, routine)
        return Scores(self.schema, ids[start:], surprise, routine=routine)

    def _past_anomalies(self, ids: torch.Tensor, start: int, surprise: torch.Tensor,
                        flagged: Sequence[bool] | None, routine: torch.Tensor | None,
                        values: np.ndarray | None = None) -> torch.Tensor:
        assert self.calibration is not None
        n = len(ids)
        bad = np.zeros(n, dtype=bool)
        if flagged is not None:
            given = np.asarray(flagged, dtype=bool)[-start:] if start else np.zeros(0, dtype=bool)
            bad[start - len(given): start] = given
        rate = self.alarm_rate if self.alarm_rate is not None else 1e-3
        bad[start:] = self.calibration.point_p(beyond(self._stat(surprise), routine).numpy()) < rate / 2
        if not bad.any():
            return surprise
        # each row's stand-in: itself if normal, else the nearest earlier normal row
        last_ok = np.where(~bad, np.arange(n), -1)
        last_ok = np.maximum.accumulate(last_ok)
        # rows with a flagged row among their k predecessors (a running count of flags)
        seen = np.concatenate([[0], np.cumsum(bad)])
        at = np.arange(start, n)
        targets = at[seen[at] > seen[np.maximum(0, at - self.k)]].tolist()
        if not targets:
            return surprise
        stand_in = np.where(last_ok >= 0, last_ok, np.arange(n))
        rows = []
        for t in targets:
            ctx = stand_in[max(0, t - self.k): t].tolist()
            rows.append(torch.cat([torch.zeros(1, dtype=torch.long), ids[[*ctx, t]].reshape(-1)]))
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_len.setdefault(len(r), []).append(i)
        out = surprise.clone()
        for idx in by_len.values():
            at = [targets[i] for i in idx]
            clean = self._graded(self._surprise(torch.stack([rows[i] for i in idx])), ids[at],
                                 None if values is None else np.asarray(values)[at])
            better = self._stat(clean) < self._stat(out[[t - start for t in at]])
            for j, i in enumerate(idx):
                if better[j]:
                    out[targets[i] - start] = clean[j]
        return out


def _first_of(inverse: torch.Tensor, n: int) -> torch.Tensor:
    """For each of ``n`` distinct values, one position where it occurs (``inverse`` from torch.unique)."""
    return torch.empty(n, dtype=torch.long).scatter_(0, inverse, torch.arange(len(inverse)))


class WindowMemo:
    """Rows computed for window keys, remembered up to ``capacity`` keys: past that, it
    forgets everything and starts again (a bound on memory, not an eviction policy: a
    stream that outgrows it has few repeats to gain from)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slot: dict[int, int] = {}
        self.rows: torch.Tensor | None = None

    def get(self, keys: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The rows of distinct ``keys``: remembered ones looked up, the others from
        ``compute(their positions in keys)`` and remembered."""
        slots = torch.tensor([self.slot.get(k, -1) for k in keys.tolist()], dtype=torch.long)
        missing = torch.nonzero(slots < 0).squeeze(1)
        if len(missing) and len(self.slot) + len(missing) > self.capacity:
            self.slot.clear()  # full: forget, and compute every key afresh
            slots.fill_(-1)
            missing = torch.arange(len(keys))
        if not len(missing):
            assert self.rows is not None
            return self.rows[slots]
        fresh = compute(missing)
        if len(missing) > self.capacity:  # more than it may hold (all missing: it was just emptied)
            return fresh
        if self.rows is None:  # one width for a memo's life: one Scorer, one window length
            self.rows = torch.empty((0, fresh.shape[1]))
        base = len(self.slot)
        if base + len(missing) > len(self.rows):
            grown = torch.empty((min(self.capacity, max(2 * len(self.rows), base + len(missing))), fresh.shape[1]))
            grown[:base] = self.rows[:base]
            self.rows = grown
        new = torch.arange(base, base + len(missing))
        self.rows[new] = fresh
        self.slot.update(zip(keys[missing].tolist(), new.tolist(), strict=True))
        slots[missing] = new
        return self.rows[slots]


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
