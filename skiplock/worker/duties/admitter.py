"""The admission duty, run by every worker (one at a time: skiplock.sql.admission's lock):
expire what is past its expires_at, give tasks that fell due a turn, and admit tasks waiting on a
concurrency or start-rate limit as far as the limit allows.

The supervisor runs it before it claims whenever it may find something: after a rescue, when
the earliest scheduled task falls due, when a start token is due, every
ADMIT_WHILE_WAITING_SECONDS while tasks wait (slots other workers' tasks, or cancels, freed), and
at the poll interval otherwise; after a submit's wake-up, right after the claim it asked for
(most new tasks are runnable at once). Right after this worker wrote the outcomes of
tasks that held slots while tasks wait on a limit, it admits under those limits only: a probe per
limit freed, where the full admission reads every slot held. Limits that are full cost it nothing.
(Measured and left out: admission on the result writer's thread and connection was no faster,
since in a limited drain the database's CPU is the bound; pacing admission by its own duration
starved the claim of promoted tasks while a worker was replaced under a 50,000-task backlog.)
"""

from __future__ import annotations

import logging
import math
import time

from skiplock.settings import Settings
from skiplock.sql.admission import Admitted, admission_try_lock, task_admit, task_waiting_orphans_free
from skiplock.sql.rows import Connection
from skiplock.sql.workers import task_retries_announce

log = logging.getLogger("skiplock.worker")

# While tasks wait on a limit, admission looks again at least this often; only this often while
# admissions of what this worker's ended tasks freed keep its limits busy (other workers admit
# what theirs free: the full admission, which reads every slot held, is for what nobody's tasks
# freed, such as a cancel of a task not yet started; it cost a limited drain 10% at 0.1 s).
ADMIT_WHILE_WAITING_SECONDS = 0.1
ADMIT_WHILE_FREEING_SECONDS = 0.5
# Orphaned waits (a limit's row deleted by hand) are looked for this often.
ORPHANS_EVERY_SECONDS = 10.0
# Another worker was admitting: try again this soon.
ADMIT_BUSY_RETRY_SECONDS = 0.01
# Never more often than this (a loop woken for other reasons does not admit at every turn).
ADMIT_MIN_GAP_SECONDS = 0.005


class Admitter:
    def __init__(self, settings: Settings):
        self.idle_interval = settings.poll_interval_seconds
        self._next_at = 0.0  # monotonic; the first turn admits
        self._last = -1.0
        # Not at start: rare, and a skip scan planned before the table has statistics is slow.
        self._orphans_at = time.monotonic() + ORPHANS_EVERY_SECONDS
        self.rounds = 0
        self.waiting = False  # tasks waited on a limit at the last admission
        self._freed_at = -math.inf  # the last admission of freed slots (monotonic)

    def due_in(self, now: float) -> float:
        return self._next_at - now

    def run_if_due(
        self, db: Connection, now: float, *, urgent: bool = False, freed: set[str] | None = None
    ) -> Admitted | None:
        """One admission when due (or urgent: the worker is about to claim after a wake-up);
        None if it did not run. With `freed` (limits whose slots this worker's ended tasks
        freed), an admission under those limits only, now, that leaves the full one's time be."""
        if now - self._last < ADMIT_MIN_GAP_SECONDS or (now < self._next_at and not urgent and not freed):
            return None
        self._last = now
        with db.transaction():
            if not admission_try_lock(db):
                if freed is None:  # (freed slots are tried again after the gap, as they are)
                    self._next_at = now + ADMIT_BUSY_RETRY_SECONDS
                return None
            if freed is None and now >= self._orphans_at:
                self._orphans_at = now + ORPHANS_EVERY_SECONDS
                task_waiting_orphans_free(db)
            done = task_admit(db, freed=freed)
            if (done.promoted or done.admitted) and not done.announced:
                task_retries_announce(db)  # wake idle workers for what became runnable (at commit)
        self.rounds += 1
        self.waiting = bool(done.waiting)
        if freed is not None:
            self._freed_at = now
            return done
        busy = done.promoted or done.admitted or done.waiting or done.expired
        freeing = now - self._freed_at < ADMIT_WHILE_WAITING_SECONDS
        interval = (
            (ADMIT_WHILE_FREEING_SECONDS if freeing else ADMIT_WHILE_WAITING_SECONDS)
            if busy
            else self.idle_interval
        )
        if done.refill_in is not None:
            interval = min(interval, max(ADMIT_MIN_GAP_SECONDS, done.refill_in))
        self._next_at = now + interval
        if done.expired:
            log.info("expired %d task(s) that had not started by their expires_at", done.expired)
        return done
