"""The admission duty, run by every worker (one at a time: skiplock.sql.admission's lock):
expire what is past its expires_at, give tasks that fell due a turn, and admit tasks waiting on a
concurrency or start-rate limit as far as the limit allows.

It runs before the worker claims whenever it may find something: when the worker is about to
claim after a wake-up, when the earliest scheduled task falls due, every
ADMIT_WHILE_WAITING_SECONDS while tasks wait on a limit (a slot frees when any worker's task
ends; a token when the rate allows: then sooner), and at the poll interval otherwise.
"""

from __future__ import annotations

import logging

from skiplock.settings import Settings
from skiplock.sql.admission import Admitted, admission_try_lock, task_admit
from skiplock.sql.rows import Connection
from skiplock.sql.workers import task_retries_announce

log = logging.getLogger("skiplock.worker")

# While tasks wait on a limit, admission looks again this often (one worker at a time does it).
ADMIT_WHILE_WAITING_SECONDS = 0.02
# Another worker was admitting: try again this soon.
ADMIT_BUSY_RETRY_SECONDS = 0.01
# Never more often than this (a loop woken for other reasons does not admit at every turn).
ADMIT_MIN_GAP_SECONDS = 0.005


class Admitter:
    def __init__(self, settings: Settings):
        self.idle_interval = settings.poll_interval_seconds
        self._next_at = 0.0  # monotonic; the first turn admits
        self._last = -1.0
        self.rounds = 0

    def due_in(self, now: float) -> float:
        return self._next_at - now

    def run_if_due(self, db: Connection, now: float, *, urgent: bool = False) -> Admitted | None:
        """One admission when due (or urgent: the worker is about to claim after a wake-up);
        None if it did not run."""
        if now - self._last < ADMIT_MIN_GAP_SECONDS or (now < self._next_at and not urgent):
            return None
        self._last = now
        with db.transaction():
            if not admission_try_lock(db):
                self._next_at = now + ADMIT_BUSY_RETRY_SECONDS
                return None
            done = task_admit(db)
        self.rounds += 1
        moved = done.promoted + done.admitted
        if moved:
            task_retries_announce(db)  # wake idle workers for what became runnable
        interval = ADMIT_WHILE_WAITING_SECONDS if (moved or done.waiting or done.expired) else self.idle_interval
        if done.refill_in is not None:
            interval = min(interval, max(ADMIT_MIN_GAP_SECONDS, done.refill_in))
        self._next_at = now + interval
        if done.expired:
            log.info("expired %d task(s) that had not started by their expires_at", done.expired)
        return done
