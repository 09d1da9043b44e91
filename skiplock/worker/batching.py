"""How much work a worker claims and hands to a process at once, learnt from how long tasks run.

Short tasks travel to a process in batches worth about BATCH_TARGET_SECONDS of work, so per-task
overhead (pipe messages, loop turns) stays small; a task whose type has not been timed yet, or
takes longer, goes alone. While tasks are short, claims prefetch a second batch per process so
that no process waits for the next claim. (Prefetched tasks are only reserved: they are charged
when they start, and handed back uncounted if the worker stops or dies first.)
"""

from __future__ import annotations

from collections import deque

from skiplock.sql.claim import ClaimedTask

BATCH_TARGET_SECONDS = 0.02
MAX_DISPATCH_BATCH = 256
MAX_CLAIM_BATCH = 500
DURATION_EWMA_WEIGHT = 0.2
# While tasks are short, claims fill this many batches per process (one running, one waiting).
PREFETCH_BATCHES = 2
# Run times below this count as this (a no-op measures ~0 s: the batch size must stay finite).
MIN_DURATION_SECONDS = 1e-6


class Batcher:
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}  # task type -> EWMA of run time (s)
        self.typical: float | None = None  # EWMA over all types

    def record(self, task_type: str, seconds: float) -> None:
        w = DURATION_EWMA_WEIGHT
        previous = self.durations.get(task_type)
        self.durations[task_type] = seconds if previous is None else (1 - w) * previous + w * seconds
        self.typical = seconds if self.typical is None else (1 - w) * self.typical + w * seconds

    def batch_size(self) -> int:
        """How many typical tasks make one batch (1 until tasks have been timed, or if slow)."""
        if self.typical is None:
            return 1
        return max(
            1, min(MAX_DISPATCH_BATCH, int(BATCH_TARGET_SECONDS / max(self.typical, MIN_DURATION_SECONDS)))
        )

    def claim_limit(self, *, free_processes: int, ready_processes: int, held: int, backlog: int) -> int:
        """How many tasks to claim now: enough for every idle process, and, while tasks are short,
        a second batch per process."""
        batch = self.batch_size()
        if batch == 1:
            return free_processes - backlog
        want = PREFETCH_BATCHES * batch * ready_processes - held
        return min(MAX_CLAIM_BATCH, want) if want >= batch else 0

    def take(self, backlog: deque[ClaimedTask]) -> list[ClaimedTask]:
        """The next tasks for one process: the first in line, plus followers whose type is known
        to be short, up to about BATCH_TARGET_SECONDS of work."""
        batch = [backlog.popleft()]
        budget = BATCH_TARGET_SECONDS - self.durations.get(batch[0].task_type, BATCH_TARGET_SECONDS)
        while backlog and len(batch) < MAX_DISPATCH_BATCH:
            estimate = self.durations.get(backlog[0].task_type)
            if estimate is None or estimate > budget:
                break
            budget -= estimate
            batch.append(backlog.popleft())
        return batch
