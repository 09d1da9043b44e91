"""The worker supervisor: claims tasks, hands them to its processes, keeps its duties.

One supervisor per `python worker.py`. It owns a database session (skiplock.session: a
connection for claims, leases and duties, and one that LISTENs and holds the worker's liveness
lock), a result writer thread with a third connection (skiplock.writer) and N task processes
(skiplock.processes). Each turn of its loop waits for something to happen, then:

1. reads what its processes reported: starts, outcomes, deaths, overrun timeouts;
2. hands those to the writer, which stores them while the loop goes on;
3. on the database: reads notifications, renews leases, runs its duties (rescue, prune),
   claims, and works out when to claim next (skiplock.wakeups);
4. starts claimed tasks on free processes, while it knows they are still its own.

Every write is fenced on the attempt, so:
- a hung task is killed at its deadline and its slot gets a fresh process;
- a process that dies (segfault, OOM kill) fails only its own attempt, recorded as crashed;
- a supervisor that dies takes its processes with it; its session ends and any other worker's
  rescue duty takes its tasks back within a rescue interval (a lost attempt for those that had
  started, released uncounted for the rest);
- a supervisor that froze or lost the database past its leases finds, on renewal, that the tasks
  are no longer its own, kills those processes, and its late results are fenced out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
from collections import deque
from multiprocessing.connection import wait

import psycopg

from skiplock.registry import TaskRegistry, load_registry
from skiplock.settings import Settings
from skiplock.sql.claim import ClaimedTask, task_claim
from skiplock.sql.fenced import AttemptRef
from skiplock.sql.fragments import CANCEL_CHANNEL
from skiplock.sql.workers import task_retries_announce
from skiplock.webhooks.sender import WebhookSender
from skiplock.worker.batching import Batcher
from skiplock.worker.duties.leases import LeaseKeeper
from skiplock.worker.duties.pruner import Pruner
from skiplock.worker.duties.rescuer import Rescuer
from skiplock.worker.duties.wakeups import Wakeups
from skiplock.worker.processes import Slot, TaskProcesses, ref_of
from skiplock.worker.queue_filter import QueueFilter
from skiplock.worker.session import WorkerSession
from skiplock.worker.stats import WorkerStats
from skiplock.worker.writer import Outbox, ResultWriter

log = logging.getLogger("skiplock.worker")


def default_worker_id() -> str:
    """host:pid:random. Fencing trusts this id, so it must never be shared: containers on one
    host network share the hostname and often pid 1, and a restarted worker may reuse a pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Supervisor:
    def __init__(self, settings: Settings, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.registry: TaskRegistry = load_registry(settings.task_modules, allow_crash=settings.allow_crash)
        self.task_types = self.registry.names()
        self.backlog: deque[ClaimedTask] = deque()  # claimed (reserved), not yet sent to a process
        self.outbox = Outbox()  # this turn's reports, handed to the writer at its end
        self.counters = {"claimed": 0, "completed": 0, "failed": 0, "fenced_out": 0}
        self.batcher = Batcher()
        self.stats = WorkerStats(self.worker_id, self.counters)
        self.processes = TaskProcesses(settings, self.outbox, self.backlog, self.batcher, self.stats)
        self.queues = QueueFilter(settings.queues)
        self.session = WorkerSession(settings, self.worker_id)
        self._session_generation = 0
        self.leases = LeaseKeeper(settings, self.worker_id)
        self.wakeups = Wakeups(settings, self.worker_id)
        self.rescuer = Rescuer(settings)
        self.pruner = Pruner(settings)
        self.stopping = False
        self._stop_deadline: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.webhooks = WebhookSender(settings, self.worker_id)
        # Claimed tasks with a callback: once the writer stores one's final state, its webhook
        # is due (the sender is woken instead of finding it at its next poll).
        self._callback_tasks: set[int] = set()
        self._callback_lock = threading.Lock()
        self.writer = ResultWriter(
            settings,
            self.worker_id,
            self.counters,
            wake_supervisor=self._wake,
            stats=self.stats,
            finals_written=self._finals_written,
        )

    @property
    def slots(self) -> list[Slot]:
        return self.processes.slots

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
        self.processes.start()
        self.writer.start()
        self.webhooks.start()
        if self.settings.metrics_port:
            self.stats.serve(self.settings.metrics_port, self.settings.metrics_address)
        try:
            while not (self.stopping and self.processes.busy() == 0):
                self.run_once()
        finally:
            self._shutdown()
        log.info("worker %s stopped: %s", self.worker_id, self.counters)
        return 0

    def stop(self) -> None:
        """Stop claiming and hand back what has not started; running tasks get
        shutdown_grace_seconds to finish, then are handed back too."""
        if not self.stopping:
            self.stopping = self.processes.stopping = True
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_seconds
            log.info(
                "worker %s stopping: waiting for %d running task(s), handing back %d not started",
                self.worker_id,
                self.processes.busy(),
                len(self.backlog),
            )
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

    def _held(self) -> list[ClaimedTask]:
        """Every task this worker has claimed and not yet finished."""
        return self.processes.held() + list(self.backlog)

    # --- one turn of the loop ------------------------------------------------------------------

    def run_once(self) -> None:
        """Wait for something to happen (a report, a death, a notification, a deadline), then
        react to everything that did."""
        self._wait(self._next_timeout())
        if not self.writer.is_alive():
            # Without it no result is stored and every lease would lapse into a re-run: better
            # to exit (non-zero) and let the tasks go to healthy workers.
            raise RuntimeError("the result writer thread died")
        now = time.monotonic()
        self.processes.collect(now)
        if self.processes.freed:
            self.processes.freed = False
            self.wakeups.claim_due = True
        if self.stopping:
            self._hand_back_backlog()
            if now >= self._stop_deadline:
                self.processes.hand_back_all()
        # Free processes get work before the database round trips below (a claim may take
        # milliseconds): they would idle meanwhile.
        self._dispatch_backlog()
        self.writer.put(self.outbox)  # stored on the writer's connection while we go on
        if self._ensure_session():
            db = self.session.db
            try:
                self._drain_notifications()
                self._renew_leases(db, now)
                self._rescue(db, now)
                self.pruner.run_if_due(db, now)
                self.stats.flush_throughput_if_due(db, now)
                self._claim(db, now)
                if self.writer.take_retries_scheduled():
                    self.wakeups.due_lookup = True
                self.wakeups.after_turn(db, now)
            except psycopg.OperationalError as exc:
                self._lost_session(exc)
            except psycopg.Error as exc:
                # Not the connection: a statement the database refused. Log it, reconnect after a
                # backoff and try again rather than die.
                log.exception("worker %s: database error, retrying", self.worker_id)
                self._lost_session(exc)
        self._dispatch_backlog()  # after a renewal that confirmed what we hold
        self._note_gauges()

    def _note_gauges(self) -> None:
        """What the metrics show as levels (set each turn: a few assignments)."""
        stats = self.stats
        stats.unwritten = self.writer.unwritten_count()
        stats.processes = len(self.processes.live())
        stats.busy = self.processes.busy()
        stats.events["lease_renewals"] = self.leases.renewals
        stats.events["rescue_rounds"] = self.rescuer.rounds

    def _next_timeout(self) -> float:
        """How long the next wait may last: until the earliest thing that can act is due. Timers
        that cannot act now (no database, no room to claim) must not count, or the loop spins."""
        now = time.monotonic()
        candidates = [self.settings.poll_interval_seconds]
        candidates += [deadline - now for deadline in self.processes.deadlines()]
        if self._stop_deadline is not None:
            candidates.append(self._stop_deadline - now)
        if not self.session.connected:
            candidates.append(self.session.retry_in(now))
            return max(0.0, min(candidates))
        candidates += self.wakeups.timeouts(now, can_claim=self._claim_limit() > 0)
        if self.processes.busy() or self.backlog or self.writer.has_unwritten():
            candidates.append(self.leases.renew_due_in(now))
        start_check = self.processes.next_start_check()
        if start_check is not None:
            candidates.append(start_check - now)
        candidates.append(self.rescuer.due_in(now))
        return max(0.0, min(candidates))

    def _wait(self, timeout: float) -> None:
        waitables: list = [self._wake_r, *self.processes.waitables()]
        if self.session.listener is not None:
            waitables.append(self.session.listener)
        wait(waitables, timeout)
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # --- database ------------------------------------------------------------------------------

    def _ensure_session(self) -> bool:
        if not self.session.ensure():
            return False
        if self.session.generation != self._session_generation:
            # A new session: other workers may have found the old one gone and taken back what
            # we held. Renew (confirm) before starting anything claimed, and claim at once.
            if self._session_generation:
                self.stats.event("reconnects")
            self._session_generation = self.session.generation
            self.leases.session_lost()
            self.wakeups.session_lost()
        return True

    def _lost_session(self, exc: Exception) -> None:
        self.session.lost(exc)
        self.leases.session_lost()
        self.wakeups.session_lost()

    def _drain_notifications(self) -> None:
        cancelled: set[int] = set()
        for notify in self.session.listener.notifies(timeout=0):
            if notify.channel == CANCEL_CHANNEL:
                if notify.payload.isdigit():  # anyone may NOTIFY this channel
                    cancelled.add(int(notify.payload))
            else:
                self.wakeups.claim_due = True
        if cancelled:
            refs = {ref_of(t) for t in self._held() if t.id in cancelled}
            self._abandon(refs, "cancelled by a client")

    def _renew_leases(self, db: psycopg.Connection, now: float) -> None:
        # Finished attempts whose outcome the writer has not stored yet are still ours to keep,
        # while the writer reaches the database; if it cannot, they lapse like those of a worker
        # cut off, and other workers rescue them rather than wait on this one indefinitely.
        held = {ref_of(t) for t in self._held()}
        unwritten = self.writer.unwritten()
        if self._callback_tasks:
            self._forget_callbacks_not_held({ref.task_id for ref in held | unwritten})
        if self.writer.healthy():
            held |= unwritten
        lost = self.leases.renew_if_due(db, held, now)
        if lost:
            self._abandon(lost, "no longer held by this worker (cancelled or taken over)")

    def _rescue(self, db: psycopg.Connection, now: float) -> None:
        rescued = self.rescuer.run_if_due(db, now)
        if rescued:
            self.stats.rescued_tasks(rescued)
            self.wakeups.claim_due = True
            if any(row["status"] == "pending" for row in rescued):  # released, or retried later
                self.wakeups.due_lookup = True
                task_retries_announce(db)

    def _claim_limit(self) -> int:
        """How many tasks to claim now; nothing while the writer cannot keep up (or reach the
        database): results would only pile up."""
        if self.stopping or not self.writer.accepting():
            return 0
        return self.batcher.claim_limit(
            free_processes=len(self.processes.free()),
            ready_processes=self.processes.ready_count(),
            held=len(self._held()),
            backlog=len(self.backlog),
        )

    def _claim(self, db: psycopg.Connection, now: float) -> None:
        limit = self._claim_limit()
        if limit <= 0 or not self.wakeups.should_claim(now):
            return
        queues = self.queues.claimable(db, now)
        if queues == []:  # every queue it serves is paused (or nothing is pending elsewhere)
            self.wakeups.claimed(db, now, full=False)
            return
        held = {ref_of(t) for t in self._held()}
        sent_at = time.monotonic()
        tasks = task_claim(
            db,
            worker_id=self.worker_id,
            limit=limit,
            lease_seconds=self.settings.lease_seconds,
            queues=queues,
            task_types=self.task_types,
        )
        self.leases.claimed(sent_at, held_before=bool(held))
        hooked = {t.id for t in tasks if t.has_callback}
        if hooked:
            with self._callback_lock:
                self._callback_tasks |= hooked
        self.counters["claimed"] += len(tasks)
        self.stats.claimed(len(tasks))
        for task in tasks:
            if ref_of(task) in held:
                # Ours already: released while we were away and claimed again by us. The copy
                # we hold stands for the new claim.
                self.processes.unabandon(ref_of(task))
            else:
                self.backlog.append(task)
        self._dispatch_backlog()
        self.wakeups.claimed(db, now, full=len(tasks) == limit)

    def _dispatch_backlog(self) -> None:
        """Start claimed tasks on free processes, only while they are known to be ours (after a
        freeze or a lost session, the next lease renewal tells)."""
        if self.stopping or not self.backlog or not self.leases.confirmed(time.monotonic()):
            return
        for slot in self.processes.free():
            if not self.backlog:
                return
            self.processes.dispatch(slot, self.batcher.take(self.backlog))

    def _finals_written(self, task_ids: set[int]) -> None:
        """The writer stored these tasks' final states (its thread): wake the webhook sender if
        one of them has a callback."""
        with self._callback_lock:
            hooked = self._callback_tasks & task_ids
            self._callback_tasks -= hooked
        if hooked:
            self.webhooks.wake()

    def _forget_callbacks_not_held(self, held: set[int]) -> None:
        """Tasks that left this worker without a final write here (handed back, cancelled,
        rescued) need no wake-up from it."""
        with self._callback_lock:
            self._callback_tasks &= held

    def _abandon(self, refs: set[AttemptRef], why: str) -> None:
        """Stop attempts that are no longer ours (cancelled, or taken back by another worker)."""
        kept = [t for t in self.backlog if ref_of(t) not in refs]
        self.backlog.clear()
        self.backlog.extend(kept)
        self.processes.abandon(refs, why)

    def _hand_back_backlog(self) -> None:
        """Tasks claimed but never started go back uncounted (released), in one statement."""
        for task in self.backlog:
            self.outbox.handed_back[ref_of(task)] = None
        self.backlog.clear()

    # --- shutdown ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Best effort: hand back what still runs, write what is pending, stop the processes,
        and leave the registry if everything was written."""
        self.stopping = self.processes.stopping = True
        self._hand_back_backlog()
        self.processes.hand_back_all()
        if self.session.connected:
            with contextlib.suppress(psycopg.Error):
                self.wakeups.stop_waiting(self.session.db)
        self.writer.put(self.outbox)
        written = False
        if self.writer.is_alive():
            written = self.writer.finish(timeout=max(2.0, self.settings.db_timeout_seconds * 2))
        elif self.writer.has_unwritten():
            log.error(
                "worker %s exiting with %d unwritten outcome(s) (the writer died); their leases will lapse",
                self.worker_id,
                len(self.writer.unwritten()),
            )
        if self.session.connected:
            with contextlib.suppress(psycopg.Error):  # the last seconds' counts (after the writer's)
                self.stats.flush_throughput_if_due(self.session.db, math.inf)
        self.processes.shutdown()
        # Tries under way get the time their answers take; one cut short is sent again by
        # another worker when its lease ends.
        self.webhooks.stop(timeout=self.settings.webhook_timeout_seconds + 1)
        if written:
            # Otherwise the row stays: once our session ends, other workers take what we held.
            self.session.unregister()
        self.session.close()
        self._wake_r.close()
        self._wake_w.close()
