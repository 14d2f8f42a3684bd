"""Training speed: 500 steps of the pulse atom at batch 1, the default batch (32) and 64, one thread.

    python bench/train.py [--steps 500] [--repeat 3] [--data week|random]

``week`` is a synthetic week of pulse; ``random`` is random observations, whose windows
never repeat, so a batch's distinct windows are all of it (the worst case for the trainer's
count-weighted dedupe).
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
from kiri.model.train import TrainConfig, Trainer
from kiri.model.windows import encode_many, random_ids


@click.command()
@click.option("--steps", default=500, show_default=True)
@click.option("--repeat", default=3, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--data", type=click.Choice(["week", "random"]), default="week", show_default=True)
def main(steps: int, repeat: int, threads: int, data: str) -> None:
    torch.set_num_threads(threads)
    ids = encode_many(S.PULSE, synth.generate("pulse", 7, seed=0).rows)
    if data == "random":
        ids = random_ids(S.PULSE, len(ids), torch.Generator().manual_seed(0))
    print(f"pulse atom, {sum(p.numel() for p in Trainer(S.PULSE, ids).model.parameters())} parameters, "
          f"{threads} thread(s), {steps} steps, {data} data, median of {repeat}")
    for batch in (1, 32, 64):
        runs = []
        for r in range(repeat):
            t = Trainer(S.PULSE, ids, TrainConfig(steps=steps + 10, batch_size=batch, seed=r))
            t.run(until=10)  # warm-up
            t0 = time.perf_counter()
            t.run(until=steps + 10)
            runs.append(time.perf_counter() - t0)
        total = statistics.median(runs)
        print(f"batch {batch:3d}: {total / steps * 1000:6.3f} ms/step  {steps} steps in {total:5.2f} s  "
              f"{batch * steps / total:8.0f} sequences/s  (final loss {t.last_loss:.3f})")


if __name__ == "__main__":
    main()
