"""Retention: what the hub forgets, when, and what it keeps of it.

A year of 30 s collection and scoring is two million finished tasks; kept forever they make
every count, status and scrape slower. Finished tasks (done, dead, cancelled) older than
``finished_tasks`` seconds are deleted, a bounded batch per transaction, with their counts
folded into ``task_totals`` in the same transaction: a hub killed between batches has lost
nothing and counted nothing twice. Kept always: unfinished tasks, and tasks whose weights
name them (a weights version's lineage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kiri.config import TRAIN_WINDOW
from kiri.hub.store.schema import checkpoints, task_totals, tasks, weights

FINISHED = ("done", "dead", "cancelled")


DAY = 86400.0
RAW_DEFAULT = 30 * DAY


@dataclass(frozen=True)
class Retention:
    """The policy. Raw readings: 30 days by default, counted back from each stream's newest
    reading. That holds the trainers' 14-day window twice over and a month of full-resolution
    history to look back on, while a year of 30 s readings costs a month of raw rows plus
    rollups (kept forever). ``hub/watch/keep.py`` says what is always kept."""

    finished_tasks: float | None = 7 * DAY  # seconds a finished task is kept (None: forever)
    raw: float | None = RAW_DEFAULT  # seconds of raw readings kept per stream (None: forever)
    weights: int | None = 5  # newest weights versions kept per atom, besides the active lineage (None: all)
    batch: int = 500  # rows deleted per transaction (each a few ms of the hub's loop)
    raw_batch: int = 500  # raw readings looked at per transaction
    live_raw_batch: int = 150  # the same while clients are being served: each pass holds the loop
    vacuum_pages: int = 2000  # free pages given back to the file system per pass (4 KiB each)

    def describe(self) -> dict[str, Any]:
        return {"finished_tasks_seconds": self.finished_tasks, "raw_seconds": self.raw,
                "weights_versions": self.weights, "train_window_seconds": TRAIN_WINDOW,
                "rollup_tiers_seconds": [300, 3600, 86400]}


def prune_tasks(c: sa.Connection, policy: Retention, now: float) -> int:
    """Delete one batch of finished tasks past the window, folding their counts into
    ``task_totals``; returns how many (0: nothing left to prune)."""
    if policy.finished_tasks is None:
        return 0
    t = tasks.c
    # ``status || ''``: not the status index (millions of done rows to sort), but the range of
    # ix_tasks_finished_at oldest first
    ids = c.execute(sa.select(t.id).where(t.finished_at < now - policy.finished_tasks, (t.status + "").in_(FINISHED),
                                          t.id.not_in(sa.select(weights.c.task_id).where(
                                              weights.c.task_id.is_not(None))))
                    .order_by(t.finished_at).limit(policy.batch)).scalars().all()
    if not ids:
        return 0
    groups = c.execute(sa.select(t.kind, t.status, sa.func.count(), sa.func.sum(t.failures), sa.func.sum(t.expiries))
                       .where(t.id.in_(ids)).group_by(t.kind, t.status)).all()
    tt = task_totals.c
    for kind, status, n, failures, expiries in groups:
        done = c.execute(task_totals.update().where(tt.kind == kind, tt.status == status).values(
            n=tt.n + n, failures=tt.failures + (failures or 0), expiries=tt.expiries + (expiries or 0))).rowcount
        if not done:
            c.execute(task_totals.insert().values(kind=kind, status=status, n=n, failures=failures or 0,
                                                  expiries=expiries or 0))
    c.execute(checkpoints.delete().where(checkpoints.c.task_id.in_(ids)))
    c.execute(tasks.delete().where(t.id.in_(ids)))
    return len(ids)


def prune_checkpoints(c: sa.Connection, policy: Retention) -> int:
    """Delete the checkpoints of finished tasks: nothing resumes from them."""
    ck = checkpoints.c
    # driven by the (small) checkpoints table, each task looked up by its key
    status = sa.select(tasks.c.status).where(tasks.c.id == ck.task_id).scalar_subquery()
    ids = c.execute(sa.select(ck.task_id).where(status.in_(FINISHED)).limit(policy.batch)).scalars().all()
    if ids:
        c.execute(checkpoints.delete().where(ck.task_id.in_(ids)))
    return len(ids)


def totals(c: sa.Connection) -> list[dict[str, Any]]:
    """Pruned tasks' counts per kind and final status."""
    tt = task_totals.c
    return [{"kind": r.kind, "status": r.status, "n": r.n, "failures": r.failures, "expiries": r.expiries}
            for r in c.execute(sa.select(task_totals).order_by(tt.kind, tt.status))]
