"""Bad input through the HTTP API, through the real Flask app and a real Postgres (a fresh database
per test): a clear error in the one error shape, and nothing changes (with auth off, and the
tightened answers with auth on); and what the API answers when the database is down or drops
its connections."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import (
    CONFLICT_FIELDS,
    SUBMITS,
    TASK_ROUTES,
    UNREACHABLE_DB,
    assert_error,
    body_for,
    dig,
    insert_task,
    nested,
    raw_for,
    row_count,
    run_and_end,
    submit_id,
    task_types,
)

SUBMIT_URLS = ("/api/submit-task", "/api/tasks")


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
                before = row_count(conn)
                error = assert_error(client.post(url, json=body_for(url, body)), 422)
                assert set(error) == {"code", "status", "message", "errors"}
                assert dig(error["errors"], ("json", *path))
                assert row_count(conn) == before


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
                before = row_count(conn)
                error = assert_error(post_raw(client, url, raw_for(url, raw)), 422)
                assert error["errors"]["json"]["task_input"]
                assert row_count(conn) == before


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
                before = row_count(conn)
                error = assert_error(post_raw(client, url, raw), 400)
                assert error["errors"] == {"json": ["Invalid JSON body."]}
                assert row_count(conn) == before


def test_a_json_body_that_is_not_an_object_is_422(client, conn, subtests):
    for raw in ["[1]", '"task"', "5", "true", '[{"task_input": 1}]']:
        for url in SUBMIT_URLS:
            with subtests.test(body=raw, url=url):
                before = row_count(conn)
                error = assert_error(post_raw(client, url, raw), 422)
                assert error["errors"]["json"]
                assert row_count(conn) == before


def test_an_empty_body_is_422_missing_task_input(client, conn):
    error = assert_error(post_raw(client, "/api/submit-task", b""), 422)
    assert error["errors"]["json"]["task_input"]
    assert row_count(conn) == 0


def test_a_body_that_is_not_json_is_refused(client, conn):
    response = post_raw(client, "/api/submit-task", "task_input=1", "application/x-www-form-urlencoded")
    assert response.status_code in (415, 422)
    assert_error(response, response.status_code)
    assert row_count(conn) == 0


def test_a_body_over_the_default_limit_is_413(client, conn):
    body = json.dumps({"task_input": "x" * (1024 * 1024)})
    for url in SUBMIT_URLS:
        assert_error(post_raw(client, url, body), 413)
    assert row_count(conn) == 0


def test_a_body_over_a_configured_limit_is_413(make_client, conn):
    small = make_client(max_body_bytes=1000)
    assert_error(post_raw(small, "/api/submit-task", json.dumps({"task_input": "x" * 1000})), 413)
    assert row_count(conn) == 0


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
    assert row_count(conn) == 1


# --- bad input, tightened (auth on) ------------------------------------------------------------


def deep_json(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_a_body_not_sent_as_json_is_415_and_stores_nothing(new_key, as_key, conn, subtests):
    admin = as_key(new_key("admin"))
    bodies = {**{url: body for url, (body, _) in SUBMITS.items()}, "/api/keys": {"name": "x"}}
    for url, body in bodies.items():
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            with subtests.test(url=url, content_type=content_type):
                response = admin.post(url, data=json.dumps(body), content_type=content_type)
                error = assert_error(response, 415)
                assert "Content-Type: application/json" in error["message"]
        with subtests.test(url=url, content_type="application/json; charset=utf-8"):
            response = admin.post(url, data=json.dumps(body), content_type="application/json; charset=utf-8")
            assert response.status_code in (201, 202), response.get_json()
    assert row_count(conn) == 1 + 1 + 3
    assert row_count(conn, "api_keys") == 2


def test_one_409_shape_for_result_cancel_and_retry(alice, conn, subtests):
    pending = alice.submit_id("p")
    done = alice.submit_id("d")
    failed = alice.submit_id("f", max_attempts=1)
    conn.execute("UPDATE tasks SET run_at = now() + interval '1 hour' WHERE id = %s", (pending,))
    assert run_and_end(conn, 1) == [done]
    assert run_and_end(conn, 1, outcome="failed") == [failed]
    cases = [
        ("get", f"/api/task-result/{pending}", pending, "pending", None),
        ("get", f"/api/task-result/{failed}", failed, "failed", "boom"),
        ("post", f"/api/tasks/{done}/cancel", done, "completed", None),
        ("post", f"/api/tasks/{failed}/cancel", failed, "failed", "boom"),
        ("post", f"/api/tasks/{pending}/retry", pending, "pending", None),
        ("post", f"/api/tasks/{done}/retry", done, "completed", None),
    ]
    for method, url, task_id, status, error in cases:
        with subtests.test(url=url):
            body = assert_error(alice.open(method, url), 409, status=status)
            assert set(body) == CONFLICT_FIELDS
            assert (body["task_id"], body["error"]) == (task_id, error)
            assert str(task_id) in body["message"] and status in body["message"]


def test_an_id_that_is_not_a_positive_64_bit_integer_is_404_saying_so(alice, subtests):
    alice.submit_id("task 1 exists")
    for method, template in TASK_ROUTES:
        for task_id in ["abc", "0", "-1", "1.5", str(2**63), "1e3", "%C3%A9"]:
            url = template.format(task_id)
            with subtests.test(url=url):
                body = assert_error(alice.open(method, url), 404)
                assert "task ids are positive 64-bit integers" in body["message"]
                assert "requested URL was not found" not in body["message"]


def test_a_body_nested_ten_thousand_deep_is_refused_within_a_second(new_key, as_key, conn, subtests):
    admin = as_key(new_key("admin"))
    deep = deep_json(10_000)
    bodies = {
        "/api/submit-task": b'{"task_input": ' + deep + b"}",
        "/api/tasks": b'{"task_type": "noop", "task_input": ' + deep + b"}",
        "/api/tasks/batch": b'{"tasks": [{"task_type": "noop", "task_input": ' + deep + b"}]}",
        "/api/keys": b'{"name": ' + deep + b"}",
    }
    for url, raw in bodies.items():
        with subtests.test(url=url):
            started = time.monotonic()
            response = admin.post(url, data=raw, content_type="application/json")
            elapsed = time.monotonic() - started
            assert 400 <= response.status_code < 500
            assert_error(response, response.status_code)
            assert elapsed < 1.0
    assert row_count(conn) == 0
    assert row_count(conn, "api_keys") == 1
