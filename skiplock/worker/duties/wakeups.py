"""When a worker claims: at once while claims come back full, on NOTIFY once the queue is dry,
when the earliest scheduled task falls due, and at the poll interval as a fallback.

Inserts NOTIFY only while some worker is registered in task_waiters (see schema.sql): NOTIFY
serializes committing inserts, so under load, with every worker busy, nobody is registered and
inserts do not notify. A worker registers when a claim comes back short and leaves when one comes
back full; before relying on notifications it waits until every insert that could not see its
registration has committed (task_waiters_settled), then claims once more.
"""

from __future__ import annotations

import time

from skiplock.settings import Settings
from skiplock.sql.claim import task_next_due_in
from skiplock.sql.rows import Connection
from skiplock.sql.workers import task_waiter_register, task_waiter_unregister, task_waiters_settled

# A worker about to wait for notifications that finds an insert in flight asks again after this
# delay, doubling up to the poll interval.
SETTLE_RETRY_MIN_SECONDS = 0.002
# A scheduled task is looked for at least this long from now: waking a hair early finds nothing
# and looks again, never spins.
DUE_FLOOR_SECONDS = 0.001


class Wakeups:
    def __init__(self, settings: Settings, worker_id: str):
        self.poll_interval = settings.poll_interval_seconds
        self.worker_id = worker_id
        self.claim_due = True  # claim on the first turn
        self._last_claim = 0.0
        self._registered = False  # in task_waiters: inserts notify us
        self._settled = False  # ... and no insert that missed that is still in flight
        self._settle_at = 0.0
        self._settle_delay = SETTLE_RETRY_MIN_SECONDS
        # When the earliest scheduled task (delayed, or in retry backoff) falls due (monotonic),
        # so that it runs then, not at the next poll; and whether to look that up again.
        self._due_at: float | None = None
        self.due_lookup = False

    def timeouts(self, now: float, can_claim: bool) -> list[float]:
        """Seconds until each timer of ours can act (only claim timers while a claim can take
        something, or the loop would spin)."""
        waits = []
        if can_claim:
            waits.append(0 if self.claim_due else self.poll_interval - (now - self._last_claim))
            if self._due_at is not None:
                waits.append(self._due_at - now)
        if self._registered and not self._settled:
            waits.append(self._settle_at - now)
        return waits

    def due_now(self, now: float) -> bool:
        """The earliest scheduled task has fallen due (admission gives it a turn first)."""
        return self._due_at is not None and now >= self._due_at

    def should_claim(self, now: float) -> bool:
        if self._due_at is not None and now >= self._due_at:
            self._due_at = None
            self.claim_due = True
        return self.claim_due or now - self._last_claim >= self.poll_interval

    def waiting_for_notifications(self) -> bool:
        """The last claim found the queue dry, and new work is announced to this worker."""
        return self._registered and self._settled

    def process_freed(self) -> None:
        """A process is free: claim for it at once, unless the last claim found the queue dry and
        notifications now tell of new work. A claim then would find nothing, and at the end of a
        workflow step it would race the writer's transaction that releases the next step (whose
        commit notifies)."""
        if not self.waiting_for_notifications():
            self.claim_due = True

    def claimed(self, db: Connection, now: float, *, full: bool) -> None:
        """After a claim: a full one means there is probably more, so claim again as soon as
        there is room, without notifications; a short one means the queue is dry: wait to be
        notified, and find out when the next scheduled task falls due."""
        self._last_claim = now
        self.claim_due = full
        if full:
            self.stop_waiting(db)
            return
        if not self._registered:
            task_waiter_register(db, worker_id=self.worker_id)
            self._registered = True
            self._settled = False
            self._settle_delay = SETTLE_RETRY_MIN_SECONDS
        if not self._settled:
            self._settle(db, now)
        self.due_lookup = True  # a task may have been submitted for later

    def after_turn(self, db: Connection, now: float) -> None:
        if self.due_lookup:
            self._look_up_next_due(db)
        if self._registered and not self._settled and now >= self._settle_at:
            self._settle(db, now)

    def stop_waiting(self, db: Connection) -> None:
        if self._registered:
            task_waiter_unregister(db, worker_id=self.worker_id)
        self._registered = self._settled = False

    def session_lost(self) -> None:
        # A new session registers again (its old row is replaced, or pruned once it is gone),
        # and claims at once: notifications may have been missed meanwhile.
        self._registered = self._settled = False
        self.claim_due = True

    def _look_up_next_due(self, db: Connection) -> None:
        """Wake when the earliest scheduled task falls due: inserts announce new tasks, but
        nothing announces that a delayed task or a retry has become due. (The poll remains the
        fallback: for retries other workers schedule, and tasks a DBA reschedules.)"""
        due_in = task_next_due_in(db)
        self.due_lookup = False  # only once answered: a lost connection asks again later
        self._due_at = None if due_in is None else time.monotonic() + max(due_in, DUE_FLOOR_SECONDS)

    def _settle(self, db: Connection, now: float) -> None:
        """Rely on notifications only once every insert that could not see our registration has
        committed; then claim once more, for the tasks those inserts did not announce."""
        if task_waiters_settled(db):
            self._settled = True
            self.claim_due = True
        else:  # a transaction is inserting tasks right now
            self._settle_at = now + self._settle_delay
            self._settle_delay = min(self.poll_interval, self._settle_delay * 2)
