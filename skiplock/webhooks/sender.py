"""The webhook sender: a thread of each worker that sends due deliveries (webhook_deliveries),
off the claim path, on a connection of its own.

It takes due deliveries a few at a time (each under a lease: one it cannot finish, because it
died or was cut off, is due again when the lease ends, for another sender), POSTs each from a
pool of threads, signed per Standard Webhooks, and records every try (webhook_attempts) with
its delivery's next state: delivered, due again after a backoff, or dead. It looks for due
deliveries every POLL_SECONDS, and at once when this worker's writer stored the final state of
a task with a callback (wake()).
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
from standardwebhooks.webhooks import Webhook

from skiplock.db import connect_worker, reconnect_delay
from skiplock.settings import Settings
from skiplock.sql.webhooks import (
    WebhookTry,
    webhook_deliveries_claim,
    webhook_deliveries_record,
    webhook_secret,
)
from skiplock.webhooks import targets as callbacks

log = logging.getLogger("skiplock.webhooks")

POLL_SECONDS = 1.0
# A try's lease beyond its HTTP timeout: the DNS check and recording its answer.
LEASE_MARGIN_SECONDS = 10.0
# While tries are under way, answers are gathered this long before they are recorded together.
GATHER_SECONDS = 0.005


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(secret: str, message_id: str, body: str) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature for this body, signed now."""
    now = datetime.now(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body),
    }


def message_id(delivery_id: int) -> str:
    return f"msg_{delivery_id}"


class WebhookSender:
    def __init__(self, settings: Settings, worker_id: str):
        self.settings = settings
        self.worker_id = worker_id
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._answers: queue.SimpleQueue[WebhookTry] = queue.SimpleQueue()
        self._in_flight = 0  # taken, not yet recorded
        # Deliveries taken ahead of the threads that send them: a thread that is done finds its
        # next one waiting, instead of waiting for the next turn's transaction.
        self._ahead = 2 * settings.webhook_concurrency
        self._thread = threading.Thread(target=self._run, name="skiplock-webhooks", daemon=True)
        self._sends = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="skiplock-webhook")

    def start(self) -> WebhookSender:
        self._thread.start()
        return self

    def wake(self) -> None:
        """A delivery may be due now (this worker just stored a final state with a callback)."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Stop taking deliveries; tries under way get `timeout` to finish and be recorded (a
        try cut short is sent again by another sender when its lease ends)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set() or self._in_flight:
            try:
                with connect_worker(
                    self.settings.database_url, self.settings.db_timeout_seconds, role="webhooks"
                ) as conn:
                    failures = 0
                    self._serve(conn)
                    return
            except psycopg.Error as exc:
                failures += 1
                log.warning("webhook sender lost its connection (%s); reconnecting", str(exc).strip())
                self._stopping.wait(reconnect_delay(failures))
        self._sends.shutdown(wait=False)

    def _serve(self, conn: psycopg.Connection) -> None:
        while not self._stopping.is_set() or self._in_flight:
            self._turn(conn)
            self._wake.wait(POLL_SECONDS if not self._in_flight else 0.05)
            self._wake.clear()
            if self._in_flight and not self._stopping.is_set():
                time.sleep(GATHER_SECONDS)  # let the answers of the tries under way join in
        self._turn(conn)
        self._sends.shutdown(wait=False)

    def _turn(self, conn: psycopg.Connection) -> None:
        """Records the answers that came in and takes due deliveries for the free threads, in
        one transaction: one commit for both."""
        tries = []
        while True:
            try:
                tries.append(self._answers.get_nowait())
            except queue.Empty:
                break
        room = 0 if self._stopping.is_set() else self._ahead - self._in_flight + len(tries)
        if not tries and room <= 0:
            return
        try:
            with conn.transaction():
                if tries:
                    webhook_deliveries_record(
                        conn,
                        sender=self.worker_id,
                        tries=tries,
                        max_attempts=self.settings.webhook_max_attempts,
                        backoff_base=self.settings.webhook_backoff_base_seconds,
                        backoff_max=self.settings.webhook_backoff_max_seconds,
                    )
                due = self._take(conn, room) if room > 0 else []
        except BaseException:
            for answer in tries:  # recorded after the reconnection
                self._answers.put(answer)
            raise
        self._in_flight -= len(tries)
        for delivery, secret in due:
            self._in_flight += 1
            self._sends.submit(self._send, delivery, secret)

    def _take(self, conn: psycopg.Connection, room: int) -> list[tuple[dict, str]]:
        """Up to `room` due deliveries, each with the secret that signs it."""
        due = webhook_deliveries_claim(
            conn,
            sender=self.worker_id,
            limit=room,
            # Taken ahead, a delivery may wait for one try before its own: two tries' time.
            lease_seconds=2 * self.settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS,
            max_attempts=self.settings.webhook_max_attempts,
        )
        return [
            (
                delivery,
                delivery["secret"]
                or webhook_secret(conn, owner_key_id=delivery["owner_key_id"], candidate=new_secret()),
            )
            for delivery in due
        ]

    def _send(self, delivery: dict, secret: str) -> None:
        """One try (in a thread of the pool); its answer goes to the loop to be recorded."""
        try:
            body = json.dumps(delivery["payload"])
            headers = signed_headers(secret, message_id(delivery["id"]), body)
            answer = callbacks.post(
                delivery["url"],
                body.encode(),
                headers,
                timeout=self.settings.webhook_timeout_seconds,
                allow=self.settings.webhook_allow,
            )
        except Exception as exc:  # never lose the try: record why it failed
            log.exception("webhook %d: the try failed unexpectedly", delivery["id"])
            answer = callbacks.Answer(None, 0.0, f"{type(exc).__name__}: {exc}")
        if answer.error:
            log.info(
                "webhook %d (task %d) try %d failed: %s",
                delivery["id"],
                delivery["task_id"],
                delivery["attempt"],
                answer.error,
            )
        self._answers.put(
            WebhookTry(
                delivery["id"], delivery["attempt"], answer.latency_ms, answer.status_code, answer.error
            )
        )
        self._wake.set()
