"""The queue functions of skiplock/queries.py against a real Postgres: claim order and filters, the
SKIP LOCKED race between connections, fencing of stale workers, retries with backoff, lease
rescue, hand-back, cancel and retry, notifications, and task_list pagination.

Times are compared on the database clock (now() of the statement that wrote them), never on the
test machine's."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest

from skiplock.db import connect
from skiplock.errors import InvalidTransition, TaskNotFound
from skiplock.sql.claim import ClaimedTask, task_claim, task_next_due_in
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_hand_back_many,
    task_lease_renew,
    task_progress_many,
    task_start_many,
)
from skiplock.sql.fragments import CANCEL_CHANNEL, PENDING_CHANNEL
from skiplock.sql.tasks import task_attempts_list, task_cancel, task_get, task_list, task_retry
from skiplock.sql.workers import (
    task_rescue,
    task_retries_announce,
    task_waiter_register,
    task_waiter_unregister,
    task_waiters_prune_dead,
    task_waiters_settled,
    task_worker_register,
    task_workers_forget,
    task_workers_mark_gone,
)
from tests.conftest import insert_task, task_row, wait_until

LEASE_SECONDS = 30.0
# Large enough that a task failed or rescued in a test is never due again before the test ends.
BACKOFF = {"backoff_base": 10.0, "backoff_max": 25.0}
# Sent after the statements under test; notifications arrive in commit order, so every
# notification those statements sent has arrived once this one has.
MARKER_CHANNEL = "skiplock_test_marker"


# --- helpers -----------------------------------------------------------------------------------


def db_now(conn):
    return conn.execute("SELECT clock_timestamp() AS now").fetchone()["now"]


def claim(conn, worker_id: str = "w1", limit: int = 10, **kwargs) -> list[ClaimedTask]:
    kwargs.setdefault("lease_seconds", LEASE_SECONDS)
    return task_claim(conn, worker_id=worker_id, limit=limit, **kwargs)


def ids(tasks: list[ClaimedTask]) -> list[int]:
    return [t.id for t in tasks]


def insert_many(conn, n: int, **columns) -> list[int]:
    """n pending tasks in one INSERT statement (default columns unless given)."""
    task_type = columns.pop("task_type", "noop")
    queue = columns.pop("queue", "default")
    assert not columns, f"unsupported columns {columns}"
    rows = conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input)
        SELECT %s, %s, to_jsonb(g) FROM generate_series(1, %s) g
        RETURNING id
        """,
        (task_type, queue, n),
    ).fetchall()
    return sorted(r["id"] for r in rows)


def history(conn, task_id: int) -> list[tuple[int, str, str]]:
    """(attempt, worker_id, outcome) of every ended attempt, oldest first."""
    return [(a["attempt"], a["worker_id"], a["outcome"]) for a in task_attempts_list(conn, task_id)]


def raw_row(conn, task_id: int) -> dict:
    return conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,)).fetchone()


def expire_lease(conn, task_id: int) -> None:
    conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (task_id,))


def make_due(conn, task_id: int) -> None:
    conn.execute("UPDATE tasks SET run_at = now() - interval '1 second' WHERE id = %s", (task_id,))


def rescue(conn, limit: int = 100, grace_seconds: float = 0.5) -> dict[int, str]:
    """{task id: new status} of what a rescue took back."""
    rows = task_rescue(conn, limit=limit, grace_seconds=grace_seconds, **BACKOFF)
    return {r["id"]: r["status"] for r in rows}


def start(conn, worker_id: str, ref: AttemptRef, ago: float = 0.0) -> set[int]:
    """Mark an attempt started (a process began running it `ago` seconds ago)."""
    return task_start_many(conn, worker_id=worker_id, started_ago={ref: ago})


def complete(conn, worker_id: str, ref: AttemptRef, result: str = '{"ok": true}') -> set[int]:
    return task_complete_many(conn, worker_id=worker_id, results=[(ref, result)])


def fail(conn, worker_id: str, ref: AttemptRef, outcome: str = "failed", error: str = "boom") -> dict:
    failure = AttemptFailure(
        ref.task_id, ref.attempt, outcome, error, "Traceback (most recent call last): ..."
    )
    return task_fail_many(conn, worker_id=worker_id, failures=[failure], **BACKOFF)


def claim_only(conn, task_id: int, worker_id: str = "w1") -> AttemptRef:
    """Claim the only due task, which must be task_id."""
    [task] = claim(conn, worker_id=worker_id)
    assert task.id == task_id
    return AttemptRef(task.id, task.attempt)


def claim_and_start(conn, task_id: int, worker_id: str = "w1") -> AttemptRef:
    """Claim the only due task, which must be task_id, and start it."""
    ref = claim_only(conn, task_id, worker_id=worker_id)
    assert start(conn, worker_id, ref) == {task_id}
    return ref


@contextmanager
def listening(database_url: str, *channels: str):
    with connect(database_url, role="test-listener") as listener:
        for channel in (*channels, MARKER_CHANNEL):
            listener.execute(f"LISTEN {channel}")
        yield listener


def received(conn, listener) -> list[tuple[str, str]]:
    """(channel, payload) of every notification sent before now, in order."""
    conn.execute(f"NOTIFY {MARKER_CHANNEL}")
    got = []
    for notify in listener.notifies(timeout=10):
        if notify.channel == MARKER_CHANNEL:
            return got
        got.append((notify.channel, notify.payload))
    pytest.fail("the marker notification never arrived")


# --- task_claim --------------------------------------------------------------------------------


def test_claim_order_is_priority_then_oldest_run_at_then_id(conn):
    now = db_now(conn)

    def ago(minutes: int):
        return now - timedelta(minutes=minutes)

    negative = insert_task(conn, priority=-3, run_at=ago(60))
    low_old = insert_task(conn, priority=0, run_at=ago(30))
    high_new = insert_task(conn, priority=5, run_at=ago(1))
    tie_first = insert_task(conn, priority=1, run_at=ago(5))
    tie_second = insert_task(conn, priority=1, run_at=ago(5))
    high_old = insert_task(conn, priority=5, run_at=ago(10))
    expected = [high_old, high_new, tie_first, tie_second, low_old, negative]

    order = []
    while batch := claim(conn, limit=1):
        order += ids(batch)
    assert order == expected


def test_claim_batches_take_the_head_of_the_queue_in_order(conn):
    now = db_now(conn)
    tasks = [
        insert_task(conn, priority=p, run_at=now - timedelta(seconds=s))
        for p, s in [(0, 50), (2, 10), (0, 90), (1, 5), (2, 40), (0, 70)]
    ]
    expected = [tasks[4], tasks[1], tasks[3], tasks[2], tasks[5], tasks[0]]
    assert ids(claim(conn, limit=4)) == expected[:4]
    assert ids(claim(conn, limit=4)) == expected[4:]
    assert claim(conn, limit=4) == []


def test_claim_leaves_tasks_that_are_not_due_yet(conn):
    due = insert_task(conn)
    delayed = insert_task(conn, priority=100, delay_seconds=3600)
    scheduled = insert_task(conn, priority=100, run_at=db_now(conn) + timedelta(minutes=5))
    row = task_row(conn, delayed)
    assert row["run_at"] - row["created_at"] == timedelta(hours=1)

    assert ids(claim(conn)) == [due]
    assert claim(conn) == []
    for task_id in (delayed, scheduled):
        row = task_row(conn, task_id)
        assert (row["status"], row["attempts"], row["worker_id"]) == ("pending", 0, None)

    make_due(conn, scheduled)
    assert ids(claim(conn)) == [scheduled]


def test_claim_filters_by_queue_and_task_type(conn):
    alpha_q1 = insert_task(conn, "alpha", queue="q1")
    beta_q1 = insert_task(conn, "beta", queue="q1")
    alpha_q2 = insert_task(conn, "alpha", queue="q2")
    beta_q3 = insert_task(conn, "beta", queue="q3")

    assert ids(claim(conn, queues=["q2", "unknown"])) == [alpha_q2]
    assert ids(claim(conn, queues=["q1"], task_types=["beta"])) == [beta_q1]
    assert claim(conn, queues=["q1", "q2"], task_types=["beta", "gamma"]) == []
    assert ids(claim(conn, task_types=["alpha"])) == [alpha_q1]
    assert claim(conn, queues=["q1", "q2"]) == []
    assert ids(claim(conn, queues=None, task_types=None)) == [beta_q3]


def test_claim_respects_limit(conn):
    all_ids = insert_many(conn, 7)
    first, second, third = claim(conn, limit=3), claim(conn, limit=3), claim(conn, limit=3)
    assert [len(first), len(second), len(third)] == [3, 3, 1]
    assert ids(first) + ids(second) + ids(third) == all_ids
    assert claim(conn, limit=3) == []
    counts = conn.execute("SELECT status::text, count(*) FROM tasks GROUP BY 1").fetchall()
    assert counts == [{"status": "processing", "count": 7}]


def test_claim_marks_processing_under_a_lease_on_the_database_clock(conn):
    task_id = insert_task(conn, "greet", {"name": "Ada"}, priority=2, max_attempts=4, timeout_seconds=17)
    run_at = task_row(conn, task_id)["run_at"]
    before = db_now(conn)
    [task] = claim(conn, worker_id="host:42", lease_seconds=12.5)
    after = db_now(conn)

    assert task == ClaimedTask(
        id=task_id,
        task_type="greet",
        queue="default",
        input={"name": "Ada"},
        attempt=1,
        max_attempts=4,
        timeout_seconds=17,
        priority=2,
        run_at=run_at,
    )
    row = task_row(conn, task_id)
    assert (row["status"], row["attempts"], row["worker_id"]) == ("processing", 1, "host:42")
    # Reserved, not started: started_at is set when a process begins running it.
    assert row["started_at"] is None
    lease = row["lease_expires_at"] - timedelta(seconds=12.5)
    assert before <= lease <= after
    assert row["finished_at"] is None
    assert row["progress"] is None


def test_a_start_mark_records_when_the_attempt_began_on_the_database_clock(conn):
    task_id = insert_task(conn)
    ref = claim_only(conn, task_id)
    before = db_now(conn)
    assert start(conn, "w1", ref, ago=2.5) == {task_id}
    after = db_now(conn)
    started_at = task_row(conn, task_id)["started_at"]
    assert before - timedelta(seconds=2.5) <= started_at <= after - timedelta(seconds=2.5)

    # A second mark (the writer retrying) keeps the first start, and still answers "held".
    assert start(conn, "w1", ref, ago=0) == {task_id}
    assert task_row(conn, task_id)["started_at"] == started_at
    # Only the holder's attempt can be marked.
    assert start(conn, "w2", ref) == set()
    assert start(conn, "w1", AttemptRef(task_id, 2)) == set()


def test_an_outcome_carries_the_start_of_a_short_task(conn):
    """A task that ends before its start was marked: the completion records both."""
    task_id = insert_task(conn)
    ref = claim_only(conn, task_id)
    written = task_complete_many(conn, worker_id="w1", results=[(ref, "1")], started_ago={ref: 0.75})
    assert written == {task_id}
    row = task_row(conn, task_id)
    assert row["finished_at"] - row["started_at"] == timedelta(seconds=0.75)
    [attempt] = task_attempts_list(conn, task_id)
    assert attempt["started_at"] == row["started_at"]


# --- concurrent claims -------------------------------------------------------------------------


@contextmanager
def guarded_connection(database_url: str, role: str):
    """A connection whose statements fail instead of hanging if they ever wait on a lock."""
    with connect(database_url, role=role) as c:
        c.execute("SET lock_timeout = '2s'")
        c.execute("SET statement_timeout = '10s'")
        yield c


def test_claim_skips_rows_an_uncommitted_claim_holds(database_url, conn):
    all_ids = insert_many(conn, 6)
    with (
        guarded_connection(database_url, "test-a") as a,
        guarded_connection(database_url, "test-b") as b,
        a.transaction(),
    ):
        held = ids(claim(a, worker_id="a", limit=4))
        assert held == all_ids[:4]
        # a has not committed: b still sees those rows as pending, but must skip, not wait.
        try:
            taken = ids(claim(b, worker_id="b", limit=10))
            assert claim(b, worker_id="b", limit=10) == []
        except psycopg.errors.LockNotAvailable:
            pytest.fail("task_claim waited for rows another transaction holds")
        assert taken == all_ids[4:]
        pending = conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'pending'").fetchone()
        assert pending["n"] == 4

    holders = {r["id"]: r["worker_id"] for r in conn.execute("SELECT id, worker_id FROM tasks")}
    assert holders == {i: "a" if i in held else "b" for i in all_ids}


def test_rows_of_a_rolled_back_claim_become_claimable(database_url, conn):
    all_ids = insert_many(conn, 3)
    with guarded_connection(database_url, "test-a") as a, guarded_connection(database_url, "test-b") as b:
        with a.transaction(force_rollback=True):
            assert ids(claim(a, worker_id="a", limit=2)) == all_ids[:2]
            assert ids(claim(b, worker_id="b")) == all_ids[2:]
        assert ids(claim(b, worker_id="b")) == all_ids[:2]
    assert {task_row(conn, i)["attempts"] for i in all_ids} == {1}


def test_claim_skips_a_pending_row_locked_by_someone_else(database_url, conn):
    locked, free = insert_many(conn, 2)
    with guarded_connection(database_url, "test-a") as a, guarded_connection(database_url, "test-b") as b:
        with a.transaction():
            # As task_cancel does while it runs.
            a.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (locked,))
            try:
                assert ids(claim(b, worker_id="b")) == [free]
            except psycopg.errors.LockNotAvailable:
                pytest.fail("task_claim waited for a row another transaction holds")
        assert ids(claim(b, worker_id="b")) == [locked]


def test_concurrent_claimers_take_every_task_exactly_once(database_url, conn):
    all_ids = insert_many(conn, 500)
    workers = [f"worker-{n}" for n in range(6)]
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(workers))

    def work(worker_id: str) -> None:
        try:
            with guarded_connection(database_url, worker_id) as c:
                mine: list[int] = []
                start.wait(timeout=10)
                while batch := claim(c, worker_id=worker_id, limit=7):
                    mine += ids(batch)
                    results = [(AttemptRef(t.id, t.attempt), f'{{"by": "{worker_id}"}}') for t in batch]
                    # A concurrent claim that raced for a row may hold its lock for a moment; the
                    # fenced write skips such rows (as the supervisor does, retry them).
                    for _ in range(100):
                        written = task_complete_many(c, worker_id=worker_id, results=results)
                        results = [(ref, r) for ref, r in results if ref.task_id not in written]
                        if not results:
                            break
                    assert results == [], "completions kept being skipped"
                claimed[worker_id] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a claimer hung"
    assert errors == []

    everything = [i for mine in claimed.values() for i in mine]
    assert len(everything) == len(set(everything)) == 500
    assert sorted(everything) == all_ids
    assert sum(1 for mine in claimed.values() if mine) >= 2, "the claims did not overlap at all"

    owner = {i: w for w, mine in claimed.items() for i in mine}
    rows = conn.execute(
        "SELECT id, status::text AS status, attempts, worker_id, result FROM tasks ORDER BY id"
    ).fetchall()
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in rows)
    assert all(r["worker_id"] == owner[r["id"]] == r["result"]["by"] for r in rows)
    per_task = conn.execute(
        "SELECT task_id, count(*) AS n FROM task_attempts GROUP BY task_id HAVING count(*) <> 1"
    ).fetchall()
    assert per_task == []
    assert conn.execute("SELECT count(*) AS n FROM task_attempts").fetchone()["n"] == 500


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


def backoff_seconds(conn, task_id: int) -> float:
    """How far the last failure pushed run_at, measured from that failure on the database clock."""
    row = task_row(conn, task_id)
    ended = task_attempts_list(conn, task_id)[-1]
    return (row["run_at"] - ended["finished_at"]).total_seconds()


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


# --- rescue of expired leases ------------------------------------------------------------------


def test_rescue_retries_or_fails_expired_leases_and_leaves_live_ones(conn):
    retried = insert_task(conn, max_attempts=3)
    exhausted = insert_task(conn, max_attempts=1)
    live = insert_task(conn)
    claim_only_first = claim(conn, worker_id="dead:1", limit=2)
    assert ids(claim_only_first) == [retried, exhausted]
    for task in claim_only_first:
        assert start(conn, "dead:1", AttemptRef(task.id, task.attempt)) == {task.id}
    claim_only(conn, live, worker_id="alive:2")
    expire_lease(conn, retried)
    expire_lease(conn, exhausted)
    live_before = raw_row(conn, live)

    assert rescue(conn) == {retried: "pending", exhausted: "failed"}

    row = task_row(conn, retried)
    assert (row["status"], row["attempts"], row["lease_expires_at"]) == ("pending", 1, None)
    assert "dead:1" in row["error"]
    base = BACKOFF["backoff_base"]
    assert base * 0.75 - 1e-6 <= backoff_seconds(conn, retried) <= base * 1.25 + 1e-6

    row = task_row(conn, exhausted)
    assert (row["status"], row["lease_expires_at"]) == ("failed", None)
    assert row["finished_at"] is not None
    assert "dead:1" in row["error"]

    for task_id in (retried, exhausted):
        assert history(conn, task_id) == [(1, "dead:1", "lost")]
        assert "dead:1" in task_attempts_list(conn, task_id)[0]["error"]

    assert raw_row(conn, live) == live_before
    assert history(conn, live) == []
    assert rescue(conn) == {}


def test_rescue_releases_a_task_that_never_started_without_counting_it(conn):
    """Claimed ahead (prefetched) by a worker whose lease lapsed before it started the task: the
    attempt was never used, so it is not charged; the task is due again at once."""
    task_id = insert_task(conn, max_attempts=1)
    before = task_row(conn, task_id)
    claim_only(conn, task_id, worker_id="dead:1")
    expire_lease(conn, task_id)

    [rescued] = task_rescue(conn, limit=10, grace_seconds=0.5, **BACKOFF)
    assert (rescued["id"], rescued["status"], rescued["outcome"]) == (task_id, "pending", "released")
    assert (rescued["task_type"], rescued["queue"]) == ("noop", "default")

    row = task_row(conn, task_id)
    assert (row["status"], row["attempts"], row["lease_expires_at"], row["started_at"]) == (
        "pending",
        0,
        None,
        None,
    )
    assert row["run_at"] == before["run_at"]  # due now, at the front of the queue
    assert row["error"] is None
    [released] = task_attempts_list(conn, task_id)
    assert (released["attempt"], released["outcome"], released["started_at"]) == (1, "released", None)
    assert "dead:1" in released["error"]
    # Its only attempt is still there to be used.
    ref = claim_and_start(conn, task_id, worker_id="w2")
    assert ref.attempt == 1
    assert complete(conn, "w2", ref) == {task_id}


def test_rescue_takes_at_most_limit_tasks(conn):
    all_ids = insert_many(conn, 3)
    claim(conn, worker_id="dead:1", limit=3)
    for task_id in all_ids:
        expire_lease(conn, task_id)
    assert rescue(conn, limit=2) == {all_ids[0]: "pending", all_ids[1]: "pending"}
    assert rescue(conn, limit=2) == {all_ids[2]: "pending"}


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


# --- dead workers (task_workers) -----------------------------------------------------------------


@contextmanager
def live_worker(database_url: str, conn, worker_id: str, **info):
    """A worker as worker.py registers itself: a session holding its advisory lock, and its row.
    Leaving the block ends the session, as the death of its process would."""
    lock_key = abs(hash(worker_id)) % (2**62)
    with connect(database_url, role="test-worker") as session:
        session.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
        pid = session.info.backend_pid
        register(conn, worker_id, lock_key, pid, **info)
        yield session
    # Closing returns before the server's backend has ended and freed its locks: wait for that,
    # as the next rescue round would (a worker's death is seen once its session is gone).
    wait_until(
        lambda: not conn.execute("SELECT FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
        message="the worker's session to end",
    )


def register(conn, worker_id: str, lock_key: int, session_pid: int, **info) -> None:
    task_worker_register(
        conn,
        worker_id=worker_id,
        lock_key=lock_key,
        session_pid=session_pid,
        host="test-host",
        pid=4242,
        version="test",
        queues=info.get("queues"),
        concurrency=info.get("concurrency", 2),
        lease_seconds=30,
        rescue_interval_seconds=info.get("rescue_interval_seconds", 5),
    )


def test_a_worker_whose_session_ended_has_its_tasks_rescued_before_their_leases_lapse(database_url, conn):
    ran, waited, other = insert_many(conn, 3)
    with live_worker(database_url, conn, "dead:1"):
        refs = {t.id: AttemptRef(t.id, t.attempt) for t in claim(conn, worker_id="dead:1", limit=2)}
        assert start(conn, "dead:1", refs[ran]) == {ran}
        assert task_workers_mark_gone(conn) == []  # alive: its session holds the lock
    with live_worker(database_url, conn, "alive:2") as alive:
        claim_only(conn, other, worker_id="alive:2")

        assert task_workers_mark_gone(conn) == ["dead:1"]
        assert rescue(conn, grace_seconds=3600) == {}  # not before the grace is over
        assert rescue(conn, grace_seconds=0) == {ran: "pending", waited: "pending"}

        assert [(a, o) for a, _, o in history(conn, ran)] == [(1, "lost")]
        assert "died" in task_attempts_list(conn, ran)[0]["error"]
        assert task_row(conn, ran)["attempts"] == 1
        assert [(a, o) for a, _, o in history(conn, waited)] == [(1, "released")]
        assert task_row(conn, waited)["attempts"] == 0
        assert task_row(conn, other)["status"] == "processing"  # the live worker keeps its task
        # Once it holds nothing, its row goes; the live worker's stays.
        assert task_workers_forget(conn, grace_seconds=0) == 1
        workers = conn.execute("SELECT worker_id, session_pid FROM task_workers").fetchall()
        assert workers == [{"worker_id": "alive:2", "session_pid": alive.info.backend_pid}]


def test_a_worker_that_reconnects_within_the_grace_keeps_its_tasks(database_url, conn):
    task_id = insert_task(conn)
    with live_worker(database_url, conn, "w1"):
        ref = claim_and_start(conn, task_id, worker_id="w1")
    assert task_workers_mark_gone(conn) == ["w1"]
    # Its connections were killed, not its process: it comes back with a new session and lock.
    with live_worker(database_url, conn, "w1") as session:
        assert rescue(conn, grace_seconds=0) == {}
        assert task_workers_mark_gone(conn) == []
        assert task_row(conn, task_id)["status"] == "processing"
        assert complete(conn, "w1", ref) == {task_id}
        gone_at = conn.execute("SELECT gone_at FROM task_workers WHERE worker_id = 'w1'").fetchone()
        assert gone_at == {"gone_at": None} and session.info.backend_pid


def test_sessions_older_than_a_server_restart_are_left_to_their_leases(database_url, conn):
    """After a restart every worker is reconnecting: a missing session proves nothing yet."""
    task_id = insert_task(conn)
    with live_worker(database_url, conn, "w1"):
        claim_and_start(conn, task_id, worker_id="w1")
    conn.execute("UPDATE task_workers SET connected_at = pg_postmaster_start_time() - interval '1 minute'")
    assert task_workers_mark_gone(conn) == ["w1"]
    assert rescue(conn, grace_seconds=0) == {}
    assert task_workers_forget(conn, grace_seconds=0) == 0  # it still holds a task
    expire_lease(conn, task_id)
    assert rescue(conn, grace_seconds=0) == {task_id: "pending"}
    assert "lease expired" in task_attempts_list(conn, task_id)[0]["error"]
    assert task_workers_forget(conn, grace_seconds=0) == 1


# --- cancel and retry --------------------------------------------------------------------------


def test_cancel_pending_task(database_url, conn):
    task_id = insert_task(conn)
    with listening(database_url, CANCEL_CHANNEL) as listener:
        row = task_cancel(conn, task_id)
        assert received(conn, listener) == [], "nobody runs a pending task: nothing to notify"
    assert row == task_get(conn, task_id)
    assert row["status"] == "cancelled" and row["finished_at"] is not None
    assert history(conn, task_id) == []
    assert claim(conn) == []


def test_cancel_processing_task_logs_the_attempt_and_notifies_its_worker(database_url, conn):
    task_id = insert_task(conn)
    claim_and_start(conn, task_id, worker_id="w1")
    with listening(database_url, CANCEL_CHANNEL) as listener:
        row = task_cancel(conn, task_id)
        assert received(conn, listener) == [(CANCEL_CHANNEL, str(task_id))]

    assert row == task_get(conn, task_id)  # no internal columns leak out
    assert row["status"] == "cancelled" and row["finished_at"] is not None
    assert row["attempts"] == 1
    assert raw_row(conn, task_id)["lease_expires_at"] is None
    assert history(conn, task_id) == [(1, "w1", "cancelled")]
    assert task_attempts_list(conn, task_id)[0]["error"]


def test_cancel_of_a_task_waiting_in_its_worker_does_not_count_an_attempt(database_url, conn):
    task_id = insert_task(conn)
    claim_only(conn, task_id, worker_id="w1")
    with listening(database_url, CANCEL_CHANNEL) as listener:
        row = task_cancel(conn, task_id)
        assert received(conn, listener) == [(CANCEL_CHANNEL, str(task_id))]  # drop it
    assert (row["status"], row["attempts"]) == ("cancelled", 0)
    assert history(conn, task_id) == [(1, "w1", "released")]
    assert "before it started" in task_attempts_list(conn, task_id)[0]["error"]


def _complete_one(conn, task_id):
    assert complete(conn, "w1", claim_only(conn, task_id)) == {task_id}


def _fail_one(conn, task_id):
    conn.execute("UPDATE tasks SET max_attempts = 1 WHERE id = %s", (task_id,))
    assert fail(conn, "w1", claim_only(conn, task_id)) == {task_id: "failed"}


def _cancel_one(conn, task_id):
    task_cancel(conn, task_id)


def _leave_pending(conn, task_id):
    pass


def _start_one(conn, task_id):
    claim_only(conn, task_id)


@pytest.mark.parametrize(
    ("action", "make_state", "state"),
    [
        (task_cancel, _complete_one, "completed"),
        (task_cancel, _fail_one, "failed"),
        (task_cancel, _cancel_one, "cancelled"),
        (task_retry, _leave_pending, "pending"),
        (task_retry, _start_one, "processing"),
        (task_retry, _complete_one, "completed"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__.strip("_"),
)
def test_cancel_and_retry_refuse_other_states(conn, action, make_state, state):
    task_id = insert_task(conn)
    make_state(conn, task_id)
    before = raw_row(conn, task_id)
    attempts_before = history(conn, task_id)

    with pytest.raises(InvalidTransition) as refused:
        action(conn, task_id)

    assert (refused.value.task_id, refused.value.status) == (task_id, state)
    assert raw_row(conn, task_id) == before
    assert history(conn, task_id) == attempts_before


@pytest.mark.parametrize("action", [task_cancel, task_retry], ids=lambda f: f.__name__)
def test_cancel_and_retry_of_unknown_task(conn, action):
    insert_task(conn)
    with pytest.raises(TaskNotFound) as missing:
        action(conn, 987654)
    assert missing.value.task_id == 987654


def test_retry_of_an_exhausted_task_grants_one_more_attempt(database_url, conn):
    task_id = insert_task(conn, max_attempts=1)
    assert fail(conn, "w1", claim_only(conn, task_id)) == {task_id: "failed"}
    before = db_now(conn)

    with listening(database_url, PENDING_CHANNEL) as listener:
        row = task_retry(conn, task_id)
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]

    assert row == task_get(conn, task_id)
    assert (row["status"], row["attempts"], row["max_attempts"]) == ("pending", 1, 2)
    assert row["finished_at"] is None
    assert before <= row["run_at"] <= db_now(conn)
    again = claim_only(conn, task_id, worker_id="w2")
    assert again.attempt == 2
    assert complete(conn, "w2", again) == {task_id}
    assert history(conn, task_id) == [(1, "w1", "failed"), (2, "w2", "completed")]


def test_retry_of_a_cancelled_task_keeps_its_attempt_budget(conn):
    task_id = insert_task(conn, max_attempts=3, delay_seconds=3600)
    task_cancel(conn, task_id)
    row = task_retry(conn, task_id)
    assert (row["status"], row["attempts"], row["max_attempts"]) == ("pending", 0, 3)
    assert claim_only(conn, task_id).attempt == 1, "a retried task is due now"


# --- notifications -----------------------------------------------------------------------------


def test_insert_trigger_notifies_once_per_statement(database_url, conn):
    # Postgres folds identical notifications of one transaction, so a per-row trigger would look
    # the same from a listener; the catalog tells them apart.
    [trigger] = conn.execute(
        "SELECT tgtype FROM pg_trigger WHERE tgrelid = 'tasks'::regclass AND NOT tgisinternal"
    ).fetchall()
    assert trigger["tgtype"] & 1 == 0, "tasks_notify_inserted must be FOR EACH STATEMENT"

    task_waiter_register(conn, worker_id="w-idle")
    with listening(database_url, PENDING_CHANNEL) as listener:
        insert_many(conn, 100)
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]

        insert_task(conn)
        insert_task(conn)
        assert received(conn, listener) == [(PENDING_CHANNEL, "")] * 2

        # Not from updates: claims and completions are not new work.
        [task] = claim(conn, limit=1)
        complete(conn, "w1", AttemptRef(task.id, task.attempt))
        assert received(conn, listener) == []


def test_inserts_notify_only_while_a_worker_waits(database_url, conn):
    with listening(database_url, PENDING_CHANNEL) as listener:
        insert_task(conn)
        assert received(conn, listener) == [], "nobody waits: no NOTIFY (and no global lock)"

        task_waiter_register(conn, worker_id="w1")
        task_waiter_register(conn, worker_id="w1")  # idempotent
        insert_task(conn)
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]

        task_waiter_unregister(conn, worker_id="w1")
        insert_many(conn, 10)
        assert received(conn, listener) == []
    assert conn.execute("SELECT count(*) AS n FROM task_waiters").fetchone()["n"] == 0


def test_a_worker_going_idle_misses_no_insert(database_url, conn):
    """The race the advisory key closes: an insert whose trigger ran before the worker registered
    (so it will not NOTIFY) is still uncommitted. Until it commits the worker is told "not
    settled" (claim again soon, do not wait); once settled, a claim sees the task."""
    with connect(database_url, role="test-inserter") as inserter:
        inserter.execute("BEGIN")
        early = insert_task(inserter)  # its trigger ran: no waiter then
        task_waiter_register(conn, worker_id="w1")
        assert task_waiters_settled(conn) is False
        assert claim(conn, worker_id="w1") == [], "not committed yet: invisible to the claim"
        inserter.execute("COMMIT")
    assert task_waiters_settled(conn) is True
    assert [t.id for t in claim(conn, worker_id="w1")] == [early]

    # Inserted after the registration: announced, whenever it commits.
    with listening(database_url, PENDING_CHANNEL) as listener:
        with connect(database_url, role="test-inserter") as inserter:
            inserter.execute("BEGIN")
            insert_task(inserter)
            inserter.execute("COMMIT")
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]


def test_inserts_outside_read_committed_always_notify(database_url, conn):
    """A REPEATABLE READ transaction reads an old snapshot: it could not see a worker that
    registered after it began, so it notifies whether or not anyone waits."""
    with listening(database_url, PENDING_CHANNEL) as listener:
        with connect(database_url, role="test-dba") as dba:
            dba.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            dba.execute("SELECT count(*) FROM tasks")  # the snapshot is taken here
            task_waiter_register(conn, worker_id="w1")
            insert_task(dba)
            dba.execute("COMMIT")
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]


def test_waiters_whose_session_is_gone_are_pruned(database_url, conn):
    with connect(database_url, role="test-worker") as worker_conn:
        task_waiter_register(worker_conn, worker_id="alive")
        with connect(database_url, role="test-worker") as crashed:
            task_waiter_register(crashed, worker_id="crashed")
        wait_until(lambda: task_waiters_prune_dead(conn) == 1, message="the dead session's row to go")
        rows = conn.execute("SELECT worker_id FROM task_waiters").fetchall()
        assert [r["worker_id"] for r in rows] == ["alive"]


# --- task_list ---------------------------------------------------------------------------------


def test_task_list_filters_newest_first(conn):
    a = insert_task(conn, "alpha", queue="q1")
    b = insert_task(conn, "beta", queue="q1")
    c = insert_task(conn, "alpha", queue="q2")
    d = insert_task(conn, "beta", queue="q2")
    e = insert_task(conn, "alpha", queue="q1")
    task_cancel(conn, b)
    task_cancel(conn, d)

    def listed(**filters) -> list[int]:
        return [r["id"] for r in task_list(conn, **filters)]

    assert listed() == [e, d, c, b, a]
    assert listed(status="cancelled") == [d, b]
    assert listed(status="pending", queue="q1") == [e, a]
    assert listed(task_type="alpha") == [e, c, a]
    assert listed(task_type="alpha", queue="q2") == [c]
    assert listed(task_type="beta", status="pending") == []
    assert listed(queue="nope") == []

    [row] = task_list(conn, task_type="beta", queue="q1")
    assert row == task_get(conn, b) and "input" not in row


def test_task_list_keyset_pagination(conn):
    all_ids = insert_many(conn, 11, task_type="alpha") + insert_many(conn, 3, task_type="beta")
    newest_first = sorted(all_ids, reverse=True)

    pages, before_id = [], None
    while page := task_list(conn, before_id=before_id, limit=4):
        pages.append([r["id"] for r in page])
        before_id = page[-1]["id"]
        if len(pages) == 1:
            insert_task(conn)  # a task submitted meanwhile does not shift later pages
    assert [len(p) for p in pages] == [4, 4, 4, 2]
    assert [i for p in pages for i in p] == newest_first

    alpha_pages, before_id = [], None
    while page := task_list(conn, task_type="alpha", before_id=before_id, limit=5):
        alpha_pages.append([r["id"] for r in page])
        before_id = page[-1]["id"]
    assert [i for p in alpha_pages for i in p] == sorted(all_ids[:11], reverse=True)
    assert [len(p) for p in alpha_pages] == [5, 5, 1]


# --- when the next scheduled task falls due ---------------------------------------------------


def test_next_due_is_the_earliest_scheduled_task_of_any_priority(conn):
    assert task_next_due_in(conn) is None  # empty queue
    insert_task(conn, "noop")  # due now: not scheduled
    assert task_next_due_in(conn) is None
    insert_task(conn, "noop", priority=5, delay_seconds=300)
    insert_task(conn, "noop", priority=-5, delay_seconds=40)  # lowest priority, earliest
    insert_task(conn, "noop", priority=0, delay_seconds=100)
    assert 39 < task_next_due_in(conn) <= 40


def test_next_due_ignores_tasks_that_are_not_pending(conn):
    scheduled = insert_task(conn, "noop", delay_seconds=30)
    later = insert_task(conn, "noop", delay_seconds=90)
    task_cancel(conn, scheduled)
    assert 89 < task_next_due_in(conn) <= 90
    task_cancel(conn, later)
    assert task_next_due_in(conn) is None


def test_next_due_sees_a_retry_in_backoff(conn):
    task_id = insert_task(conn, "noop")
    [claimed] = task_claim(conn, worker_id="w1", limit=1, lease_seconds=LEASE_SECONDS)
    task_fail_many(
        conn,
        worker_id="w1",
        failures=[AttemptFailure(task_id, claimed.attempt, "failed", "boom", None)],
        **BACKOFF,
    )
    row = task_row(conn, task_id)
    assert row["status"] == "pending"
    expected = conn.execute(
        "SELECT extract(epoch FROM %s - now())::float8 AS s", (row["run_at"],)
    ).fetchone()["s"]
    assert abs(task_next_due_in(conn) - expected) < 0.5


def test_retries_are_announced_only_while_a_worker_waits(database_url, conn):
    with listening(database_url, PENDING_CHANNEL) as listener:
        task_retries_announce(conn)
        assert received(conn, listener) == [], "nobody waits: no NOTIFY (and no global lock)"
        task_waiter_register(conn, worker_id="w1")
        task_retries_announce(conn)
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]
