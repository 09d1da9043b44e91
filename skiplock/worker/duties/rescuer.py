"""The rescue duty, run by every worker: take back the tasks of workers that are gone.

A worker whose database session ended (its process died: the kernel closed its sockets) is
found by its free advisory lock (task_workers) and, if it has not reconnected within
dead_worker_grace_seconds, its tasks are rescued at once. A worker that froze or lost its network
keeps its session for a while; its tasks are rescued when their leases lapse. Either way a task
that had started counts a lost attempt; one still waiting in the worker to start is released,
uncounted.
"""

from __future__ import annotations

import logging
import time

from skiplock.db import RECONNECT_BACKOFF_MAX_SECONDS
from skiplock.settings import Settings
from skiplock.sql.rows import Connection
from skiplock.sql.watchers import task_watchers_prune
from skiplock.sql.workers import (
    RescuedRow,
    task_rescue,
    task_waiters_prune_dead,
    task_workers_forget,
    task_workers_mark_gone,
)

log = logging.getLogger("skiplock.worker")

# Rows per statement, and statements per round: a dead worker may hold a prefetched backlog of
# hundreds, all of which should be back in the queue in one round.
RESCUE_BATCH = 1000
RESCUE_MAX_BATCHES_PER_ROUND = 10
# A worker found gone is looked at again this long after its grace ends.
RECHECK_MARGIN_SECONDS = 0.05
# A client's watch on a task is refreshed while it waits (api/watch.py); one this old is stale.
STALE_WATCH_SECONDS = 300.0
# A round's log line names this many of the tasks it rescued (with their new status), not all.
RESCUES_LOGGED = 20


class Rescuer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._next_round = 0.0  # monotonic; the first turn runs a round
        self._patient_until = 0.0  # monotonic; see reconnected
        self.rounds = 0  # (for the worker's metrics)

    def reconnected(self, now: float) -> None:
        """Our session was lost and is back. Whatever cut us off (a pooler's restart, a network
        blip, connections killed) may have cut the others too, and each reconnects on its own
        backoff, up to RECONNECT_BACKOFF_MAX_SECONDS behind us, and then takes up to a connect
        timeout: until they have had that long, a worker whose session ended gets that much more
        grace. Without it, a worker that noticed the loss later than the first one back, and so
        waits out a later step of its backoff, would have its running tasks taken (charged, and
        run twice) after the 0.5 s grace. Leases lapse as ever."""
        self._patient_until = now + self.patience_seconds()

    def patience_seconds(self) -> float:
        """How long after our own reconnect the others get more grace: a backoff, the grace
        and a connect (db_timeout_seconds)."""
        s = self.settings
        return RECONNECT_BACKOFF_MAX_SECONDS + s.dead_worker_grace_seconds + s.db_timeout_seconds

    def due_in(self, now: float) -> float:
        return self._next_round - now

    def soon(self) -> None:
        """Run a round at the next turn (leases were just ended on purpose)."""
        self._next_round = 0.0

    def run_if_due(self, db: Connection, now: float) -> list[RescuedRow]:
        """One round when due; returns what it rescued (task_rescue's rows)."""
        if now < self._next_round:
            return []
        self._next_round = now + self.settings.rescue_interval_seconds
        self.rounds += 1
        grace = self.settings.dead_worker_grace_seconds
        if now < self._patient_until:
            grace += RECONNECT_BACKOFF_MAX_SECONDS + self.settings.db_timeout_seconds
        gone = task_workers_mark_gone(db)
        if gone:
            log.warning("worker(s) %s lost their database session", ", ".join(gone))
            # Take their tasks as soon as the grace is over, not a whole interval later.
            self._next_round = min(self._next_round, time.monotonic() + grace + RECHECK_MARGIN_SECONDS)
        rescued: list[RescuedRow] = []
        for _ in range(RESCUE_MAX_BATCHES_PER_ROUND):
            batch = task_rescue(
                db,
                limit=RESCUE_BATCH,
                grace_seconds=grace,
                backoff_base=self.settings.retry_backoff_base_seconds,
                backoff_max=self.settings.retry_backoff_max_seconds,
            )
            rescued += batch
            if len(batch) < RESCUE_BATCH:
                break
        if rescued:
            released = sum(1 for row in rescued if row["outcome"] == "released")
            log.warning(
                "rescued %d task(s) of gone workers or lapsed leases (%d released uncounted): %s",
                len(rescued),
                released,
                {row["id"]: row["status"] for row in rescued[:RESCUES_LOGGED]},
            )
        task_workers_forget(db, grace_seconds=grace)
        task_waiters_prune_dead(db)
        task_watchers_prune(db, older_than_seconds=STALE_WATCH_SECONDS)
        return rescued
