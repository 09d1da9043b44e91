"""The worker supervisor: claims tasks, hands them to child processes, writes their outcomes.

One supervisor per `python worker.py`. It owns two database connections (one for claims, leases
and duties, one that LISTENs), a result writer thread with a third (skiplock.writer) and N child
processes (skiplock.executor). Children never touch the database: their outcomes come back to
the supervisor, which hands them to the writer; every write is batched and fenced on the
attempt, so:

- a hung task is killed at its deadline and its slot gets a fresh process;
- a child that dies (segfault, OOM kill) fails only its own attempt, recorded as crashed;
- a supervisor that dies takes its children with it; its leases lapse and any other worker's
  rescue duty puts the tasks back (lost attempt);
- a supervisor that froze or lost the database past its leases finds, on renewal, that the tasks
  are no longer its own, kills those children, and its late results are fenced out.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import psycopg

from skiplock import queries
from skiplock.db import connect, connect_worker, reconnect_delay
from skiplock.executor import RunTask, child_main
from skiplock.queries import AttemptFailure, AttemptRef, ClaimedTask
from skiplock.registry import BUILTIN_MODULE, TaskRegistry, load_registry
from skiplock.settings import Settings
from skiplock.writer import Outbox, ResultWriter, split_stale

log = logging.getLogger("skiplock.worker")

# Renew leases when a third of the lease is gone: two renewals can fail before it lapses.
LEASE_RENEW_FRACTION = 1 / 3
RESCUE_BATCH = 100
# Retention: delete in small batches (short transactions, little WAL at a time), a bounded
# number per turn so the loop stays responsive; the next interval continues.
PRUNE_BATCH = 1000
PRUNE_MAX_BATCHES_PER_TURN = 10
PRUNE_TIME_BUDGET_SECONDS = 0.5
# Short tasks travel to a process in batches worth about this much work, so per-task overhead
# (pipe messages, loop turns) stays small; a task whose type has not been timed yet, or takes
# longer, goes alone. Claims prefetch a second batch per process while tasks are this short.
BATCH_TARGET_SECONDS = 0.02
MAX_DISPATCH_BATCH = 256
MAX_CLAIM_BATCH = 500
DURATION_EWMA_WEIGHT = 0.2
# A worker about to wait for notifications that finds an insert in flight asks again after this
# delay, doubling up to the poll interval.
SETTLE_RETRY_MIN_SECONDS = 0.002


def _ref(task: ClaimedTask) -> AttemptRef:
    return AttemptRef(task.id, task.attempt)


def default_worker_id() -> str:
    """host:pid:random. Fencing trusts this id, so it must never be shared: containers on one
    host network share the hostname and often pid 1, and a restarted worker may reuse a pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


@dataclass
class Slot:
    """One child process and the tasks sent to it: the head of `queue` is running (since
    `head_started`), the rest follow in order."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    queue: deque[ClaimedTask] = field(default_factory=deque)
    head_started: float = 0.0  # monotonic
    ready: bool = False  # the process has started and loaded the task types
    retired: bool = False  # stopped for good during shutdown

    @property
    def task(self) -> ClaimedTask | None:
        return self.queue[0] if self.queue else None

    @property
    def ref(self) -> AttemptRef | None:
        return AttemptRef(self.queue[0].id, self.queue[0].attempt) if self.queue else None

    @property
    def deadline(self) -> float | None:
        return self.head_started + self.queue[0].timeout_seconds if self.queue else None


class Supervisor:
    def __init__(self, settings: Settings, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.registry: TaskRegistry = load_registry(settings.task_modules, allow_crash=settings.allow_crash)
        self.task_types = self.registry.names()
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload([BUILTIN_MODULE, *settings.task_modules])
        self.slots: list[Slot] = []
        self.backlog: deque[ClaimedTask] = deque()  # claimed, not yet sent to a process
        self._abandoned: set[AttemptRef] = set()  # queued in a process's batch, to stop when due
        self.durations: dict[str, float] = {}  # task type -> EWMA of run time (s)
        self._typical_duration: float | None = None  # EWMA over all types
        self.outbox = Outbox()  # this turn's outcomes, handed to the writer at its end
        self.db: psycopg.Connection | None = None
        self.listener: psycopg.Connection | None = None
        self._db_retry_at = 0.0
        self._db_failures = 0
        self.stopping = False
        self._stop_deadline: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._claim_due = True  # claim on the first turn
        self._waiter_registered = False  # in task_waiters: inserts notify us
        self._waiters_settled = False  # ... and no insert that missed that is still in flight
        self._settle_at = 0.0
        self._settle_delay = SETTLE_RETRY_MIN_SECONDS
        self._last_claim = 0.0
        # When the earliest scheduled task (delayed, or in retry backoff) falls due (monotonic),
        # so that it runs then, not at the next poll; and whether to look that up again.
        self._due_at: float | None = None
        self._due_lookup = False
        self._last_renew = time.monotonic()
        self._last_rescue = 0.0
        self._last_prune = 0.0
        self.counters = {"claimed": 0, "completed": 0, "failed": 0, "fenced_out": 0}
        self.writer = ResultWriter(settings, self.worker_id, self.counters, wake_supervisor=self._wake)

    # --- lifecycle -----------------------------------------------------------------------------

    def run(self, *, handle_signals: bool = True) -> int:
        """Work until stopped (SIGTERM/SIGINT or stop()); returns the process exit code."""
        if handle_signals:
            self._install_signal_handlers()
        log.info(
            "worker %s starting: %d processes, queues=%s, types=%s",
            self.worker_id,
            self.settings.concurrency,
            ",".join(self.settings.queues) or "*",
            ",".join(self.task_types),
        )
        self.slots = [self._spawn(i) for i in range(self.settings.concurrency)]
        self.writer.start()
        try:
            while not self._finished():
                self.run_once()
        finally:
            self._shutdown()
        log.info("worker %s stopped: %s", self.worker_id, self.counters)
        return 0

    def stop(self) -> None:
        """Stop claiming; running tasks get shutdown_grace_seconds to finish, then are handed back."""
        if not self.stopping:
            self.stopping = True
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_seconds
            log.info("worker %s stopping: waiting for %d running task(s)", self.worker_id, self._busy())
        self._wake()

    def _install_signal_handlers(self) -> None:
        def on_signal(signum, frame):
            if self.stopping and signum == signal.SIGINT:
                # A second Ctrl-C: do not wait for the grace period.
                self._stop_deadline = time.monotonic()
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _finished(self) -> bool:
        # What the writer still holds is written by _shutdown, within a bounded time.
        return self.stopping and self._busy() == 0

    def _busy(self) -> int:
        return sum(1 for s in self.slots if s.queue)

    def _held(self) -> list[ClaimedTask]:
        """Every task this worker has claimed and not yet finished."""
        return [t for s in self._live_slots() for t in s.queue] + list(self.backlog)

    # --- one turn of the loop ------------------------------------------------------------------

    def run_once(self) -> None:
        """Wait for something to happen (a result, a death, a notification, a deadline), then
        react to everything that did: outcomes go to the writer, then leases, duties, claims."""
        self._wait(self._next_timeout())
        if not self.writer.is_alive():
            # Without it no result is stored and every lease would lapse into a re-run: better
            # to exit (non-zero) and let the leases hand the tasks to healthy workers.
            raise RuntimeError("the result writer thread died")
        now = time.monotonic()
        self._collect_messages()
        self._reap_dead_children()
        self._kill_overdue(now)
        if self.stopping and self._stop_deadline is not None and now >= self._stop_deadline:
            self._hand_back_running()
        self._dispatch_backlog()
        self.writer.put(self.outbox)  # stored on the writer's connection while we go on
        if self._ensure_db():
            try:
                self._drain_notifications()
                self._renew_leases(now)
                self._rescue_expired(now)
                self._prune(now)
                self._claim(now)
                if self.writer.take_retries_scheduled():
                    self._due_lookup = True
                if self._due_lookup:
                    self._look_up_next_due()
                if self._waiter_registered and not self._waiters_settled and now >= self._settle_at:
                    self._settle_waiters(now)
            except psycopg.OperationalError as exc:
                self._lost_db(exc)
            except psycopg.Error as exc:
                # Not the connection: a statement the database refused. Log it, reconnect after a
                # backoff and try again rather than die.
                log.exception("worker %s: database error, retrying", self.worker_id)
                self._lost_db(exc)

    def _next_timeout(self) -> float:
        """How long the next wait may last: until the earliest thing that can act is due. Timers
        that cannot act now (no database, no room to claim) must not count, or the loop spins."""
        now = time.monotonic()
        candidates = [self.settings.poll_interval_seconds]
        candidates += [s.deadline - now for s in self.slots if s.deadline is not None]
        if self._stop_deadline is not None:
            candidates.append(self._stop_deadline - now)
        if self.db is None:
            candidates.append(self._db_retry_at - now)
            return max(0.0, min(candidates))
        if not self.stopping and self._claim_limit() > 0:
            poll_left = self.settings.poll_interval_seconds - (now - self._last_claim)
            candidates.append(0 if self._claim_due else poll_left)
            if self._due_at is not None:
                candidates.append(self._due_at - now)
        if self._waiter_registered and not self._waiters_settled:
            candidates.append(self._settle_at - now)
        if self._busy() or self.backlog or self.writer.has_unwritten():
            lease_renew = self.settings.lease_seconds * LEASE_RENEW_FRACTION
            candidates.append(lease_renew - (now - self._last_renew))
        return max(0.0, min(candidates))

    def _wait(self, timeout: float) -> None:
        waitables: list = [self._wake_r]
        for slot in self._live_slots():
            waitables += [slot.conn, slot.process.sentinel]
        if self.listener is not None:
            waitables.append(self.listener)
        wait(waitables, timeout)
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # --- children ------------------------------------------------------------------------------

    def _spawn(self, index: int) -> Slot:
        parent_end, child_end = self._mp.Pipe()
        process = self._mp.Process(
            target=child_main,
            args=(child_end, self.settings.task_modules, self.settings.allow_crash),
            name=f"skiplock-worker-{index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        return Slot(index=index, process=process, conn=parent_end)

    def _replace(self, slot: Slot) -> None:
        """Kill a slot's process (whatever it is doing) and give the slot a fresh one."""
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(5)
        slot.conn.close()
        if not self.stopping:
            self.slots[slot.index] = self._spawn(slot.index)
        else:
            slot.queue.clear()
            slot.retired = True

    def _requeue_unstarted(self, slot: Slot) -> None:
        """Tasks sent to a process that is being replaced, behind the one it was running: still
        claimed by us and not started, so they go back to the front of the backlog (unless they
        were abandoned meanwhile)."""
        rest = [t for t in list(slot.queue)[1:] if _ref(t) not in self._abandoned]
        self._abandoned.difference_update(_ref(t) for t in slot.queue)
        self.backlog.extendleft(reversed(rest))
        slot.queue.clear()

    def _live_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired]

    def _collect_messages(self) -> None:
        for slot in self._live_slots():
            try:
                while slot.conn.poll():
                    self._on_message(slot, slot.conn.recv())
            except (EOFError, OSError):
                pass  # the child died; _reap_dead_children records it

    def _on_message(self, slot: Slot, message: tuple) -> None:
        if message[0] == "ready":
            # Claims wait for ready processes: tasks claimed for a process still starting up
            # (seconds on a busy machine) would sit under our lease instead of running elsewhere.
            slot.ready = True
            self._claim_due = True
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
        self.outbox.progress.pop(ref, None)
        self._record_duration(slot.queue.popleft().task_type, message[-1])
        slot.head_started = time.monotonic()  # the next one in its queue starts now
        self._claim_due = True
        if slot.ref in self._abandoned:
            # Cancelled (or taken over) while it waited behind another task: stop it now.
            self._stop_head(slot, "abandoned while queued in a batch")

    def _stop_head(self, slot: Slot, why: str) -> None:
        log.warning("task %d attempt %d: %s; killing its process", slot.task.id, slot.task.attempt, why)
        self.outbox.progress.pop(slot.ref, None)
        self._abandoned.discard(slot.ref)
        self._requeue_unstarted(slot)
        self._replace(slot)

    def _drain_pipe(self, slot: Slot) -> None:
        """Read what a process sent before it died or was killed: a result that made it into
        the pipe counts, whatever happens to the process next."""
        try:
            while slot.queue and slot.conn.poll():
                self._on_message(slot, slot.conn.recv())
        except (EOFError, OSError):
            pass

    def _record_duration(self, task_type: str, seconds: float) -> None:
        w = DURATION_EWMA_WEIGHT
        previous = self.durations.get(task_type)
        self.durations[task_type] = seconds if previous is None else (1 - w) * previous + w * seconds
        typical = self._typical_duration
        self._typical_duration = seconds if typical is None else (1 - w) * typical + w * seconds

    def _reap_dead_children(self) -> None:
        for slot in self._live_slots():
            if slot.process.is_alive():
                continue
            slot.process.join()
            self._drain_pipe(slot)
            if slot.retired or self.slots[slot.index] is not slot:
                continue  # already replaced while draining
            ref = slot.ref
            if ref is not None:
                error = f"the process running the task died: it {describe_exit(slot.process.exitcode)}"
                log.warning("task %d attempt %d: %s", ref.task_id, ref.attempt, error)
                self.outbox.failed[ref] = AttemptFailure(ref.task_id, ref.attempt, "crashed", error)
                self._requeue_unstarted(slot)
            self._replace(slot)

    def _kill_overdue(self, now: float) -> None:
        for slot in list(self.slots):
            if slot.task is None or slot.deadline is None or now < slot.deadline:
                continue
            self._drain_pipe(slot)
            if slot.retired or self.slots[slot.index] is not slot or slot.task is None or now < slot.deadline:
                continue
            ref = slot.ref
            error = f"timed out after {slot.task.timeout_seconds} s; its process was killed"
            log.warning("task %d attempt %d: %s", ref.task_id, ref.attempt, error)
            self.outbox.failed[ref] = AttemptFailure(ref.task_id, ref.attempt, "timed_out", error)
            self._requeue_unstarted(slot)
            self._replace(slot)

    def _abandon(self, refs: set[AttemptRef], why: str) -> None:
        """Stop attempts that are no longer ours (cancelled, or rescued by another worker). A
        running one costs its process; one queued behind another in a batch is stopped when its
        turn comes (the process's queue order must stay as sent)."""
        self.backlog = deque(t for t in self.backlog if _ref(t) not in refs)
        for slot in self._live_slots():
            queued = {_ref(t) for t in slot.queue} & refs
            if not queued:
                continue
            self._abandoned |= queued
            if slot.ref in refs:
                self._stop_head(slot, why)

    def _hand_back_running(self) -> None:
        self._hand_back_backlog()
        for slot in self._live_slots():
            if slot.queue:
                self.outbox.handed_back.update(AttemptRef(t.id, t.attempt) for t in slot.queue)
                self.outbox.progress.pop(slot.ref, None)
                self._replace(slot)

    def _hand_back_backlog(self) -> None:
        self.outbox.handed_back.update(AttemptRef(t.id, t.attempt) for t in self.backlog)
        self.backlog.clear()

    def _free_slots(self) -> list[Slot]:
        return [s for s in self._live_slots() if not s.queue and s.ready and s.process.is_alive()]

    def _batch_size(self) -> int:
        """How many typical tasks make one batch (1 until tasks have been timed, or if slow)."""
        if self._typical_duration is None:
            return 1
        return max(1, min(MAX_DISPATCH_BATCH, int(BATCH_TARGET_SECONDS / max(self._typical_duration, 1e-6))))

    def _claim_limit(self) -> int:
        """How many tasks to claim now: enough for every idle process, and, while tasks are short,
        a second batch per process so that none waits for the next claim. Nothing while the
        writer cannot keep up (or reach the database): results would only pile up."""
        if not self.writer.accepting():
            return 0
        batch = self._batch_size()
        if batch == 1:
            return len(self._free_slots()) - len(self.backlog)
        ready = sum(1 for s in self._live_slots() if s.ready)
        want = 2 * batch * ready - len(self._held())
        return min(MAX_CLAIM_BATCH, want) if want >= batch else 0

    def _take_batch(self) -> list[ClaimedTask]:
        """The next tasks for one process: the first in line, plus followers whose type is known
        to be short, up to about BATCH_TARGET_SECONDS of work."""
        batch = [self.backlog.popleft()]
        budget = BATCH_TARGET_SECONDS - self.durations.get(batch[0].task_type, BATCH_TARGET_SECONDS)
        while self.backlog and len(batch) < MAX_DISPATCH_BATCH:
            estimate = self.durations.get(self.backlog[0].task_type)
            if estimate is None or estimate > budget:
                break
            budget -= estimate
            batch.append(self.backlog.popleft())
        return batch

    def _dispatch_backlog(self) -> None:
        if self.stopping:
            self._hand_back_backlog()
            return
        for slot in self._free_slots():
            if not self.backlog:
                return
            self._dispatch(slot, self._take_batch())

    # --- database ------------------------------------------------------------------------------

    def _ensure_db(self) -> bool:
        if self.db is not None and not self.db.closed and self.listener is not None:
            return True
        if time.monotonic() < self._db_retry_at:
            return False
        try:
            self._close_db()
            timeout = self.settings.db_timeout_seconds
            self.db = connect_worker(self.settings.database_url, timeout)
            self.listener = connect(self.settings.database_url, role="listener", timeout_seconds=timeout)
            self.listener.execute(f"LISTEN {queries.PENDING_CHANNEL}")
            self.listener.execute(f"LISTEN {queries.CANCEL_CHANNEL}")
        except psycopg.OperationalError as exc:
            self._lost_db(exc)
            return False
        if self._db_failures:
            log.info("worker %s reconnected to the database", self.worker_id)
        self._db_failures = 0
        self._claim_due = True  # notifications may have been missed while away
        return True

    def _lost_db(self, exc: Exception) -> None:
        self._db_failures += 1
        delay = reconnect_delay(self._db_failures)
        if self._db_failures == 1:
            log.warning("worker %s lost the database (%s); retrying", self.worker_id, str(exc).strip())
        self._db_retry_at = time.monotonic() + delay
        self._close_db()
        # A new session registers again (its old row is replaced, or pruned once its pid is gone).
        self._waiter_registered = self._waiters_settled = False

    def _close_db(self) -> None:
        for conn in (self.db, self.listener):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # closing a broken connection must not stop the loop
                    pass
        self.db = self.listener = None

    def _drain_notifications(self) -> None:
        cancelled: set[int] = set()
        for notify in self.listener.notifies(timeout=0):
            if notify.channel == queries.CANCEL_CHANNEL:
                if notify.payload.isdigit():  # anyone may NOTIFY this channel
                    cancelled.add(int(notify.payload))
            else:
                self._claim_due = True
        if cancelled:
            refs = {_ref(t) for t in self._held() if t.id in cancelled}
            self._abandon(refs, "cancelled by a client")

    def _renew_leases(self, now: float) -> None:
        if now - self._last_renew < self.settings.lease_seconds * LEASE_RENEW_FRACTION:
            return
        self._last_renew = now
        # Finished attempts whose outcome the writer has not stored yet are still ours to keep,
        # while the writer reaches the database; if it cannot, they lapse like those of a worker
        # cut off, and other workers rescue them rather than wait on this one indefinitely.
        running = {AttemptRef(t.id, t.attempt) for t in self._held()}
        if self.writer.healthy():
            running |= self.writer.unwritten()
        if not running:
            return
        current, stale = split_stale(running)
        renewed = queries.task_lease_renew(
            self.db, worker_id=self.worker_id, refs=current, lease_seconds=self.settings.lease_seconds
        )
        missing = [ref for ref in current if ref.task_id not in renewed]
        lost = set(stale)
        if missing:
            # A row locked by another session could not be renewed but is still ours.
            held = queries.task_held_ids(self.db, worker_id=self.worker_id, refs=missing)
            lost |= {ref for ref in missing if ref.task_id not in held}
        if lost:
            self._abandon(lost, "no longer held by this worker (cancelled or lease taken over)")

    def _rescue_expired(self, now: float) -> None:
        if now - self._last_rescue < self.settings.rescue_interval_seconds:
            return
        self._last_rescue = now
        rescued = queries.task_rescue_expired(
            self.db,
            limit=RESCUE_BATCH,
            backoff_base=self.settings.retry_backoff_base_seconds,
            backoff_max=self.settings.retry_backoff_max_seconds,
        )
        if rescued:
            log.warning("rescued %d task(s) whose lease expired: %s", len(rescued), rescued)
            self._claim_due = True
            if "pending" in rescued.values():  # retried after a backoff
                self._due_lookup = True
                queries.task_retries_announce(self.db)
        queries.task_waiters_prune_dead(self.db)

    def _prune(self, now: float) -> None:
        if (
            self.settings.retention_seconds <= 0
            or now - self._last_prune < self.settings.prune_interval_seconds
        ):
            return
        self._last_prune = now
        pruned, started = 0, time.monotonic()
        for _ in range(PRUNE_MAX_BATCHES_PER_TURN):
            if time.monotonic() - started > PRUNE_TIME_BUDGET_SECONDS:
                break  # leases, deadlines and results come first; the next interval continues
            deleted = queries.task_prune(
                self.db, older_than_seconds=self.settings.retention_seconds, limit=PRUNE_BATCH
            )
            pruned += deleted
            if deleted < PRUNE_BATCH:
                break
        if pruned:
            log.info("pruned %d finished task(s) older than %.0f s", pruned, self.settings.retention_seconds)

    def _claim(self, now: float) -> None:
        limit = self._claim_limit()
        if self.stopping or limit <= 0:
            return
        if self._due_at is not None and now >= self._due_at:
            self._due_at = None
            self._claim_due = True
        if not self._claim_due and now - self._last_claim < self.settings.poll_interval_seconds:
            return
        self._last_claim = now
        tasks = queries.task_claim(
            self.db,
            worker_id=self.worker_id,
            limit=limit,
            lease_seconds=self.settings.lease_seconds,
            queues=self.settings.queues or None,
            task_types=self.task_types,
        )
        self.counters["claimed"] += len(tasks)
        # A full claim means there is probably more: claim again as soon as there is room,
        # without notifications. Less than asked for: the queue is dry, wait to be notified.
        self._claim_due = len(tasks) == limit
        self.backlog.extend(tasks)
        self._dispatch_backlog()
        if self._claim_due:
            self._stop_waiting()
        else:
            self._start_waiting(now)
            self._due_lookup = True  # a task may have been submitted for later

    def _look_up_next_due(self) -> None:
        """Wake when the earliest scheduled task falls due: inserts announce new tasks, but
        nothing announces that a delayed task or a retry has become due. (The poll remains the
        fallback: for retries other workers schedule, and tasks a DBA reschedules.)"""
        due_in = queries.task_next_due_in(self.db)
        self._due_lookup = False  # only once answered: a lost connection asks again later
        # A floor of 1 ms: waking a hair early finds nothing and looks again, never spins.
        self._due_at = None if due_in is None else time.monotonic() + max(due_in, 0.001)

    # Inserts NOTIFY only while a worker is registered in task_waiters (see schema.sql).
    def _start_waiting(self, now: float) -> None:
        if not self._waiter_registered:
            queries.task_waiter_register(self.db, worker_id=self.worker_id)
            self._waiter_registered = True
            self._waiters_settled = False
            self._settle_delay = SETTLE_RETRY_MIN_SECONDS
        if not self._waiters_settled:
            self._settle_waiters(now)

    def _settle_waiters(self, now: float) -> None:
        """Rely on notifications only once every insert that could not see our registration has
        committed; then claim once more, for the tasks those inserts did not announce."""
        if queries.task_waiters_settled(self.db):
            self._waiters_settled = True
            self._claim_due = True
        else:  # a transaction is inserting tasks right now
            self._settle_at = now + self._settle_delay
            self._settle_delay = min(self.settings.poll_interval_seconds, self._settle_delay * 2)

    def _stop_waiting(self) -> None:
        if self._waiter_registered:
            queries.task_waiter_unregister(self.db, worker_id=self.worker_id)
        self._waiter_registered = self._waiters_settled = False

    def _dispatch(self, slot: Slot, batch: list[ClaimedTask]) -> None:
        slot.queue.extend(batch)
        slot.head_started = time.monotonic()  # not the turn's start: the claim came later
        try:
            slot.conn.send([RunTask(t.id, t.attempt, t.max_attempts, t.task_type, t.input) for t in batch])
        except (BrokenPipeError, OSError):
            pass  # the child just died: _reap_dead_children fails the head and requeues the rest

    # --- shutdown ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Best effort: hand back what still runs, write what is pending, stop the children."""
        self._hand_back_running()
        if self.db is not None and not self.db.closed:
            with contextlib.suppress(psycopg.Error):
                self._stop_waiting()
        self.writer.put(self.outbox)
        if self.writer.is_alive():
            self.writer.finish(timeout=max(2.0, self.settings.db_timeout_seconds * 2))
        elif self.writer.has_unwritten():
            log.error(
                "worker %s exiting with %d unwritten outcome(s) (the writer died); their leases will lapse",
                self.worker_id,
                len(self.writer.unwritten()),
            )
        for slot in self._live_slots():
            with contextlib.suppress(BrokenPipeError, OSError):
                slot.conn.send(None)
        for slot in self._live_slots():
            slot.process.join(2)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        self._close_db()
        self._wake_r.close()
        self._wake_w.close()
