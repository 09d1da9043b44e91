"""A worker on record without running one: a session holding an advisory lock and the row
worker.py registers (task_workers), serving some task types and queues."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg

from skiplock.db import connect
from skiplock.sql.workers import task_worker_register
from tests.helpers import wait_until


@contextmanager
def serving_worker(
    database_url: str,
    conn: psycopg.Connection,
    task_types: Sequence[str] | None,
    queues: Sequence[str] | None = None,
) -> Iterator[str]:
    """A live worker that runs `task_types` (None: a worker from before task types were
    recorded) from `queues` (None: all). Leaving the block ends its session, as its death would."""
    worker_id = f"test:{secrets.token_hex(3)}"
    lock_key = secrets.randbits(62)
    with connect(database_url, role="test-worker") as session:
        session.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
        pid = session.info.backend_pid
        task_worker_register(
            conn,
            worker_id=worker_id,
            lock_key=lock_key,
            session_pid=pid,
            host="test-host",
            pid=4242,
            version="test",
            queues=queues,
            concurrency=1,
            lease_seconds=30,
            rescue_interval_seconds=5,
            task_types=task_types,
        )
        yield worker_id
    # The backend frees its locks a moment after the client closes.
    wait_until(
        lambda: not conn.execute("SELECT FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
        message="the worker's session to end",
    )
