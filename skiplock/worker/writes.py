"""The result writer's statements: what the writer thread (skiplock.worker.writer) has taken from
the supervisor, written as fenced batch statements (skiplock.sql.fenced), one per kind.

Every write is fenced. A row another session has locked right now is parked and retried with a
growing delay; a row that is no longer ours is dropped and counted (fenced_out).

Starts: the supervisor hands over the start of a task still running after a moment
(skiplock.worker.processes.START_MARK_AFTER_SECONDS), which gets a statement of its own; a shorter
task's start comes with its outcome and is written in the same statement, so short tasks cost no
extra statement and no extra row version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import TypeVar

import psycopg

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
from skiplock.sql.rows import Connection
from skiplock.sql.workers import task_retries_announce
from skiplock.worker.handoff import StepHandoff
from skiplock.worker.reports import ReportQueue, chunks, split_stale
from skiplock.worker.stats import WorkerStats
from skiplock.worker.workflow_steps import HeldSteps

log = logging.getLogger("skiplock.worker")

# Progress reports are written at most this often: each is a row update a client may be watching.
PROGRESS_FLUSH_INTERVAL_SECONDS = 0.5
# Outcomes whose row another session had locked are retried after this delay, doubling while
# the lock lasts (concurrent claims lock rows for microseconds; a DBA's session for minutes).
PARK_DELAY_MIN_SECONDS = 0.01
PARK_DELAY_MAX_SECONDS = 1.0

_V = TypeVar("_V")


class ResultWrites:
    """The writer thread's side only (no lock): reports being written, and those parked because
    another session held their rows locked."""

    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        counters: dict[str, int],
        stats: WorkerStats | None,
        retries_scheduled: Callable[[], None],
        handoff: StepHandoff | None = None,
    ):
        self.settings = settings
        self.worker_id = worker_id
        self.counters = counters
        self.stats = stats
        # Called (after the retries were announced) when failures were stored as retries.
        self._retries_scheduled = retries_scheduled
        self.pending = ReportQueue()  # being written
        self.parked = ReportQueue()  # rows locked by another session
        self.parked_until = 0.0
        self._park_delay = PARK_DELAY_MIN_SECONDS
        self._last_progress_flush = 0.0
        # Workflow steps claimed by this worker (added by the claimer, at claim): their final
        # write and the settling of their dependents and workflow are one transaction.
        self.workflow_steps = HeldSteps()
        # The steps those writes release, taken by this worker while it is idle (eager starts).
        self.handoff = handoff

    # --- what the writer thread asks -------------------------------------------------------------

    def refs(self) -> set[AttemptRef]:
        """The attempts whose outcome is still to be written here (being written, or parked)."""
        return self.pending.refs() | self.parked.refs()

    def has_outcomes(self) -> bool:
        return bool(self.pending or self.parked)

    def due(self, now: float, incoming: ReportQueue, *, stopping: bool) -> bool:
        """Whether a flush would write something now (`incoming`: handed over, not taken yet)."""
        progress_due = (self.pending.progress or incoming.progress) and (
            now - self._last_progress_flush >= PROGRESS_FLUSH_INTERVAL_SECONDS
        )
        parked_due = (self.parked or self.parked.started) and (now >= self.parked_until or stopping)
        marks_due = self.pending.started or incoming.started
        return bool(self.pending or incoming or progress_due or parked_due or marks_due)

    def waits(self, now: float, incoming: ReportQueue) -> list[float]:
        """Seconds until each of the timers here falls due."""
        waits = []
        if self.parked:
            waits.append(self.parked_until - now)
        if self.pending.progress or incoming.progress:
            waits.append(PROGRESS_FLUSH_INTERVAL_SECONDS - (now - self._last_progress_flush))
        return waits

    # --- the statements ------------------------------------------------------------------------

    def flush(self, db: Connection, now: float) -> None:
        """Write every finished attempt, one statement per kind, then the starts of tasks still
        running. Rows another session has locked right now are parked and retried shortly; rows
        no longer ours are dropped (fenced out)."""
        retrying = bool(self.parked or self.parked.started) and now >= self.parked_until
        if retrying:
            self.pending.merge(self.parked)
            self.parked = ReportQueue()
        parked_before = len(self.parked) + len(self.parked.started)
        box = self.pending
        for items in (box.completed, box.failed):
            # Fenced writes answer by task id: one attempt per task per statement.
            _, stale = split_stale(items)
            for ref in stale:
                del items[ref]
            self._count_fenced(len(stale), "outcomes of superseded attempts")
        for chunk in chunks(box.completed):
            self._count_write(len(chunk))
            done = list(chunk)  # _write_results moves results it cannot store to box.failed
            steps = self.workflow_steps.among(ref.task_id for ref in chunk)
            written = self._write_step_results(db, chunk, steps) if steps else self._write_results(db, chunk)
            self.counters["completed"] += len(written)
            self._settle(db, chunk, written, self.parked.completed, "results")
            for ref in done:
                box.completed.pop(ref, None)
        retried = False
        for failures in chunks(box.failed):
            self._count_write(len(failures))
            steps = self.workflow_steps.among(ref.task_id for ref in failures)
            with db.transaction() if steps else nullcontext():
                outcome = task_fail_many(
                    db,
                    worker_id=self.worker_id,
                    failures=failures.values(),
                    backoff_base=self.settings.retry_backoff_base_seconds,
                    backoff_max=self.settings.retry_backoff_max_seconds,
                    started_ago=self._started_ago(failures),
                )
                ended = {i for i in steps if outcome.get(i, "pending") != "pending"}
                self.workflow_steps.ended(db, ended)
            self.workflow_steps.forget(ended)
            self.counters["failed"] += len(outcome)
            retried |= "pending" in outcome.values()
            self._settle(db, failures, set(outcome), self.parked.failed, "failures")
            for ref in failures:
                box.failed.pop(ref, None)
        if retried:
            # A retry falls due after its backoff, and no insert will announce it.
            task_retries_announce(db)
            self._retries_scheduled()
        for handed in chunks(box.handed_back):
            # Uncounted either way: the start decides between handed_back and released.
            now_ = time.monotonic()
            started_ago = {ref: now_ - at for ref, at in handed.items() if at is not None}
            written = task_hand_back_many(db, worker_id=self.worker_id, refs=handed, started_ago=started_ago)
            self._settle(db, handed, written, self.parked.handed_back, "hand-backs")
            for ref in handed:
                box.handed_back.pop(ref, None)
        self._mark_starts(db)
        if len(self.parked) + len(self.parked.started) > parked_before:  # locked again
            log.debug("parked %d outcome(s) for %.3f s", len(self.parked), self._park_delay)
            self.parked_until = now + self._park_delay
            self._park_delay = min(PARK_DELAY_MAX_SECONDS, self._park_delay * 2)
        elif retrying and not (self.parked or self.parked.started):
            self._park_delay = PARK_DELAY_MIN_SECONDS
        if box.progress and now - self._last_progress_flush >= PROGRESS_FLUSH_INTERVAL_SECONDS:
            task_progress_many(db, worker_id=self.worker_id, progress=box.progress.items())
            box.progress.clear()
            self._last_progress_flush = now

    def _write_step_results(
        self, db: Connection, completed: dict[AttemptRef, str], steps: set[int]
    ) -> set[int]:
        """_write_results for a chunk with workflow steps: each write and the settling of its
        steps' dependents and workflows in one transaction (a refused row undoes it, and the
        results are then written one by one, each so)."""

        def write(items: Iterable[tuple[AttemptRef, str]]) -> set[int]:
            with self.handoff.taking(db) if self.handoff is not None else nullcontext() as take:
                with db.transaction():
                    done = self._complete(db, items)
                    self.workflow_steps.ended(db, steps & done, take, completed=True)
                self.workflow_steps.forget(steps & done)
            return done

        return self._write_results(db, completed, write)

    def _count_write(self, size: int) -> None:
        if self.stats is not None:
            self.stats.wrote(size)

    def _started_ago(self, refs: Iterable[AttemptRef]) -> dict[AttemptRef, float]:
        """Seconds since each of these attempts started (those whose start is not written)."""
        now = time.monotonic()
        started = self.pending.started
        return {ref: now - started[ref] for ref in refs if ref in started}

    def _mark_starts(self, db: Connection) -> None:
        """Record the starts of tasks that have been running for a while: that charges their
        attempt (a rescue then counts it lost, not released). Starts of tasks no longer ours
        are dropped: the supervisor learns that from its lease renewals."""
        marks = self.pending.starts_to_mark()
        _, stale = split_stale(marks)
        for ref in stale:
            del marks[ref]
            self.pending.started.pop(ref)
        for chunk in chunks(marks):
            now_ = time.monotonic()
            held = task_start_many(
                db, worker_id=self.worker_id, started_ago={ref: now_ - at for ref, at in chunk.items()}
            )
            missing = [ref for ref in chunk if ref.task_id not in held]
            # Rows another session holds locked right now (SKIP LOCKED) are marked later.
            locked = task_held_ids(db, worker_id=self.worker_id, refs=missing) if missing else set()
            for ref in chunk:
                at = self.pending.started.pop(ref)
                if ref.task_id in locked:
                    self.parked.started[ref] = at

    def _settle(
        self,
        db: Connection,
        items: dict[AttemptRef, _V],
        written: set[int],
        parked: dict[AttemptRef, _V],
        what: str,
    ) -> None:
        """After a fenced write of `items`: park what is still ours (its row was locked), with
        its start, and count the rest as fenced out. Starts of the rest were written (or are
        moot)."""
        unwritten = [ref for ref in items if ref.task_id not in written]
        held: set[int] = set()
        if unwritten:
            held = task_held_ids(db, worker_id=self.worker_id, refs=unwritten)
            for ref in unwritten:
                if ref.task_id in held:
                    parked[ref] = items[ref]
            self._count_fenced(len(unwritten) - len(held), what)
        for ref in items:
            at = self.pending.started.pop(ref, None)
            if at is not None and ref.task_id in held:
                self.parked.started[ref] = at

    def _write_results(
        self,
        db: Connection,
        completed: dict[AttemptRef, str],
        write: Callable[[Iterable[tuple[AttemptRef, str]]], set[int]] | None = None,
    ) -> set[int]:
        """Write results in one statement (`write`, by default the bare statement); if the batch
        is refused because of one bad row (a value jsonb rejects), write them one by one and fail
        the attempts whose result cannot be stored."""
        write = write or (lambda items: self._complete(db, items))
        try:
            return write(completed.items())
        except (psycopg.DataError, psycopg.IntegrityError):
            written: set[int] = set()
            for ref, result in list(completed.items()):
                try:
                    written |= write([(ref, result)])
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    self._refuse_result(ref, exc, completed)
            return written

    def _complete(self, db: Connection, items: Iterable[tuple[AttemptRef, str]]) -> set[int]:
        items = list(items)
        return task_complete_many(
            db,
            worker_id=self.worker_id,
            results=items,
            started_ago=self._started_ago(ref for ref, _ in items),
        )

    def _refuse_result(self, ref: AttemptRef, exc: Exception, completed: dict[AttemptRef, str]) -> None:
        """A result the database refuses: its attempt fails instead, saying why."""
        error = f"result could not be stored: {str(exc).strip()}"
        self.pending.failed[ref] = AttemptFailure(ref.task_id, ref.attempt, "failed", error)
        del completed[ref]

    def _count_fenced(self, count: int, what: str) -> None:
        if count > 0:
            self.counters["fenced_out"] += count
            log.warning(
                "worker %s: %d %s not written: the tasks were cancelled or taken over (fenced out)",
                self.worker_id,
                count,
                what,
            )
