"""A worker's process slots: each slot is one child process (skiplock.worker.executor) and the batch
of tasks sent to it, and the spawner that starts, kills and stops those processes (through
multiprocessing's forkserver, or spawn: SKIPLOCK_START_METHOD). What the slots' processes report is
handled by skiplock.worker.processes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.process
import signal
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any

import psutil

from skiplock.registry import BUILTIN_MODULE
from skiplock.settings import Settings
from skiplock.sql.claim import ClaimedTask
from skiplock.sql.fenced import AttemptRef
from skiplock.worker.executor import ProcessConfig, SharedInt, child_main

log = logging.getLogger("skiplock.worker")

# Imported first by the forkserver, so that it and every task process ignore SIGTERM and SIGINT.
FORKSERVER_INIT_MODULE = "skiplock.worker.forkserver_init"
# A killed process is gone at once (SIGKILL); this only bounds the wait on a wedged kernel.
KILLED_JOIN_SECONDS = 5.0
# At shutdown each process is asked to exit and gets this long before it is killed.
EXIT_JOIN_SECONDS = 2.0
# A process being recycled gets this long to run its teardowns and exit before it is killed.
RECYCLE_EXIT_SECONDS = 30.0
# A slot whose process's setup failed starts the next one after base * 2^(failures - 1) seconds,
# at most max: a broken setup (a missing model file) costs a log line now and then, not a loop.
SETUP_RETRY_BASE_SECONDS = 1.0
SETUP_RETRY_MAX_SECONDS = 60.0
# multiprocessing's exit status when the forkserver, which reports a child's status, is gone.
_FORKSERVER_GONE_EXITCODE = 255


def task_fields(task: ClaimedTask) -> dict[str, Any]:
    """A task's fields for a log line's extra= (JSON logs carry them; text lines leave them out)."""
    return {"task_id": task.id, "attempt": task.attempt, "task_type": task.task_type, "queue": task.queue}


def warn(task: ClaimedTask, what: str, **extra: Any) -> None:
    """A warning about one attempt: "task <id> attempt <n>: <what>", with the task's fields."""
    log.warning("task %d attempt %d: %s", task.id, task.attempt, what, extra={**task_fields(task), **extra})


def tell(task: ClaimedTask, what: str, **extra: Any) -> None:
    """As warn(), at info level: what a task decided for itself (RetryAfter, NonRetryableError)."""
    log.info("task %d attempt %d: %s", task.id, task.attempt, what, extra={**task_fields(task), **extra})


def ref_of(task: ClaimedTask) -> AttemptRef:
    return AttemptRef(task.id, task.attempt)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    if exitcode == _FORKSERVER_GONE_EXITCODE and not forkserver_alive():
        # multiprocessing's placeholder when the forkserver, which reports a child's status,
        # is gone: the real status is unknowable.
        return "died with the forkserver that started it (exit status unknown)"
    return f"exited with code {exitcode}"


def forkserver_alive() -> bool:
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@dataclass
class Slot:
    """One child process and the tasks sent to it: the head of `queue` is running (since
    `head_started`, monotonic), the rest follow in order."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    running: SharedInt  # shared with the process: id of the task whose function it last entered
    queue: deque[ClaimedTask] = field(default_factory=deque)
    head_started: float = 0.0  # when the head became the head (it starts at once, barring trouble)
    head_confirmed: bool = False  # the process has entered the head's function
    ready: bool = False  # the process has started and loaded the task types
    retired: bool = False  # stopped for good during shutdown
    # The process reached a recycling limit (monotonic time it said so): it takes no more tasks,
    # runs its teardowns and exits, and is then replaced.
    recycling_since: float | None = None
    # Tasks at the end of `queue` sent ahead, while it ran the batch before them (at most one
    # batch ahead; 0 once the process has reached them).
    ahead: int = 0

    def new_head(self, now: float) -> None:
        """The next task in its queue is the head from `now` (its process starts it at once)."""
        self.head_started = now
        self.head_confirmed = False

    def head_running(self) -> bool:
        """Whether the head has started in the process (it may still be running, or be done)."""
        return bool(self.queue) and (self.head_confirmed or self.running.value == self.queue[0].id)

    @property
    def task(self) -> ClaimedTask | None:
        return self.queue[0] if self.queue else None

    @property
    def ref(self) -> AttemptRef | None:
        return ref_of(self.queue[0]) if self.queue else None

    @property
    def head(self) -> ClaimedTask:
        """The head task, for callers that know the queue is not empty."""
        return self.queue[0]

    @property
    def head_ref(self) -> AttemptRef:
        return ref_of(self.queue[0])

    @property
    def deadline(self) -> float | None:
        return self.head_started + self.queue[0].timeout_seconds if self.queue else None


def _work_left(slot: Slot, estimate: Callable[[ClaimedTask], float], now: float, late: float) -> float:
    """Seconds of work a slot's queue holds by the estimates; infinite with a batch already ahead
    or a head running `late` seconds past its estimate (a short task's head is seen late: the
    supervisor reads its start when its predecessor's outcome arrives)."""
    if not slot.queue:
        return 0.0
    head_left = estimate(slot.queue[0]) - (now - slot.head_started)
    if slot.ahead or head_left < -late:
        return math.inf
    return max(0.0, head_left) + sum(estimate(t) for t in itertools.islice(slot.queue, 1, None))


class SlotTable:
    """A worker's slots (one per task process), and what the supervisor asks about them."""

    def __init__(self) -> None:
        self.slots: list[Slot] = []

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired]

    def waitables(self) -> list[Connection | int]:
        return [w for slot in self.live() for w in (slot.conn, slot.process.sentinel)]

    def busy(self) -> int:
        return sum(1 for s in self.slots if s.queue)

    def held(self) -> list[ClaimedTask]:
        """Every task sent to a process and not finished (the heads are running)."""
        return [t for s in self.live() for t in s.queue]

    def wanting_within(
        self, ahead: float, estimate: Callable[[ClaimedTask], float], now: float
    ) -> list[Slot]:
        """The slots to send a batch to now: free ones, and busy ones (ready, not retiring, with
        no batch ahead yet) with at most `ahead` seconds of work left by `estimate` (their next
        batch waits in the pipe). A head running well past its estimate (2 x `ahead`) may be
        stuck: nothing is sent behind it. Once one slot wants, those within twice that join it: one hand-over
        serves them all."""
        open_slots = [
            s for s in self.live() if s.ready and s.recycling_since is None and s.process.is_alive()
        ]
        left = {s.index: _work_left(s, estimate, now, late=2 * ahead) for s in open_slots}
        if not any(left[s.index] <= ahead for s in open_slots):
            return []
        return [s for s in open_slots if left[s.index] <= 2 * ahead]

    def next_start_check(self, after: float) -> float | None:
        """When a running head will have run `after` seconds (long enough to have its start stored)."""
        times = [s.head_started + after for s in self.live() if s.queue and not s.head_confirmed]
        return min(times) if times else None

    def free(self) -> list[Slot]:
        return [s for s in self.live() if not s.queue and s.ready and s.process.is_alive()]

    def ready_count(self) -> int:
        return sum(1 for s in self.live() if s.ready)

    def deadlines(self) -> list[float]:
        return [s.deadline for s in self.slots if s.deadline is not None]


class ProcessSpawner:
    """Starts task processes, kills them, and stops them at shutdown. With the forkserver (the
    default) each is forked from a server that imported the task types' declaration modules once
    (a process starts in milliseconds); with spawn each is a fresh interpreter (nothing imported
    before it starts: safe for CUDA). Implementation modules ("module:function") and
    @process_setup run in each process, never in the forkserver."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._mp: ForkServerContext | SpawnContext = (
            multiprocessing.get_context("spawn")
            if settings.start_method == "spawn"
            else multiprocessing.get_context("forkserver")
        )
        if settings.start_method == "forkserver":
            self._mp.set_forkserver_preload([FORKSERVER_INIT_MODULE, BUILTIN_MODULE, *settings.task_modules])
        self._setup_failures: dict[int, int] = {}  # by slot index, since its last ready process

    def setup_failed(self, index: int) -> float:
        """A slot's process could not set up: the delay before the next one's setup."""
        self._setup_failures[index] = self._setup_failures.get(index, 0) + 1
        return self.start_delay(index)

    def start_delay(self, index: int) -> float:
        failures = self._setup_failures.get(index, 0)
        return (
            min(SETUP_RETRY_BASE_SECONDS * 2 ** (failures - 1), SETUP_RETRY_MAX_SECONDS) if failures else 0.0
        )

    def set_up(self, index: int) -> None:
        """A slot's process is ready: its next one starts without delay."""
        self._setup_failures.pop(index, None)

    def spawn(self, index: int) -> Slot:
        parent_end, child_end = self._mp.Pipe()
        running = self._mp.RawValue("q", 0)  # one aligned 64-bit word: read and written whole
        process = self._mp.Process(
            target=child_main,
            args=(child_end, ProcessConfig.from_settings(self.settings, self.start_delay(index)), running),
            name=f"skiplock-worker-{index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        return Slot(index=index, process=process, conn=parent_end, running=running)

    def kill(self, slot: Slot, close: bool = True) -> None:
        """Kill a slot's process, whatever it is doing, and close its pipe (unless what it sent
        before dying is still to be read: close=False)."""
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(KILLED_JOIN_SECONDS)
        if close:
            slot.conn.close()

    def shutdown(self, slots: Iterable[Slot]) -> None:
        """Ask every process to exit, then kill those that do not within EXIT_JOIN_SECONDS."""
        slots = list(slots)
        for slot in slots:
            with contextlib.suppress(BrokenPipeError, OSError):
                slot.conn.send(None)
        for slot in slots:
            slot.process.join(EXIT_JOIN_SECONDS)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
