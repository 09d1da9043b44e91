"""Leases: a worker renews the leases of everything it holds, and knows until when its holdings
are confirmed.

Claimed tasks wait in the backlog (reserved, not started) until a process is free. A worker may
start one only while it knows the task is still its own: it was claimed or renewed on the
current database session less than a lease ago. After a freeze longer than the lease, or a lost
session (another worker may have found it dead and released the tasks), the holdings are renewed
first; whatever did not survive is dropped instead of run twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from skiplock.settings import Settings
from skiplock.sql.fenced import AttemptRef, task_held_ids, task_lease_renew, task_leases_disown
from skiplock.sql.rows import Connection
from skiplock.worker.reports import split_stale

# Renew leases when a third of the lease is gone: two renewals can fail before it lapses.
LEASE_RENEW_FRACTION = 1 / 3
# Holdings count as confirmed for this fraction of a lease after the statement that confirmed
# them was sent (the database's lease runs from its commit, later still).
CONFIRMED_FRACTION = 0.9


class LeaseKeeper:
    def __init__(self, settings: Settings, worker_id: str):
        self.lease_seconds = settings.lease_seconds
        self.worker_id = worker_id
        self._next_renew = time.monotonic() + self.lease_seconds * LEASE_RENEW_FRACTION
        self._confirmed_until = 0.0
        self.renewals = 0  # statements sent (for the worker's metrics)
        self.reconcile_due = True  # a new session: what the database says we hold, against what we know

    def renew_due_in(self, now: float) -> float:
        return self._next_renew - now

    def confirmed(self, now: float) -> bool:
        """Whether reserved tasks may start now: held for sure on the database."""
        return now < self._confirmed_until

    def claimed(self, sent_at: float, held_before: bool) -> None:
        """A claim sent at `sent_at` succeeded. It confirms the tasks it took; older holdings
        stay confirmed by the last renewal (which ends earlier), unless there were none."""
        if not held_before:
            self._confirmed_until = sent_at + self.lease_seconds * CONFIRMED_FRACTION

    def session_lost(self) -> None:
        """The database session ended: renew (and so confirm) before starting anything held."""
        self._confirmed_until = 0.0
        self._next_renew = 0.0
        self.reconcile_due = True

    def reconcile(self, db: Connection, known: Iterable[AttemptRef]) -> int:
        """Once per session (while reconcile_due; the caller waits until no workflow step is
        being taken for us: StepHandoff.settled): the tasks the database says we hold and we
        know nothing of lose their lease at once (task_leases_disown); returns how many. After
        a failover to a standby that had not received our last writes, those are tasks whose
        outcomes we wrote to the old primary: rescued now, they run again in seconds instead of
        staying processing under us, unrenewed, for a whole lease."""
        disowned = task_leases_disown(db, worker_id=self.worker_id, keep=known)
        self.reconcile_due = False
        return disowned

    def renew_if_due(self, db: Connection, held: Iterable[AttemptRef], now: float) -> set[AttemptRef]:
        """Extend the leases of `held` when due; returns the attempts that are no longer ours
        (cancelled, or rescued by another worker), which must be abandoned."""
        if now < self._next_renew:
            return set()
        sent_at = time.monotonic()
        held = set(held)
        current, stale = split_stale(held)
        renewed = task_lease_renew(
            db, worker_id=self.worker_id, refs=current, lease_seconds=self.lease_seconds
        )
        self.renewals += 1 if current else 0
        missing = [ref for ref in current if ref.task_id not in renewed]
        lost = set(stale)
        if missing:
            # A row locked by another session could not be renewed but is still ours.
            still_held = task_held_ids(db, worker_id=self.worker_id, refs=missing)
            lost |= {ref for ref in missing if ref.task_id not in still_held}
        self._next_renew = now + self.lease_seconds * LEASE_RENEW_FRACTION
        self._confirmed_until = sent_at + self.lease_seconds * CONFIRMED_FRACTION
        return lost
