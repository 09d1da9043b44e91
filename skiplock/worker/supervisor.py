"""The worker supervisor: claims tasks, hands them to its processes, keeps its duties.

One supervisor per worker (`skiplock worker`, or `python worker.py`). It owns a database session
(skiplock.worker.session: a connection for claims, leases and duties, and one that LISTENs and
holds the worker's liveness lock), a result writer thread with a third connection
(skiplock.worker.writer), a webhook sender process (skiplock.webhooks.process) and N
task processes (skiplock.worker.processes). Each turn of its loop (run_once) waits for something
to happen, then:

1. reads what its processes reported: starts, outcomes, deaths, overrun timeouts;
2. hands those to the writer, which stores them while the loop goes on;
3. on the database (skiplock.worker.duty_turn): reads notifications, renews leases, runs its
   duties (rescue, prune: skiplock.worker.duties);
4. claims (skiplock.worker.claimer), then runs the admission a submit's wake-up asked for
   (duty_turn.after_claim), and works out when to claim next (duties/wakeups.py);
5. starts claimed tasks on free processes, while it knows they are still its own, once the
   database records them as in its hands (a dead worker's tasks in hand count as started).

Every write is fenced on the attempt, so:
- a hung task is killed at its deadline and its slot gets a fresh process;
- a process that dies (segfault, OOM kill) fails only its own attempt, recorded as crashed;
- a supervisor that dies takes its processes with it; its session ends and any other worker's
  rescue duty takes its tasks back within a rescue interval (a lost attempt for those it had
  handed to its processes, released uncounted for the rest);
- a supervisor that froze or lost the database past its leases finds, on renewal, that the tasks
  are no longer its own, kills those processes, and its late results are fenced out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

import psycopg

from skiplock.db import SESSION_ENDED
from skiplock.registry import TaskRegistry
from skiplock.settings import Settings
from skiplock.startup import load_task_registry
from skiplock.webhooks.process import SenderProcess
from skiplock.worker.claimer import Claimer
from skiplock.worker.duties.leases import LeaseKeeper
from skiplock.worker.duties.wakeups import Wakeups
from skiplock.worker.duty_turn import DutyTurn
from skiplock.worker.handoff import StepHandoff
from skiplock.worker.processes import START_MARK_AFTER_SECONDS
from skiplock.worker.reports import ReportQueue
from skiplock.worker.slots import Slot
from skiplock.worker.stats import WorkerStats
from skiplock.worker.writer import ResultWriter

log = logging.getLogger("skiplock.worker")

# At shutdown the writer gets at least this long to store what is left (hand-backs included),
# or SHUTDOWN_WRITE_TIMEOUTS database timeouts if that is longer.
SHUTDOWN_WRITE_MIN_SECONDS = 2.0
SHUTDOWN_WRITE_TIMEOUTS = 2
# Random bytes in a worker id (with host and pid): two workers never share one in practice.
WORKER_ID_RANDOM_BYTES = 3
# Bytes read at once when emptying the wake-up socket (each wake-up is one byte).
_WAKE_READ_BYTES = 4096


def default_worker_id() -> str:
    """host:pid:random. Fencing trusts this id, so it must never be shared: containers on one
    host network share the hostname and often pid 1, and a restarted worker may reuse a pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(WORKER_ID_RANDOM_BYTES)}"


def on_session(duties: DutyTurn, step: Callable[..., None], db: psycopg.Connection[Any], *args: Any) -> bool:
    """Run a step on the worker's session; False if it lost the session (or a statement failed:
    the session is dropped and reconnected after a backoff rather than the worker dying)."""
    try:
        step(db, *args)
        return True
    except SESSION_ENDED as exc:
        duties.lost_session(exc)
    except psycopg.Error as exc:
        # Not the connection: a statement the database refused. Log it, reconnect after a
        # backoff and try again rather than die.
        log.exception("worker %s: database error, retrying", duties.worker_id)
        duties.lost_session(exc)
    return False


class Supervisor:
    def __init__(self, settings: Settings, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        # A task module that does not import: a StartupError naming it (not a traceback).
        self.registry: TaskRegistry = load_task_registry(
            settings.task_modules, allow_crash=settings.allow_crash
        )
        self.task_types = self.registry.names()
        self.reports = ReportQueue()  # this turn's reports, handed to the writer at its end
        self.counters = {"claimed": 0, "completed": 0, "failed": 0, "fenced_out": 0}
        self.stats = WorkerStats(self.worker_id, self.counters)
        self.leases = LeaseKeeper(settings, self.worker_id)
        self.wakeups = Wakeups(settings, self.worker_id)
        self.stopping = False
        self._stop_deadline: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.webhooks = SenderProcess(settings, self.worker_id)  # webhooks go out from its process
        self.handoff = StepHandoff(
            self.worker_id, settings.lease_seconds, settings.queues, self.task_types, self._wake
        )
        self.writer = ResultWriter(
            settings,
            self.worker_id,
            self.counters,
            wake_supervisor=self._wake,
            stats=self.stats,
            handoff=self.handoff,
        )
        self.claimer = Claimer(
            settings,
            self.worker_id,
            self.task_types,
            reports=self.reports,
            counters=self.counters,
            stats=self.stats,
            leases=self.leases,
            wakeups=self.wakeups,
            writer=self.writer,
        )
        self.processes = self.claimer.processes
        self.queues = self.claimer.queues  # which queues it claims from (paused ones aside)
        self.duties = DutyTurn(
            settings,
            self.worker_id,
            claimer=self.claimer,
            writer=self.writer,
            stats=self.stats,
            leases=self.leases,
            wakeups=self.wakeups,
            type_limits={t.name: t.max_running for t in self.registry if t.max_running is not None},
            schedules=self.registry.schedules,
            handoff=self.handoff,
        )
        self.session = self.duties.session
        self.session.task_types = self.task_types  # registered: what no live worker serves shows

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
            self._set_stopping()
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_seconds
            log.info(
                "worker %s stopping: waiting for %d running task(s), handing back %d not started",
                self.worker_id,
                self.processes.busy(),
                len(self.claimer.backlog),
            )
        self._wake()

    def _set_stopping(self) -> None:
        self.stopping = self.claimer.stopping = self.processes.stopping = True

    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.stopping and signum == signal.SIGINT:
                # A second Ctrl-C: do not wait for the grace period.
                self._stop_deadline = time.monotonic()
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

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
            self.wakeups.process_freed()
        if self.stopping:
            self.claimer.hand_back_backlog()
            if self._stop_deadline is not None and now >= self._stop_deadline:
                self.processes.hand_back_all()
        # Free processes get work before the duties' round trips below (a claim may take
        # milliseconds): they would idle meanwhile. Workflow steps the writer took for us first.
        for sent_at, tasks in self.handoff.take():
            self.claimer.adopt(tasks, sent_at)
        db = self.duties.ensure_session()
        if db is not None and not on_session(self.duties, self.claimer.dispatch, db):
            db = None
        # Steps the writes handed over now release, this worker may take itself while idle.
        idle = self.wakeups.waiting_for_notifications() and not self.stopping
        self.handoff.offer(self.claimer.claim_limit() if idle else 0)
        # Stored on the writer's connection while we go on (with the limits whose slots it frees).
        self.writer.put(self.reports, self.claimer.freed_by(self.reports.refs()))
        if db is not None:
            on_session(self.duties, self._database_turn, db, now)
        self._note_gauges()

    def _database_turn(self, db: psycopg.Connection[Any], now: float) -> None:
        """Duties, the claim (what it takes goes to free processes at once) and the admission
        a wake-up asked for, then the rest of the backlog to processes a renewal just freed."""
        self.duties.run(db, now)
        self.webhooks.check(db, now)  # started once needed, again if it died
        self.claimer.claim(db, now)
        self.duties.after_claim(db, now)
        if self.writer.take_retries_scheduled():
            self.wakeups.due_lookup = True
        self.wakeups.after_turn(db, now)
        self.claimer.dispatch(db)  # after a renewal that confirmed what we hold

    def _note_gauges(self) -> None:
        """What the metrics show as levels (set each turn: a few assignments)."""
        stats = self.stats
        stats.unwritten = self.writer.unwritten_count()
        stats.processes = len(self.processes.live())
        stats.busy = self.processes.busy()
        stats.events["lease_renewals"] = self.leases.renewals
        stats.events["rescue_rounds"] = self.duties.rescuer.rounds
        stats.events["workflow_steps_taken"] = self.handoff.steps_taken

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
        candidates += self.wakeups.timeouts(now, can_claim=self.claimer.claim_limit() > 0)
        holding = bool(self.processes.busy() or self.claimer.backlog or self.writer.has_unwritten())
        candidates += self.duties.timeouts(now, holding=holding)
        start_check = self.processes.next_start_check(START_MARK_AFTER_SECONDS)
        if start_check is not None:
            candidates.append(start_check - now)
        return max(0.0, min(candidates))

    def _wait(self, timeout: float) -> None:
        waitables: list[Any] = [self._wake_r, *self.processes.waitables()]
        if self.session.listener is not None:
            waitables.append(self.session.listener)
        wait(waitables, timeout)
        try:
            while self._wake_r.recv(_WAKE_READ_BYTES):
                pass
        except (BlockingIOError, OSError):
            pass

    # --- shutdown ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Best effort: hand back what still runs, write what is pending, stop the processes,
        and leave the registry if everything was written."""
        self._set_stopping()
        self.claimer.hand_back_backlog()
        self.processes.hand_back_all()
        if self.session.db is not None and self.session.connected:
            with contextlib.suppress(psycopg.Error):
                self.wakeups.stop_waiting(self.session.db)
        self.writer.put(self.reports)
        written = False
        if self.writer.is_alive():
            written = self.writer.finish(
                timeout=max(
                    SHUTDOWN_WRITE_MIN_SECONDS, self.settings.db_timeout_seconds * SHUTDOWN_WRITE_TIMEOUTS
                )
            )
        elif self.writer.has_unwritten():
            log.error(
                "worker %s exiting with %d unwritten outcome(s) (the writer died); their leases will lapse",
                self.worker_id,
                len(self.writer.unwritten()),
            )
        if self.session.db is not None and self.session.connected:
            with contextlib.suppress(psycopg.Error):  # the last seconds' counts (after the writer's)
                self.duties.flush_stats_now(self.session.db)
        self.processes.shutdown()
        # Tries under way get the time their answers take; one cut short is sent again by
        # another sender when its lease ends.
        self.webhooks.stop()
        if written:
            # Otherwise the row stays: once our session ends, other workers take what we held.
            self.session.unregister()
        self.session.close()
        self._wake_r.close()
        self._wake_w.close()
