"""Reading and steering tasks through the HTTP API, through the real Flask app and a real Postgres
(a fresh database per test): status, result, the task list, attempts, cancel and retry, and
pruned tasks (410 Gone).

Tasks are moved through processing, completed and failed with the queue's own functions
(skiplock/sql) on a direct connection, exactly as a worker would: no mocks anywhere."""

from __future__ import annotations

from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_progress_many,
)
from skiplock.sql.limits import limit_put
from skiplock.sql.operations import task_prune
from skiplock.sql.waiting_for import MAX_TASKS_AHEAD, task_waiting_for
from tests.helpers import (
    BACKOFF,
    BIGINT_MAX,
    CONFLICT_FIELDS,
    STATUS_FIELDS,
    WORKER,
    Explain,
    admit,
    assert_error,
    complete_task,
    fail_task,
    indexes_used,
    insert_many,
    insert_task,
    parse_time,
    pick,
    run_attempt,
    seq_scanned,
    submit_id,
    task_row,
)

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
    attempt = run_attempt(conn, task_id)
    task_progress_many(conn, worker_id=WORKER, progress=[(AttemptRef(task_id, attempt), 0.5)])
    body = client.get(f"/api/task-status/{task_id}").get_json()
    assert (body["status"], body["attempts"], body["progress"]) == ("processing", 1, 0.5)
    assert body["result"] is None and body["finished_at"] is None
    assert body["started_at"] is not None


def test_status_once_completed_has_the_result(client, conn):
    task_id = submit_id(client)
    complete_task(conn, task_id, {"answer": 42})
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
    assert fail_task(conn, task_id, "disk full") == "pending"
    response = client.get(f"/api/task-status/{task_id}")
    body = response.get_json()
    assert (body["status"], body["error"], body["attempts"]) == ("pending", "disk full", 1)
    assert "secret" not in response.get_data(as_text=True)


def test_status_of_a_task_failed_for_good(client, conn):
    task_id = submit_id(client, max_attempts=1)
    assert fail_task(conn, task_id, "bad input") == "failed"
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
    complete_task(conn, task_id, [1, "two", {"three": 3}])
    response = client.get(f"/api/task-result/{task_id}")
    assert response.status_code == 200
    assert response.get_json() == {"task_id": task_id, "result": [1, "two", {"three": 3}]}


def test_result_null_is_a_result(client, conn):
    task_id = submit_id(client, task_type="noop")
    complete_task(conn, task_id, None)
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
    run_attempt(conn, task_id)
    response = client.get(f"/api/task-result/{task_id}")
    body = assert_error(response, 409, status="processing")
    assert body["error"] is None
    assert response.headers["Retry-After"] == "1"


def test_result_of_a_task_waiting_for_a_retry_carries_the_last_error(client, conn):
    task_id = submit_id(client)
    assert fail_task(conn, task_id, "timeout talking to S3") == "pending"
    response = client.get(f"/api/task-result/{task_id}")
    body = assert_error(response, 409, status="pending")
    assert body["error"] == "timeout talking to S3"
    assert int(response.headers["Retry-After"]) >= 1


def test_result_of_a_failed_task_is_409_with_the_error_and_no_retry_after(client, conn):
    task_id = submit_id(client, max_attempts=1)
    fail_task(conn, task_id, "division by zero")
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
    assert fail_task(conn, task_id, "flaky") == "pending"
    conn.execute("UPDATE tasks SET run_at = now() WHERE id = %s", (task_id,))  # skip the backoff
    complete_task(conn, task_id, "ok")
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
    attempt = run_attempt(conn, task_id)
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
    complete_task(conn, completed, 1)
    failed = submit_id(client, max_attempts=1)
    fail_task(conn, failed)
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
    assert fail_task(conn, task_id, "boom") == "failed"
    response = client.post(f"/api/tasks/{task_id}/retry")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["attempts"], body["max_attempts"]) == ("pending", 1, 2)
    assert body["finished_at"] is None
    row = task_row(conn, task_id)
    assert (row["status"], row["max_attempts"]) == ("pending", 2)
    assert run_attempt(conn, task_id) == 2  # due at once


def test_retry_a_cancelled_task_keeps_its_attempt_budget(client, conn):
    task_id = submit_id(client)
    assert client.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    body = client.post(f"/api/tasks/{task_id}/retry").get_json()
    assert (body["status"], body["attempts"], body["max_attempts"]) == ("pending", 0, 3)
    assert task_row(conn, task_id)["status"] == "pending"


def test_retry_a_task_cancelled_while_processing(client, conn):
    task_id = submit_id(client, max_attempts=1)
    run_attempt(conn, task_id)
    assert client.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    body = client.post(f"/api/tasks/{task_id}/retry").get_json()
    assert (body["status"], body["attempts"], body["max_attempts"]) == ("pending", 1, 2)
    assert run_attempt(conn, task_id) == 2


def test_retry_a_task_that_is_not_failed_or_cancelled_is_409(client, conn, subtests):
    processing = submit_id(client)
    run_attempt(conn, processing)
    completed = submit_id(client)
    complete_task(conn, completed, 1)
    pending = submit_id(client)
    for task_id, status in [(pending, "pending"), (processing, "processing"), (completed, "completed")]:
        with subtests.test(status=status):
            before = task_row(conn, task_id)
            body = assert_error(client.post(f"/api/tasks/{task_id}/retry"), 409, status=status)
            assert set(body) == CONFLICT_FIELDS
            assert body["task_id"] == task_id
            assert task_row(conn, task_id) == before


# --- retention: pruned tasks are Gone ----------------------------------------------------------------


def test_a_pruned_task_answers_410_and_an_unissued_id_404(client, conn, subtests):
    task_id = submit_id(client, "soon gone")
    complete_task(conn, task_id, {"ok": True})
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


# --- GET /api/tasks/{id}: waiting_for ------------------------------------------------------------


def waiting_for(client, task_id: int) -> dict | None:
    response = client.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["waiting_for"]


def rest_submit(client, **fields) -> int:
    response = client.post("/api/tasks", json={"task_type": "noop", "task_input": None, **fields})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def test_waiting_for_a_delayed_task_is_its_run_at(client):
    task_id = submit_id(client, delay_seconds=3600)
    waits = waiting_for(client, task_id)
    assert waits["reason"] == "run_at"
    assert waits["until"] == client.get(f"/api/tasks/{task_id}").get_json()["run_at"]
    assert "scheduled" in waits["detail"]


def test_waiting_for_a_task_in_retry_backoff_is_the_backoff(client, conn):
    task_id = submit_id(client, max_attempts=3)
    attempt = run_attempt(conn, task_id)
    failure = AttemptFailure(task_id, attempt, "failed", "boom")
    assert task_fail_many(conn, worker_id=WORKER, failures=[failure], **BACKOFF) == {task_id: "pending"}
    waits = waiting_for(client, task_id)
    assert waits["reason"] == "retry_backoff"
    assert parse_time(waits["until"]) == task_row(conn, task_id)["run_at"]
    assert "retried" in waits["detail"]


def test_waiting_for_the_next_task_is_a_worker(client, conn, subtests):
    with subtests.test("due, before a worker's admission gave it its turn"):
        (raw,) = insert_many(conn, 1)
        waits = waiting_for(client, raw)
        assert waits["reason"] == "worker" and "are workers running" in waits["detail"]
    with subtests.test("runnable, nothing ahead of it"):
        admit(conn)
        assert waiting_for(client, raw) == {
            "reason": "worker",
            "detail": "It is next in queue 'default': it starts when a worker of the queue is free.",
            "tasks_ahead": 0,
            "owners_ahead": 0,
        }


def test_waiting_for_a_task_behind_other_owners_is_its_fair_share(new_key, as_key, conn):
    alice, bob = as_key(new_key(name="alice")), as_key(new_key(name="bob"))
    alices = [alice.submit_id(i) for i in range(3)]
    bobs = bob.submit_id("b")
    first = waiting_for(alice, alices[0])
    assert (first["reason"], first["tasks_ahead"], first["owners_ahead"]) == ("worker", 0, 0)
    # Bob's first task is not behind Alice's backlog: one of hers (maybe two) before it.
    behind = waiting_for(bob, bobs)
    assert behind["reason"] == "fair_share"
    assert behind["owners_ahead"] == 1 and 1 <= behind["tasks_ahead"] <= 2
    assert "1 other owner" in behind["detail"]
    last = waiting_for(alice, alices[2])
    assert (last["reason"], last["tasks_ahead"], last["owners_ahead"]) == ("fair_share", 3, 1)
    # A task of higher priority starts first too; its owner is not "ahead in the rotation".
    urgent = alice.post("/api/submit-task", json={"task_input": "urgent", "priority": 5})
    assert urgent.status_code == 202
    assert pick(waiting_for(bob, bobs), "tasks_ahead", "owners_ahead") == {
        "tasks_ahead": behind["tasks_ahead"] + 1,
        "owners_ahead": 1,
    }


def test_waiting_for_a_task_of_a_paused_queue_is_the_pause(client):
    task_id = submit_id(client, queue="mail")
    assert client.post("/api/queues/mail/pause").status_code == 200
    assert waiting_for(client, task_id) == {"reason": "queue_paused", "detail": "Its queue 'mail' is paused."}
    assert client.post("/api/queues/mail/resume").status_code == 200
    assert waiting_for(client, task_id)["reason"] == "worker"


def test_waiting_for_a_task_held_by_a_limit_names_the_limit(client, conn, subtests):
    cases = [
        ("concurrency_limit", {"scope": "key", "name": "gpu"}, {"concurrency_key": "gpu"}),
        (
            "type_limit",
            {"scope": "type", "name": "greet"},
            {"task_type": "greet", "task_input": {"name": "A"}},
        ),
        ("queue_limit", {"scope": "queue", "name": "imports"}, {"queue": "imports"}),
    ]
    for reason, limit, fields in cases:
        with subtests.test(reason, max_running=0):
            limit_put(conn, owner=0, max_running=0, **limit)
            held = rest_submit(client, **fields)
            waits = waiting_for(client, held)
            assert waits["reason"] == reason
            assert waits["limit"] == {
                **limit,
                "max_running": 0,
                "max_starts_per_second": None,
                "running": 0,
                "waiting": 1,
            }
            assert "holds its tasks" in waits["detail"]
        with subtests.test(reason, max_running=1):
            limit_put(conn, owner=0, max_running=1, **limit)  # admits the one waiting
            waiting = rest_submit(client, **fields)
            waits = waiting_for(client, waiting)
            assert waits["reason"] == reason
            assert pick(waits["limit"], "max_running", "running", "waiting") == {
                "max_running": 1,
                "running": 1,
                "waiting": 1,
            }
            assert "lets 1 run at once: 1 do, 1 wait" in waits["detail"]
            assert waiting_for(client, held)["reason"] in ("worker", "fair_share")  # holds the slot


def test_waiting_for_a_task_out_of_start_tokens_is_the_rate_limit(client, conn):
    limit_put(conn, scope="key", owner=0, name="api", max_running=None, max_starts_per_second=0.01, burst=1)
    first, second = (rest_submit(client, concurrency_key="api") for _ in range(2))
    admit(conn)  # the first takes the one token
    assert waiting_for(client, first)["reason"] == "worker"
    waits = waiting_for(client, second)
    assert waits["reason"] == "rate_limit"
    assert pick(waits["limit"], "scope", "name", "max_starts_per_second", "waiting") == {
        "scope": "key",
        "name": "api",
        "max_starts_per_second": 0.01,
        "waiting": 1,
    }
    assert "0.01 starts per second" in waits["detail"]


def test_waiting_for_is_null_unless_pending(client, conn, subtests):
    task_id = submit_id(client)
    with subtests.test("processing"):
        attempt = run_attempt(conn, task_id)
        assert waiting_for(client, task_id) is None
    with subtests.test("completed"):
        ref = AttemptRef(task_id, attempt)
        assert task_complete_many(conn, worker_id=WORKER, results=[(ref, "1")]) == {task_id}
        assert waiting_for(client, task_id) is None
    with subtests.test("cancelled"):
        cancelled = submit_id(client)
        assert client.post(f"/api/tasks/{cancelled}/cancel").status_code == 200
        assert waiting_for(client, cancelled) is None
    with subtests.test("only GET /api/tasks/{id} says it"):
        assert "waiting_for" not in client.get(f"/api/task-status/{submit_id(client)}").get_json()


def test_waiting_for_walks_the_claim_index_never_the_table(conn):
    """Over 20,000 runnable tasks of 200 owners and 20,000 finished ones: each statement reads
    tasks by index (the walks of what is ahead are ranges of tasks_runnable_queue_idx)."""
    conn.execute(
        """INSERT INTO api_keys (name, role, prefix, token_sha256)
           SELECT 'k' || g, 'client', 'p' || g, sha256(g::text::bytea) FROM generate_series(1, 200) g"""
    )
    conn.execute(
        """INSERT INTO tasks (task_type, input, owner_key_id, turn, priority)
           SELECT 'noop', 'null', (SELECT min(id) FROM api_keys) + mod(g, 200), g / 200.0 + random(),
                  CASE WHEN g <= 500 THEN 1 ELSE 0 END
           FROM generate_series(1, 20000) g"""
    )
    conn.execute(
        """INSERT INTO tasks (task_type, input, status, finished_at)
           SELECT 'noop', 'null', 'completed', now() FROM generate_series(1, 20000)"""
    )
    conn.execute("ANALYZE tasks")
    task_id = conn.execute(
        "SELECT id FROM tasks WHERE status = 'pending' AND priority = 0 ORDER BY turn DESC LIMIT 1"
    ).fetchone()["id"]
    explain = Explain(conn, rows=True)
    waits = task_waiting_for(explain, task_id)
    assert waits is not None and waits["reason"] == "fair_share"
    assert (waits["tasks_ahead"], waits["owners_ahead"]) == (MAX_TASKS_AHEAD, 199)
    assert len(explain.plans) == 2
    for plan in explain.plans:
        assert "tasks" not in seq_scanned(plan)
    assert "tasks_runnable_queue_idx" in indexes_used(explain.plans[1])
