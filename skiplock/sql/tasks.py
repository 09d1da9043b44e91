"""Tasks as clients see them (tasks, task_attempts): submit one or many, read, list, cancel, retry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, NotRequired, TypedDict

from psycopg.types.json import Jsonb

from skiplock.errors import InvalidTransition, TaskGone, TaskNotFound
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

# tasks_max_attempts_in_range (schema.sql): no task may have more attempts than this.
MAX_ATTEMPTS_STORED = 1000


class SubmittedRow(TypedDict):
    """What task_insert returns at least: the new task's id and status."""

    id: int
    status: str


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


class AttemptRow(TypedDict):
    """An ended attempt of a task (task_attempts)."""

    attempt: int
    worker_id: str
    outcome: str
    started_at: datetime | None
    finished_at: datetime
    error: str | None


def task_insert(
    conn: Connection,
    *,
    task_type: str,
    input: Any,
    queue: str,
    priority: int,
    max_attempts: int,
    timeout_seconds: int,
    run_at: datetime | None = None,
    delay_seconds: float | None = None,
    owner_key_id: int | None = None,
    full_row: bool = True,
    callback_url: str | None = None,
    callback_secret: str | None = None,
) -> SubmittedRow:
    """task_insert: enqueue one task; the insert trigger wakes waiting workers. run_at defaults
    to now() (the database clock), optionally pushed back by delay_seconds. Returns the stored
    task (a TaskRow), or only its id and status (full_row=False: a hot path that needs no more).
    A callback_secret is stored in the same statement (task_callback_secrets)."""
    returning = TASK_COLUMNS if full_row else "id, status::text AS status"
    insert = """
        INSERT INTO tasks (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at,
                           owner_key_id, callback_url)
        VALUES (%(task_type)s, %(input)s, %(queue)s, %(priority)s, %(max_attempts)s,
                %(timeout_seconds)s,
                coalesce(%(run_at)s, now()) + make_interval(secs => coalesce(%(delay)s, 0)),
                %(owner)s, %(callback_url)s)"""
    if callback_secret is None:  # the hot path: one INSERT
        statement = f"{insert} RETURNING {returning}"
    else:
        statement = f"""
        WITH inserted AS ({insert} RETURNING *), secret AS (
            INSERT INTO task_callback_secrets (task_id, secret) SELECT id, %(secret)s FROM inserted
        )
        SELECT {returning} FROM inserted"""
    return one_row(
        conn.execute(
            statement,
            {
                "callback_url": callback_url,
                "secret": callback_secret,
                "owner": owner_key_id,
                "task_type": task_type,
                "input": Jsonb(input),
                "queue": queue,
                "priority": priority,
                "max_attempts": max_attempts,
                "timeout_seconds": timeout_seconds,
                "run_at": run_at,
                "delay": delay_seconds,
            },
        )
    )


@dataclass(frozen=True)
class NewTask:
    """One task of a batch submit (task_insert_many)."""

    task_type: str
    input_json: str  # JSON text, already validated
    queue: str
    priority: int
    max_attempts: int
    timeout_seconds: int
    run_at: datetime | None = None
    delay_seconds: float | None = None
    callback_url: str | None = None
    callback_secret: str | None = None


def task_insert_many(
    conn: Connection, tasks: Sequence[NewTask], *, owner_key_id: int | None = None
) -> list[int]:
    """task_insert_many: enqueue a batch in one statement (all or nothing, one NOTIFY); returns
    the new ids in the order given (identity values follow the insertion order).

    Arrays go in binary (%b): psycopg's text format quotes every element with a regex, which
    cost the API more CPU per batch than Postgres spent storing it. Callback secrets, if any,
    are stored in the same statement."""
    insert = """
        INSERT INTO tasks (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at,
                           owner_key_id, callback_url)
        SELECT r.task_type, r.input, r.queue, r.priority, r.max_attempts, r.timeout_seconds,
               coalesce(r.run_at, now()) + make_interval(secs => coalesce(r.delay, 0)), %(owner)s,
               r.callback_url
        FROM unnest(%(types)b::text[], %(inputs)b::text[]::jsonb[], %(queues)b::text[], %(priorities)b::int[],
                    %(max_attempts)b::int[], %(timeouts)b::int[], %(run_ats)b::timestamptz[],
                    %(delays)b::float8[], %(callback_urls)b::text[])
            WITH ORDINALITY AS r(task_type, input, queue, priority, max_attempts, timeout_seconds,
                                 run_at, delay, callback_url, n)
        ORDER BY r.n
        RETURNING id"""
    secrets = [t.callback_secret for t in tasks]
    if not any(secrets):
        statement = insert
    else:
        # Identity values follow the insertion order: the n-th smallest new id is the n-th task.
        statement = f"""
        WITH inserted AS ({insert}), secrets AS (
            INSERT INTO task_callback_secrets (task_id, secret)
            SELECT i.id, s.secret
            FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM inserted) i
            JOIN unnest(%(secrets)s::text[]) WITH ORDINALITY AS s(secret, n) ON s.n = i.n
            WHERE s.secret IS NOT NULL
        )
        SELECT id FROM inserted"""
    rows = conn.execute(
        statement,
        {
            "callback_urls": [t.callback_url for t in tasks],
            "secrets": secrets,
            "owner": owner_key_id,
            "types": [t.task_type for t in tasks],
            "inputs": [t.input_json for t in tasks],
            "queues": [t.queue for t in tasks],
            "priorities": [t.priority for t in tasks],
            "max_attempts": [t.max_attempts for t in tasks],
            "timeouts": [t.timeout_seconds for t in tasks],
            "run_ats": [t.run_at for t in tasks],
            "delays": [t.delay_seconds for t in tasks],
        },
    ).fetchall()
    return sorted(r["id"] for r in rows)


def task_get(
    conn: Connection, task_id: int, *, with_input: bool = False, owner: int | None = None
) -> TaskRow:
    """task_get: one task as clients see it; raises TaskNotFound (also for another owner's
    task: it answers exactly as an id never issued), or TaskGone for an id that was issued but
    whose row is gone (pruned after its retention period, or deleted)."""
    columns = TASK_COLUMNS + (", input" if with_input else "")
    row = conn.execute(
        f"SELECT {columns} FROM tasks WHERE id = %(id)s AND {OWNED}", {"id": task_id, "owner": owner}
    ).fetchone()
    if row is None:
        _raise_missing(conn, task_id)
    return row


def _raise_missing(conn: Connection, task_id: int) -> NoReturn:
    """TaskGone for an id issued whose row is gone, else TaskNotFound (also when the row exists
    but belongs to another owner)."""
    gone = one_row(
        conn.execute(
            """
        SELECT %(id)s BETWEEN 1 AND CASE WHEN is_called THEN last_value ELSE 0 END
               AND NOT EXISTS (SELECT FROM tasks WHERE id = %(id)s) AS gone
        FROM tasks_id_seq
        """,
            {"id": task_id},
        )
    )["gone"]
    raise TaskGone(task_id) if gone else TaskNotFound(task_id)


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
    client key's own tasks only (owner), through tasks_owner_idx."""
    return conn.execute(
        f"""
        SELECT {TASK_COLUMNS} FROM tasks
        WHERE {OWNED}
          AND (%(status)s::task_status IS NULL OR status = %(status)s::task_status)
          AND (%(task_type)s::text IS NULL OR task_type = %(task_type)s)
          AND (%(queue)s::text IS NULL OR queue = %(queue)s)
          AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
        ORDER BY id DESC
        LIMIT %(limit)s
        """,
        {
            "status": status,
            "task_type": task_type,
            "queue": queue,
            "before_id": before_id,
            "limit": limit,
            "owner": owner,
        },
    ).fetchall()


def task_cancel(conn: Connection, task_id: int, *, owner: int | None = None) -> TaskRow:
    """task_cancel: pending or processing -> cancelled. A processing attempt is recorded as
    cancelled here (released, uncounted, if it had not started) and its worker is told (NOTIFY)
    to stop it; its late writes are fenced out."""
    row = conn.execute(
        f"""
        WITH target AS (
            SELECT id, status AS previous_status, attempts, worker_id, started_at
            FROM tasks WHERE id = %(id)s AND status IN ('pending', 'processing') AND {OWNED}
            FOR UPDATE
        ), cancelled AS (
            UPDATE tasks t
            SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                attempts = CASE WHEN target.previous_status = 'processing' AND target.started_at IS NULL
                                THEN t.attempts - 1 ELSE t.attempts END
            FROM target
            WHERE t.id = target.id
            RETURNING {task_columns("t")},
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
        {"id": task_id, "channel": CANCEL_CHANNEL, "owner": owner},
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


def task_retry(conn: Connection, task_id: int, *, owner: int | None = None) -> TaskRow:
    """task_retry: failed or cancelled -> pending, due now. Grants one more attempt if the task
    had used them all (attempts are not reset: with worker_id they are the fencing token)."""
    row = conn.execute(
        f"""
        WITH retried AS (
            UPDATE tasks
            SET status = 'pending', run_at = now(), finished_at = NULL, progress = NULL,
                max_attempts = greatest(max_attempts, attempts + 1)
            WHERE id = %(id)s AND status IN ('failed', 'cancelled') AND {OWNED}
              AND attempts < {MAX_ATTEMPTS_STORED}  -- no attempt can be granted past it
            RETURNING {TASK_COLUMNS}, pg_notify(%(channel)s, '') AS notified
        ), {announce("retried", "false")}
        SELECT * FROM retried WHERE {ANNOUNCED}
        """,
        {"id": task_id, "channel": PENDING_CHANNEL, "owner": owner},
    ).fetchone()
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
