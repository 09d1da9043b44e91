"""Eager starts: the workflow steps a worker's own writes release, taken by that worker in the
same transaction while it is idle, instead of a NOTIFY, a wake-up and a claim: a chain's next step
starts a millisecond or two after its parent's end, on the process the parent just freed.

Only while the worker is idle (its last claim came back short and it waits for notifications):
nothing else was runnable for it, so taking its own released steps first passes nobody over. The
claim is task_claim_released, held to the claim's rules (its queues and task types, a pause, a
limit's wait); what it does not take wakes the idle workers as before. The tasks reach the
supervisor only once the transaction has committed (a rolled-back write took nothing), and count
as claimed from the moment the transaction began (their lease runs from its commit, later).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from skiplock.sql.claim import ClaimedTask, task_claim_released
from skiplock.sql.rows import Connection


class Taker:
    """One transaction's taking (skiplock.sql.workflows.TakeReleased), up to `room` tasks."""

    def __init__(self, handoff: StepHandoff, db: Connection, room: int):
        self._handoff = handoff
        self._db = db
        self.room = room
        self.sent_at = time.monotonic()  # before the transaction: its claims come after
        self.tasks: list[ClaimedTask] = []

    def __call__(self, released: list[int]) -> int:
        if self.room <= 0:
            return 0
        h = self._handoff
        taken = task_claim_released(
            self._db,
            ids=released,
            worker_id=h.worker_id,
            limit=self.room,
            lease_seconds=h.lease_seconds,
            queues=h.queues,
            task_types=h.task_types,
        )
        self.tasks += taken
        self.room -= len(taken)
        return len(taken)


class StepHandoff:
    """Between the supervisor (how many steps it could start now; the steps taken) and the
    writer thread (the transactions that release steps)."""

    def __init__(
        self,
        worker_id: str,
        lease_seconds: float,
        queues: Sequence[str],
        task_types: Sequence[str],
        wake_supervisor: Callable[[], None],
    ):
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.queues = list(queues) or None
        self.task_types = list(task_types) or None
        self._wake_supervisor = wake_supervisor
        self._lock = threading.Lock()
        self._room = 0
        self._taken: list[tuple[float, list[ClaimedTask]]] = []
        self._outstanding = 0  # takers whose transaction has not ended yet
        self.steps_taken = 0  # for the worker's metrics

    # --- the supervisor's side ---------------------------------------------------------------

    def offer(self, room: int) -> None:
        """How many released steps this worker could start now (0: none, it is busy or stopping)."""
        with self._lock:
            self._room = room

    def take(self) -> list[tuple[float, list[ClaimedTask]]]:
        """The steps taken since the last call, each batch with when its claim was sent."""
        with self._lock:
            taken, self._taken = self._taken, []
        return taken

    def settled(self) -> bool:
        """No step is being taken, and none taken is waiting for take(): every task the
        database says this worker holds through a handoff, the supervisor holds too."""
        with self._lock:
            return self._outstanding == 0 and not self._taken

    # --- the writer thread's side ------------------------------------------------------------

    @contextmanager
    def taking(self, db: Connection) -> Iterator[Taker | None]:
        """Around a transaction about to end workflow steps: its taker (None while there is no
        room), told at the end whether the transaction committed."""
        take = self._taker(db)
        try:
            yield take
        except BaseException:
            self._rolled_back(take)
            raise
        self._committed(take)

    def _taker(self, db: Connection) -> Taker | None:
        """For a transaction about to end workflow steps: None while there is no room. The room
        is used up until the supervisor offers again (two transactions cannot both fill it)."""
        with self._lock:
            room, self._room = self._room, 0
            if room <= 0:
                return None
            self._outstanding += 1
        return Taker(self, db, room)

    def _committed(self, taker: Taker | None) -> None:
        """The transaction of `taker` committed: its steps are this worker's to start."""
        if taker is None:
            return
        with self._lock:
            self._outstanding -= 1
            if not taker.tasks:
                return
            self._taken.append((taker.sent_at, taker.tasks))
            self.steps_taken += len(taker.tasks)
        self._wake_supervisor()

    def _rolled_back(self, taker: Taker | None) -> None:
        """The transaction of `taker` did not commit: it took nothing."""
        if taker is not None:
            with self._lock:
                self._outstanding -= 1
