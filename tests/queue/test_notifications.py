"""The notifications the queue statements send (LISTEN/NOTIFY on a real Postgres): what each
statement announces, and to whom."""

from __future__ import annotations

from skiplock.db import connect
from skiplock.sql.fenced import AttemptRef
from skiplock.sql.fragments import PENDING_CHANNEL
from skiplock.sql.workers import (
    task_waiter_register,
    task_waiter_unregister,
    task_waiters_prune_dead,
    task_waiters_settled,
)
from tests.helpers import claim, complete, insert_many, insert_task, listening, received, wait_until

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
