"""The worker's result writer: a thread with its own connection that stores finished attempts.

The supervisor's loop hands over what its processes reported (a ReportQueue,
skiplock.worker.reports) and goes straight back to claiming and dispatching, so Postgres stores
one batch of results on this connection while it claims the next batch on the other: two
backends, two cores.

This module is the thread: the hand-over, its connection, its loop and when the supervisor may
claim. The statements it runs (fenced, parked while a row is locked) are skiplock.worker.writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from skiplock.db import SESSION_ENDED, connect_worker, reconnect_delay
from skiplock.settings import Settings, statement_timeout_seconds
from skiplock.sql.fenced import AttemptRef
from skiplock.sql.rows import Connection
from skiplock.worker.handoff import StepHandoff
from skiplock.worker.reports import ReportQueue
from skiplock.worker.stats import WorkerStats
from skiplock.worker.writes import ResultWrites

log = logging.getLogger("skiplock.worker")

# Past this many unwritten outcomes the supervisor stops claiming until the writer is down to
# RESUME_CLAIMS_AT (short tasks run faster than their results can be stored).
MAX_UNWRITTEN = 4000
# Half: claims resume with room for a good many results before the next pause.
RESUME_CLAIMS_AT = MAX_UNWRITTEN // 2
# With nothing due the thread still looks again this often (a timer it missed costs no more).
IDLE_WAIT_SECONDS = 1.0
# While stopping, how often it checks whether its deadline has come.
STOPPING_CHECK_SECONDS = 0.1
# The shortest wait: a timer due now (or past) must not make the loop spin.
MIN_WAIT_SECONDS = 0.001
# finish() waits this long beyond a statement's worst case for the thread to end.
JOIN_MARGIN_SECONDS = 1.0


def _do_nothing() -> None:
    pass


class ResultWriter(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        counters: dict[str, int],
        wake_supervisor: Callable[[], None] = _do_nothing,
        stats: WorkerStats | None = None,
        handoff: StepHandoff | None = None,
    ):
        super().__init__(name="skiplock-result-writer", daemon=True)
        # Called when the supervisor may claim again (caught up, or reconnected): it may be
        # asleep with nothing else to wake it.
        self._wake_supervisor = wake_supervisor
        # Whether to wake the supervisor after a flush that freed slots of limits (set by the
        # supervisor while tasks wait on a limit: its admission fills them).
        self.wake_on_flush = False
        # Limits (admission groups) whose slots the handed-over outcomes free: incoming (under
        # _cond), being written, and written (under _cond; taken by the supervisor's admission).
        self._incoming_freed: set[str] = set()
        self._writing_freed: set[str] = set()
        self._freed: set[str] = set()
        self._throttled = False  # the supervisor was told to stop claiming (under _cond)
        self._retries_scheduled = False  # failures were written as retries (under _cond)
        self.settings = settings
        self.worker_id = worker_id
        self.db: Connection | None = None
        self.writes = ResultWrites(settings, worker_id, counters, stats, self._on_retries_scheduled, handoff)
        self._incoming = ReportQueue()  # handed over by the supervisor (under _cond)
        # Everything handed over and not yet written or dropped (under _cond): while the writer
        # is healthy the supervisor renews these leases, or a slow write would let them lapse
        # into a re-run.
        self._unwritten: set[AttemptRef] = set()
        self._cond = threading.Condition()
        self._db_retry_at = 0.0
        self._db_failures = 0  # consecutive: > 0 while the writer cannot reach the database
        self._stop_at: float | None = None  # monotonic deadline once stopping

    # --- the supervisor's side -------------------------------------------------------------------

    def take_retries_scheduled(self) -> bool:
        """Whether failures were stored as retries since the last call (the supervisor then
        looks up when the next scheduled task falls due)."""
        with self._cond:
            scheduled, self._retries_scheduled = self._retries_scheduled, False
        return scheduled

    def put(self, reports: ReportQueue, freed: set[str] | None = None) -> None:
        """Hand over outcomes and starts (the supervisor's queue is emptied), and the limits
        whose slots those outcomes free once written."""
        if reports.empty():
            return
        with self._cond:
            self._incoming_freed |= freed or set()
            self._incoming.merge(reports)
            self._unwritten |= reports.refs()
            self._cond.notify()
        reports.clear()

    def take_freed(self) -> set[str]:
        """The limits whose slots outcomes written since the last call freed."""
        with self._cond:
            freed, self._freed = self._freed, set()
        return freed

    def unwritten(self) -> set[AttemptRef]:
        """Attempts whose outcome is still waiting to be written (a copy)."""
        with self._cond:
            return set(self._unwritten)

    def has_unwritten(self) -> bool:
        with self._cond:
            return bool(self._unwritten)

    def unwritten_count(self) -> int:
        with self._cond:
            return len(self._unwritten)

    def healthy(self) -> bool:
        """Reaching the database. While not, the supervisor neither renews the leases of the
        outcomes waiting here (they lapse and other workers rescue the tasks, as if this worker
        were cut off) nor claims more."""
        return self.is_alive() and self._db_failures == 0

    def accepting(self) -> bool:
        """Healthy and not too far behind: the supervisor may claim more work. Once behind, it
        stays so until down to RESUME_CLAIMS_AT, and then wakes the supervisor."""
        if not self.healthy():
            return False
        with self._cond:
            if len(self._unwritten) >= MAX_UNWRITTEN:
                self._throttled = True
            return not self._throttled

    def finish(self, timeout: float) -> bool:
        """Write what is left (within timeout), then stop. True if nothing was left unwritten."""
        with self._cond:
            self._stop_at = time.monotonic() + timeout
            self._cond.notify()
        # A statement in flight may take up to statement_timeout to give up.
        self.join(timeout + statement_timeout_seconds(self.settings) + JOIN_MARGIN_SECONDS)
        left = len(self.unwritten())
        if self.is_alive():
            log.error("worker %s: the result writer did not finish in time", self.worker_id)
        if left:
            log.error(
                "worker %s exiting with %d unwritten outcome(s); their leases will lapse",
                self.worker_id,
                left,
            )
        return left == 0

    # --- the writer thread -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception:
            # The supervisor notices the dead thread and exits (its leases lapse): say why.
            log.exception("worker %s: the result writer failed", self.worker_id)
        finally:
            if self.db is not None:
                self.db.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._work_due() and not self._stopping_done():
                    self._cond.wait(self._wait_seconds())
                if self._stopping_done():
                    return
                self.writes.pending.merge(self._incoming)
                self._incoming = ReportQueue()
                self._writing_freed |= self._incoming_freed
                self._incoming_freed = set()
            db = self._ensure_db()
            if db is not None:
                try:
                    if self._stop_at is not None:
                        self.writes.parked_until = 0.0  # stopping: no more waiting on locks
                    self.writes.flush(db, time.monotonic())
                    freed, self._writing_freed = self._writing_freed, set()
                    with self._cond:
                        self._freed |= freed
                        self._unwritten = self.writes.refs() | self._incoming.refs()
                        caught_up = self._throttled and len(self._unwritten) <= RESUME_CLAIMS_AT
                        if caught_up:
                            self._throttled = False
                    if caught_up or (freed and self.wake_on_flush):  # room to claim, or slots to fill
                        self._wake_supervisor()
                except SESSION_ENDED as exc:
                    self._lost_db(exc)
                except psycopg.Error as exc:
                    log.exception("worker %s: the database refused a write, retrying", self.worker_id)
                    self._lost_db(exc)

    def _on_retries_scheduled(self) -> None:
        """Failures were stored as retries (the writer thread, mid-flush)."""
        with self._cond:
            self._retries_scheduled = True
        self._wake_supervisor()

    def _pending(self) -> bool:
        return bool(self.writes.has_outcomes() or self._incoming or self._incoming.progress)

    def _work_due(self) -> bool:
        now = time.monotonic()
        if self.db is None and now < self._db_retry_at:
            return False
        return self.writes.due(now, self._incoming, stopping=self._stop_at is not None)

    def _stopping_done(self) -> bool:
        if self._stop_at is None:
            return False
        return not self._pending() or time.monotonic() >= self._stop_at

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        waits = [IDLE_WAIT_SECONDS, *self.writes.waits(now, self._incoming)]
        if self.db is None:
            waits.append(self._db_retry_at - now)
        if self._stop_at is not None:
            waits.append(min(STOPPING_CHECK_SECONDS, self._stop_at - now))
        return max(MIN_WAIT_SECONDS, min(waits))

    def _ensure_db(self) -> Connection | None:
        """The connection, (re)connected when the backoff allows; None while unreachable."""
        if self.db is not None and not self.db.closed:
            return self.db
        if time.monotonic() < self._db_retry_at:
            return None
        try:
            self.db = connect_worker(
                self.settings.database_url,
                self.settings.db_timeout_seconds,
                role="writer",
                lease_seconds=self.settings.lease_seconds,
                pooler=self.settings.database_pooler,
            )
        except psycopg.OperationalError as exc:
            self._lost_db(exc)
            return None
        if self._db_failures:
            self._wake_supervisor()  # healthy again: it may claim
        self._db_failures = 0
        return self.db

    def _lost_db(self, exc: Exception) -> None:
        self._db_failures += 1
        self._db_retry_at = time.monotonic() + reconnect_delay(self._db_failures)
        if self.db is not None:
            try:
                self.db.close()
            except Exception:  # closing a broken connection must not stop the writer
                pass
        self.db = None
