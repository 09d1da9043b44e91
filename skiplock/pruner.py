"""The retention duty, run by every worker: delete finished tasks older than retention_seconds
(with their attempts), and Idempotency-Keys past their window, in small batches so that no
statement holds locks or writes WAL for long."""

from __future__ import annotations

import logging
import time

import psycopg

from skiplock import queries
from skiplock.settings import Settings

log = logging.getLogger("skiplock.worker")

PRUNE_BATCH = 1000
# A bounded amount per turn keeps the loop responsive (leases, deadlines and results come
# first); the next interval continues.
PRUNE_MAX_BATCHES_PER_TURN = 10
PRUNE_TIME_BUDGET_SECONDS = 0.5


class Pruner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._last_round = 0.0

    def run_if_due(self, db: psycopg.Connection, now: float) -> int:
        """Prune when due; returns how many tasks were deleted."""
        if now - self._last_round < self.settings.prune_interval_seconds:
            return 0
        self._last_round = now
        pruned = 0
        if self.settings.retention_seconds > 0:
            pruned = _in_batches(
                lambda: queries.task_prune(
                    db, older_than_seconds=self.settings.retention_seconds, limit=PRUNE_BATCH
                )
            )
            if pruned:
                log.info(
                    "pruned %d finished task(s) older than %.0f s", pruned, self.settings.retention_seconds
                )
        _in_batches(
            lambda: queries.idempotency_keys_prune(
                db, older_than_seconds=self.settings.idempotency_ttl_seconds, limit=PRUNE_BATCH
            )
        )
        return pruned


def _in_batches(delete_batch) -> int:
    """Call delete_batch until it deletes less than a batch, within the turn's budget."""
    deleted, started = 0, time.monotonic()
    for _ in range(PRUNE_MAX_BATCHES_PER_TURN):
        if time.monotonic() - started > PRUNE_TIME_BUDGET_SECONDS:
            break
        batch = delete_batch()
        deleted += batch
        if batch < PRUNE_BATCH:
            break
    return deleted
