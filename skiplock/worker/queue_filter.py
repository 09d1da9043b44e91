"""Which queues a worker may claim from now: those it serves (all, or its --queue ones) that are
not paused (task_queues). The paused set is read at most every PAUSED_REFRESH_SECONDS, so a pause
takes effect on every worker within about that, without a notification.

While nothing is paused the claim walks tasks_claim_idx for every queue, as before. Once some
queue is paused, claiming "everything but it" that way would walk over the paused queue's whole
backlog at every claim; instead the worker claims from the other queues with pending tasks, one
probe each (task_claim's per-queue statement), found by a skip scan.
"""

from __future__ import annotations

from collections.abc import Sequence

from skiplock.sql.operations import task_pending_queues, task_queues_paused
from skiplock.sql.rows import Connection

PAUSED_REFRESH_SECONDS = 1.0


class QueueFilter:
    def __init__(self, served: Sequence[str]):
        self.served = list(served)  # empty: every queue
        self.paused: set[str] = set()
        self._read_at = float("-inf")

    def claimable(self, db: Connection, now: float) -> list[str] | None:
        """The queues to claim from: None for every queue, else a list (empty: none now)."""
        if now - self._read_at >= PAUSED_REFRESH_SECONDS:
            self.paused = set(task_queues_paused(db))
            self._read_at = now
        if not self.paused:
            return self.served or None
        candidates = self.served or task_pending_queues(db)
        return [q for q in candidates if q not in self.paused]
