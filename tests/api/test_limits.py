"""Rate limits and quotas per key, through the real Flask app with authentication on and a real
Postgres: 429 with Retry-After and the RateLimit headers, and what counts against a quota. Tasks are moved through processing and completed with the queue's own functions
(skiplock/sql), as a worker would: no mocks anywhere."""

from __future__ import annotations

import re
import time

from tests.helpers import SUBMITS, assert_error, row_count, run_and_end, wait_until

# A RateLimit-Policy / RateLimit list member (draft-ietf-httpapi-ratelimit-headers): a quoted
# policy name, then ;key=integer or ;key="string" parameters.
SF_MEMBER = re.compile(r'^"([a-z][a-z0-9_-]*)"((?:;[a-z]+=(?:\d+|"[^"]*"))+)$')


def sf_list(value: str) -> dict[str, dict[str, object]]:
    """Parse a RateLimit-Policy / RateLimit field: {policy name: {param: int or str}}."""
    out: dict[str, dict[str, object]] = {}
    for member in value.split(", "):
        match = SF_MEMBER.match(member)
        assert match, f"not a structured-field list member: {member!r} (in {value!r})"
        params = {}
        for param in match.group(2).split(";")[1:]:
            name, _, raw = param.partition("=")
            params[name] = raw.strip('"') if raw.startswith('"') else int(raw)
        out[match.group(1)] = params
    return out


# --- rate limits -------------------------------------------------------------------------------


def test_a_key_gets_its_burst_at_once_then_429(new_key, as_key, conn):
    caller = as_key(new_key(rate_per_second=1, burst=5))
    remaining = []
    for _ in range(5):
        response = caller.submit()
        assert response.status_code == 202, response.get_json()
        assert sf_list(response.headers["RateLimit-Policy"]) == {"rate": {"q": 5, "w": 5}}
        state = sf_list(response.headers["RateLimit"])
        assert set(state) == {"rate"}
        remaining.append((state["rate"]["r"], state["rate"]["t"]))
    # t: seconds until a token is due, 0 while some are left.
    assert remaining == [(4, 0), (3, 0), (2, 0), (1, 0), (0, 1)]

    refused = caller.submit()
    body = assert_error(refused, 429)
    assert "Rate limit" in body["message"]
    assert refused.headers["Retry-After"] == "1"  # a token per second: the next within a second
    assert sf_list(refused.headers["RateLimit-Policy"]) == {"rate": {"q": 5, "w": 5}}
    assert sf_list(refused.headers["RateLimit"]) == {"rate": {"r": 0, "t": 1}}
    # Refusals that follow (known to this process without a query) say the same.
    for _ in range(3):
        again = caller.submit()
        assert_error(again, 429)
        assert again.headers["Retry-After"] == "1"
        assert sf_list(again.headers["RateLimit-Policy"]) == {"rate": {"q": 5, "w": 5}}
        assert sf_list(again.headers["RateLimit"]) == {"rate": {"r": 0, "t": 1}}
    # A refused request changes nothing: five tasks, and GETs are refused too.
    assert row_count(conn) == 5
    assert_error(caller.get("/api/tasks"), 429)
    assert row_count(conn) == 5


def test_a_limited_key_gets_tokens_back_at_its_rate(new_key, as_key, conn):
    caller = as_key(new_key(rate_per_second=10, burst=2))
    assert [caller.get("/api/tasks").status_code for _ in range(2)] == [200, 200]
    assert_error(caller.get("/api/tasks"), 429)
    emptied = time.monotonic()
    wait_until(lambda: caller.get("/api/tasks").status_code == 200, timeout=2, interval=0.01)
    assert time.monotonic() - emptied < 0.5  # one token every 0.1 s
    # Every request spends a token: over a second, at most burst + rate succeed.
    started, ok = time.monotonic(), 0
    while time.monotonic() - started < 1.0:
        ok += caller.get("/api/tasks").status_code == 200
        time.sleep(0.01)
    assert 6 <= ok <= 2 + 10 * (time.monotonic() - started) + 1


def test_limits_are_per_key_and_unlimited_keys_have_no_ratelimit_fields(new_key, as_key, web):
    limited = as_key(new_key(rate_per_second=1, burst=1))
    free = as_key(new_key())
    assert limited.get("/api/tasks").status_code == 200
    assert_error(limited.get("/api/tasks"), 429)
    for _ in range(10):
        response = free.get("/api/tasks")
        assert response.status_code == 200
        assert "RateLimit" not in response.headers and "RateLimit-Policy" not in response.headers
    # The probes are not limited, nor counted.
    for _ in range(3):
        assert web.get("/healthz", headers={"Authorization": f"Bearer {limited.token}"}).status_code == 200


def test_a_refused_submit_with_an_idempotency_key_stores_nothing(new_key, as_key, conn):
    caller = as_key(new_key(rate_per_second=0.5, burst=1))
    assert caller.submit(headers={"Idempotency-Key": "first"}).status_code == 202
    refused = caller.submit(body={"task_input": 2}, headers={"Idempotency-Key": "second"})
    assert_error(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert row_count(conn) == 1
    assert [r["idempotency_key"] for r in conn.execute(
        "SELECT idempotency_key FROM task_idempotency_keys").fetchall()] == ["first"]  # fmt: skip


# --- quotas ------------------------------------------------------------------------------------


def test_the_n_plus_first_unfinished_task_is_refused_until_some_finish(new_key, as_key, conn):
    caller = as_key(new_key(max_unfinished=3))
    rooms = []
    for i in range(3):
        response = caller.submit(body={"task_input": i})
        assert response.status_code == 202, response.get_json()
        assert sf_list(response.headers["RateLimit-Policy"]) == {
            "unfinished": {"q": 3, "qu": "concurrent-requests"}
        }
        rooms.append(sf_list(response.headers["RateLimit"])["unfinished"]["r"])
    assert rooms == [2, 1, 0]
    for url in SUBMITS:
        refused = caller.submit(url)
        body = assert_error(refused, 429)
        assert "3 unfinished" in body["message"]
        assert refused.headers["Retry-After"] == "1"
        assert sf_list(refused.headers["RateLimit-Policy"]) == {
            "unfinished": {"q": 3, "qu": "concurrent-requests"}
        }
        assert sf_list(refused.headers["RateLimit"]) == {"unfinished": {"r": 0}}
    assert row_count(conn) == 3
    # Reading is not submitting: a key at its cap still reads.
    assert caller.get("/api/tasks").status_code == 200

    run_and_end(conn, 2)
    # At once: a submit that the bound would refuse counts exactly (under the key's quota lock).
    assert caller.submit(body={"task_input": "again"}).status_code == 202
    assert caller.submit(body={"task_input": "again 2"}).status_code == 202
    assert_error(caller.submit(body={"task_input": "one too many"}), 429)
    unfinished = conn.execute("SELECT count(*) AS n FROM tasks WHERE status IN ('pending', 'processing')")
    assert unfinished.fetchone()["n"] == 3
    assert row_count(conn) == 5


def test_a_cancelled_task_frees_its_place(new_key, as_key, conn):
    caller = as_key(new_key(max_unfinished=1))
    task_id = caller.submit_id("one")
    assert_error(caller.submit(), 429)
    assert caller.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    assert caller.submit().status_code == 202
    assert row_count(conn) == 2


def test_a_batch_counts_every_task_against_the_quota(new_key, as_key, conn):
    caller = as_key(new_key(max_unfinished=5))

    def batch(n: int):
        return caller.submit(
            "/api/tasks/batch", {"tasks": [{"task_type": "noop", "task_input": i} for i in range(n)]}
        )

    body = assert_error(batch(6), 429)
    assert "5 more" in body["message"]
    assert row_count(conn) == 0
    assert caller.submit_id("one") and caller.submit_id("two")
    assert_error(batch(4), 429)
    assert row_count(conn) == 2
    response = batch(3)
    assert response.status_code == 202
    assert sf_list(response.headers["RateLimit"]) == {"unfinished": {"r": 0}}
    assert_error(batch(1), 429)
    assert_error(caller.submit(), 429)
    assert row_count(conn) == 5


def test_quotas_are_per_key(new_key, as_key, conn):
    capped, other = as_key(new_key(max_unfinished=1)), as_key(new_key(max_unfinished=2))
    capped.submit_id("a")
    assert_error(capped.submit(), 429)
    assert other.submit_id("b") and other.submit_id("c")
    assert row_count(conn) == 3


def test_a_key_with_both_limits_reports_both_policies(new_key, as_key):
    caller = as_key(new_key(rate_per_second=4, burst=4, max_unfinished=10))
    response = caller.submit()
    assert response.status_code == 202
    assert sf_list(response.headers["RateLimit-Policy"]) == {
        "rate": {"q": 4, "w": 1},
        "unfinished": {"q": 10, "qu": "concurrent-requests"},
    }
    state = sf_list(response.headers["RateLimit"])
    assert state["unfinished"] == {"r": 9}
    assert state["rate"]["t"] == 0 and 0 <= state["rate"]["r"] <= 3
    # A read spends a token but no place: only the rate is reported.
    assert set(sf_list(caller.get("/api/tasks").headers["RateLimit"])) == {"rate"}


def test_a_retried_submit_is_replayed_even_at_the_cap(new_key, as_key, conn):
    """A retry that creates nothing is not an N+1th unfinished task: it gets the first answer."""
    caller = as_key(new_key(max_unfinished=1))
    first = caller.submit(headers={"Idempotency-Key": "only-once"})
    assert first.status_code == 202
    retried = caller.submit(headers={"Idempotency-Key": "only-once"})
    assert retried.status_code == 202, retried.get_json()
    assert retried.headers.get("Idempotent-Replayed") == "true"
    assert retried.get_json() == first.get_json()
    assert row_count(conn) == 1


def test_replays_do_not_use_up_the_quota(new_key, as_key, conn):
    """Replays create nothing, so they take no place: after five replays of one submit, a key
    with room for two unfinished tasks still has room for one more."""
    caller = as_key(new_key(max_unfinished=2))
    first = caller.submit(headers={"Idempotency-Key": "once"})
    assert first.status_code == 202
    for _ in range(5):
        again = caller.submit(headers={"Idempotency-Key": "once"})
        assert again.status_code == 202, again.get_json()
        assert again.get_json() == first.get_json()
    second = caller.submit(body={"task_input": "second"})
    assert second.status_code == 202, second.get_json()
    assert row_count(conn) == 2
