"""task_claim against a real Postgres: claim order (priority, then the fair rotation: turn, then
id) and filters, rows that need an admission first, the SKIP LOCKED race between connections,
and when the next scheduled task falls due (skiplock/sql/claim.py).

Times are compared on the database clock (now() of the statement that wrote them), never on the
test machine's."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest

from skiplock.db import connect
from skiplock.sql.claim import ClaimedTask, ClaimPosition, task_claim, task_claim_released, task_next_due_in
from skiplock.sql.fenced import AttemptFailure, AttemptRef, task_complete_many, task_fail_many
from skiplock.sql.fragments import PENDING_CHANNEL
from skiplock.sql.tasks import task_attempts_list, task_cancel
from skiplock.sql.workers import task_retries_announce, task_waiter_register
from tests.helpers import (
    BACKOFF,
    LEASE_SECONDS,
    admit,
    claim,
    claim_only,
    db_now,
    ids,
    insert_many,
    insert_task,
    listening,
    make_due,
    received,
    start,
    task_row,
)

# --- task_claim --------------------------------------------------------------------------------


def test_claim_order_is_priority_then_turn_then_id(conn):
    """Highest priority first; within a priority the fair rotation (turn), which for one owner is
    the order its tasks became due. A due task's run_at no longer orders it: a task submitted
    with an older run_at does not jump the ones already queued."""
    now = db_now(conn)

    def ago(minutes: int):
        return now - timedelta(minutes=minutes)

    negative = insert_task(conn, priority=-3, run_at=ago(60))
    low_old = insert_task(conn, priority=0, run_at=ago(30))
    high_first = insert_task(conn, priority=5, run_at=ago(1))
    tie_first = insert_task(conn, priority=1, run_at=ago(5))
    tie_second = insert_task(conn, priority=1, run_at=ago(5))
    high_older_run_at = insert_task(conn, priority=5, run_at=ago(10))
    expected = [high_first, high_older_run_at, tie_first, tie_second, low_old, negative]

    order = []
    while batch := claim(conn, limit=1):
        order += ids(batch)
    assert order == expected


def test_claim_order_within_a_priority_is_the_turn_then_the_id(conn):
    """The turn decides, whatever the ids (set by hand here, as admission would); equal turns go
    by id."""
    first, second, third, fourth = (insert_task(conn) for _ in range(4))
    turns = {first: 7.0, second: 2.0, third: 5.0, fourth: 5.0}
    for task_id, turn in turns.items():
        conn.execute("UPDATE tasks SET turn = %s WHERE id = %s", (turn, task_id))
    assert ids(claim(conn, limit=10)) == [second, third, fourth, first]


def test_claim_batches_take_the_head_of_the_queue_in_order(conn):
    now = db_now(conn)
    tasks = [
        insert_task(conn, priority=p, run_at=now - timedelta(seconds=s))
        for p, s in [(0, 50), (2, 10), (0, 90), (1, 5), (2, 40), (0, 70)]
    ]
    # Priority, then submit order (the turn): run_at plays no part once due.
    expected = [tasks[1], tasks[4], tasks[3], tasks[0], tasks[2], tasks[5]]
    assert ids(claim(conn, limit=4)) == expected[:4]
    assert ids(claim(conn, limit=4)) == expected[4:]
    assert claim(conn, limit=4) == []


def test_tasks_inserted_by_hand_wait_for_an_admission(conn):
    """A row a DBA inserts has no turn: not runnable (the claim's index does not hold it) until
    the workers' admission gives it one, in the order the rows fell due."""
    by_hand = insert_many(conn, 3)
    assert task_claim(conn, worker_id="w1", limit=10, lease_seconds=LEASE_SECONDS) == []
    assert {task_row(conn, i)["turn"] for i in by_hand} == {None}
    done = admit(conn)
    assert (done.promoted, done.admitted, done.expired) == (3, 0, 0)
    turns = [task_row(conn, i)["turn"] for i in by_hand]
    assert turns == sorted(turns) and len(set(turns)) == 3
    assert ids(task_claim(conn, worker_id="w1", limit=10, lease_seconds=LEASE_SECONDS)) == by_hand
    assert admit(conn).promoted == 0  # nothing left to admit


def test_a_task_set_back_to_pending_by_hand_is_admitted_again(conn):
    task_id = insert_task(conn)
    claim_only(conn, task_id)
    conn.execute(
        "UPDATE tasks SET status = 'pending', worker_id = NULL, lease_expires_at = NULL, turn = NULL "
        "WHERE id = %s",
        (task_id,),
    )
    assert task_claim(conn, worker_id="w1", limit=10, lease_seconds=LEASE_SECONDS) == []
    [again] = claim(conn)
    assert (again.id, again.attempt) == (task_id, 2)


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


def test_a_claim_from_a_position_takes_higher_priorities_then_its_priority_onwards(conn):
    """A worker deep in a backlog claims from where its previous claim began (ClaimPosition):
    higher priorities first, then its priority from that turn on. A task sorted before the
    position (here: set back to pending with an old turn, as a rescue does) is left for a claim
    from the start, which task_claim makes itself when the claim from the position comes up short."""
    insert_many(conn, 6)
    first_batch = claim(conn, limit=2)
    position = ClaimPosition(first_batch[0].priority, first_batch[0].turn)
    rest = ids(task_claim(conn, worker_id="peek", limit=10, lease_seconds=1))  # the 4 after them
    conn.execute(
        "UPDATE tasks SET status = 'pending', attempts = 0, worker_id = NULL, lease_expires_at = NULL "
        "WHERE worker_id = 'peek'"
    )
    behind = insert_task(conn, priority=0)
    conn.execute("UPDATE tasks SET turn = %s WHERE id = %s", (position.turn - 100, behind))
    urgent = insert_task(conn, priority=5)

    after = {None: position}  # a worker of every queue
    taken = task_claim(conn, worker_id="w1", limit=3, lease_seconds=30, after=after)
    assert ids(taken) == [urgent, *rest[:2]]
    # Short: the last two from the position, then a claim from the start finds the one behind it.
    taken = task_claim(conn, worker_id="w1", limit=5, lease_seconds=30, after=after)
    assert ids(taken) == [behind, *rest[2:]]
    assert task_claim(conn, worker_id="w1", limit=5, lease_seconds=30, after=after) == []


def test_a_worker_of_some_queues_claims_from_each_queues_position(conn):
    """Per queue: a queue with a position is claimed from it, one without from its start; a
    claim that comes up short takes the rest from the start."""
    behind, ahead = insert_task(conn, queue="q"), insert_task(conn, queue="q")
    other = insert_task(conn, queue="r")
    conn.execute("UPDATE tasks SET turn = turn - 100 WHERE id IN (%s, %s)", (behind, other))
    after = {"q": ClaimPosition(0, task_row(conn, ahead)["turn"])}
    take = {"worker_id": "w1", "lease_seconds": 30, "queues": ["q", "r"], "after": after}
    assert ids(task_claim(conn, limit=2, **take)) == [other, ahead]  # q's `behind` is before q's position
    assert ids(task_claim(conn, limit=1, **take)) == [behind]  # short from the positions: from the start


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
        turn=task_row(conn, task_id)["turn"],
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


def synchronous_commit(conn) -> str:
    return conn.execute("SELECT current_setting('synchronous_commit') AS s").fetchone()["s"]


@pytest.mark.parametrize("queues", [None, ["default"]], ids=["every queue", "some queues"])
def test_a_claim_commits_without_waiting_for_its_flush_and_only_its_own(conn, queues):
    """task_claim turns synchronous_commit off for its own transaction (a claim lost in a crash
    leaves its tasks pending, no attempt charged), and only when it claimed something; the
    session keeps its setting. task_claim_released, which runs in the writer's transaction with
    the results, leaves it on: those must be durable."""
    assert synchronous_commit(conn) == "on"
    with conn.transaction(force_rollback=True):
        assert task_claim(conn, worker_id="w1", limit=1, lease_seconds=LEASE_SECONDS, queues=queues) == []
        assert synchronous_commit(conn) == "on"  # nothing claimed, nothing to commit
    first, second = insert_task(conn), insert_task(conn)
    with conn.transaction(force_rollback=True):
        [got] = task_claim(conn, worker_id="w1", limit=1, lease_seconds=LEASE_SECONDS, queues=queues)
        assert got.id == first
        assert synchronous_commit(conn) == "off"
    assert synchronous_commit(conn) == "on"
    with conn.transaction(force_rollback=True):
        [got] = task_claim_released(
            conn, ids=[second], worker_id="w1", limit=1, lease_seconds=LEASE_SECONDS, queues=queues
        )
        assert got.id == second
        assert synchronous_commit(conn) == "on"


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
    admit(conn)  # runnable before the race (a's admission would hold its lock until a commits)
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
    admit(conn)
    with guarded_connection(database_url, "test-a") as a, guarded_connection(database_url, "test-b") as b:
        with a.transaction(force_rollback=True):
            assert ids(claim(a, worker_id="a", limit=2)) == all_ids[:2]
            assert ids(claim(b, worker_id="b")) == all_ids[2:]
        assert ids(claim(b, worker_id="b")) == all_ids[:2]
    assert {task_row(conn, i)["attempts"] for i in all_ids} == {1}


def test_claim_skips_a_pending_row_locked_by_someone_else(database_url, conn):
    locked, free = insert_many(conn, 2)
    admit(conn)
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
    admit(conn)  # all runnable: the race is between claims (their admissions find nothing)
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
