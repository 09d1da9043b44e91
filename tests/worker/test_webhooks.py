"""Webhooks: tasks submitted with callback_url, a real receiver (an HTTP server on 127.0.0.1,
allow-listed as the tests' only exception to the SSRF refusal), real workers sending them.
Signatures are checked with the standardwebhooks library, as a receiver would."""

from __future__ import annotations

import itertools
import json
import signal
import time
from dataclasses import replace

import psycopg
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api import create_app
from skiplock import keys
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import AttemptRef, task_complete_many, task_start_many
from skiplock.sql.workers import task_rescue
from skiplock.webhooks.signing import new_secret

# LOOPBACK and Receiver are imported from here by tests/worker/test_webhook_wakeups.py too.
from tests.helpers import Received, Receiver, insert_task, wait_until


@pytest.fixture
def start_hook_worker(hook_settings, start_worker):
    """A worker (in a thread; its task processes are real) with the hook settings (+ overrides)."""
    return lambda **overrides: start_worker(**vars(hook_settings) | overrides)


@pytest.fixture
def hook_app(hook_settings):
    app = create_app(hook_settings)
    yield app
    app.extensions["skiplock"].close()


def verify(secret: str, copy: Received) -> dict:
    return Webhook(secret).verify(copy.body, copy.headers)


def deliveries(conn, task_id: int) -> list[dict]:
    return conn.execute(
        "SELECT *, status::text AS status FROM webhook_deliveries WHERE task_id = %s ORDER BY id", (task_id,)
    ).fetchall()


def tries(conn, delivery_id: int) -> list[dict]:
    return conn.execute(
        "SELECT * FROM webhook_attempts WHERE delivery_id = %s ORDER BY attempt", (delivery_id,)
    ).fetchall()


def submit(client, receiver, **fields) -> int:
    body = {"task_type": "greet", "task_input": {"name": "Ada"}, "callback_url": receiver.url, **fields}
    response = client.post("/api/tasks", json=body)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def test_a_final_task_is_posted_signed_with_the_keys_secret(hook_app, conn, receiver, start_hook_worker):
    client = hook_app.test_client()
    secret = client.get("/api/webhooks/secret").get_json()["secret"]
    assert secret.startswith("whsec_")
    assert client.get("/api/webhooks/secret").get_json()["secret"] == secret  # one per key
    task_id = submit(client, receiver)
    start_hook_worker()
    [copy] = receiver.copies(1)
    body = verify(secret, copy)
    status = client.get(f"/api/task-status/{task_id}").get_json()
    assert body["type"] == "task.completed"
    assert body["data"] == status  # the task exactly as task-status shows it
    assert body["data"]["result"] == {"greeting": "Hello, Ada!", "attempt": 1}
    [delivery] = deliveries(conn, task_id)
    assert copy.headers["webhook-id"] == f"msg_{delivery['id']}"
    assert copy.headers["Content-Type"] == "application/json"
    assert abs(int(copy.headers["webhook-timestamp"]) - time.time()) < 30
    wait_until(lambda: deliveries(conn, task_id)[0]["status"] == "delivered", message="delivered")
    [attempt] = tries(conn, delivery["id"])
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["latency_ms"] > 0
    # What the API shows of it.
    [shown] = client.get(f"/api/tasks/{task_id}/webhooks").get_json()
    assert shown["webhook_id"] == copy.headers["webhook-id"] and shown["status"] == "delivered"
    assert [t["status_code"] for t in shown["tries"]] == [200]


def test_a_tasks_own_secret_signs_its_webhook(hook_app, receiver, start_hook_worker):
    client = hook_app.test_client()
    own = new_secret()
    submit(client, receiver, callback_secret=own)
    start_hook_worker()
    [copy] = receiver.copies(1)
    assert verify(own, copy)["type"] == "task.completed"
    key_secret = client.get("/api/webhooks/secret").get_json()["secret"]
    with pytest.raises(WebhookVerificationError):
        verify(key_secret, copy)


def test_failed_and_cancelled_tasks_are_posted_and_retries_are_not(
    hook_app, conn, receiver, start_hook_worker
):
    client = hook_app.test_client()
    failed = submit(client, receiver, task_type="fail", task_input={"times": 5}, max_attempts=2)
    recovered = submit(client, receiver, task_type="fail", task_input={"times": 1}, max_attempts=3)
    cancelled = submit(client, receiver, delay_seconds=3600)
    assert client.post(f"/api/tasks/{cancelled}/cancel").status_code == 200
    start_hook_worker()
    copies = receiver.copies(3)
    time.sleep(1.5)  # no fourth: the failed attempts that were retried have no webhook
    assert len(receiver.received) == 3
    secret = client.get("/api/webhooks/secret").get_json()["secret"]
    by_task = {verify(secret, c)["data"]["task_id"]: verify(secret, c) for c in copies}
    assert by_task[failed]["type"] == "task.failed"
    assert by_task[failed]["data"]["error"] == "TaskFailed: planned failure"
    assert by_task[recovered]["type"] == "task.completed"
    assert by_task[recovered]["data"]["attempts"] == 2
    assert by_task[cancelled]["type"] == "task.cancelled"


def test_a_batch_posts_for_the_tasks_that_ask(hook_app, conn, receiver, start_hook_worker):
    client = hook_app.test_client()
    items = [
        {"task_type": "noop", "task_input": 1, "callback_url": receiver.url},
        {"task_type": "noop", "task_input": 2},
        {"task_type": "noop", "task_input": 3, "callback_url": receiver.url, "callback_secret": new_secret()},
    ]
    response = client.post("/api/tasks/batch", json={"tasks": items})
    assert response.status_code == 202, response.get_json()
    ids = response.get_json()["task_ids"]
    secret = conn.execute("SELECT task_id, secret FROM task_callback_secrets").fetchall()
    assert [(r["task_id"], r["secret"]) for r in secret] == [(ids[2], items[2]["callback_secret"])]
    start_hook_worker()
    copies = receiver.copies(2)
    time.sleep(1)
    assert len(receiver.received) == 2
    key_secret = client.get("/api/webhooks/secret").get_json()["secret"]
    signed = {}
    for copy in copies:
        for name, s in (("key", key_secret), ("own", items[2]["callback_secret"])):
            try:
                signed[verify(s, copy)["data"]["task_id"]] = name
            except WebhookVerificationError:
                pass
    assert signed == {ids[0]: "key", ids[2]: "own"}


# --- the outbox: one statement ---------------------------------------------------------------


def test_the_final_write_and_its_delivery_commit_together(conn, database_url):
    task_id = insert_task(conn, "noop", callback_url="http://hooks.example.com/x")
    other = insert_task(conn, "noop")
    claimed = task_claim(conn, worker_id="w", limit=2, lease_seconds=30)
    assert {t.id: t.has_callback for t in claimed} == {task_id: True, other: False}
    refs = [(AttemptRef(t.id, t.attempt), '"done"') for t in claimed]
    with psycopg.connect(database_url, autocommit=False, row_factory=psycopg.rows.dict_row) as tx:
        task_complete_many(tx, worker_id="w", results=refs)
        tx.rollback()  # neither the final state nor the delivery
    assert conn.execute("SELECT count(*) AS n FROM webhook_deliveries").fetchone()["n"] == 0
    assert (
        conn.execute("SELECT status::text AS s FROM tasks WHERE id = %s", (task_id,)).fetchone()["s"]
        == "processing"
    )
    task_complete_many(conn, worker_id="w", results=refs)
    [delivery] = conn.execute("SELECT * FROM webhook_deliveries").fetchall()
    assert delivery["task_id"] == task_id and delivery["event"] == "task.completed"
    assert delivery["payload"]["data"]["result"] == "done"
    assert delivery["url"] == "http://hooks.example.com/x"


def test_a_rescued_task_that_fails_for_good_gets_its_delivery(conn):
    task_id = insert_task(conn, "noop", callback_url="http://hooks.example.com/x", max_attempts=1)
    [claimed] = task_claim(conn, worker_id="w", limit=1, lease_seconds=30)
    task_start_many(conn, worker_id="w", started_ago={AttemptRef(claimed.id, claimed.attempt): 0.0})
    conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (task_id,))
    [rescued] = task_rescue(conn, limit=10, grace_seconds=1, backoff_base=1, backoff_max=1)
    assert rescued["status"] == "failed"
    [delivery] = conn.execute("SELECT event, payload FROM webhook_deliveries").fetchall()
    assert delivery["event"] == "task.failed" and "lease expired" in delivery["payload"]["data"]["error"]


# --- refused callbacks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1:9/x", "127.0.0.1"),
        ("http://localhost/x", "non-public"),
        ("http://10.1.2.3/x", "10.1.2.3"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("http://[::1]/x", "::1"),
        ("http://[::ffff:127.0.0.1]/x", "127.0.0.1"),
        ("http://0.0.0.0/x", "0.0.0.0"),
        ("ftp://example.com/x", "http://"),
        ("http://user:pw@example.com/x", "credentials"),
        ("http://no-such-host.invalid/x", "does not resolve"),
        ("http:///nohost", "host"),
        ("not a url", "http://"),
    ],
)
def test_a_callback_to_a_private_or_odd_address_is_refused(client, conn, url, reason):
    response = client.post("/api/tasks", json={"task_type": "noop", "task_input": 1, "callback_url": url})
    assert response.status_code == 422
    message = str(response.get_json()["errors"]["json"]["callback_url"])
    assert reason in message
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


def test_a_bad_callback_secret_is_refused(hook_app, conn, receiver):
    client = hook_app.test_client()
    for body, field_name in (
        ({"callback_url": receiver.url, "callback_secret": "hunter2"}, "callback_secret"),
        ({"callback_url": receiver.url, "callback_secret": "whsec_" + "A" * 20}, "callback_secret"),
        ({"callback_secret": new_secret()}, "callback_secret"),
    ):
        response = client.post("/api/tasks", json={"task_type": "noop", "task_input": 1, **body})
        assert response.status_code == 422 and field_name in response.get_json()["errors"]["json"]
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


def test_the_sender_checks_the_address_again_before_each_try(
    hook_app, settings, conn, receiver, start_worker
):
    """Accepted at submit (the API allows loopback), refused when sent (this worker does not):
    as if the name had moved to a private address since."""
    task_id = submit(hook_app.test_client(), receiver)
    start_worker(webhook_max_attempts=2, webhook_backoff_base_seconds=0.1)
    wait_until(
        lambda: deliveries(conn, task_id) and deliveries(conn, task_id)[0]["status"] == "dead", message="dead"
    )
    assert receiver.received == []
    [delivery] = deliveries(conn, task_id)
    assert [t["error"].startswith("refused: ") for t in tries(conn, delivery["id"])] == [True, True]


# --- faults: every delivery arrives at least once, every copy with the same webhook-id -------


def test_a_receiver_that_is_down_gets_it_when_it_comes_back(hook_app, conn, start_hook_worker):
    down = Receiver().start()
    down.stop()  # nothing listens on its port now
    task_id = submit(hook_app.test_client(), down)
    start_hook_worker()

    def failed_tries():
        found = deliveries(conn, task_id)
        return found and len([t for t in tries(conn, found[0]["id"]) if t["error"]]) >= 2

    wait_until(failed_tries, message="two failed tries")
    [delivery] = deliveries(conn, task_id)
    assert all(
        t["status_code"] is None and "refused" in t["error"].lower() for t in tries(conn, delivery["id"])[:2]
    )
    assert delivery["status"] == "pending" and delivery["last_error"]
    back = Receiver(port=down.port).start()  # it comes back on the same port
    try:
        [copy] = back.copies(1)
        assert copy.headers["webhook-id"] == f"msg_{delivery['id']}"
        wait_until(lambda: deliveries(conn, task_id)[0]["status"] == "delivered", message="delivered")
    finally:
        back.stop()


def test_a_slow_receiver_and_a_500_get_retries_with_the_same_webhook_id(
    hook_app, conn, receiver, start_hook_worker
):
    receiver.script = ["slow", "500", "ok"]
    receiver.slow_seconds = 2.5  # past the 1 s timeout
    task_id = submit(hook_app.test_client(), receiver)
    start_hook_worker()
    copies = receiver.copies(3, timeout=30)
    assert len({c.headers["webhook-id"] for c in copies}) == 1
    assert len({c.body for c in copies}) == 1  # the same body; each try signed anew
    wait_until(lambda: deliveries(conn, task_id)[0]["status"] == "delivered", message="delivered")
    [delivery] = deliveries(conn, task_id)
    recorded = tries(conn, delivery["id"])
    assert recorded[0]["status_code"] is None and "no answer within 1 s" in recorded[0]["error"]
    assert recorded[1]["status_code"] == 500 and "HTTP 500" in recorded[1]["error"]
    assert recorded[2]["status_code"] == 200 and recorded[2]["error"] is None
    # Each retry waited for its backoff: 0.2 s after the first try, 0.4 s after the second (±25%).
    gaps = [(b["started_at"] - a["started_at"]).total_seconds() for a, b in itertools.pairwise(recorded)]
    assert gaps[0] >= 1.0 + 0.15 and gaps[1] >= 0.3, gaps


def test_a_delivery_out_of_tries_is_dead_and_can_be_sent_again(hook_app, conn, receiver, start_hook_worker):
    receiver.script = ["500", "500", "500"]
    client = hook_app.test_client()
    task_id = submit(client, receiver)
    start_hook_worker(webhook_max_attempts=3)
    wait_until(
        lambda: deliveries(conn, task_id) and deliveries(conn, task_id)[0]["status"] == "dead", message="dead"
    )
    [delivery] = deliveries(conn, task_id)
    assert delivery["attempts"] == 3 and delivery["last_status_code"] == 500
    resent = client.post(f"/api/webhooks/{delivery['id']}/resend")
    assert resent.status_code == 200 and resent.get_json()["status"] == "pending"
    again = client.post(f"/api/webhooks/{delivery['id']}/resend")
    assert again.status_code in (200, 409)  # 409 while pending; 200 if already delivered again
    copies = receiver.copies(4)
    assert {c.headers["webhook-id"] for c in copies} == {f"msg_{delivery['id']}"}
    wait_until(lambda: deliveries(conn, task_id)[0]["status"] == "delivered", message="delivered")
    assert client.post("/api/webhooks/999999/resend").status_code == 404


def test_a_worker_killed_mid_delivery_leaves_it_to_another(hook_settings, hook_app, conn, worker_process):
    receiver = Receiver(script=["hang"]).start()
    try:
        task_id = submit(hook_app.test_client(), receiver)
        first = worker_process(**vars(hook_settings) | {"concurrency": 1})
        receiver.copies(1)  # the first try is under way, unanswered
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        worker_process(**vars(hook_settings) | {"concurrency": 1})
        copies = receiver.copies(2, timeout=40)  # after the dead sender's lease (timeout + margin)
        assert copies[0].headers["webhook-id"] == copies[1].headers["webhook-id"]
        wait_until(lambda: deliveries(conn, task_id)[0]["status"] == "delivered", message="delivered")
        [delivery] = deliveries(conn, task_id)
        first_try, second_try = tries(conn, delivery["id"])
        assert "sender stopped" in first_try["error"]
        assert second_try["status_code"] == 200
    finally:
        receiver.stop()


# --- who sees what -------------------------------------------------------------------------------


def test_a_key_sees_and_resends_only_its_own_deliveries(hook_settings, conn, receiver, start_hook_worker):
    app = create_app(replace(hook_settings, auth="on"))
    try:
        client = app.test_client()
        tokens = [keys.create_key(conn, name=n)["token"] for n in ("a", "b")]
        auth = [{"Authorization": f"Bearer {t}"} for t in tokens]
        secrets = [client.get("/api/webhooks/secret", headers=h).get_json()["secret"] for h in auth]
        assert secrets[0] != secrets[1]
        response = client.post(
            "/api/tasks",
            json={"task_type": "noop", "task_input": 1, "callback_url": receiver.url},
            headers=auth[0],
        )
        task_id = response.get_json()["task_id"]
        start_hook_worker()
        [copy] = receiver.copies(1)
        assert verify(secrets[0], copy)
        with pytest.raises(WebhookVerificationError):
            verify(secrets[1], copy)
        assert client.get(f"/api/tasks/{task_id}/webhooks", headers=auth[1]).status_code == 404
        [delivery] = client.get(f"/api/tasks/{task_id}/webhooks", headers=auth[0]).get_json()
        wait_until(lambda: deliveries(conn, task_id)[0]["status"] == "delivered", message="delivered")
        assert (
            client.post(f"/api/webhooks/{delivery['delivery_id']}/resend", headers=auth[1]).status_code == 404
        )
        assert (
            client.post(f"/api/webhooks/{delivery['delivery_id']}/resend", headers=auth[0]).status_code == 200
        )
    finally:
        app.extensions["skiplock"].close()


def test_secrets_never_appear_in_task_answers(hook_app, receiver):
    client = hook_app.test_client()
    own = new_secret()
    task_id = submit(client, receiver, callback_secret=own)
    for path in (f"/api/task-status/{task_id}", f"/api/tasks/{task_id}", "/api/tasks"):
        assert own not in json.dumps(client.get(path).get_json())
