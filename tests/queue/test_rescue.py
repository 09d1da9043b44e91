"""Rescue against a real Postgres (skiplock/sql/workers.py): expired leases come back, and the
tasks of a worker whose session ended are rescued without waiting for their leases.

Times are compared on the database clock (now() of the statement that wrote them), never on the
test machine's."""

from __future__ import annotations

import time
from contextlib import contextmanager

from skiplock.db import connect
from skiplock.sql.fenced import AttemptRef
from skiplock.sql.tasks import task_attempts_list
from skiplock.sql.workers import (
    task_rescue,
    task_worker_register,
    task_workers_forget,
    task_workers_mark_gone,
)
from tests.helpers import (
    BACKOFF,
    backoff_seconds,
    claim,
    claim_and_start,
    claim_only,
    complete,
    expire_lease,
    history,
    ids,
    insert_many,
    insert_task,
    raw_row,
    rescue,
    start,
    task_row,
)
from tests.live_workers import wait_until_locks_freed

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
    wait_until_locks_freed(conn, pid)


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


def test_a_rescuer_back_from_a_lost_session_waits_out_the_others_backoff(database_url, conn, settings):
    """Whatever cut a worker off (a pooler's restart) may have cut the others too: a rescuer that
    just got its own session back gives a worker whose session ended a reconnect backoff (and a
    connect) more than the grace; once that has passed, the grace alone."""
    from skiplock.worker.duties.rescuer import Rescuer

    task_id = insert_task(conn)
    with live_worker(database_url, conn, "w1"):
        claim_and_start(conn, task_id, worker_id="w1")
    back = Rescuer(settings)
    reconnected_at = time.monotonic()
    back.reconnected(reconnected_at)
    assert back.run_if_due(conn, time.monotonic()) == []  # it marks w1 gone, and waits
    time.sleep(settings.dead_worker_grace_seconds + 0.1)
    back.soon()
    assert back.run_if_due(conn, time.monotonic()) == []  # past the grace: still waiting
    assert task_row(conn, task_id)["status"] == "processing"
    back.soon()
    later = reconnected_at + back.patience_seconds() + 0.01  # the others have had their chance
    assert [r["id"] for r in back.run_if_due(conn, later)] == [task_id]
