"""The webhook wake-up path: the statement that writes deliveries (the outbox step,
skiplock.sql.fragments.outbox) NOTIFYs skiplock_webhook_due at its commit, only when it wrote one,
and the sender, LISTENing on its own connection, takes them at once instead of at its next poll."""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest

from skiplock.db import connect
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_start_many,
)
from skiplock.sql.fragments import WEBHOOK_CHANNEL
from skiplock.sql.workers import task_rescue
from skiplock.webhooks import sender as sender_module
from skiplock.webhooks.sender import WebhookSender
from tests.helpers import LOOPBACK, Receiver, insert_task

HOOK = "http://hooks.example.com/x"


@pytest.fixture
def listener(database_url):
    """A connection LISTENing on the webhook channel, as a sender's does."""
    with connect(database_url, role="test") as c:
        c.execute(f"LISTEN {WEBHOOK_CHANNEL}")
        yield c


def notified(listener: psycopg.Connection) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=0.2) if n.channel == WEBHOOK_CHANNEL]


def claimed_refs(conn) -> list[AttemptRef]:
    return [AttemptRef(t.id, t.attempt) for t in task_claim(conn, worker_id="w", limit=10, lease_seconds=30)]


def test_a_final_write_notifies_only_when_it_wrote_a_delivery(conn, listener):
    plain = insert_task(conn, "noop")
    [ref] = claimed_refs(conn)
    assert task_complete_many(conn, worker_id="w", results=[(ref, '"done"')]) == {plain}
    assert notified(listener) == []  # no callback: no delivery, no notification

    hooked = [insert_task(conn, "noop", callback_url=HOOK) for _ in range(3)]
    refs = claimed_refs(conn)
    assert task_complete_many(conn, worker_id="w", results=[(r, "1") for r in refs]) == set(hooked)
    assert notified(listener) == [""]  # one per statement, however many deliveries it wrote


def test_a_retry_writes_no_delivery_and_notifies_no_sender(conn, listener):
    insert_task(conn, "noop", callback_url=HOOK, max_attempts=2)
    [ref] = claimed_refs(conn)
    failure = AttemptFailure(ref.task_id, ref.attempt, "failed", "boom")
    outcome = task_fail_many(conn, worker_id="w", failures=[failure], backoff_base=1, backoff_max=1)
    assert outcome == {ref.task_id: "pending"}
    assert notified(listener) == []


def test_a_rescue_that_fails_a_task_for_good_notifies(conn, listener):
    task_id = insert_task(conn, "noop", callback_url=HOOK, max_attempts=1)
    [ref] = claimed_refs(conn)
    task_start_many(conn, worker_id="w", started_ago={ref: 0.0})
    conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (task_id,))
    [rescued] = task_rescue(conn, limit=10, grace_seconds=1, backoff_base=1, backoff_max=1)
    assert rescued["status"] == "failed"
    assert notified(listener) == [""]


def test_the_sender_takes_a_delivery_at_once_when_notified(settings, conn, monkeypatch):
    # Its poll is made far longer than the test: only the notification can wake it in time.
    monkeypatch.setattr(sender_module, "POLL_SECONDS", 60.0)
    receiver = Receiver().start()
    sender = WebhookSender(
        replace(settings, webhook_allow=LOOPBACK, webhook_timeout_seconds=2.0), "w"
    ).start()
    try:
        first = insert_task(conn, "noop", callback_url=receiver.url)
        [ref] = claimed_refs(conn)
        task_complete_many(conn, worker_id="w", results=[(ref, "1")])
        receiver.copies(1)  # its first turn (or the notification) took it; now it waits
        time.sleep(0.3)  # the answer recorded: the sender is back to waiting

        second = insert_task(conn, "noop", callback_url=receiver.url)
        [ref] = claimed_refs(conn)
        written = time.monotonic()
        task_complete_many(conn, worker_id="w", results=[(ref, "2")])
        copies = receiver.copies(2, timeout=5)
        assert copies[1].at - written < 2.0
        ids = {r["task_id"] for r in conn.execute("SELECT task_id FROM webhook_deliveries")}
        assert ids == {first, second}
    finally:
        sender.stop(timeout=5)
        receiver.stop()
