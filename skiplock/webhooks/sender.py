"""The webhook sender: sends due deliveries (webhook_deliveries) on a connection of its own, in a
process of its own (skiplock.webhooks.process: each worker's, or `skiplock webhooks`).

It takes due deliveries a few at a time (each under a lease: one it cannot finish, because it
died or was cut off, is due again when the lease ends, for another sender), POSTs each from a
pool of threads, signed per Standard Webhooks, and records every try (webhook_attempts) with
its delivery's next state: delivered, due again after a backoff, or dead. Its connection LISTENs
on skiplock_webhook_due, which every statement that writes deliveries NOTIFYs at its commit
(skiplock.sql.fragments.outbox): it takes them at once, and looks for due deliveries (retries
after their backoff, leases that ended) every POLL_SECONDS.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait

import psycopg

from skiplock.db import connect_worker, reconnect_delay
from skiplock.settings import Settings
from skiplock.sql.fragments import WEBHOOK_CHANNEL
from skiplock.sql.rows import Connection
from skiplock.sql.webhooks import (
    DueDelivery,
    WebhookTry,
    webhook_deliveries_claim,
    webhook_deliveries_record,
    webhook_secret,
)
from skiplock.tracing import webhook_headers
from skiplock.webhooks import targets as callbacks
from skiplock.webhooks.signing import message_id, new_secret, signed_headers

log = logging.getLogger("skiplock.webhooks")

# Deliveries that fall due without a notification (retries after their backoff, deliveries whose
# sender's lease ended) are looked for this often.
POLL_SECONDS = 1.0
# While tries are under way, the loop looks for their answers this often (a finished try also
# wakes it at once).
IN_FLIGHT_POLL_SECONDS = 0.05
# A try's lease beyond its HTTP timeout: the DNS check and recording its answer.
LEASE_MARGIN_SECONDS = 10.0
# While tries are under way, answers are gathered this long before they are recorded together,
# unless more deliveries are due than the last turn took: the threads need the next turn's
# deliveries sooner than the answers need company (the turn's statements gather them anyway).
GATHER_SECONDS = 0.005
# Deliveries taken per send thread: the ones beyond the first wait for a thread that is done.
# A backlog goes as fast as the turns (record and take, one commit: ~3 ms) keep the threads fed:
# to a receiver that answers at once (make bench, webhook_sender), 2 gave ~1,500 deliveries/s,
# 4 ~1,950/s with urllib3 (its CPU per POST, ~0.4 ms, was then the limit). With libcurl (see
# skiplock.webhooks.targets) the turns are the limit: 4 gave 2,875-2,946/s, 8 3,303-3,502/s
# (two runs each, system Postgres 15), for a longer lease (a dead sender's deliveries wait
# 8 timeouts and the margin, 90 s at the defaults, before another sender takes them).
TAKEN_AHEAD_PER_THREAD = 8
# Taken ahead, a delivery may wait for the tries before its own in its thread's share of the
# queue: its lease covers them and its own, each up to the timeout.
TRIES_PER_LEASE = TAKEN_AHEAD_PER_THREAD
# Bytes read at once when emptying the doorbell (each ring is one byte).
_DOORBELL_READ_BYTES = 4096


class _Doorbell:
    """Wakes the sender's loop from other threads (a finished try, stop()): a socket, so that the
    loop waits on it and on its database connection's notifications at once."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def ring(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._w.send(b"\0")

    def fileno(self) -> int:
        return self._r.fileno()

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r.recv(_DOORBELL_READ_BYTES):
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class WebhookSender:
    def __init__(self, settings: Settings, worker_id: str):
        self.settings = settings
        self.worker_id = worker_id
        self._doorbell = _Doorbell()
        self._stopping = threading.Event()
        self._answers: queue.SimpleQueue[WebhookTry] = queue.SimpleQueue()
        self._in_flight = 0  # taken, not yet recorded
        self._all_taken = True  # the last turn took every due delivery (fewer than it had room for)
        # Deliveries taken ahead of the threads that send them: a thread that is done finds its
        # next one waiting, instead of waiting for the next turn's transaction.
        self._ahead = TAKEN_AHEAD_PER_THREAD * settings.webhook_concurrency
        self._thread = threading.Thread(target=self._run, name="skiplock-webhooks", daemon=True)
        self._sends = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="skiplock-webhook")

    def start(self) -> WebhookSender:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        """Stop taking deliveries; tries under way get `timeout` to finish and be recorded (a
        try cut short is sent again by another sender when its lease ends)."""
        self._stopping.set()
        self._doorbell.ring()
        self._thread.join(timeout)

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connected_loop()
        finally:
            self._doorbell.close()

    def _connected_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set() or self._in_flight:
            try:
                with connect_worker(
                    self.settings.database_url,
                    self.settings.db_timeout_seconds,
                    role="webhooks",
                    # It LISTENs: never through a transaction pooler (connecting fails plainly).
                    pooler="session" if self.settings.database_pooler == "session" else "",
                ) as conn:
                    conn.execute(f"LISTEN {WEBHOOK_CHANNEL}")
                    failures = 0
                    self._serve(conn)
                    return
            except psycopg.Error as exc:
                failures += 1
                log.warning("webhook sender lost its connection (%s); reconnecting", str(exc).strip())
                self._stopping.wait(reconnect_delay(failures))
        self._sends.shutdown(wait=False)

    def _serve(self, conn: Connection) -> None:
        while not self._stopping.is_set() or self._in_flight:
            self._turn(conn)
            self._wait(conn, POLL_SECONDS if not self._in_flight else IN_FLIGHT_POLL_SECONDS)
            if self._all_taken and self._in_flight and not self._stopping.is_set():
                time.sleep(GATHER_SECONDS)  # let the answers of the tries under way join in
        self._turn(conn)
        self._sends.shutdown(wait=False)

    def _wait(self, conn: Connection, timeout: float) -> None:
        """Until deliveries were written (a notification), a try ended or stop() (the doorbell),
        or `timeout`. Notifications that came in during the last turn's statements count."""
        if not self._notified(conn):
            wait([self._doorbell.fileno(), conn.fileno()], timeout)
            self._notified(conn)
        self._doorbell.clear()

    def _notified(self, conn: Connection) -> bool:
        """Reads the notifications received so far (without waiting): whether there were any."""
        return sum(1 for _ in conn.notifies(timeout=0)) > 0

    def _turn(self, conn: Connection) -> None:
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
        self._all_taken = len(due) < room
        self._in_flight -= len(tries)
        for delivery, secret in due:
            self._in_flight += 1
            self._sends.submit(self._send, delivery, secret)

    def _take(self, conn: Connection, room: int) -> list[tuple[DueDelivery, str]]:
        """Up to `room` due deliveries, each with the secret that signs it."""
        due = webhook_deliveries_claim(
            conn,
            sender=self.worker_id,
            limit=room,
            lease_seconds=TRIES_PER_LEASE * self.settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS,
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

    def _send(self, delivery: DueDelivery, secret: str) -> None:
        """One try (in a thread of the pool); its answer goes to the loop to be recorded."""
        try:
            body = delivery["body"]
            headers = signed_headers(secret, message_id(delivery["id"]), body)
            headers.update(webhook_headers(delivery["trace_context"]))  # the receiver joins the trace
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
                "webhook %d (task %s) try %d failed: %s",
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
        self._doorbell.ring()
