"""Idempotent submits (Idempotency-Key), through the real Flask app with authentication on and a
real Postgres: a retry replays the first answer, a different body is refused, keys expire."""

from __future__ import annotations

import time

import pytest

from tests.helpers import SUBMITS, assert_error, row_count, task_owners

# --- idempotency -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", list(SUBMITS))
def test_the_same_key_and_body_get_the_same_answer_and_one_submission(url, alice, conn):
    body, tasks = SUBMITS[url]
    first = alice.submit(url, body, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 202, first.get_json()
    assert "Idempotent-Replayed" not in first.headers
    for _ in range(3):
        again = alice.submit(url, body, headers={"Idempotency-Key": "order-42"})
        assert again.status_code == first.status_code
        assert again.get_json() == first.get_json()
        assert again.headers.get("Location") == first.headers.get("Location")
        assert again.headers["Idempotent-Replayed"] == "true"
    assert row_count(conn) == tasks
    # The first answer is what a submit without the header answers (same fields).
    plain = alice.submit(url, body)
    assert set(plain.get_json()) == set(first.get_json())
    assert row_count(conn) == 2 * tasks


def test_the_body_is_compared_as_json_and_a_quoted_key_is_the_same_key(alice, conn):
    first = alice.post(
        "/api/tasks",
        data='{"task_type": "noop", "task_input": {"a": 1, "b": 2}}',
        content_type="application/json",
        headers={"Idempotency-Key": "k-1"},
    )
    assert first.status_code == 202
    reordered = alice.post(
        "/api/tasks",
        data='{"task_input":{"b":2,"a":1},"task_type":"noop"}',
        content_type="application/json",
        headers={"Idempotency-Key": '"k-1"'},
    )
    assert reordered.status_code == 202
    assert reordered.headers["Idempotent-Replayed"] == "true"
    assert reordered.get_json()["task_id"] == first.get_json()["task_id"]
    assert row_count(conn) == 1


def test_the_same_key_with_another_body_or_endpoint_is_422(alice, conn, subtests):
    first = alice.submit(
        "/api/submit-task", {"task_input": 1, "task_type": "default"}, {"Idempotency-Key": "k"}
    )
    assert first.status_code == 202
    others = {
        "another input": ("/api/submit-task", {"task_input": 2, "task_type": "default"}),
        "another option": ("/api/submit-task", {"task_input": 1, "task_type": "default", "priority": 1}),
        "the same body at another endpoint": ("/api/tasks", {"task_input": 1, "task_type": "default"}),
        "a batch": ("/api/tasks/batch", {"tasks": [{"task_input": 1, "task_type": "default"}]}),
    }
    for case, (url, body) in others.items():
        with subtests.test(case=case):
            error = assert_error(alice.submit(url, body, {"Idempotency-Key": "k"}), 422)
            assert "'k'" in error["message"] and "different request" in error["message"]
            assert error["errors"] == {
                "headers": {"Idempotency-Key": ["already used with a different request"]}
            }
    assert row_count(conn) == 1
    assert row_count(conn, "task_idempotency_keys") == 1
    # The first use is still replayed.
    replay = alice.submit(
        "/api/submit-task", {"task_input": 1, "task_type": "default"}, {"Idempotency-Key": "k"}
    )
    assert replay.get_json() == first.get_json() and replay.headers["Idempotent-Replayed"] == "true"


def test_idempotency_keys_belong_to_their_owner(new_key, as_key, conn):
    alice_key, bob_key = new_key(), new_key()
    alice, bob = as_key(alice_key), as_key(bob_key)
    a = alice.submit(headers={"Idempotency-Key": "shared"})
    b = bob.submit(headers={"Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 202
    assert "Idempotent-Replayed" not in b.headers
    assert a.get_json()["task_id"] != b.get_json()["task_id"]
    # Bob may use the key for another body: it is his own key, unrelated to Alice's.
    c = bob.submit(body={"task_input": "other"}, headers={"Idempotency-Key": "also-alices"})
    alice_c = alice.submit(body={"task_input": "yet another"}, headers={"Idempotency-Key": "also-alices"})
    assert c.status_code == alice_c.status_code == 202
    assert task_owners(conn) == {
        a.get_json()["task_id"]: alice_key.id,
        b.get_json()["task_id"]: bob_key.id,
        c.get_json()["task_id"]: bob_key.id,
        alice_c.get_json()["task_id"]: alice_key.id,
    }
    # Each replays its own answer.
    assert alice.submit(headers={"Idempotency-Key": "shared"}).get_json() == a.get_json()
    assert bob.submit(headers={"Idempotency-Key": "shared"}).get_json() == b.get_json()


def test_an_expired_idempotency_key_is_a_fresh_request(alice, conn):
    first = alice.submit(headers={"Idempotency-Key": "daily"})
    # A day minus an hour later: still remembered (24 h).
    conn.execute("UPDATE task_idempotency_keys SET created_at = now() - interval '23 hours'")
    assert alice.submit(headers={"Idempotency-Key": "daily"}).headers["Idempotent-Replayed"] == "true"
    conn.execute("UPDATE task_idempotency_keys SET created_at = now() - interval '25 hours'")
    fresh = alice.submit(headers={"Idempotency-Key": "daily"})
    assert fresh.status_code == 202
    assert "Idempotent-Replayed" not in fresh.headers
    assert fresh.get_json()["task_id"] != first.get_json()["task_id"]
    assert row_count(conn) == 2
    # Forgotten means forgotten: another body is no conflict either once expired.
    conn.execute("UPDATE task_idempotency_keys SET created_at = now() - interval '25 hours'")
    other = alice.submit(body={"task_input": "new"}, headers={"Idempotency-Key": "daily"})
    assert other.status_code == 202 and "Idempotent-Replayed" not in other.headers
    assert row_count(conn) == 3 and row_count(conn, "task_idempotency_keys") == 1


def test_a_short_idempotency_ttl_is_honoured(make_app, new_key, as_key, conn):
    ttl = 0.3
    caller = as_key(new_key(), make_app(auth="on", idempotency_ttl_seconds=ttl).test_client())
    first = caller.submit(headers={"Idempotency-Key": "brief"})
    time.sleep(ttl + 0.05)
    fresh = caller.submit(headers={"Idempotency-Key": "brief"})
    assert fresh.status_code == 202 and "Idempotent-Replayed" not in fresh.headers
    assert fresh.get_json()["task_id"] != first.get_json()["task_id"]


def test_a_malformed_idempotency_key_is_400_and_stores_nothing(alice, conn, subtests):
    cases = {
        "empty": "",
        "blank": "   ",
        "256 characters": "k" * 256,
        "non-ASCII": "clé",
        "a space inside": "two words",
        "a quote inside": 'a"b',
        "only quotes": '""',
        "a tab": "a\tb",
    }
    for case, value in cases.items():
        for url in SUBMITS:
            with subtests.test(case=case, url=url):
                body = assert_error(alice.submit(url, headers={"Idempotency-Key": value}), 400)
                assert "Idempotency-Key" in body["message"]
    assert row_count(conn) == 0
    assert row_count(conn, "task_idempotency_keys") == 0
    longest = alice.submit(headers={"Idempotency-Key": "k" * 255})
    assert longest.status_code == 202
    assert row_count(conn, "task_idempotency_keys") == 1


def test_a_submit_refused_under_a_key_leaves_the_key_free(alice, conn, subtests):
    """Validation (422 before the insert) and the database's refusal (422 inside the key's
    transaction) both leave nothing behind: the corrected request under the same key is new."""
    for case, raw, message in [
        ("invalid-field", '{"task_input": 1, "priority": "high"}', "semantic errors"),
        ("refused-by-postgres", '{"task_input": "\\ud800"}', "refused by the database"),
    ]:
        with subtests.test(case=case):
            key = f"fix-{case}"
            refused = alice.post(
                "/api/submit-task",
                data=raw,
                content_type="application/json",
                headers={"Idempotency-Key": key},
            )
            assert message in assert_error(refused, 422)["message"]
            assert row_count(conn, "task_idempotency_keys") == 0
            fixed = alice.submit(body={"task_input": case}, headers={"Idempotency-Key": key})
            assert fixed.status_code == 202 and "Idempotent-Replayed" not in fixed.headers
            conn.execute("DELETE FROM task_idempotency_keys")
    assert row_count(conn) == 2
