"""The database part of each turn of the supervisor's loop, before it claims: keep the session
(skiplock.worker.session), read its notifications (new tasks, cancels), renew leases, and run the
background duties, each in a file of its own (skiplock.worker.duties: leases, rescuer, admitter,
scheduler, sweeper, pruner, wakeups), plus the throughput flush of the worker's stats.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from skiplock.registry import DeclaredSchedule
from skiplock.settings import Settings
from skiplock.sql.fenced import AttemptRef, task_hand_over
from skiplock.sql.fragments import CANCEL_CHANNEL, RUNNABLE, SCHEDULES_CHANGED
from skiplock.sql.limits import limit_declare_types
from skiplock.sql.rows import Connection
from skiplock.sql.schedules import schedules_sync_declared
from skiplock.sql.workers import task_retries_announce
from skiplock.worker.claimer import Claimer
from skiplock.worker.duties.admitter import ADMIT_MIN_GAP_SECONDS, Admitter
from skiplock.worker.duties.leases import LeaseKeeper
from skiplock.worker.duties.pruner import Pruner
from skiplock.worker.duties.rescuer import Rescuer
from skiplock.worker.duties.scheduler import Scheduler
from skiplock.worker.duties.sweeper import Sweeper
from skiplock.worker.duties.wakeups import Wakeups
from skiplock.worker.handoff import StepHandoff
from skiplock.worker.session import WorkerSession
from skiplock.worker.slots import ref_of
from skiplock.worker.stats import WorkerStats
from skiplock.worker.writer import ResultWriter


class DutyTurn:
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        *,
        claimer: Claimer,
        writer: ResultWriter,
        stats: WorkerStats,
        leases: LeaseKeeper,
        wakeups: Wakeups,
        type_limits: dict[str, int] | None = None,
        schedules: Sequence[DeclaredSchedule] = (),
        handoff: StepHandoff | None = None,
    ):
        self.session = WorkerSession(settings, worker_id)
        self.worker_id = worker_id
        # max_running declared in code per task type: written at each (re)connection.
        self.type_limits = type_limits or {}
        self.declared_schedules = tuple(schedules)  # from the code: written at each (re)connection
        self._session_generation = 0
        self.claimer = claimer
        self.writer = writer
        self.stats = stats
        self.leases = leases
        self.wakeups = wakeups
        self.handoff = handoff  # workflow steps the writer takes for us (not held until taken)
        self.rescuer = Rescuer(settings)
        self.pruner = Pruner(settings)
        self.admitter = Admitter(settings)
        self.scheduler = Scheduler(worker_id)
        self.sweeper = Sweeper()
        self._freed: set[str] = set()  # limits whose slots ended tasks freed (see _admit)
        self._admit_soon = True  # after a rescue, a new session: admission first
        # Tasks were submitted: some may wait on a limit. Admission follows the claim: nearly
        # every new task is runnable at once, and the admission (2-3 ms of statements) before
        # the claim doubled a submit's wait for its start on an idle worker.
        self._admit_after_claim = False

    def ensure_session(self) -> Connection | None:
        """The session's statement connection, (re)connected when the backoff allows; None
        while the database cannot be reached."""
        if not self.session.ensure():
            return None
        if self.session.generation != self._session_generation:
            # A new session: other workers may have found the old one gone and taken back what
            # we held. Renew (confirm) before starting anything claimed, and claim at once.
            if self._session_generation:
                self.stats.event("reconnects")
                self.rescuer.reconnected(time.monotonic())
            self._session_generation = self.session.generation
            self.leases.session_lost()
            self.wakeups.session_lost()
            self._admit_soon = True
            if self.type_limits and self.session.db is not None:
                limit_declare_types(self.session.db, dict(self.type_limits), by=f"worker {self.worker_id}")
            if self.declared_schedules and self.session.db is not None:
                schedules_sync_declared(
                    self.session.db, self.declared_schedules, by=f"worker {self.worker_id}"
                )
            self.scheduler.changed()
        return self.session.db

    def lost_session(self, exc: Exception) -> None:
        self.session.lost(exc)
        self.leases.session_lost()
        self.wakeups.session_lost()

    def run(self, db: Connection, now: float) -> None:
        """Everything but the claim, in order: notifications, leases, rescue, prune, stats."""
        self._drain_notifications()
        self._renew_leases(db, now)
        self._rescue(db, now)
        self._admit(db, now)
        self.scheduler.run_if_due(db, now)
        self.sweeper.run_if_due(db, now)
        self.pruner.run_if_due(db, now)
        self.stats.flush_throughput_if_due(db, now)

    def flush_stats_now(self, db: Connection) -> None:
        """The last seconds' counts, at shutdown (after the writer's)."""
        self.stats.flush_throughput_if_due(db, math.inf)

    def timeouts(self, now: float, *, holding: bool) -> list[float]:
        """Seconds until the leases (while holding anything) and the rescue duty are due."""
        waits = [self.rescuer.due_in(now), self.admitter.due_in(now), self.scheduler.due_in(now)]
        if self._freed and self.admitter.waiting:  # an admission of what ended waits out its gap
            waits.append(ADMIT_MIN_GAP_SECONDS)
        if holding:
            waits.append(self.leases.renew_due_in(now))
        return waits

    def _drain_notifications(self) -> None:
        listener = self.session.listener
        if listener is None:
            return
        cancelled: set[int] = set()
        for notify in listener.notifies(timeout=0):
            if notify.channel == CANCEL_CHANNEL:
                # One id (a cancel), or several (released: a pause, a limit lowered). Anyone may
                # NOTIFY this channel: only digits count.
                cancelled.update(int(i) for i in notify.payload.split(",") if i.isdigit())
            elif notify.payload == SCHEDULES_CHANGED:
                self.scheduler.changed()
            elif notify.payload == RUNNABLE:  # runnable already: claim, no admission first
                self.wakeups.claim_due = True
            else:
                self.wakeups.claim_due = True
                self._admit_after_claim = True
        if cancelled:
            refs = {ref_of(t) for t in self.claimer.held() if t.id in cancelled}
            self.claimer.abandon(refs, "cancelled by a client, or released by a pause or a limit")

    def after_claim(self, db: Connection, now: float) -> None:
        """The admission a submit's wake-up asked for, once the claim took what was runnable
        (what it admits, the next turn claims)."""
        if self._admit_after_claim:
            self._admit_after_claim = False
            self._admit_soon = True
            self._admit(db, now)

    def _renew_leases(self, db: Connection, now: float) -> None:
        # Finished attempts whose outcome the writer has not stored yet are still ours to keep,
        # while the writer reaches the database; if it cannot, they lapse like those of a worker
        # cut off, and other workers rescue them rather than wait on this one indefinitely.
        held: set[AttemptRef] = {ref_of(t) for t in self.claimer.held()}
        unwritten = self.writer.unwritten()
        # Once a session, and not while the writer is taking steps for us: they are ours before
        # we hold them.
        settled = self.leases.reconcile_due and (self.handoff is None or self.handoff.settled())
        if settled:
            # A new session: the record of what our processes hold may have been lost with the
            # server (a hand-over commits asynchronously): written again, durably (nothing handed).
            task_hand_over(db, worker_id=self.worker_id, handing=[], kept=self.claimer.in_hand())
        if settled and self.leases.reconcile(db, held | unwritten):
            self.rescuer.soon()  # in this turn, right after the renewal
        if self.writer.healthy():
            held |= unwritten
        lost = self.leases.renew_if_due(db, held, now)
        if lost:
            self.claimer.abandon(lost, "no longer held by this worker (cancelled or taken over)")

    def _admit(self, db: Connection, now: float) -> None:
        self._freed |= self.writer.take_freed() | self.claimer.abandoned_groups
        self.claimer.abandoned_groups = set()
        urgent = self._admit_soon or self.wakeups.due_now(now)
        # Only this worker's ended tasks freed slots since the last admission: admission under
        # those limits alone (its cost follows what ended, not every slot held).
        freed = (
            self._freed if not urgent and self.admitter.due_in(now) > 0 and self.admitter.waiting else None
        )
        done = self.admitter.run_if_due(db, now, urgent=urgent, freed=freed or None)
        if done is not None:
            self._admit_soon = False
            self._freed = set()
            self.writer.wake_on_flush = self.admitter.waiting
        if done is not None and (done.promoted or done.admitted):
            self.wakeups.claim_due = True
        if done is not None and (done.promoted or done.expired):
            self.wakeups.due_lookup = True

    def _rescue(self, db: Connection, now: float) -> None:
        rescued = self.rescuer.run_if_due(db, now)
        if rescued:
            self._admit_soon = True  # slots freed, retries scheduled
            self.stats.rescued_tasks(rescued)
            self.wakeups.claim_due = True
            if any(row["status"] == "pending" for row in rescued):  # released, or retried later
                self.wakeups.due_lookup = True
                task_retries_announce(db)
