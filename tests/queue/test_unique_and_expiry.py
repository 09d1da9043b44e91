"""Unique tasks and expiry (issue 16, points 4 and 5), in the engine: tasks_unique_idx decides
between concurrent submits of one unique_key (one row, the others answered with its id), the key
is free again once its task is final; a pending task past its expires_at ends `expired` (a final
status) at the next admission, is never claimed meanwhile, a retry that would come after it
expires instead, and a client's retry of an expired task runs it again."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from skiplock.db import connect
from skiplock.errors import InvalidTransition, UniqueTaken
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import AttemptFailure, AttemptRef, task_fail_many
from skiplock.sql.inserts import NewTask, task_insert, task_insert_many
from skiplock.sql.operations import task_prune
from skiplock.sql.tasks import task_cancel, task_get, task_retry
from skiplock.sql.workers import task_rescue
from tests.helpers import (
    BACKOFF,
    LEASE_SECONDS,
    add_key,
    admit,
    claim,
    claim_and_start,
    claim_only,
    complete,
    db_now,
    expire_lease,
    history,
    ids,
    insert_task,
    make_due,
    task_row,
    wait_until,
)

SUBMITTERS = 20


def new(unique_key: str | None = None, **fields) -> NewTask:
    fields = {"task_type": "noop", "input_json": "null", "queue": "default", "priority": 0,
              "max_attempts": 3, "timeout_seconds": 30} | fields  # fmt: skip
    return NewTask(unique_key=unique_key, **fields)


# --- unique tasks ---------------------------------------------------------------------------------


def test_concurrent_submits_of_one_unique_key_make_exactly_one_task(database_url, conn):
    owner = add_key(conn)
    answers: list[dict] = []
    errors: list[BaseException] = []
    ready = threading.Barrier(SUBMITTERS)

    def submit(n: int) -> None:
        try:
            with connect(database_url, role=f"submitter-{n}") as c:
                ready.wait(timeout=10)
                answers.append(
                    task_insert(
                        c,
                        task_type="noop",
                        input={"n": n},
                        queue="default",
                        priority=0,
                        max_attempts=3,
                        timeout_seconds=30,
                        owner_key_id=owner,
                        unique_key="nightly-report",
                    )
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(n,), daemon=True) for n in range(SUBMITTERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    rows = conn.execute("SELECT id, input FROM tasks WHERE unique_key = 'nightly-report'").fetchall()
    assert len(rows) == 1
    [(winner, winner_input)] = [(r["id"], r["input"]) for r in rows]
    fresh = [a for a in answers if not a.get("deduplicated")]
    deduplicated = [a for a in answers if a.get("deduplicated")]
    assert len(answers) == SUBMITTERS
    assert len(fresh) == 1 and len(deduplicated) == SUBMITTERS - 1
    assert {a["id"] for a in answers} == {winner}
    assert fresh[0]["id"] == winner and winner_input["n"] in range(SUBMITTERS)


def test_a_unique_key_holds_while_the_task_is_unfinished_and_is_free_once_final(conn):
    owner = add_key(conn)

    def submit(**fields):
        return task_insert(conn, task_type="noop", input=None, queue="default", priority=0, max_attempts=3,
                           timeout_seconds=30, owner_key_id=owner, unique_key="sync", **fields)  # fmt: skip

    first = submit()
    assert "deduplicated" not in first
    assert submit(delay_seconds=60) == {**task_row_view(conn, first["id"]), "deduplicated": True}
    ref = claim_and_start(conn, first["id"])  # processing
    assert submit()["id"] == first["id"]
    task_fail_many(
        conn, worker_id="w1", failures=[AttemptFailure(first["id"], ref.attempt, "failed", "x")], **BACKOFF
    )
    assert task_row(conn, first["id"])["status"] == "pending"  # in retry backoff: still holds the key
    assert submit()["id"] == first["id"]
    make_due(conn, first["id"])
    complete(conn, "w1", claim_only(conn, first["id"]))
    second = submit()
    assert second["id"] != first["id"] and "deduplicated" not in second
    task_cancel(conn, second["id"])  # cancelled frees it too
    third = submit()
    assert third["id"] not in (first["id"], second["id"])


def task_row_view(conn, task_id: int) -> dict:
    """The task as task_insert answers it (the client's columns)."""
    return dict(task_get(conn, task_id))


def test_unique_keys_are_scoped_to_their_owner(conn):
    a, b = add_key(conn, "a"), add_key(conn, "b")
    [ta] = task_insert_many(conn, [new("k")], owner_key_id=a)
    [tb] = task_insert_many(conn, [new("k")], owner_key_id=b)
    [tn] = task_insert_many(conn, [new("k")], owner_key_id=None)
    assert len({ta.id, tb.id, tn.id}) == 3
    assert not (ta.deduplicated or tb.deduplicated or tn.deduplicated)
    [again] = task_insert_many(conn, [new("k")], owner_key_id=None)
    assert (again.id, again.deduplicated) == (tn.id, True)


def test_duplicates_within_a_batch_are_answered_with_the_first(conn):
    owner = add_key(conn)
    [existing] = task_insert_many(conn, [new("old")], owner_key_id=owner)
    answers = task_insert_many(
        conn, [new("a"), new("a"), new("b"), new(None), new("old"), new("a"), new(None)], owner_key_id=owner
    )
    a, a2, b, plain, old, a3, plain2 = answers
    assert (a.deduplicated, b.deduplicated, plain.deduplicated, plain2.deduplicated) == (False,) * 4
    assert (a2, a3) == (type(a)(a.id, True), type(a)(a.id, True))
    assert (old.id, old.deduplicated) == (existing.id, True)
    assert len({a.id, b.id, plain.id, plain2.id, existing.id}) == 5
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 5
    # Inserted in order: ids follow the batch.
    assert a.id < b.id < plain.id < plain2.id


def test_a_batch_whose_duplicate_finished_meanwhile_is_inserted_once(database_url, conn):
    """The race task_insert_many retries: a batch task is skipped for its unique_key, and the task
    holding the key finishes (another session's commit) before the batch looks it up. The batch
    is inserted again (the key is free now): the other tasks of the first round must not stay
    behind as well. A test trigger holds the batch's first INSERT (a sleep, once: a sequence is
    not rolled back) while this session cancels the holder."""
    owner = add_key(conn)
    [holder] = task_insert_many(conn, [new("report")], owner_key_id=owner)
    conn.execute(
        """
        CREATE SEQUENCE race_once;
        CREATE FUNCTION race_hold() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('race_once') = 1 THEN PERFORM pg_sleep(2); END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER race_hold AFTER INSERT ON tasks FOR EACH STATEMENT EXECUTE FUNCTION race_hold();
        """
    )
    answers: list = []

    def submit() -> None:
        with connect(database_url, role="batch") as c:
            answers.extend(task_insert_many(c, [new(None), new("report"), new(None)], owner_key_id=owner))

    batch = threading.Thread(target=submit)
    try:
        batch.start()
        # The trigger has begun its sleep once it has drawn from the sequence.
        wait_until(
            lambda: conn.execute("SELECT is_called FROM race_once").fetchone()["is_called"],
            message="the batch's first INSERT held by the trigger",
        )
        task_cancel(conn, holder.id)
        batch.join(timeout=20)
    finally:
        conn.execute("DROP TRIGGER race_hold ON tasks; DROP FUNCTION race_hold(); DROP SEQUENCE race_once")
    assert [a.deduplicated for a in answers] == [False, False, False]
    assert answers[1].id != holder.id
    rows = conn.execute(
        "SELECT id, status FROM tasks WHERE owner_key_id = %s ORDER BY id", (owner,)
    ).fetchall()
    # The holder (cancelled) and the batch's three tasks: nothing of the first round left over.
    assert [(r["id"], r["status"]) for r in rows] == [(holder.id, "cancelled")] + [
        (a.id, "pending") for a in answers
    ]


def test_a_retry_that_would_take_a_unique_key_twice_is_refused(conn):
    owner = add_key(conn)

    def submit():
        return task_insert(conn, task_type="noop", input=None, queue="default", priority=0, max_attempts=1,
                           timeout_seconds=30, owner_key_id=owner, unique_key="u")["id"]  # fmt: skip

    first = submit()
    task_cancel(conn, first)
    second = submit()
    with pytest.raises(UniqueTaken) as refused:
        task_retry(conn, first)
    assert refused.value.task_id == first
    assert task_row(conn, first)["status"] == "cancelled"
    task_cancel(conn, second)
    assert task_retry(conn, first)["status"] == "pending"


# --- expiry ---------------------------------------------------------------------------------------


def test_a_pending_task_past_its_expiry_is_never_claimed_and_expires_at_admission(conn):
    past = db_now(conn) - timedelta(seconds=1)
    doomed = insert_task(conn, expires_at=past, callback_url="https://example.com/hook")
    fine = insert_task(conn, expires_in_seconds=3600)
    # Runnable (it got a turn at submit), but the claim skips what has expired.
    assert task_row(conn, doomed)["turn"] is not None
    assert ids(task_claim(conn, worker_id="w1", limit=10, lease_seconds=LEASE_SECONDS)) == [fine]

    done = admit(conn)
    assert done.expired == 1
    row = task_row(conn, doomed)
    assert row["status"] == "expired"
    assert "expires_at" in row["error"] and row["finished_at"] is not None
    assert (row["turn"], row["waiting_on"], row["attempts"]) == (None, None, 0)
    assert history(conn, doomed) == []
    # Final: a webhook reports it, cancel refuses it, a claim never sees it.
    [hook] = conn.execute(
        "SELECT event, payload FROM webhook_deliveries WHERE task_id = %s", (doomed,)
    ).fetchall()
    assert hook["event"] == "task.expired" and hook["payload"]["data"]["status"] == "expired"
    with pytest.raises(InvalidTransition):
        task_cancel(conn, doomed)
    assert claim(conn) == []
    assert admit(conn).expired == 0


def test_a_scheduled_task_whose_run_at_comes_after_its_expiry_expires_unrun(conn):
    task_id = insert_task(conn, delay_seconds=3600, expires_in_seconds=1800)
    conn.execute(
        "UPDATE tasks SET run_at = now() - interval '1 second', expires_at = now() - interval '2 seconds' "
        "WHERE id = %s",
        (task_id,),
    )
    assert admit(conn).expired == 1
    assert task_row(conn, task_id)["status"] == "expired"


def test_a_failure_whose_retry_would_come_after_the_expiry_expires(conn):
    task_id = insert_task(conn, max_attempts=5, expires_in_seconds=5)  # backoff is 10 s or more
    ref = claim_and_start(conn, task_id)
    ended = task_fail_many(
        conn, worker_id="w1", failures=[AttemptFailure(task_id, ref.attempt, "failed", "boom")], **BACKOFF
    )
    assert ended == {task_id: "expired"}
    row = task_row(conn, task_id)
    assert row["status"] == "expired" and row["finished_at"] is not None
    assert (
        row["error"].startswith("expired: its retry would come after expires_at") and "boom" in row["error"]
    )
    assert history(conn, task_id) == [(1, "w1", "failed")]


def test_a_failure_with_time_left_before_its_expiry_is_retried(conn):
    task_id = insert_task(conn, max_attempts=5, expires_in_seconds=3600)
    ref = claim_and_start(conn, task_id)
    ended = task_fail_many(
        conn, worker_id="w1", failures=[AttemptFailure(task_id, ref.attempt, "failed", "boom")], **BACKOFF
    )
    assert ended == {task_id: "pending"}
    assert task_row(conn, task_id)["error"] == "boom"


def test_a_lost_attempt_whose_retry_would_come_after_the_expiry_expires(conn):
    task_id = insert_task(conn, max_attempts=5, expires_in_seconds=5)
    claim_and_start(conn, task_id)
    expire_lease(conn, task_id)
    [rescued] = task_rescue(conn, limit=10, grace_seconds=0.5, **BACKOFF)
    assert (rescued["id"], rescued["status"], rescued["outcome"]) == (task_id, "expired", "lost")
    assert task_row(conn, task_id)["status"] == "expired"


def test_retrying_an_expired_task_runs_it_again(conn):
    task_id = insert_task(conn, expires_at=db_now(conn) - timedelta(seconds=1))
    admit(conn)
    assert task_row(conn, task_id)["status"] == "expired"
    row = task_retry(conn, task_id)
    assert row["status"] == "pending"
    assert task_row(conn, task_id)["expires_at"] is None  # asked to run again: no deadline
    [task] = claim(conn)
    assert (task.id, task.attempt) == (task_id, 1)
    complete(conn, "w1", AttemptRef(task_id, 1))
    assert task_row(conn, task_id)["status"] == "completed"


def test_retention_prunes_expired_tasks_as_every_other_final_task(conn):
    """`expired` is final for retention too: task_prune deletes an expired task once it is older
    than the retention, as a completed or cancelled one, and leaves a pending one alone."""
    past = db_now(conn) - timedelta(seconds=1)
    expired = insert_task(conn, expires_at=past)
    cancelled = insert_task(conn)
    task_cancel(conn, cancelled)
    pending = insert_task(conn, run_at=db_now(conn) + timedelta(hours=1))
    assert admit(conn).expired == 1
    conn.execute("UPDATE tasks SET finished_at = now() - interval '8 days' WHERE finished_at IS NOT NULL")
    assert task_prune(conn, older_than_seconds=7 * 24 * 3600, limit=10) == 2
    left = conn.execute("SELECT id, status FROM tasks WHERE id = ANY(%s)", ([expired, cancelled, pending],))
    assert [(r["id"], r["status"]) for r in left] == [(pending, "pending")]
