"""The worker registry (task_workers, task_waiters): sessions, dead workers' tasks rescued, idle
workers woken only while someone waits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NotRequired, TypedDict

from skiplock.sql.fragments import (
    ANNOUNCED,
    HOOK_COLUMNS,
    NOW_FINAL,
    PENDING_CHANNEL,
    RETRY_OR_FAIL,
    announce,
    outbox,
    retry_error,
)
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.workflows import workflow_tasks_ended

# Workers whose session ended more than the grace ago: their advisory lock is free right now
# (checked again here, so a worker that reconnected meanwhile keeps its tasks). Sessions older
# than the server are left to their leases: after a restart every worker is reconnecting.
_DEAD_WORKERS = """
    dead AS (
        SELECT worker_id FROM task_workers
        WHERE gone_at < now() - make_interval(secs => %(grace)s)
          AND connected_at >= pg_postmaster_start_time()
          AND pg_try_advisory_xact_lock(lock_key)
    )"""


class RescuedRow(TypedDict):
    """A task task_rescue took back."""

    id: int
    status: str  # its new status: pending (released, or retried later) or failed
    outcome: str  # lost (it had started: the attempt counts) or released (uncounted)
    task_type: str
    queue: str
    workflow_id: NotRequired[int | None]  # (read and dropped by task_rescue)


# The rescue's first statement locks the tasks to take back; the second, in a later snapshot,
# reads what their workers had handed to processes (a hand-over that committed before the lock
# was taken must be seen: task_hand_over) and takes them back.
TASK_RESCUE_LOCK_SQL = f"""
WITH {_DEAD_WORKERS}
SELECT t.id, t.worker_id IN (SELECT worker_id FROM dead) AS worker_died
FROM tasks t
WHERE t.status = 'processing'
  AND (t.lease_expires_at < now() OR t.worker_id IN (SELECT worker_id FROM dead))
ORDER BY t.id
LIMIT %(limit)s
FOR UPDATE OF t SKIP LOCKED
"""

TASK_RESCUE_SQL = f"""
WITH doomed AS (
    SELECT t.id, d.worker_died,
           coalesce(t.started_at, skiplock_handed_at(t.worker_id, t.id, t.attempts)) AS started_at
    FROM unnest(%(ids)s::bigint[], %(died)s::boolean[]) AS d(id, worker_died)
    JOIN tasks t ON t.id = d.id
), released AS (
    UPDATE tasks t
    SET status = 'pending', attempts = t.attempts - 1, lease_expires_at = NULL, progress = NULL
    FROM doomed d
    WHERE t.id = d.id AND d.started_at IS NULL
    RETURNING t.id, t.attempts + 1 AS attempt, t.worker_id, d.worker_died, t.task_type, t.queue
), lost AS (
    UPDATE tasks t
    SET {RETRY_OR_FAIL},
        error = {
    retry_error('''CASE WHEN d.worker_died
                     THEN 'worker ' || t.worker_id || ' died (its database session ended)'
                     ELSE 'lease expired: worker ' || t.worker_id
                          || ' stopped renewing it (died, froze or lost its connection)' END''')
},
        error_traceback = NULL, started_at = d.started_at
    FROM doomed d
    WHERE t.id = d.id AND d.started_at IS NOT NULL
    RETURNING t.id, t.attempts, t.worker_id, t.started_at, t.status, t.error, t.task_type, t.queue,
              t.workflow_id, {HOOK_COLUMNS}
), {outbox("lost")}, logged AS (
    INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
    SELECT id, attempts, worker_id, 'lost'::task_attempt_outcome, started_at, error FROM lost
    UNION ALL
    SELECT id, attempt, worker_id, 'released'::task_attempt_outcome, NULL,
           CASE WHEN worker_died THEN 'worker ' || worker_id || ' died before starting it'
                ELSE 'lease expired before worker ' || worker_id || ' started it' END
    FROM released
), rescued AS (
    SELECT id, status::text AS status, 'lost' AS outcome, task_type, queue, workflow_id FROM lost
    UNION ALL
    SELECT id, 'pending', 'released', task_type, queue, NULL FROM released
), {announce("rescued", NOW_FINAL)}
SELECT * FROM rescued WHERE {ANNOUNCED}
"""


def task_rescue(
    conn: Connection, *, limit: int, grace_seconds: float, backoff_base: float, backoff_max: float
) -> list[RescuedRow]:
    """task_rescue: take back up to `limit` processing tasks whose lease lapsed (their worker
    froze, was cut off or died unseen) or whose worker's session ended more than grace_seconds
    ago (task_workers_mark_gone). A task that may have started (started_at, or in its worker's
    hands: skiplock_handed_at) counts a lost attempt and is retried after its backoff, or failed;
    one that had not is released: pending again, due now, uncounted. Returns a row per task: id, status (new), outcome (lost or released), task_type,
    queue."""
    with conn.transaction():  # a workflow step failed for good settles its dependents with it
        locked = conn.execute(TASK_RESCUE_LOCK_SQL, {"limit": limit, "grace": grace_seconds}).fetchall()
        if not locked:
            return []
        rows: list[RescuedRow] = conn.execute(
            TASK_RESCUE_SQL,
            {
                "ids": [r["id"] for r in locked],
                "died": [r["worker_died"] for r in locked],
                "backoff_base": backoff_base,
                "backoff_max": backoff_max,
            },
        ).fetchall()
        ended = [r["id"] for r in rows if r.pop("workflow_id") is not None and r["status"] != "pending"]
        workflow_tasks_ended(conn, ended)
    return rows


def task_worker_register(
    conn: Connection,
    *,
    worker_id: str,
    lock_key: int,
    session_pid: int,
    host: str,
    pid: int,
    version: str,
    queues: Sequence[str] | None,
    concurrency: int,
    lease_seconds: float,
    rescue_interval_seconds: float,
    task_types: Sequence[str] | None = None,
) -> None:
    """task_worker_register: this worker is alive for as long as the session `session_pid` holds
    the advisory lock `lock_key` (take it first), and runs `task_types` (None: unknown, counted
    as every type). Called on every (re)connection."""
    conn.execute(
        """
        INSERT INTO task_workers (worker_id, host, pid, version, queues, concurrency, lease_seconds,
                                  rescue_interval_seconds, lock_key, session_pid, task_types)
        VALUES (%(worker_id)s, %(host)s, %(pid)s, %(version)s, %(queues)s, %(concurrency)s,
                %(lease)s, %(rescue)s, %(lock_key)s, %(session_pid)s, %(task_types)s)
        ON CONFLICT (worker_id) DO UPDATE
        SET lock_key = excluded.lock_key, session_pid = excluded.session_pid,
            task_types = excluded.task_types, connected_at = now(), gone_at = NULL
        """,
        {
            "worker_id": worker_id,
            "host": host,
            "pid": pid,
            "version": version,
            "queues": list(queues) if queues else None,
            "concurrency": concurrency,
            "lease": lease_seconds,
            "rescue": rescue_interval_seconds,
            "lock_key": lock_key,
            "session_pid": session_pid,
            "task_types": list(task_types) if task_types is not None else None,
        },
    )


def task_worker_unregister(conn: Connection, *, worker_id: str) -> None:
    """task_worker_unregister: this worker stops (after handing back what it held)."""
    conn.execute("DELETE FROM task_workers WHERE worker_id = %(worker_id)s", {"worker_id": worker_id})


def task_workers_mark_gone(conn: Connection) -> list[str]:
    """task_workers_mark_gone: note the workers whose session has ended (their advisory lock is
    free); task_rescue takes their tasks once they have not come back within the grace."""
    rows = conn.execute(
        """
        UPDATE task_workers SET gone_at = now()
        WHERE gone_at IS NULL AND pg_try_advisory_xact_lock(lock_key)
        RETURNING worker_id
        """
    ).fetchall()
    return [r["worker_id"] for r in rows]


def task_workers_forget(conn: Connection, *, grace_seconds: float) -> int:
    """task_workers_forget: delete the rows of workers gone for good that hold no task any more."""
    return conn.execute(
        """
        DELETE FROM task_workers w
        WHERE gone_at < now() - make_interval(secs => %(grace)s)
          AND NOT EXISTS (SELECT FROM tasks t WHERE t.status = 'processing' AND t.worker_id = w.worker_id)
          AND pg_try_advisory_xact_lock(lock_key)  -- still free: no session came back
        """,
        {"grace": grace_seconds},
    ).rowcount


def task_waiter_register(conn: Connection, *, worker_id: str) -> None:
    """task_waiter_register: this worker is idle and waits for NOTIFY skiplock_task_pending.
    Commits at once; before relying on notifications, call task_waiters_settled."""
    conn.execute(
        """
        INSERT INTO task_waiters (worker_id, pid, backend_start)
        SELECT %(worker_id)s, pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()
        ON CONFLICT (worker_id) DO UPDATE
        SET pid = excluded.pid, backend_start = excluded.backend_start, since = now()
        """,
        {"worker_id": worker_id},
    )


def task_waiters_settled(conn: Connection) -> bool:
    """task_waiters_settled: True once no transaction that inserted tasks without seeing the
    waiters is still uncommitted (each holds the advisory key shared until commit; see
    tasks_notify_inserted). Never waits: False means "an insert is in flight, ask again soon".
    After True, one more claim sees every task that was not announced."""
    row = one_row(
        conn.execute("SELECT pg_try_advisory_xact_lock(hashtext('skiplock.task_waiters')) AS settled")
    )
    settled: bool = row["settled"]
    return settled


def task_retries_announce(conn: Connection) -> None:
    """task_retries_announce: after failures or rescues were stored as retries, wake the idle
    workers (if any wait) the way an insert would: each claims, finds the retry not yet due and
    looks up when it falls due (task_next_due_in). No insert trigger sees a row set back to
    pending, and the worker that wrote it may be too busy to run it."""
    conn.execute(
        "SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT FROM task_waiters)",
        {"channel": PENDING_CHANNEL},
    )


def task_waiter_unregister(conn: Connection, *, worker_id: str) -> None:
    """task_waiter_unregister: this worker is busy and claims without waiting for notifications."""
    conn.execute("DELETE FROM task_waiters WHERE worker_id = %(worker_id)s", {"worker_id": worker_id})


def task_waiters_prune_dead(conn: Connection) -> int:
    """task_waiters_prune_dead: forget waiters whose session is gone (a worker that crashed or
    reconnected), or whose worker was found gone (behind a pooler in session mode its server
    session lives on in the pool): they would only make every insert NOTIFY for nobody. A
    session is its pid and start time, so a reused pid does not keep a dead worker's row."""
    return conn.execute(
        """
        DELETE FROM task_waiters w
        WHERE NOT EXISTS (
            SELECT FROM pg_stat_activity a
            WHERE a.pid = w.pid AND a.backend_start IS NOT DISTINCT FROM w.backend_start)
           OR EXISTS (SELECT FROM task_workers tw WHERE tw.worker_id = w.worker_id AND tw.gone_at IS NOT NULL)
        """
    ).rowcount
