"""Enqueue from the caller's own transaction (skiplock.enqueue): the task exists if and only if
that transaction commits, with the API's rules (types, bounds, defaults, owners, unique keys,
idempotency keys) and the same wake-up of idle workers, at commit."""

from __future__ import annotations

import psycopg
import pytest

from skiplock.enqueue import Enqueued, Enqueuer, IdempotencyKeyReused
from skiplock.sql.fragments import PENDING_CHANNEL
from skiplock.sql.workers import task_waiter_register
from skiplock.submission import BoundRefused, InputNotStorable, InputRefused, UnknownType
from tests.helpers import add_key, listening, received, row_count, task_row, wait_until


@pytest.fixture(scope="module")
def enqueuer() -> Enqueuer:
    return Enqueuer(("tests.sample_tasks",))


@pytest.fixture
def app_conn(database_url):
    """The application's own connection: psycopg's defaults (tuple rows, transactions)."""
    with psycopg.connect(database_url) as conn:
        yield conn


def test_the_task_exists_if_and_only_if_the_transaction_commits(enqueuer, app_conn, conn):
    with app_conn.transaction():
        kept = enqueuer.submit(app_conn, "greet", {"name": "Ada"})
        assert row_count(conn) == 0  # not before the commit
    with pytest.raises(RuntimeError, match="the order failed"), app_conn.transaction():
        enqueuer.submit(app_conn, "greet", {"name": "Bob"})
        raise RuntimeError("the order failed")

    assert row_count(conn) == 1
    row = task_row(conn, kept.id)
    assert (row["task_type"], row["input"], row["status"]) == ("greet", {"name": "Ada"}, "pending")
    # The type's defaults, as the API fills them (tests/sample_tasks.py: greet, 10 s, 2 attempts).
    assert (row["timeout_seconds"], row["max_attempts"], row["queue"], row["owner_key_id"]) == (
        10,
        2,
        "default",
        None,
    )
    assert row["turn"] is not None  # due now: runnable, as an API submit is
    # The caller's connection reads its rows as it did.
    assert app_conn.execute("SELECT 1").fetchone() == (1,)


def test_idle_workers_are_woken_at_the_commit_not_before(enqueuer, app_conn, conn, database_url):
    task_waiter_register(conn, worker_id="w-idle")
    with listening(database_url, PENDING_CHANNEL) as listener:
        with app_conn.transaction():
            enqueuer.submit(app_conn, "noop")
            enqueuer.submit_many(app_conn, [{"task_type": "noop"}] * 3)
            assert received(conn, listener) == []
        assert received(conn, listener) == [(PENDING_CHANNEL, "")]


def test_refusals_name_the_field_and_write_nothing(enqueuer, app_conn, conn):
    refused = [
        ({"task_type": "nope"}, UnknownType, "task_type"),
        ({"task_type": "greet", "task_input": {"name": ""}}, InputRefused, "task_input"),
        ({"task_type": "noop", "priority": 10**9}, BoundRefused, "priority"),
        ({"task_type": "noop", "queue": "no spaces"}, BoundRefused, "queue"),
        ({"task_type": "noop", "max_attempts": 0}, BoundRefused, "max_attempts"),
        ({"task_type": "noop", "unique_key": ""}, BoundRefused, "unique_key"),
        ({"task_type": "noop", "colour": "red"}, BoundRefused, "colour"),
        ({"task_type": "noop", "task_input": "\x00"}, InputNotStorable, "task_input"),
    ]
    with app_conn.transaction():
        for task, error, field in refused:
            with pytest.raises(error) as caught:
                enqueuer.submit_many(app_conn, [{"task_type": "noop"}, task])  # all or none
            assert caught.value.field == field, task
        # Refused before any statement: the caller's transaction goes on.
        enqueuer.submit(app_conn, "noop")
    assert row_count(conn) == 1
    with pytest.raises(BoundRefused, match="1 to 1000"):
        enqueuer.submit_many(app_conn, [])


def test_owner_unique_key_and_batch_order(enqueuer, app_conn, conn):
    owner = add_key(conn, "shop")
    with app_conn.transaction():
        first = enqueuer.submit(app_conn, "noop", 1, owner_key_id=owner, unique_key="receipt-42")
    with app_conn.transaction():
        again = enqueuer.submit(app_conn, "noop", 2, owner_key_id=owner, unique_key="receipt-42")
        batch = enqueuer.submit_many(
            app_conn,
            [{"task_type": "noop", "task_input": n, "priority": n} for n in range(5)],
            owner_key_id=owner,
        )
    # Another owner's key is its own.
    other = enqueuer.submit(app_conn, "noop", 3, unique_key="receipt-42")
    app_conn.commit()

    assert again == Enqueued(first.id, deduplicated=True)
    assert other.id != first.id and not other.deduplicated
    assert [task_row(conn, t.id)["input"] for t in batch] == list(range(5))
    assert {task_row(conn, t.id)["owner_key_id"] for t in [first, *batch]} == {owner}
    assert row_count(conn) == 7


def test_an_idempotency_key_replays_the_first_answer(enqueuer, app_conn, conn):
    tasks = [{"task_type": "noop", "task_input": n} for n in range(3)]
    first = enqueuer.submit_many(app_conn, tasks, idempotency_key="import-2026-12-05")
    app_conn.commit()
    again = enqueuer.submit_many(app_conn, tasks, idempotency_key="import-2026-12-05")
    with pytest.raises(IdempotencyKeyReused):
        enqueuer.submit_many(app_conn, tasks[:1], idempotency_key="import-2026-12-05")
    app_conn.rollback()

    assert [t.id for t in again] == [t.id for t in first] and all(t.replayed for t in again)
    assert row_count(conn) == 3


def test_an_autocommit_connection_makes_each_call_a_transaction(enqueuer, database_url, conn):
    with psycopg.connect(database_url, autocommit=True) as auto:
        one = enqueuer.submit(auto, "noop", idempotency_key="once")
        assert enqueuer.submit(auto, "noop", idempotency_key="once") == Enqueued(one.id, replayed=True)
        enqueuer.submit(
            auto, "noop", callback_url="http://127.0.0.1:9/hook", callback_secret="whsec_" + "A" * 32
        )
    assert row_count(conn) == 2


def test_a_worker_runs_what_was_enqueued(enqueuer, app_conn, conn, start_worker):
    start_worker()
    with app_conn.transaction():
        task = enqueuer.submit(app_conn, "greet", {"name": "Ada"})

    done = wait_until(lambda: (row := task_row(conn, task.id))["status"] == "completed" and row)
    assert done["result"] == {"greeting": "Hello, Ada!", "attempt": 1}
