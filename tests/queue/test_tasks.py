"""Steering and reading tasks against a real Postgres (skiplock/sql/tasks.py): cancel and retry,
and task_list pagination.

Times are compared on the database clock (now() of the statement that wrote them), never on the
test machine's."""

from __future__ import annotations

import re

import pytest

from skiplock import keys as key_admin
from skiplock.errors import InvalidTransition, TaskNotFound
from skiplock.sql.fragments import CANCEL_CHANNEL, PENDING_CHANNEL
from skiplock.sql.tasks import task_attempts_list, task_cancel, task_get, task_list, task_retry
from tests.helpers import (
    Explain,
    claim,
    claim_and_start,
    claim_only,
    complete,
    db_now,
    fail,
    history,
    indexes_used,
    insert_many,
    insert_task,
    listening,
    raw_row,
    received,
)

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


def test_a_clients_list_by_status_reads_only_its_tasks_of_that_status_in_any_plan(conn):
    """A client whose history is all completed asking for its failed (or pending) tasks: the
    statement reaches them through the partial index of that status, in the plan made for its
    parameters and in the generic plan a prepared statement may switch to (an "IS NULL OR"
    filter, or a status only a parameter names, would have walked the whole history)."""
    key = key_admin.create_key(conn, name="history")["id"]
    conn.execute(
        "INSERT INTO tasks (task_type, input, status, result, attempts, worker_id, owner_key_id, started_at, finished_at)"
        " SELECT 'noop', 'null', 'completed', 'null', 1, 'w1', %s, now(), now() FROM generate_series(1, 5000)",
        (key,),
    )
    cancelled = [insert_task(conn, owner_key_id=key) for _ in range(2)]
    for task_id in cancelled:
        task_cancel(conn, task_id)  # (cancelled: one of the statuses tasks_owner_ended_idx holds)
    pending = insert_task(conn, owner_key_id=key)
    conn.execute("ANALYZE tasks")
    assert [r["id"] for r in task_list(conn, owner=key, status="cancelled")] == cancelled[::-1]
    assert [r["id"] for r in task_list(conn, owner=key, status="pending")] == [pending]
    for status, index in (
        ("cancelled", "tasks_owner_ended_idx"),
        ("failed", "tasks_owner_ended_idx"),
        ("pending", "tasks_owner_unfinished_idx"),
    ):
        explain = Explain(conn)
        task_list(explain, owner=key, status=status)
        [custom] = explain.plans
        assert index in indexes_used(custom), custom
        every = {
            "owner": key,
            "status": status,
            "task_type": None,
            "queue": None,
            "before_id": None,
            "limit": 50,
        }
        assert index in indexes_used(generic_plan(conn, explain.statements[0], **every))


def generic_plan(conn, statement: str, **params) -> dict:
    """The plan Postgres makes for `statement` (psycopg's %(name)s placeholders) prepared and
    planned generically, whatever its parameters (plan_cache_mode = force_generic_plan)."""
    names: list[str] = []

    def placeholder(match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", placeholder, statement)
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE listed AS {text}")
        try:
            arguments = ", ".join(sql_literal(params[name]) for name in names)
            row = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE listed({arguments})").fetchone()
        finally:
            conn.execute("DEALLOCATE listed")
    return row["QUERY PLAN"][0]["Plan"]


def sql_literal(value) -> str:
    return (
        "NULL"
        if value is None
        else str(value)
        if isinstance(value, int)
        else "'" + str(value).replace("'", "''") + "'"
    )
