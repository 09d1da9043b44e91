"""The HTTP API through the real Flask app and a real Postgres (a fresh database per test).

Tasks are moved through processing, completed and failed with the queue's own functions
(skiplock.queries) on a direct connection, exactly as a worker would: no mocks anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from werkzeug.http import HTTP_STATUS_CODES

from api import create_app
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_progress_many,
    task_start_many,
)
from skiplock.sql.fragments import PENDING_CHANNEL
from skiplock.sql.operations import task_prune
from skiplock.sql.workers import task_waiter_register
from tests.conftest import insert_task, task_row

WORKER = "test-worker:1"
BIGINT_MAX = 2**63 - 1
SUBMIT_URLS = ("/api/submit-task", "/api/tasks")
STATUS_FIELDS = {
    "task_id", "status", "result", "error", "progress", "attempts", "max_attempts", "task_type",
    "queue", "priority", "timeout_seconds", "created_at", "run_at", "started_at", "finished_at",
}  # fmt: skip
UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/nowhere"
# 409 from task-result, cancel and retry: `status` is the task's status.
CONFLICT_FIELDS = {"code", "status", "message", "task_id", "error"}


# --- helpers -----------------------------------------------------------------------------------


def assert_error(response, code: int, status: str | None = None) -> dict:
    """The one error shape: JSON {code, status, message[, errors]}; never HTML, never a traceback."""
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code
    assert body["status"] == (status or HTTP_STATUS_CODES[code])
    assert isinstance(body["message"], str) and body["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "<html" not in text.lower()
    return body


def body_for(url: str, body: dict) -> dict:
    """The REST submits name their task type; the original /api/submit-task defaults it."""
    if url != "/api/submit-task" and "task_type" not in body:
        return {"task_type": "default", **body}
    return body


def raw_for(url: str, raw):
    """The same, for a raw JSON body that starts with task_input."""
    if url != "/api/submit-task" and isinstance(raw, str) and raw.startswith('{"task_input"'):
        return '{"task_type": "default", ' + raw[1:]
    return raw


def submit(client, task_input=None, url="/api/submit-task", **fields):
    response = client.post(url, json=body_for(url, {"task_input": task_input, **fields}))
    assert response.status_code == 202, response.get_json()
    return response


def submit_id(client, task_input=None, **fields) -> int:
    return submit(client, task_input, **fields).get_json()["task_id"]


def task_count(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"]


def claim(conn, task_id: int) -> int:
    """Take the next due task and start it, as a worker would; it must be `task_id`. Returns the
    attempt number."""
    claimed = task_claim(conn, worker_id=WORKER, limit=1, lease_seconds=60)
    assert [t.id for t in claimed] == [task_id]
    ref = AttemptRef(task_id, claimed[0].attempt)
    assert task_start_many(conn, worker_id=WORKER, started_ago={ref: 0}) == {task_id}
    return claimed[0].attempt


def complete(conn, task_id: int, result) -> None:
    attempt = claim(conn, task_id)
    done = task_complete_many(
        conn, worker_id=WORKER, results=[(AttemptRef(task_id, attempt), json.dumps(result))]
    )
    assert done == {task_id}


def fail(conn, task_id: int, error: str = "boom") -> str:
    """Run one attempt that fails; returns the task's new status (pending if attempts are left)."""
    attempt = claim(conn, task_id)
    ended = task_fail_many(
        conn,
        worker_id=WORKER,
        failures=[AttemptFailure(task_id, attempt, "failed", error, "Traceback: secret")],
        backoff_base=0.01,
        backoff_max=0.01,
    )
    return ended[task_id]


def dig(errors: dict, path: tuple[str, ...]):
    for key in path:
        assert isinstance(errors, dict) and key in errors, f"{path}: {errors}"
        errors = errors[key]
    return errors


def pick(mapping: dict, *keys: str) -> dict:
    return {key: mapping[key] for key in keys}


def nested(levels: int):
    """A JSON array nested `levels` deep."""
    value = 1
    for _ in range(levels):
        value = [value]
    return value


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed


@pytest.fixture
def make_client(settings):
    """make_client(**settings_overrides) -> a test client of another app; its pool closed after."""
    apps = []

    def make(**overrides):
        app = create_app(replace(settings, **overrides))
        app.config["TESTING"] = True
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["skiplock"].close()


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
    assert claim(conn, row["id"]) == 1  # due at once


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
    assert task_count(conn) == 1


# --- GET /api/task-status/{id} -----------------------------------------------------------------


def test_status_of_a_new_task(client):
    task_id = submit_id(client, {"name": "Ada"}, task_type="greet", queue="q1", priority=5)
    body = client.get(f"/api/task-status/{task_id}").get_json()
    assert set(body) == STATUS_FIELDS
    assert body["task_id"] == task_id
    assert pick(body, "status", "task_type", "queue", "priority") == {
        "status": "pending",
        "task_type": "greet",
        "queue": "q1",
        "priority": 5,
    }
    assert pick(body, "attempts", "max_attempts", "timeout_seconds") == {
        "attempts": 0,
        "max_attempts": 2,
        "timeout_seconds": 10,
    }
    for empty in ("result", "error", "progress", "started_at", "finished_at"):
        assert body[empty] is None, empty
    assert parse_time(body["run_at"]) == parse_time(body["created_at"])


def test_status_while_processing_shows_attempt_and_progress_but_no_result(client, conn):
    task_id = submit_id(client)
    attempt = claim(conn, task_id)
    task_progress_many(conn, worker_id=WORKER, progress=[(AttemptRef(task_id, attempt), 0.5)])
    body = client.get(f"/api/task-status/{task_id}").get_json()
    assert (body["status"], body["attempts"], body["progress"]) == ("processing", 1, 0.5)
    assert body["result"] is None and body["finished_at"] is None
    assert body["started_at"] is not None


def test_status_once_completed_has_the_result(client, conn):
    task_id = submit_id(client)
    complete(conn, task_id, {"answer": 42})
    body = client.get(f"/api/task-status/{task_id}").get_json()
    assert pick(body, "status", "result", "progress", "error") == {
        "status": "completed",
        "result": {"answer": 42},
        "progress": 1.0,
        "error": None,
    }
    assert parse_time(body["finished_at"]) >= parse_time(body["started_at"])


def test_status_after_a_failed_attempt_shows_the_error_but_never_the_traceback(client, conn):
    task_id = submit_id(client)
    assert fail(conn, task_id, "disk full") == "pending"
    response = client.get(f"/api/task-status/{task_id}")
    body = response.get_json()
    assert (body["status"], body["error"], body["attempts"]) == ("pending", "disk full", 1)
    assert "secret" not in response.get_data(as_text=True)


def test_status_of_a_task_failed_for_good(client, conn):
    task_id = submit_id(client, max_attempts=1)
    assert fail(conn, task_id, "bad input") == "failed"
    body = client.get(f"/api/task-status/{task_id}").get_json()
    assert (body["status"], body["error"], body["result"]) == ("failed", "bad input", None)
    assert body["finished_at"] is not None


def test_status_of_an_unknown_id_is_404(client, subtests):
    for task_id in ["1", str(BIGINT_MAX)]:
        with subtests.test(task_id=task_id):
            body = assert_error(client.get(f"/api/task-status/{task_id}"), 404)
            assert f"Task {task_id} does not exist" in body["message"]


def test_status_of_an_id_that_cannot_name_a_task_is_404_saying_why(client, subtests):
    """Not Werkzeug's generic page: the API's shape, and what a task id looks like."""
    cases = [str(BIGINT_MAX + 1), "99999999999999999999", "abc", "1.5", "-1", "0", "007", "%20", "%C3%A9"]
    for task_id in cases:
        for template in (
            "/api/task-status/{}",
            "/api/task-result/{}",
            "/api/tasks/{}",
            "/api/tasks/{}/cancel",
        ):
            url = template.format(task_id)
            with subtests.test(url=url):
                method = client.post if url.endswith("/cancel") else client.get
                body = assert_error(method(url), 404)
                assert "task ids are positive 64-bit integers" in body["message"]


# --- GET /api/task-result/{id} -----------------------------------------------------------------


def test_result_of_a_completed_task(client, conn):
    task_id = submit_id(client)
    complete(conn, task_id, [1, "two", {"three": 3}])
    response = client.get(f"/api/task-result/{task_id}")
    assert response.status_code == 200
    assert response.get_json() == {"task_id": task_id, "result": [1, "two", {"three": 3}]}


def test_result_null_is_a_result(client, conn):
    task_id = submit_id(client, task_type="noop")
    complete(conn, task_id, None)
    response = client.get(f"/api/task-result/{task_id}")
    assert response.status_code == 200
    assert response.get_json() == {"task_id": task_id, "result": None}


def test_result_of_a_pending_task_is_409_with_retry_after(client):
    task_id = submit_id(client)
    response = client.get(f"/api/task-result/{task_id}")
    body = assert_error(response, 409, status="pending")
    assert set(body) == CONFLICT_FIELDS
    assert body["task_id"] == task_id
    assert "error" in body and body["error"] is None
    assert response.headers["Retry-After"] == "1"


def test_result_retry_after_of_a_delayed_task_is_its_wait(client):
    task_id = submit_id(client, delay_seconds=120)
    response = client.get(f"/api/task-result/{task_id}")
    assert_error(response, 409, status="pending")
    assert 118 <= int(response.headers["Retry-After"]) <= 120


def test_result_retry_after_is_capped_at_an_hour(client):
    task_id = submit_id(client, delay_seconds=2 * 24 * 3600)
    assert client.get(f"/api/task-result/{task_id}").headers["Retry-After"] == "3600"


def test_result_of_a_processing_task_is_409_with_retry_after(client, conn):
    task_id = submit_id(client)
    claim(conn, task_id)
    response = client.get(f"/api/task-result/{task_id}")
    body = assert_error(response, 409, status="processing")
    assert body["error"] is None
    assert response.headers["Retry-After"] == "1"


def test_result_of_a_task_waiting_for_a_retry_carries_the_last_error(client, conn):
    task_id = submit_id(client)
    assert fail(conn, task_id, "timeout talking to S3") == "pending"
    response = client.get(f"/api/task-result/{task_id}")
    body = assert_error(response, 409, status="pending")
    assert body["error"] == "timeout talking to S3"
    assert int(response.headers["Retry-After"]) >= 1


def test_result_of_a_failed_task_is_409_with_the_error_and_no_retry_after(client, conn):
    task_id = submit_id(client, max_attempts=1)
    fail(conn, task_id, "division by zero")
    response = client.get(f"/api/task-result/{task_id}")
    body = assert_error(response, 409, status="failed")
    assert body["error"] == "division by zero"
    assert "Retry-After" not in response.headers


def test_result_of_a_cancelled_task_is_409_without_retry_after(client):
    task_id = submit_id(client)
    assert client.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    response = client.get(f"/api/task-result/{task_id}")
    body = assert_error(response, 409, status="cancelled")
    assert "error" in body
    assert "Retry-After" not in response.headers


def test_every_task_endpoint_answers_404_for_an_unknown_or_impossible_id(client, subtests):
    submit_id(client)  # task 1 exists; the others do not
    endpoints = [("get", "/api/task-result/{}"), ("get", "/api/tasks/{}"), ("get", "/api/tasks/{}/attempts")]
    endpoints += [("post", "/api/tasks/{}/cancel"), ("post", "/api/tasks/{}/retry")]
    for method, template in endpoints:
        for task_id in ["2", str(BIGINT_MAX), str(BIGINT_MAX + 1), "99999999999999999999", "abc", "-1"]:
            url = template.format(task_id)
            with subtests.test(method=method, url=url):
                assert_error(getattr(client, method)(url), 404)


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
    assert set(body) == STATUS_FIELDS | {"task_input"}
    assert body["task_input"] == {"limit": 1000}
    assert body["task_type"] == "primes"


# --- GET /api/tasks ----------------------------------------------------------------------------


def test_list_of_no_tasks(client):
    assert client.get("/api/tasks").get_json() == {"tasks": [], "next_before": None}


def test_list_is_newest_first_without_inputs(client):
    ids = [submit_id(client, {"secret": n}) for n in range(3)]
    body = client.get("/api/tasks").get_json()
    assert [t["task_id"] for t in body["tasks"]] == ids[::-1]
    assert body["next_before"] is None
    assert all(set(t) == STATUS_FIELDS for t in body["tasks"])


def test_list_pages_walk_every_task_once_in_descending_order(client, conn):
    ids = [insert_task(conn) for _ in range(23)]
    seen, pages, before = [], [], None
    while True:
        query = {"limit": 5} | ({"before": before} if before else {})
        body = client.get("/api/tasks", query_string=query).get_json()
        pages.append(len(body["tasks"]))
        seen += [t["task_id"] for t in body["tasks"]]
        before = body["next_before"]
        if before is None:
            break
        assert before == seen[-1]
    assert pages == [5, 5, 5, 5, 3]
    assert seen == sorted(ids, reverse=True)


def test_list_last_full_page_has_no_next_cursor(client, conn):
    ids = [insert_task(conn) for _ in range(10)]
    first = client.get("/api/tasks?limit=5").get_json()
    second = client.get(f"/api/tasks?limit=5&before={first['next_before']}").get_json()
    assert [t["task_id"] for t in second["tasks"]] == ids[4::-1]
    assert second["next_before"] is None


def test_list_default_limit_is_50(client, conn):
    for _ in range(51):
        insert_task(conn)
    body = client.get("/api/tasks").get_json()
    assert len(body["tasks"]) == 50
    assert body["next_before"] == body["tasks"][-1]["task_id"]


def test_list_before_skips_newer_tasks(client, conn):
    ids = [insert_task(conn) for _ in range(4)]
    body = client.get(f"/api/tasks?before={ids[2]}").get_json()
    assert [t["task_id"] for t in body["tasks"]] == [ids[1], ids[0]]


def test_list_filters_by_status_type_and_queue(client, conn):
    a = insert_task(conn, "noop", queue="q1")
    b = insert_task(conn, "greet", {"name": "x"}, queue="q1")
    c = insert_task(conn, "greet", {"name": "y"}, queue="q2")
    assert client.post(f"/api/tasks/{c}/cancel").status_code == 200

    def ids(query):
        response = client.get("/api/tasks", query_string=query)
        assert response.status_code == 200
        return [t["task_id"] for t in response.get_json()["tasks"]]

    assert ids({"status": "pending"}) == [b, a]
    assert ids({"status": "cancelled"}) == [c]
    assert ids({"status": "completed"}) == []
    assert ids({"task_type": "greet"}) == [c, b]
    assert ids({"queue": "q1"}) == [b, a]
    assert ids({"task_type": "greet", "queue": "q1", "status": "pending"}) == [b]
    assert ids({"task_type": "unknown"}) == []


def test_list_rejects_bad_query_arguments(client, subtests):
    cases = [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("before=0", "before"),
        (f"before={BIGINT_MAX + 1}", "before"),
        ("status=done", "status"),
        ("task_type=a%20b", "task_type"),
        ("queue=has%20space", "queue"),
    ]
    for query, field in cases:
        with subtests.test(query=query):
            body = assert_error(client.get(f"/api/tasks?{query}"), 422)
            assert field in body["errors"]["query"]


# --- GET /api/tasks/{id}/attempts --------------------------------------------------------------


def test_attempts_of_a_new_task_is_empty(client):
    task_id = submit_id(client)
    response = client.get(f"/api/tasks/{task_id}/attempts")
    assert response.status_code == 200
    assert response.get_json() == []


def test_attempts_list_every_ended_attempt_oldest_first(client, conn):
    task_id = submit_id(client)
    assert fail(conn, task_id, "flaky") == "pending"
    conn.execute("UPDATE tasks SET run_at = now() WHERE id = %s", (task_id,))  # skip the backoff
    complete(conn, task_id, "ok")
    attempts = client.get(f"/api/tasks/{task_id}/attempts").get_json()
    assert [(a["attempt"], a["outcome"], a["error"], a["worker_id"]) for a in attempts] == [
        (1, "failed", "flaky", WORKER),
        (2, "completed", None, WORKER),
    ]
    assert set(attempts[0]) == {"attempt", "worker_id", "outcome", "started_at", "finished_at", "error"}
    assert all(parse_time(a["finished_at"]) >= parse_time(a["started_at"]) for a in attempts)


# --- POST /api/tasks/{id}/cancel ---------------------------------------------------------------


def test_cancel_a_pending_task(client, conn):
    task_id = submit_id(client)
    response = client.post(f"/api/tasks/{task_id}/cancel")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["task_id"], body["status"]) == (task_id, "cancelled")
    assert body["finished_at"] is not None
    assert task_row(conn, task_id)["status"] == "cancelled"
    assert client.get(f"/api/tasks/{task_id}/attempts").get_json() == []
    assert task_claim(conn, worker_id=WORKER, limit=1, lease_seconds=60) == []


def test_cancel_a_processing_task_records_a_cancelled_attempt(client, conn):
    task_id = submit_id(client)
    attempt = claim(conn, task_id)
    response = client.post(f"/api/tasks/{task_id}/cancel")
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    row = task_row(conn, task_id)
    assert (row["status"], row["lease_expires_at"]) == ("cancelled", None)
    attempts = client.get(f"/api/tasks/{task_id}/attempts").get_json()
    assert [(a["attempt"], a["outcome"], a["worker_id"]) for a in attempts] == [(1, "cancelled", WORKER)]
    # The worker's late result is fenced out: the task stays cancelled.
    late = task_complete_many(conn, worker_id=WORKER, results=[(AttemptRef(task_id, attempt), "1")])
    assert late == set()
    assert_error(client.get(f"/api/task-result/{task_id}"), 409, status="cancelled")


def test_cancel_a_finished_task_is_409_and_changes_nothing(client, conn, subtests):
    completed = submit_id(client)
    complete(conn, completed, 1)
    failed = submit_id(client, max_attempts=1)
    fail(conn, failed)
    cancelled = submit_id(client)
    assert client.post(f"/api/tasks/{cancelled}/cancel").status_code == 200
    for task_id, status in [(completed, "completed"), (failed, "failed"), (cancelled, "cancelled")]:
        with subtests.test(status=status):
            before = task_row(conn, task_id)
            body = assert_error(client.post(f"/api/tasks/{task_id}/cancel"), 409, status=status)
            assert set(body) == CONFLICT_FIELDS  # the one 409 shape (task-result's)
            assert body["task_id"] == task_id
            assert task_row(conn, task_id) == before


# --- POST /api/tasks/{id}/retry ----------------------------------------------------------------


def test_retry_a_failed_task_grants_one_more_attempt(client, conn):
    task_id = submit_id(client, max_attempts=1)
    assert fail(conn, task_id, "boom") == "failed"
    response = client.post(f"/api/tasks/{task_id}/retry")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["attempts"], body["max_attempts"]) == ("pending", 1, 2)
    assert body["finished_at"] is None
    row = task_row(conn, task_id)
    assert (row["status"], row["max_attempts"]) == ("pending", 2)
    assert claim(conn, task_id) == 2  # due at once


def test_retry_a_cancelled_task_keeps_its_attempt_budget(client, conn):
    task_id = submit_id(client)
    assert client.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    body = client.post(f"/api/tasks/{task_id}/retry").get_json()
    assert (body["status"], body["attempts"], body["max_attempts"]) == ("pending", 0, 3)
    assert task_row(conn, task_id)["status"] == "pending"


def test_retry_a_task_cancelled_while_processing(client, conn):
    task_id = submit_id(client, max_attempts=1)
    claim(conn, task_id)
    assert client.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    body = client.post(f"/api/tasks/{task_id}/retry").get_json()
    assert (body["status"], body["attempts"], body["max_attempts"]) == ("pending", 1, 2)
    assert claim(conn, task_id) == 2


def test_retry_a_task_that_is_not_failed_or_cancelled_is_409(client, conn, subtests):
    processing = submit_id(client)
    claim(conn, processing)
    completed = submit_id(client)
    complete(conn, completed, 1)
    pending = submit_id(client)
    for task_id, status in [(pending, "pending"), (processing, "processing"), (completed, "completed")]:
        with subtests.test(status=status):
            before = task_row(conn, task_id)
            body = assert_error(client.post(f"/api/tasks/{task_id}/retry"), 409, status=status)
            assert set(body) == CONFLICT_FIELDS
            assert body["task_id"] == task_id
            assert task_row(conn, task_id) == before


# --- GET /api/task-types -----------------------------------------------------------------------


def task_types(client) -> dict[str, dict]:
    response = client.get("/api/task-types")
    assert response.status_code == 200
    return {t["name"]: t for t in response.get_json()}


def test_task_types_lists_builtin_and_custom_types(client):
    types = task_types(client)
    expected = {
        "default",
        "primes",
        "hash_chain",
        "noop",
        "sleep",
        "fail",
        "crash",
        "greet",
        "hang",
        "pid",
        "stamp",
    }
    assert expected <= set(types)
    for task in types.values():
        assert set(task) == {"name", "description", "timeout_seconds", "max_attempts", "input_schema"}
        assert isinstance(task["input_schema"], dict)
        assert task["description"]


def test_task_types_give_defaults_and_input_json_schema(client):
    types = task_types(client)
    greet = types["greet"]
    assert (greet["timeout_seconds"], greet["max_attempts"]) == (10, 2)
    assert greet["input_schema"]["type"] == "object"
    assert greet["input_schema"]["required"] == ["name"]
    assert greet["input_schema"]["properties"]["name"] == {"type": "string", "minLength": 1, "maxLength": 50}
    primes = types["primes"]["input_schema"]
    assert primes["required"] == ["limit"]
    assert primes["properties"]["limit"]["type"] == "integer"
    assert set(types["hash_chain"]["input_schema"]["required"]) == {"data", "rounds"}


def test_without_allow_crash_the_crash_type_is_gone_and_refused(make_client, conn):
    safe = make_client(allow_crash=False)
    assert "crash" not in task_types(safe)
    assert "TaskInput.crash" not in safe.get("/openapi.json").get_json()["components"]["schemas"]
    body = assert_error(safe.post("/api/submit-task", json={"task_input": None, "task_type": "crash"}), 422)
    assert "task_type" in body["errors"]["json"]
    assert task_count(conn) == 0


def test_apps_with_different_settings_keep_their_own_documents(client, make_client):
    make_client(allow_crash=False)
    assert "crash" in task_types(client)
    assert "TaskInput.crash" in client.get("/openapi.json").get_json()["components"]["schemas"]


def test_with_allow_crash_a_crash_task_can_be_submitted(client, conn):
    assert task_row(conn, submit_id(client, None, task_type="crash"))["task_type"] == "crash"


# --- OpenAPI, docs, probes ---------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_document_describes_every_endpoint(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "skiplock" and doc["info"]["version"]
    methods = {"get", "post", "put", "patch", "delete"}
    operations = {path: set(item) & methods for path, item in doc["paths"].items()}
    assert operations == {
        "/api/submit-task": {"post"},
        "/api/task-status/{task_id}": {"get"},
        "/api/task-result/{task_id}": {"get"},
        "/api/tasks": {"get", "post"},
        "/api/tasks/batch": {"post"},
        "/api/tasks/{task_id}": {"get"},
        "/api/tasks/{task_id}/attempts": {"get"},
        "/api/tasks/{task_id}/events": {"get"},
        "/api/tasks/{task_id}/webhooks": {"get"},
        "/api/webhooks/secret": {"get"},
        "/api/webhooks/{delivery_id}/resend": {"post"},
        "/api/tasks/{task_id}/cancel": {"post"},
        "/api/tasks/{task_id}/retry": {"post"},
        "/api/task-types": {"get"},
        "/api/keys": {"get", "post"},
        "/api/keys/{key_id}/revoke": {"post"},
        "/api/queues": {"get"},
        "/api/queues/{queue}/pause": {"post"},
        "/api/queues/{queue}/resume": {"post"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }
    for path, item in doc["paths"].items():
        for method in set(item) & methods:
            assert item[method]["responses"], f"{method} {path}"
            assert item[method]["summary"], f"{method} {path}"
    assert "409" in doc["paths"]["/api/task-result/{task_id}"]["get"]["responses"]
    assert "410" in doc["paths"]["/api/task-status/{task_id}"]["get"]["responses"]


def test_openapi_references_all_resolve(client):
    doc = client.get("/openapi.json").get_json()
    refs = set(_refs(doc))
    assert refs
    for ref in refs:
        assert ref.startswith("#/")
        target = doc
        for part in ref[2:].split("/"):
            assert part in target, ref
            target = target[part]


def test_openapi_has_an_input_schema_per_task_type(client):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    types = task_types(client)
    for name, task in types.items():
        assert schemas[f"TaskInput.{name}"] == task["input_schema"]
    assert {"SubmitTask", "Task", "TaskResult", "Error"} <= set(schemas)


def test_docs_page_and_its_static_files_are_served(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert "/docs/static/swagger-ui-bundle.js" in page.get_data(as_text=True)
    with client.get("/docs/static/swagger-ui-bundle.js") as bundle:
        assert bundle.status_code == 200
        assert "javascript" in bundle.mimetype
        assert b"SwaggerUIBundle" in bundle.get_data()


def test_health_and_readiness_probes(client):
    health = client.get("/healthz")
    assert (health.status_code, health.get_json()) == (200, {"status": "ok"})
    ready = client.get("/readyz")
    assert (ready.status_code, ready.get_json()) == (200, {"status": "ready"})


# --- bad input: a clear error, and nothing changes ---------------------------------------------


# (case, body, path under errors.json that names what is wrong)
INVALID_SUBMISSIONS = [
    ("no task_input", {}, ("task_input",)),
    ("unknown field", {"task_input": 1, "bogus": 1}, ("bogus",)),
    ("task_type not a string", {"task_input": 1, "task_type": 5}, ("task_type",)),
    ("task_type null", {"task_input": 1, "task_type": None}, ("task_type",)),
    ("unknown task_type", {"task_input": 1, "task_type": "nope"}, ("task_type",)),
    ("task_type too long", {"task_input": 1, "task_type": "x" * 101}, ("task_type",)),
    ("queue empty", {"task_input": 1, "queue": ""}, ("queue",)),
    ("queue with a space", {"task_input": 1, "queue": "has space"}, ("queue",)),
    ("queue not a string", {"task_input": 1, "queue": ["q"]}, ("queue",)),
    ("priority a word", {"task_input": 1, "priority": "high"}, ("priority",)),
    ("priority a numeric string", {"task_input": 1, "priority": "3"}, ("priority",)),
    ("priority fractional", {"task_input": 1, "priority": 1.5}, ("priority",)),
    ("priority boolean", {"task_input": 1, "priority": True}, ("priority",)),
    ("priority too high", {"task_input": 1, "priority": 1_000_001}, ("priority",)),
    ("priority too low", {"task_input": 1, "priority": -1_000_001}, ("priority",)),
    ("priority beyond bigint", {"task_input": 1, "priority": 2**63}, ("priority",)),
    ("max_attempts 0", {"task_input": 1, "max_attempts": 0}, ("max_attempts",)),
    ("max_attempts 101", {"task_input": 1, "max_attempts": 101}, ("max_attempts",)),
    ("max_attempts fractional", {"task_input": 1, "max_attempts": 2.5}, ("max_attempts",)),
    ("timeout_seconds 0", {"task_input": 1, "timeout_seconds": 0}, ("timeout_seconds",)),
    ("timeout_seconds over a week", {"task_input": 1, "timeout_seconds": 604_801}, ("timeout_seconds",)),
    ("delay_seconds negative", {"task_input": 1, "delay_seconds": -1}, ("delay_seconds",)),
    ("delay_seconds over a year", {"task_input": 1, "delay_seconds": 367 * 86400}, ("delay_seconds",)),
    ("delay_seconds a word", {"task_input": 1, "delay_seconds": "soon"}, ("delay_seconds",)),
    (
        "delay_seconds and run_at",
        {"task_input": 1, "delay_seconds": 5, "run_at": "2030-01-01T00:00:00+00:00"},
        ("delay_seconds",),
    ),
    ("run_at a word", {"task_input": 1, "run_at": "tomorrow"}, ("run_at",)),
    ("run_at without offset", {"task_input": 1, "run_at": "2030-01-01T00:00:00"}, ("run_at",)),
    ("run_at a number", {"task_input": 1, "run_at": 1893456000}, ("run_at",)),
    ("run_at before year 1 in UTC", {"task_input": 1, "run_at": "0001-01-01T00:00:00+14:00"}, ("run_at",)),
    ("run_at after 9999 in UTC", {"task_input": 1, "run_at": "9999-12-31T23:59:59-14:00"}, ("run_at",)),
    ("primes limit x", {"task_type": "primes", "task_input": {"limit": "x"}}, ("task_input", "limit")),
    ("primes limit missing", {"task_type": "primes", "task_input": {}}, ("task_input", "limit")),
    ("primes limit 1", {"task_type": "primes", "task_input": {"limit": 1}}, ("task_input", "limit")),
    ("primes input not an object", {"task_type": "primes", "task_input": 100}, ("task_input",)),
    ("primes input null", {"task_type": "primes", "task_input": None}, ("task_input",)),
    ("greet empty name", {"task_type": "greet", "task_input": {"name": ""}}, ("task_input", "name")),
    ("greet name too long", {"task_type": "greet", "task_input": {"name": "x" * 51}}, ("task_input", "name")),
    (
        "greet extra field",
        {"task_type": "greet", "task_input": {"name": "a", "age": 3}},
        ("task_input", "age"),
    ),
    (
        "hash_chain no rounds",
        {"task_type": "hash_chain", "task_input": {"data": "x"}},
        ("task_input", "rounds"),
    ),
    (
        "hash_chain unknown algorithm",
        {"task_type": "hash_chain", "task_input": {"data": "x", "rounds": 1, "algorithm": "md5"}},
        ("task_input", "algorithm"),
    ),
    ("sleep negative", {"task_type": "sleep", "task_input": {"seconds": -1}}, ("task_input", "seconds")),
    ("NUL in a string", {"task_input": "a\x00b"}, ("task_input",)),
    ("NUL in a key", {"task_input": {"k\x00": 1}}, ("task_input",)),
    ("NUL deep inside", {"task_input": [[{"deep": ["ok", "x\x00"]}]]}, ("task_input",)),
    ("NUL in a typed input", {"task_type": "greet", "task_input": {"name": "a\x00b"}}, ("task_input",)),
    ("nested 101 levels", {"task_input": nested(101)}, ("task_input",)),
    ("nested 600 levels", {"task_input": nested(600)}, ("task_input",)),
]


def test_invalid_submissions_are_422_naming_the_field_and_store_nothing(client, conn, subtests):
    insert_task(conn)
    for case, body, path in INVALID_SUBMISSIONS:
        for url in SUBMIT_URLS:
            with subtests.test(case=case, url=url):
                before = task_count(conn)
                error = assert_error(client.post(url, json=body_for(url, body)), 422)
                assert set(error) == {"code", "status", "message", "errors"}
                assert dig(error["errors"], ("json", *path))
                assert task_count(conn) == before


def test_unknown_task_type_error_names_the_known_types(client):
    error = assert_error(client.post("/api/submit-task", json={"task_input": 1, "task_type": "nope"}), 422)
    message = " ".join(error["errors"]["json"]["task_type"])
    assert "'nope'" in message and "greet" in message and "primes" in message


def post_raw(client, url: str, raw: str | bytes, content_type: str = "application/json"):
    return client.post(url, data=raw, content_type=content_type)


def test_json_postgres_cannot_store_is_422_and_stores_nothing(client, conn, subtests):
    cases = {
        "NaN": '{"task_input": NaN}',
        "Infinity": '{"task_input": [1, Infinity]}',
        "overflowing float": '{"task_input": 1e400}',
        "lone surrogate": '{"task_input": "\\ud800"}',
        "escaped NUL": '{"task_input": {"a": "\\u0000"}}',
    }
    for case, raw in cases.items():
        for url in SUBMIT_URLS:
            with subtests.test(case=case, url=url):
                before = task_count(conn)
                error = assert_error(post_raw(client, url, raw_for(url, raw)), 422)
                assert error["errors"]["json"]["task_input"]
                assert task_count(conn) == before


def test_malformed_json_is_400_and_stores_nothing(client, conn, subtests):
    cases = {
        "truncated": b'{"task_input": ',
        "single quotes": b"{'task_input': 1}",
        "trailing comma": b'{"task_input": 1,}',
        "invalid UTF-8": b'{"task_input": "\xff"}',
        "integer of 5000 digits": b'{"task_input": ' + b"9" * 5000 + b"}",
        "nested 100000 levels": b'{"task_input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }
    for case, raw in cases.items():
        for url in SUBMIT_URLS:
            with subtests.test(case=case, url=url):
                before = task_count(conn)
                error = assert_error(post_raw(client, url, raw), 400)
                assert error["errors"] == {"json": ["Invalid JSON body."]}
                assert task_count(conn) == before


def test_a_json_body_that_is_not_an_object_is_422(client, conn, subtests):
    for raw in ["[1]", '"task"', "5", "true", '[{"task_input": 1}]']:
        for url in SUBMIT_URLS:
            with subtests.test(body=raw, url=url):
                before = task_count(conn)
                error = assert_error(post_raw(client, url, raw), 422)
                assert error["errors"]["json"]
                assert task_count(conn) == before


def test_an_empty_body_is_422_missing_task_input(client, conn):
    error = assert_error(post_raw(client, "/api/submit-task", b""), 422)
    assert error["errors"]["json"]["task_input"]
    assert task_count(conn) == 0


def test_a_body_that_is_not_json_is_refused(client, conn):
    response = post_raw(client, "/api/submit-task", "task_input=1", "application/x-www-form-urlencoded")
    assert response.status_code in (415, 422)
    assert_error(response, response.status_code)
    assert task_count(conn) == 0


def test_a_body_over_the_default_limit_is_413(client, conn):
    body = json.dumps({"task_input": "x" * (1024 * 1024)})
    for url in SUBMIT_URLS:
        assert_error(post_raw(client, url, body), 413)
    assert task_count(conn) == 0


def test_a_body_over_a_configured_limit_is_413(make_client, conn):
    small = make_client(max_body_bytes=1000)
    assert_error(post_raw(small, "/api/submit-task", json.dumps({"task_input": "x" * 1000})), 413)
    assert task_count(conn) == 0


# --- one error shape everywhere ----------------------------------------------------------------


def test_unknown_route_is_404_json(client, subtests):
    for url in ["/nope", "/api", "/api/task-status", "/api/tasks/1/nope", "/docs/static/nope.js"]:
        with subtests.test(url=url):
            assert_error(client.get(url), 404)


def test_wrong_method_is_405_json_with_allow(client, subtests):
    cases = [
        ("get", "/api/submit-task", "POST"),
        ("put", "/api/tasks", "GET"),
        ("delete", "/api/tasks/1", "GET"),
        ("post", "/api/task-status/1", "GET"),
        ("get", "/api/tasks/1/cancel", "POST"),
        ("post", "/api/task-types", "GET"),
        ("post", "/healthz", "GET"),
    ]
    for method, url, allowed in cases:
        with subtests.test(method=method, url=url):
            response = getattr(client, method)(url)
            assert_error(response, 405)
            assert allowed in response.headers["Allow"].split(", ")


def test_an_unexpected_error_is_500_json_without_details(app):
    def boom():
        raise RuntimeError("secret detail: password=hunter2")

    app.add_url_rule("/boom", "boom", boom)
    response = app.test_client().get("/boom")
    assert_error(response, 500)
    assert "hunter2" not in response.get_data(as_text=True)
    assert "RuntimeError" not in response.get_data(as_text=True)


# --- the database ------------------------------------------------------------------------------


@pytest.fixture
def unreachable(make_client):
    return make_client(database_url=UNREACHABLE_DB, db_timeout_seconds=0.5)


def test_database_unreachable_is_a_quick_503_with_retry_after(unreachable, subtests):
    requests = [
        ("post", "/api/submit-task", {"task_input": 1}),
        ("post", "/api/tasks", {"task_type": "default", "task_input": 1}),
        ("get", "/api/task-status/1", None),
        ("get", "/api/task-result/1", None),
        ("get", "/api/tasks", None),
        ("post", "/api/tasks/1/cancel", None),
        ("get", "/readyz", None),
    ]
    for method, url, body in requests:
        with subtests.test(method=method, url=url):
            started = time.monotonic()
            response = getattr(unreachable, method)(url, json=body)
            assert time.monotonic() - started < 3
            assert_error(response, 503)
            assert int(response.headers["Retry-After"]) >= 1


def test_database_unreachable_leaves_probes_and_catalogue_up(unreachable):
    assert unreachable.get("/healthz").status_code == 200
    assert "greet" in task_types(unreachable)
    assert unreachable.get("/openapi.json").status_code == 200


def test_invalid_input_is_refused_before_touching_an_unreachable_database(unreachable):
    error = assert_error(unreachable.post("/api/submit-task", json={"task_input": 1, "priority": "x"}), 422)
    assert "priority" in error["errors"]["json"]


def test_requests_survive_the_database_dropping_pooled_connections(client, conn):
    assert client.get("/readyz").status_code == 200  # the pool now holds a connection
    killed = conn.execute(
        """
        SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) AS n FROM pg_stat_activity
        WHERE datname = current_database() AND application_name = 'skiplock-api'
        """
    ).fetchone()["n"]
    assert killed >= 1
    assert client.get("/readyz").status_code == 200
    submit_id(client)
    assert task_count(conn) == 1


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
            before = task_count(conn)
            body = assert_error(client.post("/api/tasks/batch", json={"tasks": tasks}), 422)
            assert dig(body["errors"]["json"], path), body
            assert task_count(conn) == before
    with subtests.test("not a list"):
        before = task_count(conn)
        assert_error(client.post("/api/tasks/batch", json={"tasks": {"task_input": 1}}), 422)
        assert_error(client.post("/api/tasks/batch", json=[good]), 422)
        assert task_count(conn) == before


# --- retention: pruned tasks are Gone ----------------------------------------------------------------


def test_a_pruned_task_answers_410_and_an_unissued_id_404(client, conn, subtests):
    task_id = submit_id(client, "soon gone")
    complete(conn, task_id, {"ok": True})
    conn.execute("UPDATE tasks SET finished_at = now() - interval '8 days' WHERE id = %s", (task_id,))
    assert task_prune(conn, older_than_seconds=7 * 24 * 3600, limit=10) == 1
    assert (
        conn.execute("SELECT count(*) AS n FROM task_attempts WHERE task_id = %s", (task_id,)).fetchone()["n"]
        == 0
    )
    for method, url in [
        ("get", f"/api/task-status/{task_id}"),
        ("get", f"/api/task-result/{task_id}"),
        ("get", f"/api/tasks/{task_id}"),
        ("get", f"/api/tasks/{task_id}/attempts"),
        ("post", f"/api/tasks/{task_id}/cancel"),
        ("post", f"/api/tasks/{task_id}/retry"),
    ]:
        with subtests.test(url=url):
            body = assert_error(getattr(client, method)(url), 410)
            assert "no longer exists" in body["message"]
    with subtests.test("never issued"):
        assert_error(client.get(f"/api/task-status/{task_id + 1000}"), 404)
