"""The schedules duty, run by every worker: fire the schedules that are due (skiplock.sql.
schedule_fires: exactly once whichever workers are up, decided on the database clock).

A worker sleeps until the earliest next_fire_at it read, and reads it again at least every
RECHECK_SECONDS (another host may have fired, a schedule may have been made) and at once when
the API says a schedule changed (a NOTIFY, skiplock.sql.fragments.SCHEDULES_CHANGED). On an idle
system that is one short statement per RECHECK_SECONDS per worker, plus each fire's own.
"""

from __future__ import annotations

import logging

from skiplock.sql.rows import Connection
from skiplock.sql.schedule_fires import FIRE_BATCH, schedules_fire_due
from skiplock.sql.schedules import schedules_next_due_in

log = logging.getLogger("skiplock.worker")

RECHECK_SECONDS = 5.0
# Rounds one turn runs at most while each fires a full batch (many schedules due at once).
MAX_ROUNDS_PER_TURN = 10
# A schedule still due after a round is looked at again this soon, not in a spin.
MIN_WAIT_SECONDS = 0.05


class Scheduler:
    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self._next_at = 0.0  # monotonic; the first turn looks
        self._fire_due = True  # at _next_at a schedule falls due (else: only look again)
        self.fired = 0  # tasks created by this worker's fires
        self.missed = 0  # fire times it recorded as missed

    def due_in(self, now: float) -> float:
        return self._next_at - now

    def changed(self) -> None:
        """A schedule was made, changed or resumed: look again now."""
        self._next_at = 0.0
        self._fire_due = True

    def run_if_due(self, db: Connection, now: float) -> None:
        if now < self._next_at:
            return
        if not self._fire_due:  # a look again: fire only if something fell due meanwhile
            due_in = schedules_next_due_in(db)
            if due_in is None or due_in > 0:
                self._plan(now, due_in)
                return
        for _ in range(MAX_ROUNDS_PER_TURN):
            fires = schedules_fire_due(db, by=self.worker_id)
            for fire in fires:
                if fire.outcome == "missed":
                    self.missed += 1
                elif fire.outcome == "created":
                    self.fired += 1
                if fire.outcome in ("refused", "missed"):
                    log.warning(
                        "schedule %s at %s: %s (%s)",
                        fire.schedule_id,
                        fire.scheduled_for,
                        fire.outcome,
                        fire.reason,
                    )
            if len({f.schedule_id for f in fires}) < FIRE_BATCH:
                break
        self._plan(now, schedules_next_due_in(db))

    def _plan(self, now: float, due_in: float | None) -> None:
        """Sleep until the earliest schedule is due, or RECHECK_SECONDS if that is sooner. (Due
        now after a round: locked by another worker mid-round, or past this turn's rounds.)"""
        self._fire_due = due_in is not None and due_in <= RECHECK_SECONDS
        wait = RECHECK_SECONDS if due_in is None else min(RECHECK_SECONDS, max(due_in, MIN_WAIT_SECONDS))
        self._next_at = now + wait
