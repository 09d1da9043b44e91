"""The supervisor's claims: how many tasks to take (skiplock.worker.batching), taking them
(task_claim), the backlog of claimed tasks waiting for a free process, and sending them on while
they are known to be ours (skiplock.worker.duties.leases). Tasks that are no longer ours are
dropped (abandoned); at shutdown, those never started are handed back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from skiplock.settings import Settings
from skiplock.sql.claim import ClaimedTask, ClaimPosition, task_claim
from skiplock.sql.fenced import AttemptRef, task_hand_over
from skiplock.sql.rows import Connection
from skiplock.worker.batching import HAND_OVER_AHEAD_SECONDS, Batcher
from skiplock.worker.duties.leases import LeaseKeeper
from skiplock.worker.duties.wakeups import Wakeups
from skiplock.worker.processes import TaskProcesses, pickled
from skiplock.worker.queue_filter import QueueFilter
from skiplock.worker.reports import ReportQueue
from skiplock.worker.slots import ref_of
from skiplock.worker.stats import WorkerStats
from skiplock.worker.writer import ResultWriter

# A worker deep in a backlog claims from where one of its claims began (task_claim's `after`),
# and from the start at least this often: a task sorted before that place (rescued with its old
# turn, of a resumed queue, inserted by a transaction that lasted longer than the lag below)
# waits at most this much longer than in strict claim order.
CLAIM_FROM_START_EVERY_SECONDS = 1.0
# ... one of its claims that began at least this long ago, not the last one: a submit computes
# its turn from the queue's head in its snapshot, where the rows a claim is taking still look
# runnable, and commits after the next claims began; its turn may then sort before where they
# began (measured: an owner's submits behind another's 100,000-task backlog waited up to the
# full second above, p99 150-955 ms, against 60 ms when every claim started from the start).
# Claiming from 0.1 s back steps over the entries of what was claimed since (about 1,500 at
# 15,000 tasks/s: a few index pages), not over everything claimed since the last VACUUM.
POSITION_LAG_SECONDS = 0.1


# A batch sent ahead to a busy process waits unread in its pipe (a socket pair; Linux buffers
# about 200 kB). One at most per process (Slot.ahead), and only this big: a send that did not fit
# would block the supervisor until the process reads it. A bigger one waits in the backlog until
# the process is free.
AHEAD_SEND_MAX_BYTES = 16384


class Claimer:
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        task_types: list[str],
        *,
        reports: ReportQueue,
        counters: dict[str, int],
        stats: WorkerStats,
        leases: LeaseKeeper,
        wakeups: Wakeups,
        writer: ResultWriter,
    ):
        self.settings = settings
        self.worker_id = worker_id
        self.task_types = task_types
        self.backlog: deque[ClaimedTask] = deque()  # claimed (reserved), not yet sent to a process
        self.batcher = Batcher()
        self.queues = QueueFilter(settings.queues)
        self.processes = TaskProcesses(settings, reports, self.backlog, self.batcher, stats)
        self.reports = reports
        self.counters = counters
        self.stats = stats
        self.leases = leases
        self.wakeups = wakeups
        self.writer = writer
        self.stopping = False  # no more claims or dispatches; the backlog goes back
        # Held tasks that may hold a slot of a limit -> those limits (ClaimedTask.limit_groups):
        # when one ends, admission looks at just these (see freed_by).
        self._limit_groups: dict[AttemptRef, tuple[str, ...]] = {}
        self.abandoned_groups: set[str] = set()  # of tasks ended elsewhere (cancelled, taken over)
        # Where recent claims began (per queue; None: every queue) and when, oldest first, while
        # they found as many tasks as they asked for (more are behind).
        self._began: dict[str | None, deque[tuple[float, ClaimPosition]]] = {}
        self._claimed_from_start_at = 0.0

    def held(self) -> list[ClaimedTask]:
        """Every task this worker has claimed and not yet finished."""
        return self.processes.held() + list(self.backlog)

    def claim_limit(self) -> int:
        """How many tasks to claim now; nothing while the writer cannot keep up (or reach the
        database): results would only pile up."""
        if self.stopping or not self.writer.accepting():
            return 0
        return self.batcher.claim_limit(
            free_processes=len(self.processes.free()),
            ready_processes=self.processes.ready_count(),
            held=len(self.held()),
            backlog=len(self.backlog),
        )

    def claim(self, db: Connection, now: float) -> None:
        limit = self.claim_limit()
        if limit <= 0 or not self.wakeups.should_claim(now):
            return
        queues = self.queues.claimable(db, now)
        if queues == []:  # every queue it serves is paused (or nothing is pending elsewhere)
            self.wakeups.claimed(db, now, full=False)
            return
        held = {ref_of(t) for t in self.held()}
        sent_at = time.monotonic()
        after = self._positions(now)
        if not after or now - self._claimed_from_start_at >= CLAIM_FROM_START_EVERY_SECONDS:
            after, self._claimed_from_start_at = {}, now
        # What goes to idle processes as soon as it is back (nothing waits before it): the claim
        # records that hand-over itself, a round trip less from a submit to its start.
        at_once = 0 if self.backlog else len(self.processes.free()) * self.batcher.dispatch_size()
        tasks = task_claim(
            db,
            worker_id=self.worker_id,
            limit=limit,
            lease_seconds=self.settings.lease_seconds,
            queues=queues,
            task_types=self.task_types,
            after=after,
            hand_over=at_once,
            in_hand=self.in_hand() if at_once else (),
        )
        self._note_positions(tasks, now, full=len(tasks) == limit, by_queue=bool(queues))
        self.adopt(tasks, sent_at, held)
        self.dispatch(db)
        for task in tasks:  # any the dispatch could not send now go through a hand-over later
            task.in_hand = False
        self.wakeups.claimed(db, now, full=len(tasks) == limit)

    def _positions(self, now: float) -> dict[str | None, ClaimPosition]:
        """Where the next claim may start, per queue: where the newest claim that began at least
        POSITION_LAG_SECONDS ago began (older ones are forgotten)."""
        positions = {}
        for key, began in self._began.items():
            while len(began) > 1 and began[1][0] <= now - POSITION_LAG_SECONDS:
                began.popleft()
            if began and began[0][0] <= now - POSITION_LAG_SECONDS:
                positions[key] = began[0][1]
        return positions

    def _note_positions(self, tasks: list[ClaimedTask], now: float, *, full: bool, by_queue: bool) -> None:
        """Remember where this claim began (per queue for a worker of some queues: a queue this
        claim took nothing from keeps what it had), if it was full; forget everything if not."""
        if not full:
            self._began.clear()
            return
        noted: set[str | None] = set()
        for task in tasks:  # in claim order: each queue's first is where it began
            key = task.queue if by_queue else None
            if task.turn is not None and key not in noted:
                noted.add(key)
                self._began.setdefault(key, deque()).append((now, ClaimPosition(task.priority, task.turn)))

    def adopt(self, tasks: list[ClaimedTask], sent_at: float, held: set[AttemptRef] | None = None) -> None:
        """Tasks claimed for this worker by a statement sent at `sent_at` (its claim, or the
        writer's taking of workflow steps it released), when it held `held` (default: what it
        holds now): held from now on, sent to a process when one is free (dispatch)."""
        if held is None:
            held = {ref_of(t) for t in self.held()}
        self.leases.claimed(sent_at, held_before=bool(held))
        self.counters["claimed"] += len(tasks)
        self.stats.claimed(len(tasks))
        for task in tasks:
            if ref_of(task) in held:
                # Ours already: released while we were away and claimed again by us. The copy
                # we hold stands for the new claim.
                self.processes.unabandon(ref_of(task))
            else:
                self.backlog.append(task)
            if task.limit_groups:
                self._limit_groups[ref_of(task)] = task.limit_groups
            self.writer.writes.workflow_steps.add(task)  # its end settles its dependents

    def dispatch(self, db: Connection) -> None:
        """Send claimed tasks to free processes, only while they are known to be ours (after a
        freeze or a lost session, the next lease renewal tells), and only once the database
        records them as in this worker's hands (task_hand_over): from then on, whatever dies
        when, they count as started. Those no longer ours, or locked by a cancel or a release
        at that moment, go back to the front of the backlog until the worker learns which."""
        if self.stopping or not self.backlog or not self.leases.confirmed(time.monotonic()):
            return
        plan = []
        now = time.monotonic()
        for slot in self.processes.wanting_within(HAND_OVER_AHEAD_SECONDS, self.batcher.estimate, now):
            if not self.backlog:
                break
            batch = self.batcher.take(self.backlog)
            payload = pickled(batch)
            if slot.queue and len(payload) > AHEAD_SEND_MAX_BYTES:
                self.backlog.extendleft(reversed(batch))  # sent once the process is free
                continue
            plan.append((slot, batch, payload))
        if not plan:
            return
        batches = [batch for _, batch, _ in plan]
        handing = [ref_of(t) for batch in batches for t in batch if not t.in_hand]
        handed = {ref_of(t) for batch in batches for t in batch if t.in_hand}  # by their claim
        if handing:
            sent_at = time.perf_counter()
            try:
                handed |= task_hand_over(
                    db, worker_id=self.worker_id, handing=handing, kept=self.in_hand() | handed
                )
            except BaseException:
                self.backlog.extendleft(reversed([t for batch in batches for t in batch]))
                raise
            self.stats.hand_over_time.observe(time.perf_counter() - sent_at)
        kept_back = []
        for slot, batch, payload in plan:
            sent = [t for t in batch if ref_of(t) in handed]
            kept_back += [t for t in batch if ref_of(t) not in handed]
            if sent:
                self.processes.dispatch(slot, sent, payload if len(sent) == len(batch) else None)
        self.backlog.extendleft(reversed(kept_back))

    def in_hand(self) -> set[AttemptRef]:
        """What this worker has recorded as in its processes' hands and not yet stored the outcome
        of: sent to them, and claimed as handed over (ClaimedTask.in_hand) but not sent yet."""
        return (
            {ref_of(t) for t in self.processes.held()}
            | {ref_of(t) for t in self.backlog if t.in_hand}
            | self.reports.refs()
            | self.writer.unwritten()
        )

    def freed_by(self, refs: Iterable[AttemptRef]) -> set[str]:
        """The limits whose slots these attempts hold (their outcomes go to the writer: once
        written, the slots are free)."""
        return {g for ref in refs for g in self._limit_groups.pop(ref, ())}

    def abandon(self, refs: set[AttemptRef], why: str) -> None:
        """Stop attempts that are no longer ours (cancelled, or taken back by another worker)."""
        self.abandoned_groups |= self.freed_by(refs)
        kept = [t for t in self.backlog if ref_of(t) not in refs]
        self.backlog.clear()
        self.backlog.extend(kept)
        self.processes.abandon(refs, why)

    def hand_back_backlog(self) -> None:
        """Tasks claimed but never started go back uncounted (released), in one statement."""
        for task in self.backlog:
            self.reports.handed_back[ref_of(task)] = None
        self.backlog.clear()
