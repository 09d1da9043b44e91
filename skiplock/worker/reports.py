"""What a worker's processes report, on its way to the database: the ReportQueue, filled by the
supervisor's loop (skiplock.worker.processes) and written by the result writer
(skiplock.worker.writer), and the helpers both sides use to cut it into fenced writes.

(Not to be confused with the webhook outbox: the webhook_deliveries rows the final writes insert,
skiplock.sql.fragments.outbox.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from skiplock.sql.fenced import AttemptFailure, AttemptRef

# At most this many outcomes per statement: a backlog (after an outage) is written in pieces
# that each fit well within statement_timeout, instead of one statement that may never fit.
WRITE_BATCH_MAX = 1000

_V = TypeVar("_V")


@dataclass
class ReportQueue:
    """Reports waiting to be written: kept until a write succeeds, so a database outage loses
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

    def merge(self, other: ReportQueue) -> None:
        self.completed.update(other.completed)
        self.failed.update(other.failed)
        self.handed_back.update(other.handed_back)
        self.progress.update(other.progress)
        self.started.update(other.started)

    def clear(self) -> None:
        self.completed.clear()
        self.failed.clear()
        self.progress.clear()
        self.handed_back.clear()
        self.started.clear()

    def starts_to_mark(self) -> dict[AttemptRef, float]:
        """Starts that need a write of their own: no outcome here to carry them."""
        return {
            ref: at
            for ref, at in self.started.items()
            if ref not in self.completed and ref not in self.failed and ref not in self.handed_back
        }


def chunks(items: dict[AttemptRef, _V], size: int = WRITE_BATCH_MAX) -> Iterator[dict[AttemptRef, _V]]:
    """Consecutive pieces of a dict, each a dict of at most `size` items."""
    keys = list(items)
    for start in range(0, len(keys), size):
        yield {key: items[key] for key in keys[start : start + size]}


def split_stale(refs: Iterable[AttemptRef]) -> tuple[list[AttemptRef], set[AttemptRef]]:
    """Per task, the newest attempt and the older ones. A worker holds two attempts of one task
    only if it lost the first (its lease lapsed) and claimed the task again: the older one is no
    longer ours, and a fenced write, which answers by task id, must never carry both."""
    refs = list(refs)
    newest: dict[int, AttemptRef] = {}
    for ref in refs:
        if ref.task_id not in newest or ref.attempt > newest[ref.task_id].attempt:
            newest[ref.task_id] = ref
    current = list(newest.values())
    return current, set(refs) - set(current)
