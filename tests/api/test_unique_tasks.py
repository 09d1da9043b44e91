"""Unique tasks through the HTTP API (issue 16, point 4), through the real Flask app and a real
Postgres: a submit whose unique_key an unfinished task of the same owner has creates nothing and
answers that task (200, deduplicated: true), on all three submit endpoints and inside a batch;
the key is free again once its task is final; the index decides between concurrent submits; how
it differs from Idempotency-Key; and refused keys."""

from __future__ import annotations

import json
import threading
import time

import pytest

from skiplock.sql.fenced import AttemptRef, task_complete_many
from tests.helpers import (
    SUBMITS,
    WORKER,
    assert_error,
    complete_task,
    dig,
    fail_task,
    row_count,
    run_attempt,
    task_row,
)

SINGLE = ("/api/submit-task", "/api/tasks")


def body(url: str, unique_key: str | None = "report:42", **fields) -> dict:
    """A submit body for `url` (one task, or a batch of one) with this unique_key."""
    task = {"task_type": "noop", "task_input": {"n": 1}, **fields}
    if unique_key is not None:
        task["unique_key"] = unique_key
    return {"tasks": [task]} if url == "/api/tasks/batch" else task


def unfinished(conn, unique_key: str) -> list[int]:
    rows = conn.execute(
        "SELECT id FROM tasks WHERE unique_key = %s AND status IN ('pending', 'processing') ORDER BY id",
        (unique_key,),
    ).fetchall()
    return [r["id"] for r in rows]


@pytest.mark.parametrize("url", SINGLE)
def test_a_second_submit_with_the_key_answers_the_first_task_with_200(client, conn, url):
    first = client.post(url, json=body(url))
    assert first.status_code == 202, first.get_json()
    assert "deduplicated" not in first.get_json()  # a new task: the answer is as it always was
    task_id = first.get_json()["task_id"]

    again = client.post(url, json=body(url, task_input={"n": 2}, priority=7))
    assert again.status_code == 200, again.get_json()
    answer = again.get_json()
    assert (answer["task_id"], answer["deduplicated"], answer["status"]) == (task_id, True, "pending")
    assert row_count(conn) == 1
    assert task_row(conn, task_id)["input"] == {"n": 1}  # the first task, unchanged
    if url == "/api/submit-task":
        assert set(answer) == {"task_id", "status", "deduplicated"}
        assert again.headers["Location"] == f"/api/task-status/{task_id}"
    else:
        assert answer["task_type"] == "noop" and answer["priority"] == 0
        assert again.headers["Location"] == f"/api/tasks/{task_id}"


def test_every_endpoint_answers_the_same_task_for_the_same_key(client, conn):
    first = client.post("/api/submit-task", json=body("/api/submit-task")).get_json()["task_id"]
    rest = client.post("/api/tasks", json=body("/api/tasks"))
    batch = client.post("/api/tasks/batch", json=body("/api/tasks/batch"))
    assert (rest.status_code, rest.get_json()["task_id"]) == (200, first)
    assert batch.status_code == 202
    assert batch.get_json() == {"task_ids": [first], "status": "pending", "deduplicated": [True]}
    assert row_count(conn) == 1


def test_a_batch_answers_duplicates_within_itself_and_with_earlier_tasks(client, conn):
    earlier = client.post("/api/submit-task", json=body("/api/submit-task", "a")).get_json()["task_id"]
    keys = ["a", "b", None, "b", "c", None, "a"]
    response = client.post(
        "/api/tasks/batch",
        json={"tasks": [body("/api/tasks", key, task_input=i) for i, key in enumerate(keys)]},
    )
    assert response.status_code == 202, response.get_json()
    answer = response.get_json()
    ids, deduplicated = answer["task_ids"], answer["deduplicated"]
    assert deduplicated == [True, False, False, True, False, False, True]
    assert ids[0] == ids[6] == earlier
    assert ids[1] == ids[3]
    assert len({ids[1], ids[2], ids[4], ids[5], earlier}) == 5
    assert row_count(conn) == 5
    assert task_row(conn, ids[1])["input"] == 1  # the first of the batch with "b"


def test_a_batch_without_unique_keys_answers_no_duplicates(client):
    answer = client.post("/api/tasks/batch", json=SUBMITS["/api/tasks/batch"][0]).get_json()
    assert answer["deduplicated"] == [False, False, False]


def test_the_key_holds_in_retry_backoff_and_while_processing_and_frees_once_final(client, conn, subtests):
    url = "/api/submit-task"
    task_id = client.post(url, json=body(url, max_attempts=3)).get_json()["task_id"]

    with subtests.test("in retry backoff"):
        assert fail_task(conn, task_id) == "pending"
        again = client.post(url, json=body(url))
        assert (again.status_code, again.get_json()) == (
            200,
            {"task_id": task_id, "status": "pending", "deduplicated": True},
        )
    with subtests.test("processing"):
        time.sleep(0.05)  # the backoff (10 ms) is over
        attempt = run_attempt(conn, task_id)
        again = client.post(url, json=body(url))
        assert (again.status_code, again.get_json()["status"]) == (200, "processing")
    with subtests.test("completed: a new task"):
        ref = AttemptRef(task_id, attempt)
        assert task_complete_many(conn, worker_id=WORKER, results=[(ref, "null")]) == {task_id}
        fresh = client.post(url, json=body(url))
        assert fresh.status_code == 202
        assert fresh.get_json()["task_id"] != task_id
        assert unfinished(conn, "report:42") == [fresh.get_json()["task_id"]]


def test_a_delayed_task_holds_its_key(client, conn):
    url = "/api/tasks"
    task_id = client.post(url, json=body(url, delay_seconds=3600)).get_json()["task_id"]
    again = client.post(url, json=body(url))
    assert (again.status_code, again.get_json()["task_id"]) == (200, task_id)


def test_a_failed_or_cancelled_task_frees_its_key(client, conn, subtests):
    url = "/api/submit-task"
    with subtests.test("failed"):
        failed = client.post(url, json=body(url, "f", max_attempts=1)).get_json()["task_id"]
        assert fail_task(conn, failed) == "failed"
        assert client.post(url, json=body(url, "f")).status_code == 202
    with subtests.test("cancelled"):
        cancelled = client.post(url, json=body(url, "c")).get_json()["task_id"]
        assert client.post(f"/api/tasks/{cancelled}/cancel").status_code == 200
        assert client.post(url, json=body(url, "c")).status_code == 202


def test_retrying_a_task_whose_key_was_taken_again_is_409(client, conn):
    url = "/api/submit-task"
    old = client.post(url, json=body(url)).get_json()["task_id"]
    assert client.post(f"/api/tasks/{old}/cancel").status_code == 200
    new = client.post(url, json=body(url)).get_json()["task_id"]
    refused = client.post(f"/api/tasks/{old}/retry")
    answer = assert_error(refused, 409)
    assert answer["task_id"] == old
    assert task_row(conn, old)["status"] == "cancelled"
    assert unfinished(conn, "report:42") == [new]


def test_keys_are_scoped_to_their_owner(new_key, as_key, conn):
    alice, bob = as_key(new_key(name="alice")), as_key(new_key(name="bob"))
    url = "/api/submit-task"
    a = alice.post(url, json=body(url))
    b = bob.post(url, json=body(url))
    assert (a.status_code, b.status_code) == (202, 202)
    assert a.get_json()["task_id"] != b.get_json()["task_id"]
    # Bob's duplicate answers Bob's task, never Alice's.
    again = bob.post(url, json=body(url))
    assert (again.status_code, again.get_json()["task_id"]) == (200, b.get_json()["task_id"])
    assert row_count(conn) == 2


def test_twenty_concurrent_submits_with_one_key_make_one_task(app, conn):
    """The unique index decides, not a check-then-insert: every submit answers the one task."""
    assert app.test_client().get("/api/tasks").status_code == 200  # the app makes its pool, once
    barrier = threading.Barrier(20)
    answers: list[tuple[int, int, bool]] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        client = app.test_client()
        url = "/api/submit-task" if i % 3 == 0 else "/api/tasks" if i % 3 == 1 else "/api/tasks/batch"
        barrier.wait()
        response = client.post(url, json=body(url, "race", task_input=i))
        answer = response.get_json()
        with lock:
            if url == "/api/tasks/batch":
                answers.append((response.status_code, answer["task_ids"][0], answer["deduplicated"][0]))
            else:
                answers.append((response.status_code, answer["task_id"], answer.get("deduplicated", False)))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 20
    assert len(unfinished(conn, "race")) == 1
    assert row_count(conn) == 1
    (task_id,) = unfinished(conn, "race")
    assert {a[1] for a in answers} == {task_id}
    assert sum(not a[2] for a in answers) == 1  # exactly one created it
    assert all(status in (200, 202) for status, _, _ in answers)


def test_unique_key_is_not_idempotency_key(client, conn):
    """Idempotency-Key replays the answer to a request (even once the task is done); unique_key
    answers the unfinished task with the key (and, once it is final, makes a new one)."""
    url = "/api/submit-task"
    headers = {"Idempotency-Key": "req-1"}
    first = client.post(url, json=body(url), headers=headers)
    task_id = first.get_json()["task_id"]
    # The same key with the same request: the first answer, replayed, as it was (202).
    replay = client.post(url, json=body(url), headers=headers)
    assert (replay.status_code, replay.headers.get("Idempotent-Replayed")) == (202, "true")
    assert replay.get_json() == first.get_json()
    # Another request with the unique_key: the task, deduplicated, not replayed.
    other = client.post(url, json=body(url), headers={"Idempotency-Key": "req-2"})
    assert (other.status_code, other.get_json()["deduplicated"]) == (200, True)
    assert "Idempotent-Replayed" not in other.headers
    # A replay of that request answers it again as it was: 200, deduplicated.
    replayed = client.post(url, json=body(url), headers={"Idempotency-Key": "req-2"})
    assert (replayed.status_code, replayed.get_json()) == (200, other.get_json())

    complete_task(conn, task_id, None)
    assert client.post(url, json=body(url), headers=headers).get_json()["task_id"] == task_id  # replayed
    fresh = client.post(url, json=body(url))  # the key is free: a new task
    assert fresh.status_code == 202 and fresh.get_json()["task_id"] != task_id
    assert row_count(conn) == 2


def test_get_task_shows_the_scheduling_keys(client):
    url = "/api/tasks"
    task_id = client.post(
        url, json=body(url, "u", fairness_key="customer-7", concurrency_key="gpu")
    ).get_json()["task_id"]
    task = client.get(f"/api/tasks/{task_id}").get_json()
    assert (task["unique_key"], task["fairness_key"], task["concurrency_key"]) == ("u", "customer-7", "gpu")


@pytest.mark.parametrize("url", list(SUBMITS))
def test_bad_scheduling_keys_are_422_and_store_nothing(client, conn, subtests, url):
    for field in ("unique_key", "fairness_key", "concurrency_key"):
        for value in ("", "x" * 201, 5, None, ["a"], {"a": 1}):
            with subtests.test(field=field, value=value):
                task = {"task_type": "noop", "task_input": 1, field: value}
                response = client.post(url, json={"tasks": [task]} if url.endswith("batch") else task)
                errors = assert_error(response, 422)["errors"]
                path = ("json", "tasks", "0", field) if url.endswith("batch") else ("json", field)
                assert dig(errors, path)
    assert row_count(conn) == 0


def test_keys_of_200_characters_and_any_text_are_stored(client, conn):
    for value in ("x" * 200, "ünïcödé ✓ 😀", "a:b:c", "' OR 1=1 --"):
        response = client.post(
            "/api/tasks", json=body("/api/tasks", value, concurrency_key=value, fairness_key=value)
        )
        assert response.status_code == 202, response.get_json()
        row = task_row(conn, response.get_json()["task_id"])
        assert row["unique_key"] == row["concurrency_key"] == row["fairness_key"] == value


def test_skiplock_submit_takes_the_same_keys(client, conn, database_url):
    """`skiplock submit --unique-key` answers the API's task with the key (both have no owner)."""
    from click.testing import CliRunner

    from skiplock.cli import main

    def cli(*args: str):
        return CliRunner().invoke(main, list(args), env={"DATABASE_URL": database_url})

    task_id = client.post("/api/tasks", json=body("/api/tasks", "nightly")).get_json()["task_id"]
    again = cli("--json", "submit", "noop", "1", "--unique-key", "nightly", "--fairness-key", "f")
    assert again.exit_code == 0, again.output
    answer = json.loads(again.stdout)
    assert (answer["task_id"], answer["deduplicated"]) == (task_id, True)
    assert f"task {task_id} (unfinished) has unique key 'nightly': nothing submitted" in again.stderr
    fresh = cli("--json", "submit", "noop", "1", "--unique-key", "other", "--concurrency-key", "gpu")
    assert fresh.exit_code == 0, fresh.output
    row = task_row(conn, json.loads(fresh.stdout)["task_id"])
    assert (row["unique_key"], row["concurrency_key"]) == ("other", "gpu")
    assert "deduplicated" not in json.loads(fresh.stdout)
    for bad in ("", "x" * 201):
        refused = cli("submit", "noop", "1", "--unique-key", bad)
        assert refused.exit_code == 2 and "1 to 200 characters" in refused.output
    assert row_count(conn) == 2
