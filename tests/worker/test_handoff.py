"""The workflow-step handoff between the writer thread and the supervisor: what it tells the
reconcile on a new session (StepHandoff.settled) must follow every taker to its end, committed or
rolled back, or a worker would never reconcile (or would disown steps it is about to start)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from skiplock.sql.claim import ClaimedTask
from skiplock.worker.handoff import StepHandoff


def handoff() -> StepHandoff:
    return StepHandoff("w1", 30.0, [], [], wake_supervisor=lambda: None)


def a_step(task_id: int) -> ClaimedTask:
    return ClaimedTask(
        id=task_id, task_type="noop", queue="default", input=None, attempt=1, max_attempts=3,
        timeout_seconds=30, priority=0, run_at=datetime.now(UTC), workflow_id=1,
    )  # fmt: skip


def test_a_taker_in_flight_and_steps_not_yet_taken_unsettle_it_until_taken():
    h = handoff()
    assert h.settled()
    h.offer(2)
    with h.taking(db=None) as take:
        assert take is not None and not h.settled()  # a transaction may be claiming steps now
        take.tasks.append(a_step(7))
    assert not h.settled()  # committed: the steps are ours, not yet the supervisor's
    [(_, tasks)] = h.take()
    assert [t.id for t in tasks] == [7] and h.settled()


def test_a_rolled_back_taker_took_nothing_and_settles_it():
    h = handoff()
    h.offer(2)
    with pytest.raises(RuntimeError), h.taking(db=None) as take:
        take.tasks.append(a_step(8))
        raise RuntimeError("the write was refused")
    assert h.settled() and h.take() == []


def test_without_room_there_is_no_taker_and_nothing_to_wait_for():
    h = handoff()
    with h.taking(db=None) as take:
        assert take is None
    assert h.settled()
