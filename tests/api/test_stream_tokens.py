"""Stream tokens (POST /api/tasks/{id}/stream-token, /api/workflows/{id}/stream-token): a stream
opened with ?token= instead of an Authorization header, through the real app with auth on. Only
that stream, only until the token expires, only while its key lives; CORS for those requests
only. tests/system/test_browser_stream.py opens one from a page in Chromium."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from skiplock.sql.operations import api_secret
from skiplock.sql.workflows import workflow_tasks_ended
from skiplock.stream_tokens import StreamClaims, mint
from tests.helpers import assert_error, complete_task, wait_until

NOOP = {"task_type": "noop", "task_input": None}


@pytest.fixture
def bob(new_key, as_key):
    return as_key(new_key(name="bob"))


def events_of(response) -> list[tuple[str, dict]]:
    """(event, data) of every event of a finished stream."""
    found = []
    for block in response.get_data(as_text=True).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            found.append((fields["event"], json.loads(fields["data"])))
    return found


def token_for(caller, task_id: int, **query) -> dict:
    response = caller.post(f"/api/tasks/{task_id}/stream-token", query_string=query)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_a_token_opens_its_tasks_stream_without_a_key_from_any_origin(alice, conn, web):
    task_id = alice.submit_id("hello")
    complete_task(conn, task_id, {"ok": True})
    minted = token_for(alice, task_id)
    assert urlsplit(minted["url"]).path == f"/api/tasks/{task_id}/events"
    assert parse_qs(urlsplit(minted["url"]).query)["token"] == [minted["token"]]
    left = time.mktime(time.strptime(minted["expires_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(
        time.gmtime()
    )
    assert 240 < left <= 300  # five minutes by default

    stream = web.get(path_of(minted["url"]), headers={"Origin": "https://shop.example"})
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"
    assert stream.headers["Access-Control-Allow-Origin"] == "*"
    assert events_of(stream)[-1] == ("status", {**events_of(stream)[-1][1], "status": "completed"})
    assert events_of(stream)[-1][1]["task_id"] == task_id


def test_a_stream_opened_with_the_key_gets_no_cors_headers(alice, conn):
    task_id = alice.submit_id(None)
    complete_task(conn, task_id, None)
    stream = alice.get(f"/api/tasks/{task_id}/events", headers={"Origin": "https://shop.example"})
    assert stream.status_code == 200
    assert "Access-Control-Allow-Origin" not in stream.headers


def test_a_preflight_with_a_token_is_allowed(alice, web):
    minted = token_for(alice, alice.submit_id(None))
    answer = web.options(
        path_of(minted["url"]),
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"},
    )
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Last-Event-ID" in answer.headers["Access-Control-Allow-Headers"]


def test_a_token_opens_no_other_task_and_nothing_but_the_stream(alice, web):
    first, second = alice.submit_id(None), alice.submit_id(None)
    token = token_for(alice, first)["token"]
    body = assert_error(web.get(f"/api/tasks/{second}/events", query_string={"token": token}), 403)
    assert body["message"] == f"This stream token opens task {first}'s events, not task {second}'s."
    # Anywhere but a stream, a token is no credential.
    assert_error(web.get(f"/api/tasks/{first}", query_string={"token": token}), 401)
    assert_error(web.post(f"/api/tasks/{first}/cancel", query_string={"token": token}), 401)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda t: t.replace(".", ".9", 1), "signature does not match"),  # another task id
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "signature does not match"),
        (lambda t: "skl_" + t, "Not a stream token"),
        (lambda t: "", "Not a stream token"),
    ],
    ids=["another task", "signature", "garbage", "empty"],
)
def test_a_changed_token_is_a_401_saying_so(change, says, alice, web):
    task_id = alice.submit_id(None)
    token = change(token_for(alice, task_id)["token"])
    response = web.get(f"/api/tasks/{task_id}/events", query_string={"token": token})
    body = assert_error(response, 401)
    assert says in body["message"]
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="skiplock", error="invalid_token"')


def test_an_expired_token_is_a_401_saying_so(alice, new_key, conn, web):
    task_id = alice.submit_id(None)
    token_for(alice, task_id)  # the secret is made on first use
    secret = api_secret(conn, name="stream_token", candidate=b"x" * 32)
    key_id = conn.execute("SELECT id FROM api_keys WHERE name = 'alice'").fetchone()["id"]
    expired = mint(secret, StreamClaims("task", task_id, key_id, int(time.time()) - 5))
    body = assert_error(web.get(f"/api/tasks/{task_id}/events", query_string={"token": expired}), 401)
    assert "expired" in body["message"] and "mint another one" in body["message"]
    # The same claims, not yet expired, open it: it is the expiry that refused it.
    fresh = mint(secret, StreamClaims("task", task_id, key_id, int(time.time()) + 60))
    complete_task(conn, task_id, None)
    assert web.get(f"/api/tasks/{task_id}/events", query_string={"token": fresh}).status_code == 200


def test_a_token_dies_with_the_key_that_made_it(alice, new_key, as_key, conn, make_client):
    task_id = alice.submit_id(None)
    complete_task(conn, task_id, None)
    token = token_for(alice, task_id)["token"]
    # Another API process (another app on the same database) shares the secret.
    other = make_client(auth="on", key_cache_seconds=0.0)
    assert other.get(f"/api/tasks/{task_id}/events", query_string={"token": token}).status_code == 200
    conn.execute("UPDATE api_keys SET revoked_at = now() WHERE name = 'alice'")
    body = assert_error(other.get(f"/api/tasks/{task_id}/events", query_string={"token": token}), 401)
    assert "was revoked" in body["message"]


def test_only_who_sees_the_task_may_mint_one(alice, bob):
    task_id = alice.submit_id(None)
    assert_error(bob.post(f"/api/tasks/{task_id}/stream-token"), 404)
    assert_error(bob.post("/api/tasks/999999/stream-token"), 404)


@pytest.mark.parametrize("lifetime", [0, 9, 3601, "soon"])
def test_a_lifetime_out_of_range_is_a_422_naming_it(lifetime, alice):
    task_id = alice.submit_id(None)
    response = alice.post(f"/api/tasks/{task_id}/stream-token", query_string={"lifetime_seconds": lifetime})
    assert "lifetime_seconds" in str(assert_error(response, 422)["errors"])


def test_a_longer_lifetime_is_honoured(alice):
    minted = token_for(alice, alice.submit_id(None), lifetime_seconds=3600)
    expires = int(minted["token"].split(".")[3])
    assert 3500 < expires - time.time() <= 3600


def test_a_workflows_stream_opens_with_its_own_token(alice, web, conn):
    made = alice.post("/api/workflows", json={"chain": [NOOP]}).get_json()
    workflow_id, task_id = made["workflow_id"], made["tasks"][0]["task_id"]
    complete_task(conn, task_id, None)
    workflow_tasks_ended(conn, {task_id})  # as the worker's writer does: the workflow is final
    response = alice.post(f"/api/workflows/{workflow_id}/stream-token")
    assert response.status_code == 201
    minted = response.get_json()
    assert urlsplit(minted["url"]).path == f"/api/workflows/{workflow_id}/events"
    stream = web.get(path_of(minted["url"]))
    assert stream.status_code == 200 and stream.headers["Access-Control-Allow-Origin"] == "*"
    assert events_of(stream)[-1][1]["state"] == "completed"
    # A task's token opens no workflow's stream, even with the same id.
    task_token = token_for(alice, task_id)["token"]
    assert_error(web.get(f"/api/workflows/{task_id}/events", query_string={"token": task_token}), 403)


def test_with_auth_off_a_token_is_minted_and_the_stream_needs_none(client, conn):
    task_id = client.post("/api/tasks", json=NOOP).get_json()["task_id"]
    complete_task(conn, task_id, None)
    minted = client.post(f"/api/tasks/{task_id}/stream-token").get_json()
    assert client.get(path_of(minted["url"])).status_code == 200


def test_the_key_header_wins_over_a_token(alice, bob, conn):
    task_id = alice.submit_id(None)
    token = token_for(alice, task_id)["token"]
    # Bob's key, with Alice's token in the URL: Bob's request, and Alice's task is not his.
    assert_error(bob.get(f"/api/tasks/{task_id}/events", query_string={"token": token}), 404)


def test_a_stream_opened_in_time_runs_on_past_the_tokens_expiry(alice, conn, web):
    task_id = alice.submit_id(None)
    token_for(alice, task_id)  # the secret is made on first use
    secret = api_secret(conn, name="stream_token", candidate=b"x" * 32)
    key_id = conn.execute("SELECT id FROM api_keys WHERE name = 'alice'").fetchone()["id"]
    expires = int(time.time()) + 5
    token = mint(secret, StreamClaims("task", task_id, key_id, expires))
    response = web.get(f"/api/tasks/{task_id}/events", query_string={"token": token}, buffered=False)
    assert response.status_code == 200
    chunks = (c.decode() if isinstance(c, bytes) else c for c in response.response)
    assert next(chunks).startswith("retry:")
    assert '"status": "pending"' in next(chunks)
    wait_until(lambda: time.time() >= expires, timeout=20, message="the token to expire")
    assert_error(web.get(f"/api/tasks/{task_id}/events", query_string={"token": token}), 401)  # a new one
    complete_task(conn, task_id, {"done": True})
    rest = "".join(chunks)  # the open stream goes on to the final state, then ends
    assert '"status": "completed"' in rest.strip().split("\n\n")[-1]
    response.close()
