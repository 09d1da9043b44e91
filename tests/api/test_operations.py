"""Operating the queue through the API: GET /api/queues and pausing and resuming queues (admin
keys only) against a real worker, and the workers' prune duty on task_throughput. Real Postgres,
the real Flask app, a real Supervisor: no mocks."""

from __future__ import annotations

import time

from skiplock import keys as key_admin
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import AttemptRef, task_complete_many, task_start_many
from skiplock.sql.operations import queue_summaries, task_queue_set_paused, task_throughput_recent
from skiplock.worker.duties.pruner import THROUGHPUT_KEPT_SECONDS
from skiplock.worker.queue_filter import PAUSED_REFRESH_SECONDS
from tests.helpers import WORKER, admit, assert_error, bearer, history, insert_task, task_row, wait_until

# --- helpers -----------------------------------------------------------------------------------


def queue_rows(conn) -> dict[str, dict]:
    return {r["queue"]: r for r in conn.execute("SELECT * FROM task_queues").fetchall()}


def listed(client, headers: dict | None = None) -> dict[str, dict]:
    response = client.get("/api/queues", headers=headers or {})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert [q["queue"] for q in body] == sorted(q["queue"] for q in body)
    return {q["queue"]: q for q in body}


# --- GET /api/queues -----------------------------------------------------------------------------


def test_queues_are_listed_with_what_the_database_counts(client, conn):
    assert listed(client) == {}
    for _ in range(2):
        insert_task(conn, "noop", queue="emails")
    old = insert_task(conn, "noop", queue="emails")
    conn.execute("UPDATE tasks SET run_at = now() - interval '2 minutes' WHERE id = %s", (old,))
    insert_task(conn, "noop", queue="emails", delay_seconds=600)
    for _ in range(3):
        insert_task(conn, "noop", queue="reports")
    claimed = task_claim(conn, worker_id=WORKER, limit=2, lease_seconds=60, queues=["reports"])
    task_start_many(conn, worker_id=WORKER, started_ago={AttemptRef(claimed[0].id, claimed[0].attempt): 0})
    done = insert_task(conn, "noop", queue="finished")
    [t] = task_claim(conn, worker_id=WORKER, limit=1, lease_seconds=60, queues=["finished"])
    task_complete_many(conn, worker_id=WORKER, results=[(AttemptRef(t.id, t.attempt), "null")])
    assert task_row(conn, done)["status"] == "completed"
    task_queue_set_paused(conn, queue="quiet", paused=True, by="dba")

    queues = listed(client)
    # Finished tasks are not counted, and a queue with only finished tasks and no setting is not
    # listed; a paused queue is, with nothing in it.
    assert set(queues) == {"emails", "reports", "quiet"}
    counts = {
        q: (v["due"], v["scheduled"], v["reserved"], v["running"], v["paused"]) for q, v in queues.items()
    }
    assert counts == {
        "emails": (3, 1, 0, 0, False),
        "reports": (1, 0, 1, 1, False),
        "quiet": (0, 0, 0, 0, True),
    }
    assert 120 <= queues["emails"]["oldest_due_wait_seconds"] < 180
    assert queues["quiet"]["oldest_due_wait_seconds"] is None
    # The same as the query the dashboard and /metrics read.
    for row in queue_summaries(conn):
        assert {
            k: queues[row["queue"]][k] for k in ("due", "scheduled", "reserved", "running", "paused")
        } == {k: row[k] for k in ("due", "scheduled", "reserved", "running", "paused")}


# --- pause and resume against a real worker ------------------------------------------------------


def test_a_paused_queue_is_not_claimed_and_a_resumed_one_is_at_once(client, conn, start_worker):
    worker = start_worker()
    running = insert_task(conn, "sleep", {"seconds": 1.5}, queue="slow")
    wait_until(lambda: task_row(conn, running)["started_at"] is not None, message="the slow task to start")

    paused = client.post("/api/queues/slow/pause")
    assert paused.status_code == 200, paused.get_json()
    body = paused.get_json()
    assert (body["queue"], body["paused"], body["changed_by"]) == ("slow", True, "auth off")
    assert queue_rows(conn)["slow"]["paused"] is True  # a row a DBA can read (and change)
    # Workers read the paused queues at most every PAUSED_REFRESH_SECONDS, at their claims.
    paused_at = time.monotonic()
    wait_until(lambda: "slow" in worker.supervisor.queues.paused, timeout=10, message="the pause seen")
    assert time.monotonic() - paused_at < PAUSED_REFRESH_SECONDS + 2

    held = insert_task(conn, "noop", queue="slow")
    passed = insert_task(conn, "noop", queue="fast")
    wait_until(lambda: task_row(conn, passed)["status"] == "completed", message="the other queue served")
    # What ran when the queue was paused finishes.
    wait_until(lambda: task_row(conn, running)["status"] == "completed", message="the running task to finish")
    time.sleep(0.6)  # several polls (0.2 s) and claims later
    assert task_row(conn, held)["status"] == "pending"
    slow = listed(client)["slow"]
    assert (slow["paused"], slow["due"], slow["running"], slow["reserved"]) == (True, 1, 0, 0)

    resumed = client.post("/api/queues/slow/resume")
    assert resumed.status_code == 200
    assert (resumed.get_json()["queue"], resumed.get_json()["paused"]) == ("slow", False)
    resumed_at = time.monotonic()
    wait_until(lambda: task_row(conn, held)["status"] == "completed", timeout=10, message="the resumed queue")
    # A resume wakes idle workers: well within a paused-queue refresh, not a timeout.
    assert time.monotonic() - resumed_at < 3
    assert queue_rows(conn)["slow"]["paused"] is False
    assert listed(client)["slow"]["paused"] is False


def test_a_pause_holds_when_it_answers_even_for_claimed_tasks(client, conn):
    """Tasks a worker claimed ahead and has not started are pending again when the pause
    answers (a released attempt each; the worker is told to drop them); a started one finishes;
    other queues are untouched."""
    held = [insert_task(conn, "noop", queue="drain") for _ in range(3)]
    other = insert_task(conn, "noop", queue="other")
    admit(conn)
    claimed = task_claim(conn, worker_id=WORKER, limit=10, lease_seconds=60)
    assert {t.id for t in claimed} == {*held, other}
    refs = {t.id: AttemptRef(t.id, t.attempt) for t in claimed}
    task_start_many(conn, worker_id=WORKER, started_ago={refs[held[0]]: 0})

    paused = client.post("/api/queues/drain/pause")
    assert paused.status_code == 200, paused.get_json()
    assert (paused.get_json()["paused"], paused.get_json()["released"]) == (True, 2)
    for task_id in held[1:]:
        row = task_row(conn, task_id)
        assert (row["status"], row["attempts"], row["started_at"]) == ("pending", 0, None)
        assert history(conn, task_id) == [(1, WORKER, "released")]
    assert task_row(conn, held[0])["status"] == "processing"  # started: it finishes
    assert task_row(conn, other)["status"] == "processing"
    # None of them is claimed again while the queue is paused.
    admit(conn)
    assert task_claim(conn, worker_id=WORKER, limit=10, lease_seconds=60) == []
    drain = listed(client)["drain"]
    assert (drain["due"], drain["reserved"], drain["running"]) == (2, 0, 1)
    # A resume answers without a count; a second pause has nothing left to release.
    assert "released" not in client.post("/api/queues/drain/resume").get_json()
    assert client.post("/api/queues/drain/pause").get_json()["released"] == 0


def test_a_pause_keeps_the_limits_of_the_tasks_it_releases(client, conn):
    for _ in range(3):
        insert_task(conn, "noop", queue="gpu", concurrency_key="render")
    assert client.put("/api/concurrency-limits/render", json={"max_running": 1}).status_code == 200
    admit(conn)
    [claimed] = task_claim(conn, worker_id=WORKER, limit=10, lease_seconds=60)
    assert client.post("/api/queues/gpu/pause").get_json()["released"] == 1
    limit = client.get("/api/concurrency-limits/render").get_json()
    assert (limit["running"], limit["waiting"]) == (1, 2)  # the released task keeps its slot
    assert client.post("/api/queues/gpu/resume").status_code == 200
    admit(conn)
    assert [t.id for t in task_claim(conn, worker_id=WORKER, limit=10, lease_seconds=60)] == [claimed.id]
    assert client.get("/api/concurrency-limits/render").get_json()["running"] == 1


def test_pause_and_resume_answer_for_any_valid_name_and_refuse_invalid_ones(client, conn):
    # A queue need not exist to be paused: the row is made by the first pause (schema.sql), so
    # a queue can be paused before its first task arrives.
    first = client.post("/api/queues/not-seen-yet/pause")
    assert first.status_code == 200 and first.get_json()["paused"] is True
    assert listed(client)["not-seen-yet"]["due"] == 0
    again = client.post("/api/queues/not-seen-yet/pause")  # idempotent
    assert again.status_code == 200 and again.get_json()["paused"] is True
    assert again.get_json()["changed_at"] >= first.get_json()["changed_at"]
    resumed = client.post("/api/queues/never.paused:1_a/resume")  # resuming what never was paused
    assert resumed.status_code == 200 and resumed.get_json()["paused"] is False
    assert {q: r["paused"] for q, r in queue_rows(conn).items()} == {
        "not-seen-yet": True,
        "never.paused:1_a": False,
    }

    for name in ("has%20space", "semi;colon", "quote'", "x" * 101, "%C3%A9t%C3%A9", "a%00b"):
        for action in ("pause", "resume"):
            body = assert_error(client.post(f"/api/queues/{name}/{action}"), 404)
            assert "No queue can be named" in body["message"], body
    assert len(queue_rows(conn)) == 2  # nothing was written for them
    assert client.post("/api/queues/" + "y" * 100 + "/pause").status_code == 200  # the longest name
    assert_error(client.get("/api/queues/slow/pause"), 405)
    assert_error(client.post("/api/queues"), 405)


def test_only_admin_keys_see_and_steer_queues(auth_client, conn):
    admin = key_admin.create_key(conn, name="ops", role="admin")
    reader = key_admin.create_key(conn, name="app", role="client")
    insert_task(conn, "noop", queue="emails")

    for method, url in (
        ("get", "/api/queues"),
        ("post", "/api/queues/emails/pause"),
        ("post", "/api/queues/emails/resume"),
    ):
        no_key = getattr(auth_client, method)(url)
        assert_error(no_key, 401)
        assert no_key.headers["WWW-Authenticate"].startswith('Bearer realm="skiplock"')
        assert_error(getattr(auth_client, method)(url, headers=bearer(reader["token"])), 403)
    assert queue_rows(conn) == {}  # a client key changed nothing

    paused = auth_client.post("/api/queues/emails/pause", headers=bearer(admin["token"]))
    assert paused.status_code == 200
    assert paused.get_json()["changed_by"] == admin["prefix"]  # who did it, for the DBA
    assert_error(auth_client.post("/api/queues/emails/resume", headers=bearer(reader["token"])), 403)
    assert queue_rows(conn)["emails"]["paused"] is True
    assert listed(auth_client, bearer(admin["token"]))["emails"]["paused"] is True


# --- the prune duty on task_throughput -----------------------------------------------------------


def test_workers_prune_throughput_older_than_a_day(conn, start_worker):
    assert THROUGHPUT_KEPT_SECONDS == 24 * 3600
    ages = {
        "25 hours": True,  # pruned
        "24 hours 2 minutes": True,
        "23 hours 58 minutes": False,  # kept
        "30 minutes": False,
        "0 seconds": False,
    }
    for n, age in enumerate(ages):
        conn.execute(
            "INSERT INTO task_throughput (minute, queue, task_type, worker_id, completed, failed, run_seconds) "
            "VALUES (date_trunc('minute', now() - %s::interval), 'default', 'noop', %s, 5, 1, 0.5)",
            (age, f"w{n}"),
        )
    # Finished tasks are pruned by the same duty; this one is kept (younger than the retention).
    kept_task = insert_task(conn, "noop")
    conn.execute(
        "UPDATE tasks SET status = 'cancelled', finished_at = now() - interval '1 hour' WHERE id = %s",
        (kept_task,),
    )

    def left() -> set[str]:
        return {r["worker_id"] for r in conn.execute("SELECT worker_id FROM task_throughput")}

    expected = {f"w{n}" for n, pruned in enumerate(ages.values()) if not pruned}
    start_worker(prune_interval_seconds=0.2)
    wait_until(lambda: left() == expected, timeout=10, message=f"task_throughput pruned to {expected}")
    # Later rounds go on: a row that is (now) older than a day goes too, the recent ones stay.
    conn.execute(
        "INSERT INTO task_throughput (minute, queue, task_type, worker_id, completed, failed, run_seconds) "
        "VALUES (date_trunc('minute', now() - interval '2 days'), 'default', 'noop', 'late', 1, 0, 0.1)"
    )
    wait_until(lambda: left() == expected, timeout=10, message="a later prune round")
    assert task_row(conn, kept_task)["status"] == "cancelled"
    # What remains is what the dashboard charts (the last hour of it).
    assert sum(r["completed"] for r in task_throughput_recent(conn, minutes=60)) == 10
