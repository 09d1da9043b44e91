"""Expiry through the HTTP API (issue 16, point 5), through the real Flask app and a real Postgres:
expires_at / expires_in_seconds on every submit endpoint (stored on the database's clock, refused
with 422 when they leave the task no time to run), and an expired task as every endpoint shows
it: final, with no result (409 expired, like failed), retryable. Tasks expire by the workers'
admission, run here on a direct connection as a worker would run it."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from skiplock.submission import MAX_EXPIRES_IN_SECONDS
from tests.helpers import (
    CONFLICT_FIELDS,
    SUBMITS,
    admit,
    assert_error,
    dig,
    parse_time,
    row_count,
    task_row,
)


def submit_body(url: str, **fields) -> dict:
    task = {"task_type": "noop", "task_input": 1, **fields}
    return {"tasks": [task]} if url == "/api/tasks/batch" else task


def task_id_of(response) -> int:
    answer = response.get_json()
    return answer["task_ids"][0] if "task_ids" in answer else answer["task_id"]


def expire_now(conn, task_id: int) -> None:
    """Its deadline passes, and a worker's admission ends it."""
    conn.execute("UPDATE tasks SET expires_at = now() - interval '1 ms' WHERE id = %s", (task_id,))
    admit(conn)
    assert task_row(conn, task_id)["status"] == "expired"


@pytest.mark.parametrize("url", list(SUBMITS))
def test_expires_in_seconds_is_counted_from_the_databases_now(client, conn, url):
    response = client.post(url, json=submit_body(url, expires_in_seconds=90))
    assert response.status_code == 202, response.get_json()
    row = task_row(conn, task_id_of(response))
    assert row["expires_at"] - row["created_at"] == pytest.approx(
        timedelta(seconds=90), abs=timedelta(seconds=1)
    )


@pytest.mark.parametrize("url", list(SUBMITS))
def test_expires_at_is_stored_as_given(client, conn, url):
    deadline = datetime.now(UTC).replace(microsecond=123000) + timedelta(hours=2)
    offset = deadline.astimezone(UTC).astimezone(timezone_of("+05:30"))
    response = client.post(url, json=submit_body(url, expires_at=offset.isoformat()))
    assert response.status_code == 202, response.get_json()
    assert task_row(conn, task_id_of(response))["expires_at"] == deadline


def timezone_of(offset: str):
    return datetime.fromisoformat(f"2000-01-01T00:00:00{offset}").tzinfo


def test_get_task_shows_its_expiry(client):
    response = client.post("/api/tasks", json=submit_body("/api/tasks", expires_in_seconds=60))
    task = client.get(f"/api/tasks/{task_id_of(response)}").get_json()
    assert parse_time(task["expires_at"]) > datetime.now(UTC) + timedelta(seconds=50)


def test_an_expiry_after_the_delay_or_run_at_is_accepted(client, conn):
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    even_later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    for fields in (
        {"delay_seconds": 60, "expires_in_seconds": 61},
        {"run_at": later, "expires_at": even_later},
        {"run_at": "2000-01-01T00:00:00Z", "expires_in_seconds": 1},  # due long ago: now counts
        {"expires_in_seconds": MAX_EXPIRES_IN_SECONDS},
    ):
        response = client.post("/api/tasks", json=submit_body("/api/tasks", **fields))
        assert response.status_code == 202, (fields, response.get_json())
    assert row_count(conn) == 4


REFUSED = [
    ({"expires_at": "2030-01-01T00:00:00Z", "expires_in_seconds": 60}, "expires_in_seconds", "not both"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "in the future"),
    ({"expires_at": "2030-01-01T00:00:00"}, "expires_at", "aware"),  # no UTC offset
    ({"expires_at": "tomorrow"}, "expires_at", "datetime"),
    ({"expires_at": 1893456000}, "expires_at", "datetime"),
    ({"expires_in_seconds": 0}, "expires_in_seconds", "greater than or equal"),
    ({"expires_in_seconds": -5}, "expires_in_seconds", "greater than or equal"),
    ({"expires_in_seconds": MAX_EXPIRES_IN_SECONDS + 1}, "expires_in_seconds", "less than or equal"),
    ({"expires_in_seconds": "soon"}, "expires_in_seconds", "number"),
    ({"expires_in_seconds": True}, "expires_in_seconds", ""),
    ({"delay_seconds": 60, "expires_in_seconds": 60}, "expires_in_seconds", "after run_at or the delay"),
    ({"delay_seconds": 3600, "expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "in the future"),
    (
        {"run_at": "2099-01-01T00:00:00Z", "expires_at": "2098-12-31T23:59:59Z"},
        "expires_at",
        "after run_at or the delay",
    ),
]


@pytest.mark.parametrize("url", list(SUBMITS))
def test_an_expiry_that_leaves_no_time_to_run_is_422_and_stores_nothing(client, conn, subtests, url):
    for fields, field, words in REFUSED:
        with subtests.test(fields=fields):
            response = client.post(url, json=submit_body(url, **fields))
            errors = assert_error(response, 422)["errors"]
            path = ("json", "tasks", "0", field) if url.endswith("batch") else ("json", field)
            messages = dig(errors, path)
            assert isinstance(messages, list) and messages
            assert words.lower() in messages[0].lower(), messages
    assert row_count(conn) == 0


def test_one_bad_expiry_refuses_the_whole_batch(client, conn):
    tasks = [{"task_type": "noop", "task_input": i, "expires_in_seconds": 60} for i in range(3)]
    tasks[1]["expires_in_seconds"] = 0
    errors = assert_error(client.post("/api/tasks/batch", json={"tasks": tasks}), 422)["errors"]
    assert list(dig(errors, ("json", "tasks"))) == ["1"]
    assert row_count(conn) == 0


def test_the_documented_submit_bodies_forbid_both_expiries(client):
    spec = client.get("/openapi.json").get_json()
    rule = {"not": {"required": ["expires_at", "expires_in_seconds"]}}
    for name in ("SubmitTask", "RestSubmitTask", "SubmitTask.untyped", "SubmitTask.noop"):
        schema = spec["components"]["schemas"][name]
        assert rule in schema["allOf"], name
        assert {"expires_at", "expires_in_seconds"} <= set(schema["properties"]), name


# --- an expired task, as the endpoints show it --------------------------------------------------


def test_an_expired_task_is_final_with_no_result(client, conn, subtests):
    task_id = task_id_of(
        client.post("/api/submit-task", json=submit_body("/api/submit-task", expires_in_seconds=60))
    )
    expire_now(conn, task_id)

    with subtests.test("task-result: 409 expired, like failed"):
        response = client.get(f"/api/task-result/{task_id}")
        answer = assert_error(response, 409, status="expired")
        assert set(answer) == CONFLICT_FIELDS
        assert answer["task_id"] == task_id
        assert answer["error"].startswith("expired")
        assert "it has no result" in answer["message"]
        assert "Retry-After" not in response.headers  # final: asking again changes nothing
    with subtests.test("task-result?wait answers at once"):
        began = time.monotonic()
        assert client.get(f"/api/task-result/{task_id}?wait=5").status_code == 409
        assert time.monotonic() - began < 2
    with subtests.test("task-status and GET /api/tasks/{id}"):
        status = client.get(f"/api/task-status/{task_id}").get_json()
        assert (status["status"], status["result"]) == ("expired", None)
        assert status["error"].startswith("expired") and status["finished_at"] is not None
        task = client.get(f"/api/tasks/{task_id}").get_json()
        assert (task["status"], task["waiting_for"]) == ("expired", None)
    with subtests.test("listed by its status"):
        listed = client.get("/api/tasks?status=expired").get_json()["tasks"]
        assert [t["task_id"] for t in listed] == [task_id]
    with subtests.test("cancel: 409"):
        assert_error(client.post(f"/api/tasks/{task_id}/cancel"), 409, status="expired")


def test_a_waiting_client_hears_of_the_expiry(client, conn):
    task_id = task_id_of(client.post("/api/tasks", json=submit_body("/api/tasks", expires_in_seconds=60)))
    box = {}

    def wait():
        began = time.monotonic()
        box["response"] = client.get(f"/api/task-result/{task_id}?wait=20")
        box["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    time.sleep(0.5)  # the long-poll is waiting
    expire_now(conn, task_id)
    thread.join(15)
    assert not thread.is_alive(), "the long-poll did not answer"
    assert box["response"].status_code == 409
    assert box["response"].get_json()["status"] == "expired"
    assert box["seconds"] < 10


def test_retrying_an_expired_task_runs_it_without_its_deadline(client, conn):
    task_id = task_id_of(client.post("/api/tasks", json=submit_body("/api/tasks", expires_in_seconds=60)))
    expire_now(conn, task_id)
    retried = client.post(f"/api/tasks/{task_id}/retry")
    assert retried.status_code == 200, retried.get_json()
    assert retried.get_json()["status"] == "pending"
    assert task_row(conn, task_id)["expires_at"] is None
    admit(conn)
    assert task_row(conn, task_id)["status"] == "pending"  # not expired again


def test_skiplock_submit_takes_the_same_expiry_rules(conn, database_url, subtests):
    from click.testing import CliRunner

    from skiplock.cli import main

    def cli(*args: str):
        return CliRunner().invoke(
            main, ["--json", "submit", "noop", "1", *args], env={"DATABASE_URL": database_url}
        )

    with subtests.test("--expires-in"):
        done = cli("--expires-in", "90")
        assert done.exit_code == 0, done.output
        row = task_row(conn, json.loads(done.stdout)["task_id"])
        assert row["expires_at"] - row["created_at"] == pytest.approx(
            timedelta(seconds=90), abs=timedelta(seconds=1)
        )
    with subtests.test("--expires-at"):
        done = cli("--expires-at", "2099-01-01T00:00:00+01:00")
        assert done.exit_code == 0, done.output
        assert task_row(conn, json.loads(done.stdout)["task_id"])["expires_at"] == datetime(
            2098, 12, 31, 23, tzinfo=UTC
        )
    refused = [
        (("--expires-at", "2099-01-01T00:00:00"), 2, "UTC offset"),
        (("--expires-at", "tomorrow"), 2, "ISO 8601"),
        (("--expires-in", "0"), 2, "0<x"),
        (("--expires-in", "nan"), 2, "not a number"),
        (("--expires-at", "2001-01-01T00:00:00Z"), 1, "in the future"),
        (("--expires-in", "10", "--expires-at", "2099-01-01T00:00:00Z"), 1, "not both"),
        (("--delay", "60", "--expires-in", "30"), 1, "after run_at or the delay"),
    ]
    for args, code, words in refused:
        with subtests.test(args=args):
            result = cli(*args)
            assert result.exit_code == code, result.output
            assert words in result.output
    assert row_count(conn) == 2
