"""Long-polls: ?wait=N and Prefer: wait=N on task-status, task-result and /api/tasks/{id},
through the real app, with a real worker finishing the tasks. What is announced to waiting API
processes (NOTIFY skiplock_task_changed), and that only when someone waits."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import psycopg
import pytest

from api import watch
from skiplock import keys
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_progress_many,
)
from skiplock.sql.fragments import CHANGED_CHANNEL
from skiplock.sql.watchers import task_unwatch, task_watch
from tests.helpers import admit, insert_task, wait_until


def submit(client, task_type="sleep", task_input=None, headers=None) -> int:
    body = {"task_type": task_type, "task_input": task_input if task_input is not None else {"seconds": 0.3}}
    response = client.post("/api/tasks", json=body, headers=headers or {})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns a getter of (result, seconds it took)."""
    box = {}

    def run():
        began = time.monotonic()
        box["result"] = fn(*args, **kwargs)
        box["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def get(timeout=60):
        thread.join(timeout)
        assert not thread.is_alive(), "the request did not answer"
        return box["result"], box["seconds"]

    return get


def watch_rows(conn) -> list[tuple[int, str]]:
    return [(r["task_id"], r["watcher"]) for r in conn.execute("SELECT task_id, watcher FROM task_watchers")]


@pytest.fixture
def notifications_only(monkeypatch):
    """The hub's safety net (a look at every watched task each second) pushed out of reach: a
    waiter that answers early was woken by the worker's NOTIFY."""
    monkeypatch.setattr(watch, "RECHECK_SECONDS", 120.0)


def test_waiters_on_all_three_endpoints_answer_when_the_worker_finishes(
    app, conn, start_worker, notifications_only
):
    task_id = submit(app.test_client(), task_input={"seconds": 0.5})
    waiters = [
        in_thread(app.test_client().get, f"/api/task-result/{task_id}?wait=30"),
        in_thread(app.test_client().get, f"/api/task-status/{task_id}", headers={"Prefer": "wait=30"}),
        in_thread(app.test_client().get, f"/api/tasks/{task_id}?wait=30"),
    ]
    # One registration for the task in this API process, however many of its clients wait.
    wait_until(lambda: watch_rows(conn), message="the watch to be registered")
    assert [task_id for task_id, _ in watch_rows(conn)] == [task_id]
    start_worker()
    (result, result_s), (status, status_s), (detail, detail_s) = (get() for get in waiters)
    assert result.status_code == 200 and result.get_json() == {"task_id": task_id, "result": {"slept": 0.5}}
    assert status.status_code == 200 and status.get_json()["status"] == "completed"
    assert status.headers["Preference-Applied"] == "wait=30"
    assert "Prefer" in status.headers["Vary"]
    assert detail.get_json()["status"] == "completed" and detail.get_json()["task_input"] == {"seconds": 0.5}
    # Answered on the worker's notification, not at the deadline (nor by the safety net).
    assert max(result_s, status_s, detail_s) < 15
    assert watch_rows(conn) == []


def test_when_the_wait_ends_the_answer_is_the_one_without_a_wait(client, conn):
    task_id = submit(client)  # no worker: it stays pending
    began = time.monotonic()
    response = client.get(f"/api/task-status/{task_id}?wait=1")
    assert time.monotonic() - began >= 1
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    began = time.monotonic()
    response = client.get(f"/api/task-result/{task_id}", headers={"Prefer": "respond-async, wait=1"})
    assert time.monotonic() - began >= 1
    assert response.status_code == 409
    assert response.get_json()["status"] == "pending"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["Preference-Applied"] == "wait=1"
    assert watch_rows(conn) == []


def test_a_final_task_answers_at_once_and_is_not_watched(client, conn, start_worker):
    task_id = submit(client, task_input={"seconds": 0})
    start_worker()
    wait_until(lambda: client.get(f"/api/task-status/{task_id}").get_json()["status"] == "completed")
    began = time.monotonic()
    response = client.get(f"/api/task-result/{task_id}?wait=60")
    assert time.monotonic() - began < 1
    assert response.status_code == 200
    assert watch_rows(conn) == []


@pytest.mark.parametrize(
    "query, reason",
    [
        ("wait=61", "less than or equal to 60"),
        ("wait=-1", "greater than or equal to 0"),
        ("wait=soon", "number"),
        ("wait=1&color=red", "Unknown"),
    ],
)
def test_a_bad_wait_is_a_422_naming_the_parameter(client, conn, query, reason):
    task_id = submit(client)
    response = client.get(f"/api/task-status/{task_id}?{query}")
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == 422
    assert reason in str(body["errors"]["query"])
    assert watch_rows(conn) == []


def test_prefer_wait_is_a_preference_capped_and_ignored_when_unreadable(client, start_worker):
    task_id = submit(client, task_input={"seconds": 0})
    start_worker()
    wait_until(lambda: client.get(f"/api/task-status/{task_id}").get_json()["status"] == "completed")
    capped = client.get(f"/api/task-status/{task_id}", headers={"Prefer": "wait=3600"})
    assert capped.status_code == 200 and capped.headers["Preference-Applied"] == "wait=60"
    unreadable = client.get(f"/api/task-status/{task_id}", headers={"Prefer": "wait=later"})
    assert unreadable.status_code == 200 and "Preference-Applied" not in unreadable.headers
    # The query parameter wins over the header.
    both = client.get(f"/api/task-status/{task_id}?wait=1", headers={"Prefer": "wait=5"})
    assert both.status_code == 200 and "Preference-Applied" not in both.headers


def test_another_keys_task_is_404_at_once_and_never_watched(settings, conn):
    from api import create_app

    app = create_app(replace(settings, auth="on"))
    try:
        owner = keys.create_key(conn, name="owner")["token"]
        other = keys.create_key(conn, name="other")["token"]
        task_id = submit(app.test_client(), headers={"Authorization": f"Bearer {owner}"})
        began = time.monotonic()
        response = app.test_client().get(
            f"/api/task-result/{task_id}?wait=30", headers={"Authorization": f"Bearer {other}"}
        )
        assert time.monotonic() - began < 2
        assert response.status_code == 404 and response.get_json()["code"] == 404
        assert watch_rows(conn) == []
    finally:
        app.extensions["skiplock"].close()


def api_connections(conn) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'skiplock-api%%'"
    ).fetchone()["n"]


def test_waiters_hold_no_database_connection(settings, conn, start_worker):
    from api import create_app

    app = create_app(replace(settings, pool_size=2))
    try:
        ids = [submit(app.test_client(), task_input={"seconds": 0.1}) for _ in range(30)]
        waiters = [in_thread(app.test_client().get, f"/api/task-status/{i}?wait=30") for i in ids]
        wait_until(lambda: len(watch_rows(conn)) == 30, message="30 watches")
        # The pool (2) and the one listening connection, for 30 waiting requests.
        assert api_connections(conn) <= 3
        start_worker(concurrency=2)
        answers = [get()[0] for get in waiters]
        assert [a.get_json()["status"] for a in answers] == ["completed"] * 30
        assert watch_rows(conn) == []
    finally:
        app.extensions["skiplock"].close()


def test_a_change_nobody_announced_is_still_seen(client, conn):
    """A DBA's UPDATE sends no notification: the hub's look each second finds it."""
    task_id = submit(client)
    get = in_thread(client.get, f"/api/task-status/{task_id}?wait=30")
    wait_until(lambda: watch_rows(conn), message="the watch")
    conn.execute("UPDATE tasks SET status = 'cancelled', finished_at = now() WHERE id = %s", (task_id,))
    response, seconds = get()
    assert response.get_json()["status"] == "cancelled"
    assert seconds < 10


def test_the_hub_listens_again_after_losing_its_connection(app, conn, start_worker, notifications_only):
    client = app.test_client()
    first = submit(client, task_input={"seconds": 0})
    get = in_thread(client.get, f"/api/task-status/{first}?wait=1")
    hub = app.extensions["skiplock"].watch
    assert hub.listening.wait(10)
    get()
    killed = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'skiplock-api-listener'"
    ).fetchall()
    assert len(killed) == 1
    wait_until(lambda: not hub.listening.is_set(), message="the hub to notice")
    assert hub.listening.wait(10), "the hub did not listen again"
    second = submit(client, task_input={"seconds": 0.3})
    get = in_thread(client.get, f"/api/task-result/{second}?wait=30")
    wait_until(lambda: len(watch_rows(conn)) == 1, message="the watch")
    start_worker()
    response, seconds = get()
    assert response.status_code == 200 and seconds < 15


# --- what the statements announce ------------------------------------------------------------


def notifications(listener: psycopg.Connection, wait: float = 0.3) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=wait) if n.channel == CHANGED_CHANNEL]


@pytest.fixture
def listener(database_url):
    with psycopg.connect(database_url, autocommit=True) as listening:
        listening.execute(f"LISTEN {CHANGED_CHANNEL}")
        yield listening


def test_changes_are_announced_only_for_watched_tasks_and_final_ones_marked(conn, listener):
    watched, unwatched = insert_task(conn), insert_task(conn)
    task_watch(conn, task_ids=[watched], watcher="api:1")
    claimed = task_claim(conn, worker_id="w", limit=10, lease_seconds=30)
    assert {t.id for t in claimed} == {watched, unwatched}
    assert notifications(listener) == [str(watched)]
    task_progress_many(conn, worker_id="w", progress=[(AttemptRef(t.id, t.attempt), 0.5) for t in claimed])
    assert notifications(listener) == [str(watched)]
    refs = [(AttemptRef(t.id, t.attempt), "null") for t in claimed]
    assert task_complete_many(conn, worker_id="w", results=refs) == {watched, unwatched}
    assert notifications(listener) == [f"{watched}!"]


def test_a_failure_that_will_be_retried_is_not_final(conn, listener):
    retried, exhausted = insert_task(conn, max_attempts=3), insert_task(conn, max_attempts=1)
    task_watch(conn, task_ids=[retried, exhausted], watcher="api:1")
    claimed = task_claim(conn, worker_id="w", limit=10, lease_seconds=30)
    notifications(listener)
    failures = [AttemptFailure(t.id, t.attempt, "failed", "boom") for t in claimed]
    task_fail_many(conn, worker_id="w", failures=failures, backoff_base=1, backoff_max=1)
    [payload] = notifications(listener)
    assert sorted(payload.split(",")) == sorted([str(retried), f"{exhausted}!"])


def test_nothing_is_announced_while_nobody_waits(conn, listener):
    task_id = insert_task(conn)
    task_watch(conn, task_ids=[task_id], watcher="api:1")
    task_unwatch(conn, task_ids=[task_id], watcher="api:1")
    [claimed] = task_claim(conn, worker_id="w", limit=1, lease_seconds=30)
    task_complete_many(conn, worker_id="w", results=[(AttemptRef(claimed.id, claimed.attempt), "1")])
    assert notifications(listener, wait=0.5) == []


def test_a_huge_announcement_asks_to_look_at_everything(conn, listener):
    ids = [
        r["id"]
        for r in conn.execute(
            "INSERT INTO tasks (task_type, input) SELECT 'noop', 'null' FROM generate_series(1, 2000) RETURNING id"
        )
    ]  # 2,000 ids do not fit in a NOTIFY's 8,000 bytes
    task_watch(conn, task_ids=ids, watcher="api:1")
    while admit(conn).promoted:  # rows inserted by hand get their turn (1,000 per admission)
        pass
    task_claim(conn, worker_id="w", limit=2000, lease_seconds=30)
    assert notifications(listener) == ["*"]


def test_the_payload_parser_reads_ids_and_final_marks():
    assert watch.parse_changes("12,13!,x,14") == [(12, False), (13, True), (14, False)]
