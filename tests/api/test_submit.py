"""Submitting through the HTTP API, through the real Flask app and a real Postgres (a fresh
database per test): POST /api/submit-task, POST /api/tasks and GET /api/tasks/{id}, POST
/api/tasks/batch."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from skiplock.sql.claim import task_claim
from skiplock.sql.fragments import PENDING_CHANNEL
from skiplock.sql.workers import task_waiter_register
from tests.helpers import (
    ORIGIN_FIELDS,
    SCHEDULING_FIELDS,
    STATUS_FIELDS,
    WORKER,
    assert_error,
    dig,
    nested,
    parse_time,
    pick,
    row_count,
    run_attempt,
    submit,
    submit_id,
    task_row,
)

# --- POST /api/submit-task ---------------------------------------------------------------------


def test_submit_answers_202_with_id_pending_status_and_location(client, conn):
    response = submit(client, {"text": "hello"})
    body = response.get_json()
    assert body == {"task_id": body["task_id"], "status": "pending"}
    assert isinstance(body["task_id"], int)
    assert response.headers["Location"] == f"/api/task-status/{body['task_id']}"
    followed = client.get(response.headers["Location"])
    assert followed.status_code == 200
    assert followed.get_json()["task_id"] == body["task_id"]
    assert task_row(conn, body["task_id"])["status"] == "pending"


def test_submit_stores_any_json_input_unchanged(client, conn, subtests):
    inputs = [None, 0, -1.5, True, "", "héllo ✓ 😀", [1, "a", None], {"nested": {"list": [{"deep": [1]}]}}]
    for task_input in inputs:
        with subtests.test(task_input=task_input):
            task_id = submit_id(client, task_input)
            assert task_row(conn, task_id)["input"] == task_input
            assert client.get(f"/api/tasks/{task_id}").get_json()["task_input"] == task_input


def test_submit_defaults_type_queue_priority_and_the_types_limits(client, conn):
    row = task_row(conn, submit_id(client, "x"))
    assert (row["task_type"], row["queue"], row["priority"]) == ("default", "default", 0)
    assert (row["max_attempts"], row["timeout_seconds"]) == (3, 60)  # the default type's
    assert row["run_at"] == row["created_at"]
    assert (row["attempts"], row["result"], row["error"], row["worker_id"]) == (0, None, None, None)


def test_submit_takes_attempts_and_timeout_defaults_from_the_task_type(client, conn, subtests):
    cases = [("greet", {"name": "Ada"}, 2, 10), ("primes", {"limit": 100}, 3, 600), ("hang", None, 1, 2)]
    for task_type, task_input, max_attempts, timeout_seconds in cases:
        with subtests.test(task_type=task_type):
            row = task_row(conn, submit_id(client, task_input, task_type=task_type))
            assert row["task_type"] == task_type
            assert (row["max_attempts"], row["timeout_seconds"]) == (max_attempts, timeout_seconds)


def test_submit_stores_explicit_queue_priority_attempts_and_timeout(client, conn):
    task_id = submit_id(
        client,
        {"name": "Bo"},
        task_type="greet",
        queue="emails.high:v1-b_2",
        priority=-1_000_000,
        max_attempts=100,
        timeout_seconds=7 * 24 * 3600,
    )
    row = task_row(conn, task_id)
    assert row["queue"] == "emails.high:v1-b_2"
    assert row["priority"] == -1_000_000
    assert (row["max_attempts"], row["timeout_seconds"]) == (100, 7 * 24 * 3600)


def test_submit_delay_pushes_run_at_back_from_creation(client, conn):
    row = task_row(conn, submit_id(client, 1, delay_seconds=90.5))
    assert row["run_at"] - row["created_at"] == timedelta(seconds=90.5)


def test_submit_run_at_is_stored_as_that_instant(client, conn):
    row = task_row(conn, submit_id(client, 1, run_at="2030-01-01T00:00:00+05:30"))
    assert row["run_at"] == datetime(2029, 12, 31, 18, 30, tzinfo=UTC)
    status = client.get(f"/api/task-status/{row['id']}").get_json()
    assert parse_time(status["run_at"]) == datetime(2029, 12, 31, 18, 30, tzinfo=UTC)


def test_submit_run_at_accepts_z_and_past_times(client, conn):
    row = task_row(conn, submit_id(client, 1, run_at="2000-01-01T00:00:00Z"))
    assert row["run_at"] == datetime(2000, 1, 1, tzinfo=UTC)
    assert run_attempt(conn, row["id"]) == 1  # due at once


def test_submit_a_delayed_task_is_not_claimable_yet(client, conn):
    submit_id(client, 1, delay_seconds=60)
    assert task_claim(conn, worker_id=WORKER, limit=10, lease_seconds=60) == []


def test_submit_accepts_input_nested_to_the_depth_limit(client, conn):
    assert task_row(conn, submit_id(client, nested(100)))["input"] == nested(100)


def test_submit_at_the_body_limit_is_accepted(make_client, conn):
    small = make_client(max_body_bytes=1000)
    body = json.dumps({"task_input": "x" * 900}).encode()
    assert len(body) < 1000
    response = small.post("/api/submit-task", data=body, content_type="application/json")
    assert response.status_code == 202
    assert row_count(conn) == 1


# --- POST /api/tasks, GET /api/tasks/{id} ------------------------------------------------------


def test_create_answers_202_with_the_stored_task_and_its_location(client, conn):
    response = submit(client, {"name": "Ada"}, url="/api/tasks", task_type="greet", priority=3)
    body = response.get_json()
    assert set(body) == STATUS_FIELDS
    assert pick(body, "status", "task_type", "priority", "max_attempts") == {
        "status": "pending",
        "task_type": "greet",
        "priority": 3,
        "max_attempts": 2,
    }
    assert response.headers["Location"] == f"/api/tasks/{body['task_id']}"
    assert task_row(conn, body["task_id"])["input"] == {"name": "Ada"}


def test_create_applies_the_same_options_as_submit(client, conn):
    task_id = submit(client, 1, url="/api/tasks", queue="bulk", delay_seconds=30).get_json()["task_id"]
    row = task_row(conn, task_id)
    assert row["queue"] == "bulk"
    assert row["run_at"] - row["created_at"] == timedelta(seconds=30)


def test_get_task_includes_its_input(client):
    task_id = submit_id(client, {"limit": 1000}, task_type="primes")
    body = client.get(f"/api/tasks/{task_id}").get_json()
    assert set(body) == STATUS_FIELDS | {"task_input"} | SCHEDULING_FIELDS | ORIGIN_FIELDS
    assert body["task_input"] == {"limit": 1000}
    assert body["task_type"] == "primes"


# --- POST /api/tasks/batch -------------------------------------------------------------------------


def test_batch_submit_stores_all_and_answers_ids_in_order(client, conn):
    tasks = [
        {"task_type": "default", "task_input": "first"},
        {"task_type": "primes", "task_input": {"limit": 10}, "priority": 7, "queue": "math"},
        {"task_type": "greet", "task_input": {"name": "Ada"}, "delay_seconds": 60},
        {"task_type": "default", "task_input": [1, 2, 3], "max_attempts": 9, "timeout_seconds": 5},
    ]
    response = client.post("/api/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 202, response.get_data(as_text=True)
    ids = response.get_json()["task_ids"]
    assert response.get_json()["status"] == "pending"
    assert len(ids) == 4 and ids == sorted(ids)
    rows = [task_row(conn, i) for i in ids]
    assert [r["input"] for r in rows] == ["first", {"limit": 10}, {"name": "Ada"}, [1, 2, 3]]
    assert [r["task_type"] for r in rows] == ["default", "primes", "greet", "default"]
    assert (rows[1]["priority"], rows[1]["queue"]) == (7, "math")
    assert (rows[2]["run_at"] - rows[2]["created_at"]).total_seconds() == pytest.approx(60, abs=0.01)
    assert (rows[2]["max_attempts"], rows[2]["timeout_seconds"]) == (2, 10)  # greet's defaults
    assert (rows[3]["max_attempts"], rows[3]["timeout_seconds"]) == (9, 5)


def test_batch_submit_of_a_thousand(client, conn):
    response = client.post(
        "/api/tasks/batch", json={"tasks": [{"task_type": "noop", "task_input": i} for i in range(1000)]}
    )
    assert response.status_code == 202
    ids = response.get_json()["task_ids"]
    assert len(set(ids)) == 1000
    assert [task_row(conn, i)["input"] for i in (ids[0], ids[500], ids[-1])] == [0, 500, 999]


def test_batch_submit_notifies_workers_once(client, conn):
    task_waiter_register(conn, worker_id="w-idle")  # a worker waits for work
    conn.execute(f"LISTEN {PENDING_CHANNEL}")
    response = client.post(
        "/api/tasks/batch", json={"tasks": [{"task_type": "noop", "task_input": i} for i in range(50)]}
    )
    assert response.status_code == 202
    conn.execute("SELECT 1")  # deliver what arrived
    assert len(list(conn.notifies(timeout=0.2))) == 1


def test_batch_submit_is_all_or_nothing(client, conn, subtests):
    good = {"task_type": "default", "task_input": "ok"}
    cases = {
        "one bad item": (
            [good, {"task_type": "primes", "task_input": {"limit": "x"}}, good],
            ("tasks", "1", "task_input"),
        ),
        "unknown type": ([good, good, {"task_type": "nope", "task_input": 1}], ("tasks", "2", "task_type")),
        "empty": ([], ("tasks",)),
        "too many": ([good] * 1001, ("tasks",)),
    }
    for name, (tasks, path) in cases.items():
        with subtests.test(name):
            before = row_count(conn)
            body = assert_error(client.post("/api/tasks/batch", json={"tasks": tasks}), 422)
            assert dig(body["errors"]["json"], path), body
            assert row_count(conn) == before
    with subtests.test("not a list"):
        before = row_count(conn)
        assert_error(client.post("/api/tasks/batch", json={"tasks": {"task_input": 1}}), 422)
        assert_error(client.post("/api/tasks/batch", json=[good]), 422)
        assert row_count(conn) == before
