"""The worker's result writer: a thread with its own connection that stores finished attempts.

The supervisor's loop hands over what its processes reported and goes straight back to claiming
and dispatching, so Postgres stores one batch of results on this connection while it claims the
next batch on the other: two backends, two cores.

Every write is fenced (skiplock.queries). A row another session has locked right now is parked
and retried with a growing delay; a row that is no longer ours is dropped and counted.

It also records when tasks start (which charges their attempt): the supervisor hands over the
start of a task still running after a moment (skiplock.processes.START_MARK_AFTER_SECONDS), which
gets a statement of its own; a shorter task's start comes with its outcome and is written in the
same statement, so short tasks cost no extra statement and no extra row version.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import psycopg

from skiplock.db import connect_worker, reconnect_delay
from skiplock.settings import Settings
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_hand_back_many,
    task_held_ids,
    task_progress_many,
    task_start_many,
)
from skiplock.sql.workers import task_retries_announce
from skiplock.worker.stats import WorkerStats

log = logging.getLogger("skiplock.worker")

PROGRESS_FLUSH_INTERVAL_SECONDS = 0.5
# Outcomes whose row another session had locked are retried after this delay, doubling while
# the lock lasts (concurrent claims lock rows for microseconds; a DBA's session for minutes).
PARK_DELAY_MIN_SECONDS = 0.01
PARK_DELAY_MAX_SECONDS = 1.0
# At most this many outcomes per statement: a backlog (after an outage) is written in pieces
# that each fit well within statement_timeout, instead of one statement that may never fit.
WRITE_BATCH_MAX = 1000
# Past this many unwritten outcomes the supervisor stops claiming until the writer is down to
# half of it (short tasks run faster than their results can be stored).
MAX_UNWRITTEN = 4000


@dataclass
class Outbox:
    """Outcomes waiting to be written: kept until a write succeeds, so a database outage loses
    nothing the worker still holds a lease for (and writes after the lease are fenced out).
    Times are the supervisor's monotonic clock; writes turn them into "seconds ago"."""

    completed: dict[AttemptRef, str] = field(default_factory=dict)
    failed: dict[AttemptRef, AttemptFailure] = field(default_factory=dict)
    progress: dict[AttemptRef, float] = field(default_factory=dict)
    # Given back uncounted at shutdown -> when a process started it (None: never started).
    handed_back: dict[AttemptRef, float | None] = field(default_factory=dict)
    # Started in a process -> when; kept until the start is written (with the outcome, or alone).
    started: dict[AttemptRef, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.completed or self.failed or self.handed_back)

    def __len__(self) -> int:
        return len(self.completed) + len(self.failed) + len(self.handed_back)

    def empty(self) -> bool:
        return not (self or self.progress or self.started)

    def refs(self) -> set[AttemptRef]:
        """The attempts with an outcome in here (progress reports and starts aside)."""
        return {*self.completed, *self.failed, *self.handed_back}

    def merge(self, other: Outbox) -> None:
        self.completed.update(other.completed)
        self.failed.update(other.failed)
        self.handed_back.update(other.handed_back)
        self.progress.update(other.progress)
        self.started.update(other.started)

    def clear(self) -> None:
        for part in (self.completed, self.failed, self.progress, self.handed_back, self.started):
            part.clear()

    def starts_to_mark(self) -> dict[AttemptRef, float]:
        """Starts that need a write of their own: no outcome here to carry them."""
        return {
            ref: at
            for ref, at in self.started.items()
            if ref not in self.completed and ref not in self.failed and ref not in self.handed_back
        }


def _chunks(items: dict, size: int = WRITE_BATCH_MAX):
    """Consecutive pieces of a dict, each a dict of at most `size` items."""
    keys = list(items)
    for start in range(0, len(keys), size):
        yield {key: items[key] for key in keys[start : start + size]}


def split_stale(refs) -> tuple[list[AttemptRef], set[AttemptRef]]:
    """Per task, the newest attempt and the older ones. A worker holds two attempts of one task
    only if it lost the first (its lease lapsed) and claimed the task again: the older one is no
    longer ours, and a fenced write, which answers by task id, must never carry both."""
    newest: dict[int, AttemptRef] = {}
    for ref in refs:
        if ref.task_id not in newest or ref.attempt > newest[ref.task_id].attempt:
            newest[ref.task_id] = ref
    current = list(newest.values())
    return current, set(refs) - set(current)


class ResultWriter(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        counters: dict[str, int],
        wake_supervisor=lambda: None,
        stats: WorkerStats | None = None,
        finals_written=lambda task_ids: None,
    ):
        super().__init__(name="skiplock-result-writer", daemon=True)
        # Told the ids of tasks whose final state (completed, failed) it stored: their webhooks
        # are due.
        self._finals_written = finals_written
        # Called when the supervisor may claim again (caught up, or reconnected): it may be
        # asleep with nothing else to wake it.
        self._wake_supervisor = wake_supervisor
        self._throttled = False  # the supervisor was told to stop claiming (under _cond)
        self._retries_scheduled = False  # failures were written as retries (under _cond)
        self.settings = settings
        self.worker_id = worker_id
        self.counters = counters
        self.stats = stats
        self.db: psycopg.Connection | None = None
        self.outbox = Outbox()  # being written (writer thread only)
        self.parked = Outbox()  # rows locked by another session (writer thread only)
        self._incoming = Outbox()  # handed over by the supervisor (under _cond)
        # Everything handed over and not yet written or dropped (under _cond): while the writer
        # is healthy the supervisor renews these leases, or a slow write would let them lapse
        # into a re-run.
        self._unwritten: set[AttemptRef] = set()
        self._cond = threading.Condition()
        self._parked_until = 0.0
        self._park_delay = PARK_DELAY_MIN_SECONDS
        self._last_progress_flush = 0.0
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

    def put(self, box: Outbox) -> None:
        """Hand over outcomes and starts (the supervisor's box is emptied)."""
        if box.empty():
            return
        with self._cond:
            self._incoming.merge(box)
            self._unwritten |= box.refs()
            self._cond.notify()
        box.clear()

    def unwritten(self) -> set[AttemptRef]:
        """Attempts whose outcome is still waiting to be written (a copy)."""
        with self._cond:
            return set(self._unwritten)

    def has_unwritten(self) -> bool:
        with self._cond:
            return bool(self._unwritten)

    def healthy(self) -> bool:
        """Reaching the database. While not, the supervisor neither renews the leases of the
        outcomes waiting here (they lapse and other workers rescue the tasks, as if this worker
        were cut off) nor claims more."""
        return self.is_alive() and self._db_failures == 0

    def accepting(self) -> bool:
        """Healthy and not too far behind: the supervisor may claim more work. Once behind, it
        stays so until half caught up, and then wakes the supervisor."""
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
        # A statement in flight may take up to statement_timeout (5x db_timeout) to give up.
        self.join(timeout + self.settings.db_timeout_seconds * 5 + 1)
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
                self.outbox.merge(self._incoming)
                self._incoming = Outbox()
            if self._ensure_db():
                try:
                    if self._stop_at is not None:
                        self._parked_until = 0.0  # stopping: no more waiting on locks
                    self._flush(time.monotonic())
                    with self._cond:
                        self._unwritten = self.outbox.refs() | self.parked.refs() | self._incoming.refs()
                        caught_up = self._throttled and len(self._unwritten) <= MAX_UNWRITTEN // 2
                        if caught_up:
                            self._throttled = False
                    if caught_up:
                        self._wake_supervisor()
                except psycopg.OperationalError as exc:
                    self._lost_db(exc)
                except psycopg.Error as exc:
                    log.exception("worker %s: the database refused a write, retrying", self.worker_id)
                    self._lost_db(exc)

    def _pending(self) -> bool:
        return bool(self.outbox or self._incoming or self._incoming.progress or self.parked)

    def _work_due(self) -> bool:
        now = time.monotonic()
        if self.db is None and now < self._db_retry_at:
            return False
        progress_due = (self.outbox.progress or self._incoming.progress) and (
            now - self._last_progress_flush >= PROGRESS_FLUSH_INTERVAL_SECONDS
        )
        parked_due = (self.parked or self.parked.started) and (
            now >= self._parked_until or self._stop_at is not None
        )
        marks_due = self.outbox.started or self._incoming.started
        return bool(self.outbox or self._incoming or progress_due or parked_due or marks_due)

    def _stopping_done(self) -> bool:
        if self._stop_at is None:
            return False
        return not self._pending() or time.monotonic() >= self._stop_at

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        waits = [1.0]
        if self.db is None:
            waits.append(self._db_retry_at - now)
        if self.parked:
            waits.append(self._parked_until - now)
        if self.outbox.progress or self._incoming.progress:
            waits.append(PROGRESS_FLUSH_INTERVAL_SECONDS - (now - self._last_progress_flush))
        if self._stop_at is not None:
            waits.append(min(0.1, self._stop_at - now))
        return max(0.001, min(waits))

    def _ensure_db(self) -> bool:
        if self.db is not None and not self.db.closed:
            return True
        if time.monotonic() < self._db_retry_at:
            return False
        try:
            self.db = connect_worker(
                self.settings.database_url,
                self.settings.db_timeout_seconds,
                role="writer",
                lease_seconds=self.settings.lease_seconds,
            )
        except psycopg.OperationalError as exc:
            self._lost_db(exc)
            return False
        if self._db_failures:
            self._wake_supervisor()  # healthy again: it may claim
        self._db_failures = 0
        return True

    def _lost_db(self, exc: Exception) -> None:
        self._db_failures += 1
        self._db_retry_at = time.monotonic() + reconnect_delay(self._db_failures)
        if self.db is not None:
            try:
                self.db.close()
            except Exception:  # closing a broken connection must not stop the writer
                pass
        self.db = None

    def _flush(self, now: float) -> None:
        """Write every finished attempt, one statement per kind, then the starts of tasks still
        running. Rows another session has locked right now are parked and retried shortly; rows
        no longer ours are dropped (fenced out)."""
        retrying = bool(self.parked or self.parked.started) and now >= self._parked_until
        if retrying:
            self.outbox.merge(self.parked)
            self.parked = Outbox()
        parked_before = len(self.parked) + len(self.parked.started)
        box = self.outbox
        for items in (box.completed, box.failed):
            # Fenced writes answer by task id: one attempt per task per statement.
            _, stale = split_stale(items)
            for ref in stale:
                del items[ref]
            self._count_fenced(len(stale), "outcomes of superseded attempts")
        for chunk in _chunks(box.completed):
            self._count_write(len(chunk))
            done = list(chunk)  # _write_results moves results it cannot store to box.failed
            written = self._write_results(chunk)
            self.counters["completed"] += len(written)
            self._finals_written(written)
            self._settle(chunk, written, self.parked.completed, "results")
            for ref in done:
                box.completed.pop(ref, None)
        retried = False
        for chunk in _chunks(box.failed):
            self._count_write(len(chunk))
            outcome = task_fail_many(
                self.db,
                worker_id=self.worker_id,
                failures=chunk.values(),
                backoff_base=self.settings.retry_backoff_base_seconds,
                backoff_max=self.settings.retry_backoff_max_seconds,
                started_ago=self._started_ago(chunk),
            )
            self.counters["failed"] += len(outcome)
            retried |= "pending" in outcome.values()
            self._finals_written({task_id for task_id, status in outcome.items() if status == "failed"})
            self._settle(chunk, set(outcome), self.parked.failed, "failures")
            for ref in chunk:
                box.failed.pop(ref, None)
        if retried:
            # A retry falls due after its backoff, and no insert will announce it.
            task_retries_announce(self.db)
            with self._cond:
                self._retries_scheduled = True
            self._wake_supervisor()
        for chunk in _chunks(box.handed_back):
            # Uncounted either way: the start decides between handed_back and released.
            now_ = time.monotonic()
            started_ago = {ref: now_ - at for ref, at in chunk.items() if at is not None}
            written = task_hand_back_many(
                self.db, worker_id=self.worker_id, refs=chunk, started_ago=started_ago
            )
            self._settle(chunk, written, self.parked.handed_back, "hand-backs")
            for ref in chunk:
                box.handed_back.pop(ref, None)
        self._mark_starts(now)
        if len(self.parked) + len(self.parked.started) > parked_before:  # locked again
            log.debug("parked %d outcome(s) for %.3f s", len(self.parked), self._park_delay)
            self._parked_until = now + self._park_delay
            self._park_delay = min(PARK_DELAY_MAX_SECONDS, self._park_delay * 2)
        elif retrying and not (self.parked or self.parked.started):
            self._park_delay = PARK_DELAY_MIN_SECONDS
        if box.progress and now - self._last_progress_flush >= PROGRESS_FLUSH_INTERVAL_SECONDS:
            task_progress_many(self.db, worker_id=self.worker_id, progress=box.progress.items())
            box.progress.clear()
            self._last_progress_flush = now

    def _count_write(self, size: int) -> None:
        if self.stats is not None:
            self.stats.wrote(size)

    def unwritten_count(self) -> int:
        with self._cond:
            return len(self._unwritten)

    def _started_ago(self, refs) -> dict[AttemptRef, float]:
        """Seconds since each of these attempts started (those whose start is not written)."""
        now = time.monotonic()
        return {ref: now - self.outbox.started[ref] for ref in refs if ref in self.outbox.started}

    def _mark_starts(self, now: float) -> None:
        """Record the starts of tasks that have been running for a while: that charges their
        attempt (a rescue then counts it lost, not released). Starts of tasks no longer ours
        are dropped: the supervisor learns that from its lease renewals."""
        marks = self.outbox.starts_to_mark()
        _, stale = split_stale(marks)
        for ref in stale:
            del marks[ref]
            self.outbox.started.pop(ref)
        for chunk in _chunks(marks):
            now_ = time.monotonic()
            held = task_start_many(
                self.db, worker_id=self.worker_id, started_ago={ref: now_ - at for ref, at in chunk.items()}
            )
            missing = [ref for ref in chunk if ref.task_id not in held]
            # Rows another session holds locked right now (SKIP LOCKED) are marked later.
            locked = task_held_ids(self.db, worker_id=self.worker_id, refs=missing) if missing else set()
            for ref in chunk:
                at = self.outbox.started.pop(ref)
                if ref.task_id in locked:
                    self.parked.started[ref] = at

    def _settle(self, items: dict, written: set[int], parked: dict, what: str) -> None:
        """After a fenced write of `items`: park what is still ours (its row was locked), with
        its start, and count the rest as fenced out. Starts of the rest were written (or are
        moot)."""
        unwritten = [ref for ref in items if ref.task_id not in written]
        held: set[int] = set()
        if unwritten:
            held = task_held_ids(self.db, worker_id=self.worker_id, refs=unwritten)
            for ref in unwritten:
                if ref.task_id in held:
                    parked[ref] = items[ref]
            self._count_fenced(len(unwritten) - len(held), what)
        for ref in items:
            at = self.outbox.started.pop(ref, None)
            if at is not None and ref.task_id in held:
                self.parked.started[ref] = at

    def _write_results(self, completed: dict[AttemptRef, str]) -> set[int]:
        """Write results in one statement; if the batch is refused because of one bad row (a value
        jsonb rejects), write them one by one and fail the attempts whose result cannot be stored."""

        def write(items):
            items = list(items)
            return task_complete_many(
                self.db,
                worker_id=self.worker_id,
                results=items,
                started_ago=self._started_ago(ref for ref, _ in items),
            )

        try:
            return write(completed.items())
        except (psycopg.DataError, psycopg.IntegrityError):
            written: set[int] = set()
            for ref, result in list(completed.items()):
                try:
                    written |= write([(ref, result)])
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    error = f"result could not be stored: {str(exc).strip()}"
                    self.outbox.failed[ref] = AttemptFailure(ref.task_id, ref.attempt, "failed", error)
                    del completed[ref]
            return written

    def _count_fenced(self, count: int, what: str) -> None:
        if count > 0:
            self.counters["fenced_out"] += count
            log.warning(
                "worker %s: %d %s not written: the tasks were cancelled or taken over (fenced out)",
                self.worker_id,
                count,
                what,
            )
