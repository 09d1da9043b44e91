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
    wait_until_locks_freed(conn, pid)


def wait_until_locks_freed(conn: psycopg.Connection, pid: int) -> None:
    """Wait until the ended session `pid` holds no lock, as the next rescue round would find it:
    closing a connection returns before its server backend has ended and freed its locks.
    (`is None`: the row of `SELECT FROM`, a dict without columns, is falsy. Tested with `not`,
    this wait returned at once, and a rescue round could find the worker still alive: CI, and
    about 1 run in 30 on a loaded machine.)"""
    wait_until(
        lambda: conn.execute("SELECT FROM pg_locks WHERE pid = %s", (pid,)).fetchone() is None,
        message=f"the locks of session {pid} to be freed",
    )
