"""Scoring speed: observations scored per second, batched, each with its context window.

    python bench/score.py [--n 200000] [--repeat 3]
"""

from __future__ import annotations

import _paths  # noqa: F401  (must come first: see bench/_paths.py)

# isort: split

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click
import torch

from kiri.model import schema as S
from kiri.model import synth
from kiri.model.score import Scorer
from kiri.model.train import TrainConfig, Trainer
from kiri.model.weights import load_weights
from kiri.model.windows import encode_many, random_ids, windows


@click.command()
@click.option("--days", default=70.0, show_default=True, help="Days of 30 s pulse data to score (70 = 201,600).")
@click.option("--repeat", default=3, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--context", type=int, default=None, help="Previous observations per window (default: as many as fit).")
def main(days: float, repeat: int, threads: int, context: int | None) -> None:
    try:
        S.resolve_context(S.PULSE, context)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--context") from None
    torch.set_num_threads(threads)
    train_ids = encode_many(S.PULSE, synth.generate("pulse", 2, seed=0).rows)
    t = Trainer(S.PULSE, train_ids, TrainConfig(steps=50))
    t.run()
    scorer = Scorer(load_weights(t.weights_bytes()), context=context)
    ids = encode_many(S.PULSE, synth.generate("pulse", days, seed=1).rows)
    scorer.score(ids[:20000])  # warm-up
    print(f"pulse, context {scorer.k} previous observation(s), {threads} thread(s), median of {repeat}:")
    # a noisier stream: each reading moves one bucket up or down with probability 0.25, as
    # a jittery sensor near bucket edges would; far more distinct windows to compute
    gen = torch.Generator().manual_seed(2)
    step = torch.randint(-1, 2, ids.shape, generator=gen) * (torch.rand(ids.shape, generator=gen) < 0.25)
    lo, buckets = torch.tensor(S.PULSE.offsets()), torch.tensor([f.buckets for f in S.PULSE.fields])
    noisy = torch.minimum(torch.maximum(ids + step, lo), lo + buckets - 1)
    # worst case: random observations; with context, every window is distinct and nothing is shared
    rand = random_ids(S.PULSE, len(ids) // 4, torch.Generator().manual_seed(0))
    for name, stream in (("synthetic stream", ids), ("jittery stream", noisy), ("random observations", rand)):
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            scorer.score(stream)
            runs.append(time.perf_counter() - t0)
        dt = statistics.median(runs)
        distinct = len(torch.unique(windows(stream, scorer.k), dim=0))
        print(f"  {name} ({distinct:,} distinct windows): {len(stream):,} observations in {dt:.3f} s "
              f"= {len(stream) / dt:,.0f} observations/s")

if __name__ == "__main__":
    main()
