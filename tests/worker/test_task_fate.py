"""A task decides its fate: NonRetryableError fails it for good, RetryAfter runs it again when it
asks (counted or not). Through a real worker.py, the API and the dashboard."""

from __future__ import annotations

import itertools
import math

import pytest

from skiplock import NonRetryableError, RetryAfter
from skiplock.task_exceptions import MAX_RETRY_DELAY_SECONDS
from tests.helpers import insert_task, task_row, wait_until

FATE_MODULES = ("tests.sample_tasks", "tests.fate_tasks")


def wait_final(conn, task_id: int, timeout: float = 30.0) -> dict:
    return wait_until(
        lambda: (row := task_row(conn, task_id))["status"] in ("completed", "failed", "expired") and row,
        timeout=timeout,
        message=f"task {task_id} to end",
    )


def history(conn, task_id: int) -> list[dict]:
    return conn.execute(
        "SELECT attempt, outcome::text AS outcome, started_at, finished_at, error FROM task_attempts "
        "WHERE task_id = %s ORDER BY id",
        (task_id,),
    ).fetchall()


def no_violations(conn, task_id: int) -> list[dict]:
    return conn.execute("SELECT * FROM task_invariant_violations WHERE task_id = %s", (task_id,)).fetchall()


@pytest.fixture
def fate_worker(worker_process):
    return worker_process(task_modules=FATE_MODULES, retry_backoff_base_seconds=30.0)


@pytest.fixture
def fate_client(make_app):
    return make_app(task_modules=FATE_MODULES).test_client()


def test_non_retryable_error_fails_the_task_for_good_with_its_message(conn, fate_worker, fate_client):
    task_id = insert_task(conn, "give_up", "cat.txt", max_attempts=5, callback_url="http://127.0.0.1:9/hook")

    row = wait_final(conn, task_id)

    assert row["status"] == "failed"
    assert (row["attempts"], row["max_attempts"]) == (1, 5)  # four attempts left, none used
    assert row["error"] == "NotAnImage: 'cat.txt' is not an image"
    assert "raise NotAnImage" in row["error_traceback"]
    assert [(a["attempt"], a["outcome"], a["error"]) for a in history(conn, task_id)] == [
        (1, "failed_for_good", "NotAnImage: 'cat.txt' is not an image")
    ]
    assert no_violations(conn, task_id) == []
    # The attempt history through the API, the final webhook's payload, the dashboard.
    attempts = fate_client.get(f"/api/tasks/{task_id}/attempts").get_json()
    assert [a["outcome"] for a in attempts] == ["failed_for_good"]
    hook = conn.execute(
        "SELECT event, payload FROM webhook_deliveries WHERE task_id = %s", (task_id,)
    ).fetchone()
    assert hook["event"] == "task.failed"
    assert hook["payload"]["data"]["error"] == "NotAnImage: 'cat.txt' is not an image"
    assert (hook["payload"]["data"]["attempts"], hook["payload"]["data"]["max_attempts"]) == (1, 5)
    page = fate_client.get(f"/dashboard/tasks/{task_id}").get_data(as_text=True)
    assert 'data-outcome="failed_for_good"' in page
    # A client may still retry it by hand: it is an ordinary failed task.
    retried = fate_client.post(f"/api/tasks/{task_id}/retry")
    assert retried.status_code == 200 and retried.get_json()["status"] == "pending"


def test_retry_after_not_charged_runs_again_when_asked_and_raises_max_attempts(conn, fate_worker):
    task_id = insert_task(conn, "come_back", {"seconds": 0.5, "times": 2}, max_attempts=1)

    row = wait_final(conn, task_id)

    assert row["status"] == "completed"
    # Two retries the task asked for did not count: the third attempt is the task's only one.
    assert row["result"] == {"attempt": 3, "max_attempts": 3}
    assert (row["attempts"], row["max_attempts"]) == (3, 3)
    runs = history(conn, task_id)
    assert [(a["attempt"], a["outcome"]) for a in runs] == [
        (1, "retry_requested"),
        (2, "retry_requested"),
        (3, "completed"),
    ]
    assert runs[0]["error"] == "RetryAfter: upstream rate limit (retry in 0.5 s, not counted)"
    # Not before the time it asked for (database clock), although the backoff would be 30 s.
    for before, after in itertools.pairwise(runs):
        gap = (after["started_at"] - before["finished_at"]).total_seconds()
        assert 0.5 <= gap < 30, gap
    assert no_violations(conn, task_id) == []


def test_retry_after_charged_counts_against_max_attempts(conn, fate_worker):
    task_id = insert_task(conn, "come_back", {"seconds": 0.2, "times": 10, "charge": True}, max_attempts=2)

    row = wait_final(conn, task_id)

    assert row["status"] == "failed"
    assert (row["attempts"], row["max_attempts"]) == (2, 2)
    assert row["error"] == "RetryAfter: upstream rate limit (retry in 0.2 s)"
    assert [a["outcome"] for a in history(conn, task_id)] == ["retry_requested", "retry_requested"]
    assert no_violations(conn, task_id) == []


def test_retry_after_its_expiry_expires_the_task(conn, fate_worker):
    task_id = insert_task(
        conn, "come_back", {"seconds": 3600, "times": 1}, max_attempts=3, expires_in_seconds=600
    )

    row = wait_final(conn, task_id)

    assert row["status"] == "expired"
    assert row["error"].startswith("expired: its retry would come after expires_at; last error: RetryAfter")
    assert [a["outcome"] for a in history(conn, task_id)] == ["retry_requested"]


def test_retry_after_refuses_a_delay_out_of_range():
    for bad in (-1, MAX_RETRY_DELAY_SECONDS + 1, math.nan):
        with pytest.raises(ValueError, match="between 0 and"):
            RetryAfter(bad)
    assert RetryAfter(0).seconds == 0.0
    assert issubclass(NonRetryableError, Exception) and not issubclass(RetryAfter, NonRetryableError)
