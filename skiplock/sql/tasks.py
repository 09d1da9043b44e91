"""Tasks as clients see them (tasks, task_attempts): read, list, cancel, retry (submits:
skiplock/sql/inserts.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NoReturn, NotRequired, TypedDict

import psycopg

from skiplock.errors import InvalidTransition, QuotaSlotTaken, TaskGone, TaskNotFound, UniqueTaken
from skiplock.sql.fragments import (
    ANNOUNCED,
    CANCEL_CHANNEL,
    HOOK_COLUMNS,
    OWNED,
    PENDING_CHANNEL,
    TASK_COLUMNS,
    announce,
    outbox,
    task_columns,
)
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.workflows import workflow_rearm, workflow_tasks_ended

# tasks_max_attempts_in_range (schema.sql): no task may have more attempts than this.
MAX_ATTEMPTS_STORED = 1000


class SubmittedRow(TypedDict):
    """What task_insert returns at least: the new task's id and status (and, for a submit that
    met an unfinished task with its unique_key, deduplicated: true)."""

    id: int
    status: str
    deduplicated: NotRequired[bool]


class TaskRow(SubmittedRow):
    """A task as clients see it (TASK_FIELDS); with its input when asked for."""

    task_type: str
    queue: str
    priority: int
    result: Any
    error: str | None
    progress: float | None
    attempts: int
    max_attempts: int
    timeout_seconds: int
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    input: NotRequired[Any]
    # What made it besides a submit (GET /api/tasks/{id}), and its workflow.
    schedule_id: NotRequired[int | None]
    scheduled_for: NotRequired[datetime | None]
    workflow_id: NotRequired[int | None]


class AttemptRow(TypedDict):
    """An ended attempt of a task (task_attempts)."""

    attempt: int
    worker_id: str
    outcome: str
    started_at: datetime | None
    finished_at: datetime
    error: str | None


def task_get(
    conn: Connection, task_id: int, *, with_input: bool = False, owner: int | None = None
) -> TaskRow:
    """task_get: one task as clients see it; raises TaskNotFound (also for another owner's
    task: it answers exactly as an id never issued), or TaskGone for an id that was issued but
    whose row is gone (pruned after its retention period, or deleted)."""
    # With the input: the whole task (GET /api/tasks/{id}), scheduling columns included.
    columns = TASK_COLUMNS + (
        ", input, fairness_key, concurrency_key, unique_key, expires_at, schedule_id, scheduled_for"
        if with_input
        else ""
    )
    row = conn.execute(
        f"SELECT {columns} FROM tasks WHERE id = %(id)s AND {OWNED}", {"id": task_id, "owner": owner}
    ).fetchone()
    if row is None:
        _raise_missing(conn, task_id)
    return row


def _raise_missing(conn: Connection, task_id: int) -> NoReturn:
    """TaskGone for an id issued whose row is gone, else TaskNotFound (also when the row exists
    but belongs to another owner). Issued: up to the last id of the current timeline, so an id
    an earlier timeline issued and a failover lost is gone too (a client did hold it)."""
    gone = one_row(
        conn.execute(
            """
        SELECT %(id)s BETWEEN 1 AND skiplock_id_base() + CASE WHEN is_called THEN last_value ELSE 0 END
               AND NOT EXISTS (SELECT FROM tasks WHERE id = %(id)s) AS gone
        FROM tasks_id_seq
        """,
            {"id": task_id},
        )
    )["gone"]
    raise TaskGone(task_id) if gone else TaskNotFound(task_id)


# task_list narrows a status to the partial index its rows are in, in the statement's text, so
# that a prepared (generic) plan can use it too: a status most of a client's history does not
# have (a client with no failed task asking for its failed ones) would otherwise walk the whole
# history through tasks_owner_idx. Completed tasks are most of any history: tasks_owner_idx.
_STATUS_INDEXED = {
    "pending": "status IN ('pending', 'processing')",  # tasks_owner_unfinished_idx
    "processing": "status IN ('pending', 'processing')",
    # As the index says it (schema.sql): failed, cancelled or expired.
    "failed": "status NOT IN ('pending', 'processing', 'completed')",  # tasks_owner_ended_idx
    "cancelled": "status NOT IN ('pending', 'processing', 'completed')",
    "expired": "status NOT IN ('pending', 'processing', 'completed')",
}


def task_list(
    conn: Connection,
    *,
    status: str | None = None,
    task_type: str | None = None,
    queue: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
    owner: int | None = None,
) -> list[TaskRow]:
    """task_list: newest first, keyset-paginated on id (pass the last id seen as before_id); a
    client key's own tasks only (owner), through tasks_owner_idx, or for a status, the partial
    index of its rows (_STATUS_INDEXED). Only the filters given are in the statement: a prepared
    statement's generic plan cannot drop an "IS NULL OR" that a parameter would have decided."""
    where = ["owner_key_id = %(owner)s" if owner is not None else "TRUE"]
    if status is not None:
        where += ["status = %(status)s::task_status", _STATUS_INDEXED.get(status, "TRUE")]
    if task_type is not None:
        where.append("task_type = %(task_type)s")
    if queue is not None:
        where.append("queue = %(queue)s")
    if before_id is not None:
        where.append("id < %(before_id)s")
    return conn.execute(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %(limit)s",
        {
            "status": status,
            "task_type": task_type,
            "queue": queue,
            "before_id": before_id,
            "limit": limit,
            "owner": owner,
        },
    ).fetchall()


def task_cancel(conn: Connection, task_id: int, *, owner: int | None = None, settle: bool = True) -> TaskRow:
    """task_cancel: pending or processing -> cancelled. A processing attempt is recorded as
    cancelled here (released, uncounted, if its worker had not handed it to a process: it had
    not started) and its worker is told (NOTIFY)
    to stop it; its late writes are fenced out. A workflow step's dependents are settled in the
    same transaction (settle=False: the caller cancels them too)."""
    with conn.transaction():
        row = _cancel(conn, task_id, owner)
        if row.pop("workflow_id") is not None and settle:
            workflow_tasks_ended(conn, [task_id])
    return row


def _cancel(conn: Connection, task_id: int, owner: int | None) -> TaskRow:
    # Lock first; decide in the next statement, whose snapshot sees a hand-over to a process
    # that committed while this waited for the lock (task_hand_over).
    params = {"id": task_id, "channel": CANCEL_CHANNEL, "owner": owner}
    conn.execute(
        f"SELECT id FROM tasks WHERE id = %(id)s AND status IN ('pending', 'processing') AND {OWNED} FOR UPDATE",
        params,
    )
    row = conn.execute(
        f"""
        WITH target AS (
            SELECT id, status AS previous_status, attempts, worker_id,
                   coalesce(started_at, skiplock_handed_at(worker_id, id, attempts)) AS started_at
            FROM tasks WHERE id = %(id)s AND status IN ('pending', 'processing') AND {OWNED}
            FOR UPDATE
        ), cancelled AS (
            UPDATE tasks t
            SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                attempts = CASE WHEN target.previous_status = 'processing' AND target.started_at IS NULL
                                THEN t.attempts - 1 ELSE t.attempts END
            FROM target
            WHERE t.id = target.id
            RETURNING {task_columns("t")}, t.workflow_id,
                      target.previous_status, target.worker_id AS holder, target.started_at AS attempt_started_at,
                      target.attempts AS attempt, {HOOK_COLUMNS}
        ), {outbox("cancelled")}, logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
            SELECT id, attempt, holder,
                   CASE WHEN attempt_started_at IS NULL THEN 'released' ELSE 'cancelled' END::task_attempt_outcome,
                   attempt_started_at,
                   CASE WHEN attempt_started_at IS NULL THEN 'cancelled by a client before it started'
                        ELSE 'cancelled by a client' END
            FROM cancelled WHERE previous_status = 'processing'
        ), {announce("cancelled", "true")}
        SELECT cancelled.*,
               CASE WHEN previous_status = 'processing'
                    THEN pg_notify(%(channel)s, id::text) END AS notified
        FROM cancelled WHERE {ANNOUNCED}
        """,
        params,
    ).fetchone()
    if row is None:
        current = task_get(conn, task_id, owner=owner)
        raise InvalidTransition(task_id, current["status"], "cancelled", current["error"])
    for extra in (
        *("previous_status", "holder", "attempt_started_at", "attempt", "notified"),
        *("callback_url", "owner_key_id", "hook_payload"),
    ):
        row.pop(extra)
    return row


def task_retry(
    conn: Connection, task_id: int, *, owner: int | None = None, quota_slot: int | None = None
) -> TaskRow:
    """task_retry: failed, cancelled or expired -> pending, due now (the workers' admission gives
    it a turn). Grants one more attempt if the task had used them all (attempts are not reset:
    with worker_id they are the fencing token). Unfinished again, it holds `quota_slot` (its
    owner's max_unfinished; None: no cap). Raises UniqueTaken if another unfinished task of the
    owner has its unique_key, QuotaSlotTaken if one took the slot."""
    try:
        with conn.transaction():  # the retry and the re-arm of the steps its end cancelled
            row = conn.execute(
                f"""
        WITH retried AS (
            UPDATE tasks
            SET status = 'pending', run_at = now(), finished_at = NULL, progress = NULL,
                max_attempts = greatest(max_attempts, attempts + 1),
                -- admission gives it a turn (or puts it to wait on its limit) at once
                turn = NULL, waiting_on = NULL, limited = false,
                -- asked to run again: an expired task's deadline no longer applies
                expires_at = CASE WHEN status = 'expired' THEN NULL ELSE expires_at END,
                quota_slot = %(quota_slot)s
            WHERE id = %(id)s AND status IN ('failed', 'cancelled', 'expired') AND {OWNED}
              AND attempts < {MAX_ATTEMPTS_STORED}  -- no attempt can be granted past it
            RETURNING {TASK_COLUMNS}, workflow_id, pg_notify(%(channel)s, '') AS notified
        ), {announce("retried", "false")}
        SELECT * FROM retried WHERE {ANNOUNCED}
        """,
                {"id": task_id, "channel": PENDING_CHANNEL, "owner": owner, "quota_slot": quota_slot},
            ).fetchone()
            if row is not None and row.pop("workflow_id") is not None:
                workflow_rearm(conn, [task_id])
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name == "tasks_quota_slot_idx":
            raise QuotaSlotTaken() from None
        raise UniqueTaken(task_id) from None
    if row is None:
        current = task_get(conn, task_id, owner=owner)
        raise InvalidTransition(task_id, current["status"], "retried", current["error"])
    row.pop("notified")
    return row


def task_attempts_list(conn: Connection, task_id: int) -> list[AttemptRow]:
    """task_attempts_list: a task's ended attempts, oldest first."""
    return conn.execute(
        """
        SELECT attempt, worker_id, outcome::text AS outcome, started_at, finished_at, error
        FROM task_attempts WHERE task_id = %s ORDER BY id
        """,
        (task_id,),
    ).fetchall()
