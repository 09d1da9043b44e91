"""How much work a worker claims and hands to a process at once, learnt from how long tasks run.

Short tasks travel to a process in batches worth about BATCH_TARGET_SECONDS of work, so per-task
overhead (pipe messages, loop turns) stays small; a task whose type has not been timed yet, or
takes longer, goes alone. While tasks are short, claims prefetch a second batch per process so
that no process waits for the next claim. (Prefetched tasks are only reserved: they are charged
once handed to a process, and handed back uncounted if the worker stops or dies first. A batch is
handed over whole, and the next one before the current one ends (HAND_OVER_AHEAD_SECONDS), so a
worker that dies mid-batch has the tasks its process had not reached counted too.)

Prefetch is also bounded in time: the worker holds at most PREFETCH_SECONDS of its own recent
throughput. Run time alone would let it hold two batches of 256 no-ops per process, about 120 ms
of this worker's pace: a task submitted meanwhile (another owner's turn, a higher priority)
would wait behind all of them.
"""

from __future__ import annotations

import time
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
# Claims hold at most this long's worth of the worker's measured throughput...
PREFETCH_SECONDS = 0.03
# ...but never fewer than this per ready process (the throughput is still being measured).
MIN_PREFETCH_PER_PROCESS = 16
# Throughput: tasks finished per second, an EWMA over windows this long.
THROUGHPUT_WINDOW_SECONDS = 0.1
# A busy process gets its next batch (handed over first: task_hand_over) once the work it has left
# is estimated at no more than this: the hand-over's round trip overlaps that work instead of
# leaving the process idle. A worker that dies then has at most this much more counted as started.
HAND_OVER_AHEAD_SECONDS = 0.005


class Batcher:
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}  # task type -> EWMA of run time (s)
        self.typical: float | None = None  # EWMA over all types
        self.throughput = 0.0  # tasks finished per second (EWMA over THROUGHPUT_WINDOW_SECONDS)
        self._finished = 0  # in the current window
        self._window_from = time.monotonic()
        self.dispatch_cap = MAX_DISPATCH_BATCH  # per batch: the prefetch shared by the processes

    def record(self, task_type: str, seconds: float) -> None:
        w = DURATION_EWMA_WEIGHT
        previous = self.durations.get(task_type)
        self.durations[task_type] = seconds if previous is None else (1 - w) * previous + w * seconds
        self.typical = seconds if self.typical is None else (1 - w) * self.typical + w * seconds
        self._finished += 1

    def _measure(self, now: float) -> None:
        elapsed = now - self._window_from
        if elapsed < THROUGHPUT_WINDOW_SECONDS:
            return
        rate = self._finished / elapsed
        # A fast rise (throughput growing with the prefetch it allows), a slower fall.
        self.throughput = rate if rate > self.throughput else 0.5 * (self.throughput + rate)
        self._finished, self._window_from = 0, now

    def batch_size(self) -> int:
        """How many typical tasks make one batch (1 until tasks have been timed, or if slow)."""
        if self.typical is None:
            return 1
        return max(
            1, min(MAX_DISPATCH_BATCH, int(BATCH_TARGET_SECONDS / max(self.typical, MIN_DURATION_SECONDS)))
        )

    def claim_limit(self, *, free_processes: int, ready_processes: int, held: int, backlog: int) -> int:
        """How many tasks to claim now: enough for every idle process, and, while tasks are short,
        a second batch per process, within PREFETCH_SECONDS of throughput."""
        batch = self.batch_size()
        if batch == 1:
            return free_processes - backlog
        self._measure(time.monotonic())
        most = max(MIN_PREFETCH_PER_PROCESS * ready_processes, int(self.throughput * PREFETCH_SECONDS))
        hold = min(PREFETCH_BATCHES * batch * ready_processes, most)
        self.dispatch_cap = max(1, hold // (PREFETCH_BATCHES * max(1, ready_processes)))
        want = hold - held
        # Claim in sizable steps (one statement per few tasks would cost more than it saves).
        return min(MAX_CLAIM_BATCH, want) if want >= min(batch, hold // 2) else 0

    def dispatch_size(self) -> int:
        """The most tasks one process is sent at once now (take's cap)."""
        return 1 if self.batch_size() == 1 else min(MAX_DISPATCH_BATCH, self.dispatch_cap)

    def estimate(self, task: ClaimedTask) -> float:
        """Seconds a task should run, by its type's record (a type not timed yet counts as long)."""
        return self.durations.get(task.task_type, BATCH_TARGET_SECONDS)

    def take(self, backlog: deque[ClaimedTask]) -> list[ClaimedTask]:
        """The next tasks for one process: the first in line, plus followers whose type is known
        to be short, up to about BATCH_TARGET_SECONDS of work."""
        batch = [backlog.popleft()]
        budget = BATCH_TARGET_SECONDS - self.durations.get(batch[0].task_type, BATCH_TARGET_SECONDS)
        while backlog and len(batch) < min(MAX_DISPATCH_BATCH, self.dispatch_cap):
            estimate = self.durations.get(backlog[0].task_type)
            if estimate is None or estimate > budget:
                break
            budget -= estimate
            batch.append(backlog.popleft())
        return batch
