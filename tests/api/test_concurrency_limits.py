"""Limits through the API: a key's concurrency limits (/api/concurrency-limits, scoped to the
calling key), queue limits (/api/queues/{queue}/limit, admin keys), a type's limit (read only),
and what GET /api/queues and /metrics show of them. The real Flask app, a real Postgres; tasks
are claimed with the queue's own functions, as a worker would."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from skiplock.sql.claim import task_claim
from skiplock.sql.limits import limit_list, limit_put
from skiplock.sql.operations import limit_usage_all
from tests.helpers import (
    WORKER,
    admit,
    assert_error,
    bearer,
    claim_refs,
    history,
    insert_task,
    row_count,
    start_all,
    task_row,
)

LIMIT_FIELDS = {
    "scope", "owner_key_id", "name", "max_running", "max_starts_per_second", "burst", "running", "waiting",
    "updated_at", "updated_by",
}  # fmt: skip
URL = "/api/concurrency-limits"


def put(client, url: str, body, token: str | None = None):
    return client.put(url, json=body, headers=bearer(token) if token else {})


def delete(client, url: str, token: str | None = None):
    return client.delete(url, headers=bearer(token) if token else {})


def get(client, url: str, token: str | None = None):
    return client.get(url, headers=bearer(token) if token else {})


def limits_in_db(conn) -> list[tuple]:
    return [
        (r["scope"], r["owner_key_id"], r["name"], r["max_running"], r["max_starts_per_second"], r["burst"])
        for r in conn.execute("SELECT * FROM task_limits ORDER BY scope, owner_key_id, name")
    ]


def keyed_tasks(conn, n: int, key: str, owner: int | None, queue: str = "default") -> list[int]:
    return [insert_task(conn, "noop", queue=queue, concurrency_key=key, owner_key_id=owner) for _ in range(n)]


def shown(limit: dict) -> tuple:
    return (
        limit["max_running"],
        limit["max_starts_per_second"],
        limit["burst"],
        limit["running"],
        limit["waiting"],
    )


# --- a key's concurrency limits ----------------------------------------------------------------


def test_a_client_sets_reads_lists_and_deletes_its_limits(web, new_key, conn):
    alice = new_key(name="alice")
    keyed_tasks(conn, 3, "gpu", alice.id)

    made = put(web, f"{URL}/gpu", {"max_running": 1}, alice.token)
    assert made.status_code == 200, made.get_json()
    body = made.get_json()
    assert set(body) == LIMIT_FIELDS
    assert (body["scope"], body["owner_key_id"], body["name"], body["updated_by"]) == (
        "key",
        alice.id,
        "gpu",
        alice.row["prefix"],
    )
    # It holds at once: one of the three holds the slot (runnable), two wait for it.
    assert shown(body) == (1, None, None, 1, 2)
    assert shown(get(web, f"{URL}/gpu", alice.token).get_json()) == (1, None, None, 1, 2)

    # A change: a rate too (with a burst), and room for two.
    changed = put(web, f"{URL}/gpu", {"max_running": 2, "max_starts_per_second": 5, "burst": 3}, alice.token)
    assert changed.status_code == 200
    assert shown(changed.get_json())[:3] == (2, 5.0, 3)
    put(web, f"{URL}/a/b c", {"max_starts_per_second": 0.5}, alice.token)  # any string is a key
    listed = get(web, URL, alice.token)
    assert listed.status_code == 200
    assert [(limit["name"], limit["max_running"]) for limit in listed.get_json()] == [
        ("a/b c", None),
        ("gpu", 2),
    ]
    assert limits_in_db(conn) == [
        ("key", alice.id, "a/b c", None, 0.5, None),
        ("key", alice.id, "gpu", 2, 5.0, 3),
    ]

    gone = delete(web, f"{URL}/gpu", alice.token)
    assert gone.status_code == 204 and gone.get_data() == b""
    assert_error(get(web, f"{URL}/gpu", alice.token), 404)
    assert_error(delete(web, f"{URL}/gpu", alice.token), 404)
    # What waited on it is runnable again.
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE waiting_on IS NOT NULL").fetchone()["n"] == 0
    assert [limit["name"] for limit in get(web, URL, alice.token).get_json()] == ["a/b c"]


def test_another_keys_limits_are_invisible_as_missing_ones(web, new_key, conn):
    alice, bob = new_key(name="alice"), new_key(name="bob")
    assert put(web, f"{URL}/shared", {"max_running": 1}, alice.token).status_code == 200

    for response in (get(web, f"{URL}/shared", bob.token), delete(web, f"{URL}/shared", bob.token)):
        body = assert_error(response, 404)
        assert body["message"] == assert_error(get(web, f"{URL}/never-set", bob.token), 404)[
            "message"
        ].replace("never-set", "shared")
    assert get(web, URL, bob.token).get_json() == []
    # Bob's limit of the same name is his own: Alice's is unchanged.
    assert put(web, f"{URL}/shared", {"max_running": 7}, bob.token).status_code == 200
    assert get(web, f"{URL}/shared", alice.token).get_json()["max_running"] == 1
    assert limits_in_db(conn) == [
        ("key", alice.id, "shared", 1, None, None),
        ("key", bob.id, "shared", 7, None, None),
    ]
    # A client may not name another key, whether it has limits or not (and nothing changes).
    for owner in (alice.id, 999_999):
        for response in (
            get(web, f"{URL}?owner_key_id={owner}", bob.token),
            get(web, f"{URL}/shared?owner_key_id={owner}", bob.token),
            put(web, f"{URL}/shared?owner_key_id={owner}", {"max_running": 0}, bob.token),
            delete(web, f"{URL}/shared?owner_key_id={owner}", bob.token),
        ):
            assert_error(response, 403)
    assert (
        get(web, f"{URL}/shared?owner_key_id={bob.id}", bob.token).get_json()["max_running"] == 7
    )  # its own
    assert limits_in_db(conn) == [
        ("key", alice.id, "shared", 1, None, None),
        ("key", bob.id, "shared", 7, None, None),
    ]


def test_an_admin_manages_another_keys_limits_with_owner_key_id(web, new_key, conn):
    admin, alice = new_key("admin"), new_key(name="alice")
    keyed_tasks(conn, 2, "gpu", alice.id)
    made = put(web, f"{URL}/gpu?owner_key_id={alice.id}", {"max_running": 0}, admin.token)
    assert made.status_code == 200, made.get_json()
    assert (made.get_json()["owner_key_id"], shown(made.get_json())) == (alice.id, (0, None, None, 0, 2))
    assert get(web, f"{URL}/gpu", alice.token).get_json()["updated_by"] == admin.row["prefix"]
    assert [
        limit["name"] for limit in get(web, f"{URL}?owner_key_id={alice.id}", admin.token).get_json()
    ] == ["gpu"]
    assert get(web, URL, admin.token).get_json() == []  # without it: the admin key's own
    body = assert_error(put(web, f"{URL}/gpu?owner_key_id=999999", {"max_running": 1}, admin.token), 404)
    assert "999999" in body["message"]
    assert delete(web, f"{URL}/gpu?owner_key_id={alice.id}", admin.token).status_code == 204
    assert limits_in_db(conn) == []


def test_with_auth_off_limits_belong_to_owner_0(client, conn):
    keyed_tasks(conn, 2, "mail", None)
    made = put(client, f"{URL}/mail", {"max_running": 1})
    assert made.status_code == 200
    assert (made.get_json()["owner_key_id"], made.get_json()["updated_by"]) == (0, "auth off")
    assert shown(made.get_json()) == (1, None, None, 1, 1)
    assert [limit["name"] for limit in get(client, URL).get_json()] == ["mail"]


INVALID = {
    "nothing to limit": ({}, "_schema"),
    "both null": ({"max_running": None, "max_starts_per_second": None}, "_schema"),
    "negative": ({"max_running": -1}, "max_running"),
    "fractional": ({"max_running": 1.5}, "max_running"),
    "a string": ({"max_running": "2"}, "max_running"),
    "too many": ({"max_running": 10**9}, "max_running"),
    "rate zero": ({"max_starts_per_second": 0}, "max_starts_per_second"),
    "rate negative": ({"max_starts_per_second": -2}, "max_starts_per_second"),
    "burst without rate": ({"max_running": 1, "burst": 2}, "burst"),
    "burst zero": ({"max_starts_per_second": 1, "burst": 0}, "burst"),
    "unknown field": ({"max_running": 1, "owner_key_id": 3}, "owner_key_id"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_limits_are_422_and_change_nothing(web, new_key, conn, case):
    alice = new_key(name="alice")
    put(web, f"{URL}/gpu", {"max_running": 3}, alice.token)
    before = limits_in_db(conn)
    body, field = INVALID[case]
    error = assert_error(put(web, f"{URL}/gpu", body, alice.token), 422)
    assert field in error["errors"]["json"], error
    assert_error(put(web, f"{URL}/other", body, alice.token), 422)
    assert limits_in_db(conn) == before


def test_a_key_no_task_could_have_is_404(web, new_key, conn):
    alice = new_key(name="alice")
    assert put(web, f"{URL}/{'k' * 200}", {"max_running": 1}, alice.token).status_code == 200
    for response in (
        put(web, f"{URL}/{'k' * 201}", {"max_running": 1}, alice.token),
        get(web, f"{URL}/{'k' * 201}", alice.token),
    ):
        assert "1 to 200" in assert_error(response, 404)["message"]
    for response in (
        put(web, f"{URL}/a%00b", {"max_running": 1}, alice.token),  # Postgres text cannot hold it
        get(web, f"{URL}/a%00b", alice.token),
        delete(web, f"{URL}/a%00b", alice.token),
    ):
        assert "NUL" in assert_error(response, 404)["message"]
    assert row_count(conn, "task_limits") == 1


def test_a_new_limit_holds_when_it_answers_even_over_claimed_tasks(web, new_key, conn):
    """Tasks a worker claimed but has not started go back to waiting: the limit admits what it
    allows again, and a started task keeps running (it holds its slot)."""
    alice = new_key(name="alice")
    ids = keyed_tasks(conn, 4, "api", alice.id)
    started = claim_refs(conn, 1)
    start_all(conn, started)
    claimed = claim_refs(conn, 3)  # not started
    assert {r.task_id for r in started + claimed} == set(ids)

    body = put(web, f"{URL}/api", {"max_running": 2}, alice.token).get_json()
    # One running, one admitted in its place, two waiting: never more than two.
    assert (body["running"], body["waiting"]) == (2, 2)
    statuses = sorted(task_row(conn, r.task_id)["status"] for r in claimed)
    assert statuses == ["pending"] * 3
    for ref in claimed:
        assert history(conn, ref.task_id) == [(ref.attempt, WORKER, "released")]
    assert task_row(conn, started[0].task_id)["status"] == "processing"
    # The claim takes only what the limit admitted.
    admit(conn)
    assert len(task_claim(conn, worker_id=WORKER, limit=10, lease_seconds=60)) == 1
    assert get(web, f"{URL}/api", alice.token).get_json()["running"] == 2


# --- queue limits (admin keys) -------------------------------------------------------------------


def test_queue_limits_are_for_admin_keys(web, new_key, conn):
    admin, alice = new_key("admin"), new_key(name="alice")
    for n in range(3):
        insert_task(conn, "noop", queue="reports", owner_key_id=alice.id, priority=n)
    url = "/api/queues/reports/limit"
    for response in (
        put(web, url, {"max_running": 1}, alice.token),
        get(web, url, alice.token),
        delete(web, url, alice.token),
        put(web, url, {"max_running": 1}),
    ):
        assert response.status_code in (401, 403), response.get_json()
    assert limits_in_db(conn) == []
    assert_error(get(web, url, admin.token), 404)

    made = put(web, url, {"max_running": 1, "max_starts_per_second": 10}, admin.token)
    assert made.status_code == 200, made.get_json()
    body = made.get_json()
    assert (body["scope"], body["owner_key_id"], body["name"], shown(body)) == (
        "queue",
        0,
        "reports",
        (1, 10.0, None, 1, 2),
    )
    assert get(web, url, admin.token).get_json()["waiting"] == 2
    queues = {q["queue"]: q for q in get(web, "/api/queues", admin.token).get_json()}
    assert (queues["reports"]["waiting_on_limit"], queues["reports"]["due"]) == (2, 3)
    assert queues["reports"]["limit"] == {
        "max_running": 1,
        "max_starts_per_second": 10.0,
        "burst": None,
        "running": 1,
        "waiting": 2,
    }
    # A client's own limit view shows nothing of it.
    assert get(web, URL, alice.token).get_json() == []
    assert_error(put(web, url, {"max_running": -1}, admin.token), 422)
    assert_error(put(web, "/api/queues/bad%20name/limit", {"max_running": 1}, admin.token), 404)
    assert_error(delete(web, url, alice.token), 403)
    assert delete(web, url, admin.token).status_code == 204
    assert_error(delete(web, url, admin.token), 404)
    queues = {q["queue"]: q for q in get(web, "/api/queues", admin.token).get_json()}
    assert (queues["reports"]["waiting_on_limit"], queues["reports"]["limit"]) == (0, None)


def test_a_queue_with_only_a_limit_is_listed(client, conn):
    assert put(client, "/api/queues/later/limit", {"max_running": 0}).status_code == 200
    [queue] = client.get("/api/queues").get_json()
    assert (queue["queue"], queue["due"], queue["limit"]["max_running"]) == ("later", 0, 0)


def test_a_type_limit_is_read_by_admin_keys(web, new_key, conn):
    admin, alice = new_key("admin"), new_key(name="alice")
    assert_error(get(web, "/api/task-types/noop/limit", admin.token), 404)
    limit_put(conn, scope="type", owner=0, name="noop", max_running=4, by="worker")
    body = get(web, "/api/task-types/noop/limit", admin.token).get_json()
    assert (body["scope"], body["name"], body["max_running"], body["updated_by"]) == (
        "type",
        "noop",
        4,
        "worker",
    )
    assert_error(get(web, "/api/task-types/noop/limit", alice.token), 403)
    assert (
        "No task type can be named"
        in assert_error(get(web, "/api/task-types/a%00b/limit", admin.token), 404)["message"]
    )


# --- /api/queues: expired tasks ---------------------------------------------------------------------


def test_queues_count_what_expired_in_the_last_hour(client, conn):
    recent, old = insert_task(conn, "noop", queue="push"), insert_task(conn, "noop", queue="push")
    conn.execute("UPDATE tasks SET status = 'expired', finished_at = now() WHERE id = %s", (recent,))
    conn.execute(
        "UPDATE tasks SET status = 'expired', finished_at = now() - interval '2 hours' WHERE id = %s", (old,)
    )
    [queue] = client.get("/api/queues").get_json()
    assert (queue["queue"], queue["expired_last_hour"], queue["due"], queue["waiting_on_limit"]) == (
        "push",
        1,
        0,
        0,
    )


# --- /metrics ------------------------------------------------------------------------------------------


def test_metrics_show_what_waits_on_limits_and_runs_under_them(client, conn):
    keyed_tasks(conn, 3, "gpu", None, queue="gpu-jobs")
    put(client, f"{URL}/gpu", {"max_running": 1})
    put(client, "/api/queues/idle/limit", {"max_running": 2})
    families = {
        f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
    }

    def samples(name: str) -> dict[tuple, float]:
        return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}

    assert samples("skiplock_limit_waiting_tasks") == {
        (("scope", "key"),): 2,
        (("scope", "queue"),): 0,
        (("scope", "type"),): 0,
    }
    key_labels = (("name", "gpu"), ("owner_key_id", "0"), ("scope", "key"))
    queue_labels = (("name", "idle"), ("owner_key_id", "0"), ("scope", "queue"))
    assert samples("skiplock_limit_running_tasks") == {key_labels: 1, queue_labels: 0}
    assert samples("skiplock_limit_max_running") == {key_labels: 1, queue_labels: 2}
    assert samples("skiplock_queue_waiting_on_limit_tasks")[(("queue", "gpu-jobs"),)] == 2
    assert samples("skiplock_queue_expired_last_hour")[(("queue", "gpu-jobs"),)] == 0


def test_what_metrics_and_the_dashboard_read_is_the_usage_view(client, conn, new_key):
    """limit_usage_all (the task_limit_usage view, ordered) counts what holds each limit's slots
    and what waits for it as the task rows say, each limit of each scope on its own."""
    alice = new_key(name="alice")
    keyed_tasks(conn, 4, "gpu", alice.id, queue="render")
    keyed_tasks(conn, 3, "gpu", None, queue="render")
    for _ in range(2):
        insert_task(conn, "sleep", {"seconds": 1}, queue="render")
    limit_put(conn, scope="key", owner=alice.id, name="gpu", max_running=2)
    limit_put(conn, scope="key", owner=0, name="gpu", max_running=None, max_starts_per_second=1, burst=1)
    limit_put(conn, scope="type", owner=0, name="sleep", max_running=1)
    limit_put(conn, scope="queue", owner=0, name="render", max_running=3)
    limit_put(conn, scope="queue", owner=0, name="empty", max_running=0)
    start_all(conn, claim_refs(conn, 2))
    admit(conn)
    usage = limit_usage_all(conn)
    assert usage == limit_list(conn)
    tasks = conn.execute(
        "SELECT coalesce(owner_key_id, 0) AS owner, concurrency_key, task_type, queue, waiting_on,"
        " (limited AND turn IS NOT NULL AND status IN ('pending', 'processing')) OR status = 'processing' AS holds,"
        " status = 'pending' AND waiting_on IS NOT NULL AS waits FROM tasks"
    ).fetchall()

    def under(limit, task) -> bool:
        if limit["scope"] == "key":
            return (task["owner"], task["concurrency_key"]) == (limit["owner_key_id"], limit["name"])
        return task["task_type" if limit["scope"] == "type" else "queue"] == limit["name"]

    def label(limit) -> str:
        if limit["scope"] == "key":
            return f"key:{limit['owner_key_id']}:{limit['name']}"
        return f"{limit['scope']}:{limit['name']}"

    counted = [
        (
            sum(1 for t in tasks if t["holds"] and under(limit, t)),
            sum(1 for t in tasks if t["waits"] and t["waiting_on"] == label(limit)),
        )
        for limit in usage
    ]
    assert [(limit["running"], limit["waiting"]) for limit in usage] == counted
    assert len(usage) == 5 and sum(r for r, _ in counted) > 0 and sum(w for _, w in counted) > 0
