"""A worker's task processes: each slot is one child process (skiplock.executor) and the batch
of tasks sent to it. The head of a slot's queue is running (or about to); the rest follow in
order.

Children never touch the database. Everything they report lands in the supervisor's Outbox
(written by the result writer): when each task started, its outcome, its progress. A task counts
as started once its process has entered its function (the `running` value a child shares), so a
process that dies, overruns its task's timeout or runs a task that is no longer ours is killed,
its slot gets a fresh one, the task it was running is charged, and the tasks queued behind it,
never started, go back to the front of the backlog uncounted.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psutil

from skiplock.registry import BUILTIN_MODULE
from skiplock.settings import Settings
from skiplock.sql.claim import ClaimedTask
from skiplock.sql.fenced import AttemptFailure, AttemptRef
from skiplock.worker.batching import Batcher
from skiplock.worker.executor import RunTask, child_main
from skiplock.worker.stats import WorkerStats
from skiplock.worker.writer import Outbox

log = logging.getLogger("skiplock.worker")


def task_fields(task) -> dict:
    """A task's fields for a log line's extra= (JSON logs carry them; text lines leave them out)."""
    return {"task_id": task.id, "attempt": task.attempt, "task_type": task.task_type, "queue": task.queue}


# Imported first by the forkserver, so that it and every task process ignore SIGTERM and SIGINT.
FORKSERVER_INIT_MODULE = "skiplock.worker.forkserver_init"
# A task still running this long after it started has its start recorded on its own (which
# charges its attempt); a shorter one's start is written with its outcome, costing no statement
# and no row version. A worker that dies sooner gives the task back uncounted (it may have run:
# at-least-once, within this window).
START_MARK_AFTER_SECONDS = 0.01


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
    if exitcode == 255 and not forkserver_alive():
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
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Slot:
    """One child process and the tasks sent to it: the head of `queue` is running (since
    `head_started`, monotonic), the rest follow in order."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    running: Any  # shared with the process: id of the task whose function it last entered
    queue: deque[ClaimedTask] = field(default_factory=deque)
    head_started: float = 0.0  # when the head became the head (it starts at once, barring trouble)
    head_confirmed: bool = False  # the process has entered the head's function
    ready: bool = False  # the process has started and loaded the task types
    retired: bool = False  # stopped for good during shutdown

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
    def deadline(self) -> float | None:
        return self.head_started + self.queue[0].timeout_seconds if self.queue else None


class TaskProcesses:
    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        backlog: deque[ClaimedTask],
        batcher: Batcher,
        stats: WorkerStats,
    ):
        self.settings = settings
        self.outbox = outbox
        self.stats = stats
        self.backlog = backlog  # the supervisor's: unstarted tasks of a replaced process go back
        self.batcher = batcher
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload([FORKSERVER_INIT_MODULE, BUILTIN_MODULE, *settings.task_modules])
        self.slots: list[Slot] = []
        self._abandoned: set[AttemptRef] = set()  # queued in a process's batch, to stop when due
        self.stopping = False  # replaced processes are not respawned
        self.freed = False  # a process became free or ready since the supervisor last looked

    # --- the supervisor's view -----------------------------------------------------------------

    def start(self) -> None:
        self.slots = [self._spawn(i) for i in range(self.settings.concurrency)]

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired]

    def waitables(self) -> list:
        return [w for slot in self.live() for w in (slot.conn, slot.process.sentinel)]

    def busy(self) -> int:
        return sum(1 for s in self.slots if s.queue)

    def held(self) -> list[ClaimedTask]:
        """Every task sent to a process and not finished (the heads are running)."""
        return [t for s in self.live() for t in s.queue]

    def free(self) -> list[Slot]:
        return [s for s in self.live() if not s.queue and s.ready and s.process.is_alive()]

    def ready_count(self) -> int:
        return sum(1 for s in self.live() if s.ready)

    def deadlines(self) -> list[float]:
        return [s.deadline for s in self.slots if s.deadline is not None]

    def next_start_check(self) -> float | None:
        """When a running head will have run long enough to have its start recorded."""
        times = [
            s.head_started + START_MARK_AFTER_SECONDS for s in self.live() if s.queue and not s.head_confirmed
        ]
        return min(times) if times else None

    def dispatch(self, slot: Slot, batch: list[ClaimedTask]) -> None:
        slot.queue.extend(batch)
        self._new_head(slot, time.monotonic())
        try:
            slot.conn.send([RunTask(t.id, t.attempt, t.max_attempts, t.task_type, t.input) for t in batch])
        except (BrokenPipeError, OSError):
            pass  # the child just died: reap() fails the head and requeues the rest

    # --- what happened since the last turn -----------------------------------------------------

    def collect(self, now: float) -> None:
        """Read every report, record every death and stop every task past its timeout."""
        for slot in self.live():
            try:
                while slot.conn.poll():
                    self._on_message(slot, slot.conn.recv())
            except (EOFError, OSError):
                pass  # the child died: _reap records it
        self._reap()
        self._kill_overdue(now)
        self._record_long_starts(now)

    def _record_long_starts(self, now: float) -> None:
        """Heads their processes have entered, and that are still running (their pipes were just
        read) START_MARK_AFTER_SECONDS after they started: their start goes to the writer, which
        records it (charging the attempt). A shorter task's start travels with its outcome."""
        for slot in self.live():
            if (
                slot.queue
                and not slot.head_confirmed
                and now - slot.head_started >= START_MARK_AFTER_SECONDS
                and slot.head_running()
            ):
                slot.head_confirmed = True
                self.outbox.started[slot.ref] = slot.head_started
                self.stats.task_started(slot.task.queue, slot.task.task_type)

    def _on_message(self, slot: Slot, message: tuple) -> None:
        if message[0] == "ready":
            # Claims wait for ready processes: tasks claimed for a process still starting up
            # (seconds on a busy machine) would sit under our lease instead of running elsewhere.
            slot.ready = True
            self.freed = True
            return
        kind, task_id, attempt = message[:3]
        ref = AttemptRef(task_id, attempt)
        if slot.ref != ref:
            return  # from a task this slot no longer runs (abandoned)
        if kind == "progress":
            self.outbox.progress[ref] = message[3]
            return
        if kind == "done":
            self.outbox.completed[ref] = message[3]
        else:
            self.outbox.failed[ref] = AttemptFailure(task_id, attempt, "failed", message[3], message[4])
            log.warning(
                "task %d attempt %d: %s",
                task_id,
                attempt,
                message[3],
                extra={**task_fields(slot.task), "traceback": message[4]},
            )
        self.outbox.progress.pop(ref, None)
        task = slot.queue.popleft()
        if not slot.head_confirmed:  # it ran, too briefly to be seen: its outcome carries its start
            self.outbox.started[ref] = slot.head_started
            self.stats.task_started(task.queue, task.task_type)
        self.stats.task_ended(
            task.queue, task.task_type, "completed" if kind == "done" else "failed", message[-1]
        )
        self.batcher.record(task.task_type, message[-1])
        self._new_head(slot, time.monotonic())  # the next one in its queue starts now
        self.freed = True
        if slot.ref in self._abandoned:
            # Cancelled (or taken over) while it waited behind another task: stop it now.
            self._stop_head(slot, "abandoned while queued in a batch")

    def _new_head(self, slot: Slot, now: float) -> None:
        slot.head_started = now
        slot.head_confirmed = False

    def _reap(self) -> None:
        for slot in self.live():
            if slot.process.is_alive():
                continue
            slot.process.join()
            self._drain_pipe(slot)
            if slot.retired or self.slots[slot.index] is not slot:
                continue  # already replaced while draining
            ref = slot.ref
            if ref is not None and slot.head_running():
                error = f"the process running the task died: it {describe_exit(slot.process.exitcode)}"
                log.warning(
                    "task %d attempt %d: %s",
                    ref.task_id,
                    ref.attempt,
                    error,
                    extra=task_fields(slot.task),
                )
                self._charge_head(slot, "crashed", error)
            elif ref is not None:
                log.warning(
                    "task %d attempt %d: its process died (it %s) before starting it; sent on",
                    ref.task_id,
                    ref.attempt,
                    describe_exit(slot.process.exitcode),
                    extra=task_fields(slot.task),
                )
                self._requeue_unstarted(slot, head_too=True)
            self._replace(slot)

    def _kill_overdue(self, now: float) -> None:
        for slot in list(self.slots):
            if slot.task is None or slot.deadline is None or now < slot.deadline:
                continue
            self._drain_pipe(slot)
            if slot.retired or self.slots[slot.index] is not slot or slot.task is None or now < slot.deadline:
                continue
            ref = slot.ref
            if slot.head_running():
                error = f"timed out after {slot.task.timeout_seconds} s; its process was killed"
                log.warning(
                    "task %d attempt %d: %s",
                    ref.task_id,
                    ref.attempt,
                    error,
                    extra=task_fields(slot.task),
                )
                self._charge_head(slot, "timed_out", error)
            else:  # the process never took it up: stuck, not the task's fault
                log.warning(
                    "task %d attempt %d: its process did not start it; replaced",
                    ref.task_id,
                    ref.attempt,
                    extra=task_fields(slot.task),
                )
                self._requeue_unstarted(slot, head_too=True)
            self._replace(slot)

    def _charge_head(self, slot: Slot, outcome: str, error: str) -> None:
        """The head ran and ended badly: fail its attempt (charged); the rest go back."""
        ref, task = slot.ref, slot.task
        self.outbox.failed[ref] = AttemptFailure(ref.task_id, ref.attempt, outcome, error)
        self.outbox.progress.pop(ref, None)
        if not slot.head_confirmed:
            self.outbox.started[ref] = slot.head_started
            self.stats.task_started(task.queue, task.task_type)
        self.stats.task_ended(task.queue, task.task_type, outcome, time.monotonic() - slot.head_started)
        self._requeue_unstarted(slot)

    def _drain_pipe(self, slot: Slot) -> None:
        """Read what a process sent before it died or was killed: a result that made it into
        the pipe counts, whatever happens to the process next."""
        try:
            while slot.queue and slot.conn.poll():
                self._on_message(slot, slot.conn.recv())
        except (EOFError, OSError):
            pass

    # --- stopping tasks and processes -------------------------------------------------------------

    def abandon(self, refs: set[AttemptRef], why: str) -> None:
        """Stop attempts that are no longer ours (cancelled, or rescued by another worker). A
        running one costs its process; one queued behind another in a batch is stopped when its
        turn comes (the process's queue order must stay as sent)."""
        for slot in self.live():
            queued = {ref_of(t) for t in slot.queue} & refs
            if not queued:
                continue
            self._abandoned |= queued
            if slot.ref in refs:
                self._stop_head(slot, why)

    def unabandon(self, ref: AttemptRef) -> None:
        """An attempt queued here is ours again (we claimed it anew): let it run."""
        self._abandoned.discard(ref)

    def _stop_head(self, slot: Slot, why: str) -> None:
        log.warning(
            "task %d attempt %d: %s; killing its process",
            slot.task.id,
            slot.task.attempt,
            why,
            extra=task_fields(slot.task),
        )
        self.outbox.progress.pop(slot.ref, None)
        self.outbox.started.pop(slot.ref, None)
        self._abandoned.discard(slot.ref)
        self._requeue_unstarted(slot)
        self._replace(slot)

    def _requeue_unstarted(self, slot: Slot, head_too: bool = False) -> None:
        """Tasks sent to a process that is being replaced, behind the one it was running (and
        that one too if it never started): still claimed by us and not started, so they go back
        to the front of the backlog (unless they were abandoned meanwhile)."""
        rest = [t for t in list(slot.queue)[0 if head_too else 1 :] if ref_of(t) not in self._abandoned]
        self._abandoned.difference_update(ref_of(t) for t in slot.queue)
        self.backlog.extendleft(reversed(rest))
        slot.queue.clear()

    def hand_back_all(self) -> None:
        """The grace period is over: give back every task sent to a process, uncounted; the one
        each process was running as handed_back, those queued behind it as released."""
        for slot in self.live():
            self._drain_pipe(slot)
            if not slot.queue:
                continue
            self.outbox.progress.pop(slot.ref, None)
            self.outbox.handed_back[slot.ref] = slot.head_started if slot.head_running() else None
            for task in list(slot.queue)[1:]:
                self.outbox.handed_back[ref_of(task)] = None
            slot.queue.clear()
            self._replace(slot)

    def _spawn(self, index: int) -> Slot:
        parent_end, child_end = self._mp.Pipe()
        running = self._mp.RawValue("q", 0)  # one aligned 64-bit word: read and written whole
        process = self._mp.Process(
            target=child_main,
            args=(child_end, self.settings.task_modules, self.settings.allow_crash, running),
            name=f"skiplock-worker-{index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        return Slot(index=index, process=process, conn=parent_end, running=running)

    def _replace(self, slot: Slot) -> None:
        """Kill a slot's process (whatever it is doing) and give the slot a fresh one."""
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(5)
        slot.conn.close()
        self.freed = True
        if not self.stopping:
            self.slots[slot.index] = self._spawn(slot.index)
        else:
            slot.queue.clear()
            slot.retired = True

    def shutdown(self) -> None:
        """Ask every process to exit, then kill those that do not within 2 s."""
        for slot in self.live():
            with contextlib.suppress(BrokenPipeError, OSError):
                slot.conn.send(None)
        for slot in self.live():
            slot.process.join(2)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
