"""The fenced writes of skiplock/sql/fenced.py against a real Postgres: a stale worker can change
nothing, retries back off, and a worker hands back what it will not run.

Times are compared on the database clock (now() of the statement that wrote them), never on the
test machine's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_hand_back_many,
    task_lease_renew,
    task_progress_many,
)
from skiplock.sql.fragments import PENDING_CHANNEL
from skiplock.sql.tasks import task_attempts_list, task_cancel
from tests.helpers import (
    BACKOFF,
    backoff_seconds,
    claim,
    claim_and_start,
    claim_only,
    complete,
    expire_lease,
    fail,
    history,
    insert_many,
    insert_task,
    listening,
    make_due,
    raw_row,
    received,
    rescue,
    start,
    task_row,
)

# --- fencing -----------------------------------------------------------------------------------
# Each scenario leaves the task in some state and returns the (worker_id, attempt) of a worker
# that no longer holds it; every write that worker makes must update nothing.


def _other_worker(conn, task_id):
    claim_only(conn, task_id, worker_id="w1")
    return "w2", 1


def _stale_attempt(conn, task_id):
    # w1's attempt 1 was rescued and w1 itself claimed the task again: only the number differs.
    claim_and_start(conn, task_id, worker_id="w1")
    expire_lease(conn, task_id)
    assert rescue(conn) == {task_id: "pending"}
    make_due(conn, task_id)
    assert claim_only(conn, task_id, worker_id="w1").attempt == 2
    return "w1", 1


def _future_attempt(conn, task_id):
    claim_only(conn, task_id, worker_id="w1")
    return "w1", 2


def _cancelled(conn, task_id):
    claim_only(conn, task_id, worker_id="w1")
    task_cancel(conn, task_id)
    return "w1", 1


def _rescued(conn, task_id):
    claim_and_start(conn, task_id, worker_id="w1")
    expire_lease(conn, task_id)
    assert rescue(conn) == {task_id: "pending"}
    return "w1", 1


def _rescued_and_reclaimed(conn, task_id):
    _rescued(conn, task_id)
    make_due(conn, task_id)
    claim_only(conn, task_id, worker_id="w2")
    return "w1", 1


def _released(conn, task_id):
    # Never started: back to pending uncounted (attempts 0 again).
    claim_only(conn, task_id, worker_id="w1")
    expire_lease(conn, task_id)
    assert rescue(conn) == {task_id: "pending"}
    return "w1", 1


def _released_and_reclaimed(conn, task_id):
    # The next claim reuses the number: only the worker id tells the attempts apart.
    _released(conn, task_id)
    assert claim_only(conn, task_id, worker_id="w2").attempt == 1
    return "w1", 1


def _already_completed(conn, task_id):
    ref = claim_only(conn, task_id, worker_id="w1")
    assert complete(conn, "w1", ref) == {task_id}
    return "w1", 1


def _handed_back(conn, task_id):
    ref = claim_only(conn, task_id, worker_id="w1")
    assert task_hand_back_many(conn, worker_id="w1", refs=[ref]) == {task_id}
    return "w1", 1


STALE_SCENARIOS = [
    _other_worker,
    _stale_attempt,
    _future_attempt,
    _cancelled,
    _rescued,
    _rescued_and_reclaimed,
    _released,
    _released_and_reclaimed,
    _already_completed,
    _handed_back,
]


def _write_complete(conn, worker_id, ref):
    return complete(conn, worker_id, ref, '{"late": true}')


def _write_fail(conn, worker_id, ref):
    return set(fail(conn, worker_id, ref, error="late failure"))


def _write_progress(conn, worker_id, ref):
    assert task_progress_many(conn, worker_id=worker_id, progress=[(ref, 0.75)]) is None
    return set()  # task_progress_many answers nothing; the unchanged row is the test


def _write_renew(conn, worker_id, ref):
    return task_lease_renew(conn, worker_id=worker_id, refs=[ref], lease_seconds=3600)


def _write_hand_back(conn, worker_id, ref):
    return task_hand_back_many(conn, worker_id=worker_id, refs=[ref])


def _write_start(conn, worker_id, ref):
    return start(conn, worker_id, ref)


WRITES = [_write_complete, _write_fail, _write_progress, _write_renew, _write_hand_back, _write_start]


def _name(fn) -> str:
    return fn.__name__.removeprefix("_write_").strip("_")


@pytest.mark.parametrize("scenario", STALE_SCENARIOS, ids=_name)
def test_writes_from_a_worker_that_lost_the_task_are_fenced_out(conn, scenario):
    task_id = insert_task(conn, max_attempts=3)
    worker_id, attempt = scenario(conn, task_id)
    before = raw_row(conn, task_id)
    attempts_before = history(conn, task_id)

    # Each write must change nothing, so they can all be tried on the same row in turn.
    for write in WRITES:
        assert write(conn, worker_id, AttemptRef(task_id, attempt)) == set(), _name(write)
        assert raw_row(conn, task_id) == before, f"{_name(write)} changed the row"
        assert history(conn, task_id) == attempts_before, f"{_name(write)} logged an attempt"


@pytest.mark.parametrize("write", WRITES, ids=_name)
def test_writes_from_the_holder_go_through(conn, write):
    """The positive control of the fencing test: the same write from the current holder works."""
    task_id = insert_task(conn, max_attempts=3)
    _stale_attempt(conn, task_id)  # the holder is now w1, attempt 2
    before = raw_row(conn, task_id)

    written = write(conn, "w1", AttemptRef(task_id, 2))

    after = raw_row(conn, task_id)
    if write is _write_progress:
        assert after["progress"] == 0.75
    else:
        assert written == {task_id}
    expected_status = {
        _write_complete: "completed",
        _write_fail: "pending",
        _write_progress: "processing",
        _write_renew: "processing",
        _write_hand_back: "pending",
        _write_start: "processing",
    }[write]
    assert after["status"] == expected_status
    if write is _write_renew:
        assert after["lease_expires_at"] > before["lease_expires_at"] + timedelta(minutes=50)
    if write is _write_start:
        assert before["started_at"] is None and after["started_at"] is not None


def test_a_batch_writes_only_the_attempts_still_held(conn):
    held, rescued, foreign = insert_many(conn, 3)
    refs = {t.id: AttemptRef(t.id, t.attempt) for t in claim(conn, worker_id="w1", limit=2)}
    refs[foreign] = claim_only(conn, foreign, worker_id="w2")
    expire_lease(conn, rescued)
    assert rescue(conn) == {rescued: "pending"}

    results = [(refs[i], f'{{"id": {i}}}') for i in (held, rescued, foreign)]
    assert task_complete_many(conn, worker_id="w1", results=results) == {held}
    assert task_row(conn, held)["result"] == {"id": held}
    assert task_row(conn, rescued)["status"] == "pending"
    assert task_row(conn, foreign)["status"] == "processing"
    assert history(conn, held) == [(1, "w1", "completed")]
    assert history(conn, foreign) == []


def test_each_ended_attempt_is_logged_once_with_its_outcome(conn):
    task_id = insert_task(conn, max_attempts=4)

    first = claim_only(conn, task_id, worker_id="w1")
    assert fail(conn, "w1", first, outcome="timed_out", error="too slow") == {task_id: "pending"}
    make_due(conn, task_id)
    claim_and_start(conn, task_id, worker_id="w2")
    expire_lease(conn, task_id)
    assert rescue(conn) == {task_id: "pending"}
    make_due(conn, task_id)
    third = claim_and_start(conn, task_id, worker_id="w3")
    started_at = task_row(conn, task_id)["started_at"]
    assert complete(conn, "w3", third, '{"answer": 42}') == {task_id}
    assert complete(conn, "w3", third, '{"answer": 43}') == set()

    assert history(conn, task_id) == [(1, "w1", "timed_out"), (2, "w2", "lost"), (3, "w3", "completed")]
    attempts = task_attempts_list(conn, task_id)
    assert attempts[0]["error"] == "too slow"
    assert "w2" in attempts[1]["error"]
    assert attempts[2]["error"] is None
    assert attempts[2]["started_at"] == started_at
    assert all(a["finished_at"] >= a["started_at"] for a in attempts)

    row = task_row(conn, task_id)
    assert (row["status"], row["result"], row["progress"], row["attempts"]) == (
        "completed",
        {"answer": 42},
        1,
        3,
    )
    assert row["error"] is None and row["error_traceback"] is None
    assert row["finished_at"] is not None and row["lease_expires_at"] is None


# --- retries -----------------------------------------------------------------------------------


def test_failure_with_attempts_left_retries_after_exponential_backoff(conn):
    base, cap = BACKOFF["backoff_base"], BACKOFF["backoff_max"]
    task_id = insert_task(conn, max_attempts=4)
    for attempt in (1, 2, 3):
        ref = claim_only(conn, task_id)
        assert ref.attempt == attempt
        assert fail(conn, "w1", ref, error=f"boom {attempt}") == {task_id: "pending"}

        expected = min(cap, base * 2 ** (attempt - 1))  # 10, 20, then 40 capped to 25
        assert expected * 0.75 - 1e-6 <= backoff_seconds(conn, task_id) <= expected * 1.25 + 1e-6
        row = task_row(conn, task_id)
        assert (row["status"], row["attempts"], row["error"]) == ("pending", attempt, f"boom {attempt}")
        assert row["error_traceback"].startswith("Traceback")
        assert row["finished_at"] is None and row["lease_expires_at"] is None
        assert claim(conn) == [], "claimed during its backoff"
        make_due(conn, task_id)

    ref = claim_only(conn, task_id)
    assert fail(conn, "w1", ref, error="boom 4") == {task_id: "failed"}
    assert [h[2] for h in history(conn, task_id)] == ["failed"] * 4


def test_backoff_jitter_spreads_retries_both_ways(conn):
    base = BACKOFF["backoff_base"]
    insert_many(conn, 40)
    failures = [AttemptFailure(t.id, t.attempt, "crashed", "died") for t in claim(conn, limit=40)]
    outcome = task_fail_many(conn, worker_id="w1", failures=failures, **BACKOFF)
    assert set(outcome.values()) == {"pending"} and len(outcome) == 40

    delays = [backoff_seconds(conn, f.task_id) for f in failures]
    assert all(base * 0.75 - 1e-6 <= d <= base * 1.25 + 1e-6 for d in delays), delays
    assert min(delays) < base < max(delays), delays


def test_failure_without_attempts_left_fails_the_task(conn):
    task_id = insert_task(conn, max_attempts=1)
    run_at = task_row(conn, task_id)["run_at"]
    ref = claim_only(conn, task_id)
    assert fail(conn, "w1", ref, outcome="crashed", error="signal 9") == {task_id: "failed"}

    row = task_row(conn, task_id)
    assert (row["status"], row["attempts"], row["error"]) == ("failed", 1, "signal 9")
    assert row["error_traceback"].startswith("Traceback")
    assert row["finished_at"] is not None
    assert row["lease_expires_at"] is None
    assert row["run_at"] == run_at
    assert history(conn, task_id) == [(1, "w1", "crashed")]
    assert task_attempts_list(conn, task_id)[0]["finished_at"] == row["finished_at"]
    assert claim(conn) == []


# --- hand back ---------------------------------------------------------------------------------


def test_hand_back_returns_the_task_without_counting_the_attempt(database_url, conn):
    task_id = insert_task(conn, max_attempts=1)
    ref = claim_only(conn, task_id, worker_id="w1")
    task_progress_many(conn, worker_id="w1", progress=[(ref, 0.5)])
    assert task_row(conn, task_id)["progress"] == 0.5

    with listening(database_url, PENDING_CHANNEL) as listener:
        handed = task_hand_back_many(conn, worker_id="w1", refs=[ref], started_ago={ref: 1.0})
        assert handed == {task_id}
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]

    row = task_row(conn, task_id)
    assert (row["status"], row["attempts"], row["max_attempts"]) == ("pending", 0, 1)
    assert row["lease_expires_at"] is None and row["progress"] is None and row["finished_at"] is None
    assert history(conn, task_id) == [(1, "w1", "handed_back")]

    # Not counted: the only attempt the task has is still available, under the same number.
    again = claim_only(conn, task_id, worker_id="w2")
    assert again.attempt == 1
    assert complete(conn, "w2", again) == {task_id}
    assert history(conn, task_id) == [(1, "w1", "handed_back"), (1, "w2", "completed")]


def test_hand_back_tells_started_from_never_started_in_one_statement(conn):
    ran, queued, marked = insert_many(conn, 3)
    refs = {t.id: AttemptRef(t.id, t.attempt) for t in claim(conn, worker_id="w1", limit=3)}
    assert start(conn, "w1", refs[marked], ago=3) == {marked}

    # ran: started in a process (its start not written yet); queued: never started.
    handed = task_hand_back_many(conn, worker_id="w1", refs=refs.values(), started_ago={refs[ran]: 2.0})

    assert handed == {ran, queued, marked}
    outcomes = {
        task_id: [(a["outcome"], a["started_at"] is None) for a in task_attempts_list(conn, task_id)]
        for task_id in refs
    }
    assert outcomes == {
        ran: [("handed_back", False)],
        queued: [("released", True)],
        marked: [("handed_back", False)],
    }
    one_statement = conn.execute(
        "SELECT count(DISTINCT finished_at) AS n FROM task_attempts WHERE task_id = ANY(%s)", (list(refs),)
    ).fetchone()["n"]
    assert one_statement == 1
    for task_id in refs:
        assert (task_row(conn, task_id)["status"], task_row(conn, task_id)["attempts"]) == ("pending", 0)
