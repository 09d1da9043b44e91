"""The workflows' safety net, run by every worker every SWEEP_EVERY_SECONDS: what a step's end
should have settled and did not (a DBA's hand-made change), and workflows whose finish was not
seen (skiplock.sql.workflows.workflows_sweep). Normally it finds nothing: a step's end settles
its dependents and its workflow in its own transaction."""

from __future__ import annotations

import logging

from skiplock.sql.rows import Connection
from skiplock.sql.workflows import workflows_sweep

log = logging.getLogger("skiplock.worker")

SWEEP_EVERY_SECONDS = 5.0


class Sweeper:
    def __init__(self) -> None:
        self._next_at = 0.0  # monotonic: the first turn sweeps
        self._after_id = 0  # where the next slice of waiting steps starts
        self.found = 0

    def run_if_due(self, db: Connection, now: float) -> None:
        if now < self._next_at:
            return
        self._next_at = now + SWEEP_EVERY_SECONDS
        found, self._after_id = workflows_sweep(db, after_id=self._after_id)
        if found:
            self.found += found
            log.info("workflows sweep: settled %d step(s) or workflow(s) left behind", found)
