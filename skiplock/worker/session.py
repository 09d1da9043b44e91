"""A worker's database session: the connection for claims, leases and duties, and the one that
LISTENs and holds the worker's liveness lock (task_workers). Both are opened, and lost, together.

The listening connection holds a session-level advisory lock for as long as the worker lives: if
the worker's process dies, the kernel closes its sockets, the lock goes with the session, and
other workers take its tasks back at once. Each connection takes a new random key, so a session
of ours that lingers on the server (a half-open TCP connection, until keepalives drop it) never
blocks the next one.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

import psycopg

from skiplock import __version__
from skiplock.db import connect, connect_worker, reconnect_delay
from skiplock.settings import Settings
from skiplock.sql.fragments import CANCEL_CHANNEL, PENDING_CHANNEL
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.workers import task_worker_register, task_worker_unregister
from skiplock.startup import check_schema

log = logging.getLogger("skiplock.worker")

# Advisory lock keys are bigint: 63 random bits keep them positive and never repeat in practice.
LOCK_KEY_BITS = 63


class WorkerSession:
    def __init__(self, settings: Settings, worker_id: str):
        self.settings = settings
        self.worker_id = worker_id
        self.db: Connection | None = None
        self.listener: Connection | None = None
        self.task_types: list[str] | None = None  # what it runs, registered (the supervisor's)
        self.failures = 0  # consecutive
        self.generation = 0  # sessions opened so far: a new one may find its holdings gone
        self._retry_at = 0.0

    @property
    def connected(self) -> bool:
        return self.db is not None and not self.db.closed and self.listener is not None

    def retry_in(self, now: float) -> float:
        return self._retry_at - now

    def ensure(self) -> bool:
        """Connected (reconnecting, LISTENing and registering when needed, not before the
        backoff allows): True if the session is usable now. Raises StartupError if the
        database's schema is missing or older than this code needs (waiting would not help)."""
        if self.connected:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            self.close()
            timeout = self.settings.db_timeout_seconds
            pooler = self.settings.database_pooler
            self.db = db = connect_worker(
                self.settings.database_url, timeout, lease_seconds=self.settings.lease_seconds, pooler=pooler
            )
            self.listener = listener = connect(
                self.settings.database_url,
                role="listener",
                timeout_seconds=timeout,
                keepalive_seconds=self.settings.lease_seconds,
                pooler=pooler,
            )
            check_schema(db)  # on every connection: the database may have been replaced meanwhile
            listener.execute(f"LISTEN {PENDING_CHANNEL}")
            listener.execute(f"LISTEN {CANCEL_CHANNEL}")
            self._register(db, listener)
        except psycopg.Error as exc:
            self.lost(exc)
            return False
        if self.failures:
            log.info("worker %s reconnected to the database", self.worker_id)
        self.failures = 0
        self.generation += 1
        return True

    def _register(self, db: Connection, listener: Connection) -> None:
        lock_key = secrets.randbits(LOCK_KEY_BITS)
        # The server's pid, not listener.info.backend_pid: behind PgBouncer that is the pooler's
        # own key, no Postgres backend's.
        row = one_row(listener.execute("SELECT pg_backend_pid() AS pid, pg_advisory_lock(%s)", (lock_key,)))
        task_worker_register(
            db,
            worker_id=self.worker_id,
            lock_key=lock_key,
            session_pid=row["pid"],
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            queues=self.settings.queues,
            concurrency=self.settings.concurrency,
            lease_seconds=self.settings.lease_seconds,
            rescue_interval_seconds=self.settings.rescue_interval_seconds,
            task_types=self.task_types,
        )

    def lost(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("worker %s lost the database (%s); retrying", self.worker_id, str(exc).strip())
        self._retry_at = time.monotonic() + reconnect_delay(self.failures)
        self.close()

    def unregister(self) -> None:
        """Leaving for good (everything held was handed back): best effort."""
        if self.db is not None and self.connected:
            try:
                task_worker_unregister(self.db, worker_id=self.worker_id)
            except psycopg.Error:
                pass  # the rescue duty of other workers forgets the row

    def close(self) -> None:
        for conn in (self.db, self.listener):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # closing a broken connection must not stop the loop
                    pass
        self.db = self.listener = None
