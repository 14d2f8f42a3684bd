"""Readings handed to scorers, remembered until their scores come back.

``record_scores`` must know each scored reading's time and host (to check the readings are
the atom's, to know which hosts are still learning, and for the rollups). Reading them back
from the database was a tenth of a backfilling hub's time, for rows that ``scoring_work``
had read a moment before. So the hub remembers the last few batches it handed out, and a
record whose readings are all among one of them takes their time and host from here.

What makes the copy safe: a reading's atom, time and host never change; a batch is
remembered only once the transaction that read it committed (``commit``; ``rollback``
forgets what it staged); retention's fold, the only thing that deletes readings, forgets
everything (``forget``). Only a hub that owns its database uses it (SQLite): over a shared
PostgreSQL another hub may fold, and the record reads the database as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

KEPT = 8  # batches remembered: a few scorers' in-flight batches (one each, a few kilobytes per 1,000 rows)


class Found:
    """The atom's readings among a batch's ids, each one's time and host, in id order."""

    def __init__(self, rows: Sequence[Sequence[object]]) -> None:
        self.ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        self.ts = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
        hosts: list[str | None] = [r[2] for r in rows]  # type: ignore[misc]
        self.one_host = not hosts or hosts.count(hosts[0]) == len(hosts)
        self.hosts = hosts

    def places(self, ids: Sequence[int]) -> np.ndarray | None:
        """Where each of ``ids`` is among the found readings; None if some are not there."""
        want = np.asarray(ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.ids, want), max(len(self.ids) - 1, 0))
        return at if len(self.ids) and bool((self.ids[at] == want).all()) else None

    def host_of(self, places: np.ndarray) -> list[str | None]:
        return [self.hosts[0]] * len(places) if self.one_host else [self.hosts[k] for k in places.tolist()]


class HandedOut:
    """The last ``KEPT`` batches handed out, per atom, as ``Found``; follows the hub's
    transactions (``commit``, ``rollback``) like the atom registry does."""

    def __init__(self, kept: int = KEPT) -> None:
        self._batches: deque[tuple[str, Found]] = deque(maxlen=kept)
        self._staged: list[tuple[str, Found]] = []

    def remember(self, atom: str, rows: Sequence[Sequence[object]]) -> None:
        """A batch handed out by the running transaction (rows: id, time, host, … in id order)."""
        if rows:
            self._staged.append((atom, Found(rows)))

    def commit(self) -> None:
        self._batches.extend(self._staged)
        self._staged = []

    def rollback(self) -> None:
        self._staged = []

    def forget(self) -> None:
        """Readings were deleted: nothing remembered may be trusted any more."""
        self._batches.clear()
        self._staged = []

    def find(self, atom: str, ids: Sequence[int]) -> tuple[Found, np.ndarray] | None:
        """A committed batch of ``atom`` holding every one of ``ids``, and where each is in it."""
        if not ids:
            return None
        lo, hi = min(ids), max(ids)
        for name, found in reversed(self._batches):
            if name == atom and len(found.ids) and found.ids[0] <= lo and hi <= found.ids[-1]:
                places = found.places(ids)
                if places is not None:
                    return found, places
        return None
