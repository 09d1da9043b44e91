"""A worker's task processes: each slot (skiplock.worker.slots) is one child process
(skiplock.worker.executor) and the batch of tasks sent to it. The head of a slot's queue is
running (or about to); the rest follow in order. This module keeps the slots' books: what their
processes report, their deaths and deadlines, and which tasks go back to the backlog.

Children never touch the database. Everything they report lands in the supervisor's ReportQueue
(skiplock.worker.reports, written by the result writer): when each task started, its outcome, its
progress. A task counts as started once its process has entered its function (the `running`
value a child shares), so a process that dies, overruns its task's timeout or runs a task that is no longer ours is killed,
its slot gets a fresh one, the task it was running is charged, and the tasks queued behind it,
never started, go back to the front of the backlog uncounted.

A process also retires itself after the outcome of a task (a recycling limit: SKIPLOCK_MAX_TASKS_PER_PROCESS,
SKIPLOCK_MAX_MEMORY_PER_PROCESS_MB): the rest of its batch goes back uncounted, it is sent nothing
more, and once it has exited (its teardowns run) its slot gets a fresh one. A process whose setup
failed is replaced after a back-off (ProcessSpawner.setup_failed), having been sent nothing.
"""

from __future__ import annotations

import time
from collections import deque
from multiprocessing.reduction import ForkingPickler

from skiplock.settings import Settings
from skiplock.sql.claim import ClaimedTask
from skiplock.sql.fenced import AttemptFailure, AttemptRef
from skiplock.worker.batching import Batcher
from skiplock.worker.executor import Fate, Report, RunTask
from skiplock.worker.lifecycle import ProcessLifecycle
from skiplock.worker.reports import ReportQueue
from skiplock.worker.slots import ProcessSpawner, Slot, SlotTable, describe_exit, ref_of, tell, warn
from skiplock.worker.stats import WorkerStats

# A task still running this long after it started has its start stored on its own (started_at:
# dashboards show it running); a shorter one's start is written with its outcome, costing no
# statement and no row version. Either way the database knew before the task was sent that it
# was in a process's hands (Claimer.dispatch, task_hand_over): if the worker dies first, its
# attempt counts as started, whatever it had reached.
START_MARK_AFTER_SECONDS = 0.01


def run_task(task: ClaimedTask) -> RunTask:
    """What a task process needs of a claimed task to run it."""
    return RunTask(
        task.id, task.attempt, task.max_attempts, task.task_type, task.input, task.parents, task.queue,
        task.trace_context,
    )  # fmt: skip


def pickled(batch: list[ClaimedTask]) -> bytes:
    """A batch as its process receives it (Connection.recv unpickles it)."""
    return bytes(ForkingPickler.dumps([run_task(t) for t in batch]))


def moved_on(slot: Slot, abandoned: AttemptRef) -> bool:
    """After its process was killed for its abandoned head and its pipe read: whether the process
    had got past that task (the supervisor reads behind it). What it finished has been read and
    counts; a task it had entered since goes back as started (handed back, uncounted)."""
    return bool(slot.queue) and slot.head_ref != abandoned


def failure(ref: AttemptRef, error: str, traceback: str | None, fate: Fate | None) -> AttemptFailure:
    """A failed attempt as its process reported it: an error, or what the task chose (Fate)."""
    if fate is None:
        return AttemptFailure(ref.task_id, ref.attempt, "failed", error, traceback)
    return AttemptFailure(
        ref.task_id, ref.attempt, fate.outcome, error, traceback, fate.retry_in_seconds, fate.charge_attempt
    )


class TaskProcesses(SlotTable):
    """The slots and their processes, as the supervisor's loop sees and drives them."""

    def __init__(
        self,
        settings: Settings,
        reports: ReportQueue,
        backlog: deque[ClaimedTask],
        batcher: Batcher,
        stats: WorkerStats,
    ):
        super().__init__()
        self.settings = settings
        self.reports = reports  # the supervisor's: what the processes reported this turn
        self.stats = stats
        self.backlog = backlog  # the supervisor's: unstarted tasks of a replaced process go back
        self.batcher = batcher
        self._spawner = ProcessSpawner(settings)
        self.lifecycle = ProcessLifecycle(self._spawner, stats)
        self._abandoned: set[AttemptRef] = set()  # queued in a process's batch, to stop when due
        self.stopping = False  # replaced processes are not respawned
        self.freed = False  # a process became free or ready since the supervisor last looked

    # --- the supervisor's view -----------------------------------------------------------------

    def start(self) -> None:
        self.slots = [self._spawner.spawn(i) for i in range(self.settings.concurrency)]

    def dispatch(self, slot: Slot, batch: list[ClaimedTask], payload: bytes | None = None) -> None:
        if slot.queue:
            slot.ahead = len(batch)  # it follows what the process runs now
        else:
            slot.new_head(time.monotonic())  # it starts now
        slot.queue.extend(batch)
        try:
            slot.conn.send_bytes(payload if payload is not None else pickled(batch))
        except (BrokenPipeError, OSError):
            pass  # the child just died: reap() fails the head and requeues the rest

    # --- what happened since the last turn -----------------------------------------------------

    def collect(self, now: float) -> None:
        """Read every report, record every death and stop every task past its timeout."""
        for slot in self.live():
            try:
                while slot.conn.poll():
                    self._receive(slot, slot.conn.recv())
            except (EOFError, OSError):
                pass  # the child died: _reap records it
        self._reap()
        self._kill_overdue(now)
        for slot in self.lifecycle.slow_to_exit(self.live(), now):
            self._replace(slot)
        self._record_long_starts(now)

    def _receive(self, slot: Slot, message: Report) -> None:
        """A process's news about itself (skiplock.worker.lifecycle), else about its tasks."""
        if not self.lifecycle.heard(slot, message):
            self._on_message(slot, message)
        elif slot.recycling_since is not None:  # retiring: the rest of its batch never started
            self._requeue_unstarted(slot, head_too=True)
            self.freed = True

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
                self.reports.started[slot.head_ref] = slot.head_started
                self.stats.task_started(slot.head.queue, slot.head.task_type)

    def _on_message(self, slot: Slot, message: Report) -> None:
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
            self.reports.progress[ref] = message[3]
            return
        task = slot.head
        outcome = "completed"
        if kind == "done":
            self.reports.completed[ref] = message[3]
        else:
            failed = self.reports.failed[ref] = failure(ref, message[3], message[4], message[5])
            outcome = failed.outcome
            # A task's own decision (NonRetryableError, RetryAfter) is worth a line, not a warning.
            if outcome == "failed":
                warn(task, message[3], traceback=message[4])
            else:
                tell(task, f"{outcome.replace('_', ' ')}: {message[3]}", traceback=message[4])
        self.reports.progress.pop(ref, None)
        slot.queue.popleft()
        if len(slot.queue) <= slot.ahead:  # the batch sent ahead is now the one it runs
            slot.ahead = 0
        if not slot.head_confirmed:  # it ran, too briefly to be seen: its outcome carries its start
            self.reports.started[ref] = slot.head_started
            self.stats.task_started(task.queue, task.task_type)
        self.stats.task_ended(task.queue, task.task_type, outcome, message[-1])
        self.batcher.record(task.task_type, message[-1])
        slot.new_head(time.monotonic())  # the next one in its queue starts now
        self.freed = True
        if slot.ref in self._abandoned and slot.process.is_alive():
            # Cancelled (or taken over) while it waited behind another task: stop it now.
            self._stop_head(slot, "abandoned while queued in a batch")

    def _reap(self) -> None:
        for slot in self.live():
            if slot.process.is_alive():
                continue
            slot.process.join()
            self._drain_pipe(slot)
            if slot.retired or self.slots[slot.index] is not slot:
                continue  # already replaced while draining
            if slot.queue and slot.head_running():
                error = f"the process running the task died: it {describe_exit(slot.process.exitcode)}"
                warn(slot.head, error)
                self._charge_head(slot, "crashed", error)
            elif slot.queue:
                warn(
                    slot.head,
                    f"its process died (it {describe_exit(slot.process.exitcode)}) before starting it; sent on",
                )
                self._requeue_unstarted(slot, head_too=True)
            self._replace(slot)

    def _kill_overdue(self, now: float) -> None:
        for slot in list(self.slots):
            if slot.task is None or slot.deadline is None or now < slot.deadline:
                continue
            self._drain_pipe(slot)
            deadline = slot.deadline
            if slot.retired or self.slots[slot.index] is not slot or deadline is None or now < deadline:
                continue
            task = slot.head
            if slot.head_running():
                error = f"timed out after {task.timeout_seconds} s; its process was killed"
                warn(task, error)
                self._charge_head(slot, "timed_out", error)
            else:  # the process never took it up: stuck, not the task's fault
                warn(task, "its process did not start it; replaced")
                self._requeue_unstarted(slot, head_too=True)
            self._replace(slot)

    def _charge_head(self, slot: Slot, outcome: str, error: str) -> None:
        """The head ran and ended badly: fail its attempt (charged); the rest go back."""
        ref, task = slot.head_ref, slot.head
        self.reports.failed[ref] = AttemptFailure(ref.task_id, ref.attempt, outcome, error)
        self.reports.progress.pop(ref, None)
        if not slot.head_confirmed:
            self.reports.started[ref] = slot.head_started
            self.stats.task_started(task.queue, task.task_type)
        self.stats.task_ended(task.queue, task.task_type, outcome, time.monotonic() - slot.head_started)
        self._requeue_unstarted(slot)

    def _drain_pipe(self, slot: Slot) -> None:
        """Read what a process sent before it died or was killed: a result that made it into
        the pipe counts, whatever happens to the process next (and a failed setup or a
        retirement is heard even when no task was sent)."""
        try:
            while slot.conn.poll():
                self._receive(slot, slot.conn.recv())
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
        """Kill the process of an abandoned head, then read what it sent (see moved_on)."""
        task, ref = slot.head, slot.head_ref
        warn(task, f"{why}; killing its process")
        self._spawner.kill(slot, close=False)
        self._drain_pipe(slot)
        for drop in (self.reports.progress, self.reports.started):
            drop.pop(ref, None)
        self._abandoned.discard(ref)
        entered = moved_on(slot, ref) and slot.head_running()
        if entered and slot.head_ref not in self._abandoned:
            self.reports.handed_back[slot.head_ref] = slot.head_started
        self._requeue_unstarted(slot, head_too=moved_on(slot, ref) and not entered)
        self._replace(slot)

    def _requeue_unstarted(self, slot: Slot, head_too: bool = False) -> None:
        """Tasks sent to a process that is being replaced, behind the one it was running (and
        that one too if it never started): still claimed by us and not started, so they go back
        to the front of the backlog (unless they were abandoned meanwhile)."""
        rest = [t for t in list(slot.queue)[0 if head_too else 1 :] if ref_of(t) not in self._abandoned]
        self._abandoned.difference_update(ref_of(t) for t in slot.queue)
        self.backlog.extendleft(reversed(rest))
        slot.queue.clear()
        slot.ahead = 0

    def hand_back_all(self) -> None:
        """The grace period is over: give back every task sent to a process, uncounted; the one
        each process was running as handed_back, those queued behind it as released."""
        for slot in self.live():
            self._drain_pipe(slot)
            if not slot.queue:
                continue
            ref = slot.head_ref
            self.reports.progress.pop(ref, None)
            self.reports.handed_back[ref] = slot.head_started if slot.head_running() else None
            for task in list(slot.queue)[1:]:
                self.reports.handed_back[ref_of(task)] = None
            slot.queue.clear()
            self._replace(slot)

    def _replace(self, slot: Slot) -> None:
        """Kill a slot's process (whatever it is doing) and give the slot a fresh one."""
        self._spawner.kill(slot)
        self.freed = True
        if not self.stopping:
            self.slots[slot.index] = self._spawner.spawn(slot.index)
        else:
            slot.queue.clear()
            slot.retired = True

    def shutdown(self) -> None:
        """Ask every process to exit, then kill those that do not in time."""
        self._spawner.shutdown(self.live())
