"""The retention duty, run by every worker: delete finished tasks older than retention_seconds
(with their attempts) and schedules' fires, Idempotency-Keys past their window and throughput minutes older than a
day, in small batches so that no statement holds locks or writes WAL for long."""

from __future__ import annotations

import logging
import time

from skiplock.settings import Settings
from skiplock.sql.keys import idempotency_keys_prune
from skiplock.sql.operations import task_prune, task_throughput_prune
from skiplock.sql.rows import Connection
from skiplock.sql.schedules import schedule_fires_prune

log = logging.getLogger("skiplock.worker")

PRUNE_BATCH = 1000
# A bounded amount per turn keeps the loop responsive (leases, deadlines and results come
# first); the next interval continues.
PRUNE_MAX_BATCHES_PER_TURN = 10
PRUNE_TIME_BUDGET_SECONDS = 0.5
# task_throughput keeps a day of minutes (the dashboard shows the last hour).
THROUGHPUT_KEPT_SECONDS = 24 * 3600.0
# A turn that ran out of batches or time left tasks to prune: the next comes this soon rather
# than a prune interval later. A turn's cap alone (10,000 tasks a minute a worker) fell behind a
# steady 200 tasks/s on two busy workers (`make soak`), and the table grew for as long as that
# lasted; catching up this way spends at most a tenth of the worker's loop on it.
CATCH_UP_SECONDS = 5.0


class Pruner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._last_round = 0.0
        self._behind = False  # the last turn left tasks to prune

    def run_if_due(self, db: Connection, now: float) -> int:
        """Prune when due; returns how many tasks were deleted."""
        interval = self.settings.prune_interval_seconds
        if self._behind:
            interval = min(interval, CATCH_UP_SECONDS)
        if now - self._last_round < interval:
            return 0
        self._last_round = now
        pruned = 0
        self._behind = False
        if self.settings.retention_seconds > 0:
            pruned = _in_batches(
                lambda: task_prune(db, older_than_seconds=self.settings.retention_seconds, limit=PRUNE_BATCH)
            )
            # Every batch full: the turn ended on its cap, not on a short batch (nothing left).
            self._behind = pruned > 0 and pruned % PRUNE_BATCH == 0
            if pruned:
                log.info(
                    "pruned %d finished task(s) older than %.0f s", pruned, self.settings.retention_seconds
                )
            _in_batches(
                lambda: schedule_fires_prune(
                    db, older_than_seconds=self.settings.retention_seconds, limit=PRUNE_BATCH
                )
            )
        _in_batches(
            lambda: idempotency_keys_prune(
                db, older_than_seconds=self.settings.idempotency_ttl_seconds, limit=PRUNE_BATCH
            )
        )
        # A row per queue, task type and minute: a day of them is a small delete.
        task_throughput_prune(db, older_than_seconds=THROUGHPUT_KEPT_SECONDS)
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
