"""What operators read and steer (task_queues, task_health, task_failures, task_throughput,
task_limits, api_secrets): queue summaries, limits in use, pause and resume, health, failures,
throughput, retention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypedDict

from skiplock.sql.fragments import PENDING_CHANNEL, TASK_COLUMNS
from skiplock.sql.limits import LimitRow
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.tasks import TaskRow


class QueueLimit(TypedDict):
    """A queue's limit (task_limits, scope queue) with what runs and waits under it."""

    max_running: int | None
    max_starts_per_second: float | None
    burst: int | None
    running: int
    waiting: int


class QueueSummaryRow(TypedDict):
    """A queue's depth and wait (queue_summaries)."""

    queue: str
    due: int
    scheduled: int
    waiting_on_limit: int  # of the due ones: held by a concurrency, type, queue or rate limit
    running: int
    reserved: int
    oldest_due_wait_seconds: float | None
    paused: bool
    expired_last_hour: int
    limit: QueueLimit | None


class QueueStateRow(TypedDict):
    """A queue's row of task_queues, as pausing or resuming it left it."""

    queue: str
    paused: bool
    changed_at: datetime
    changed_by: str | None
    notified: Any  # the NOTIFY of a resume (null)


class HealthRow(TypedDict):
    """The task_health view (schema.sql), one row."""

    tasks_dead_tuple_share: Decimal | None
    tasks_last_vacuum: datetime | None
    attempts_dead_tuple_share: Decimal | None
    attempts_last_vacuum: datetime | None
    oldest_transaction_age: timedelta | None
    oldest_transaction_xmin_age: int | None
    oldest_transaction_pid: int | None
    oldest_transaction_holder: str | None
    replication_slot_xmin_age: int | None
    notification_queue_usage: float
    lapsed_leases: int
    oldest_due_wait: timedelta | None
    workers: int


class FailureRow(TypedDict):
    """A failed attempt (the task_failures view) with its task's latest traceback."""

    task_id: int
    task_type: str
    queue: str
    attempt: int
    outcome: str
    worker_id: str
    finished_at: datetime
    error: str | None
    task_status: str
    error_traceback: str | None


class FailureCountRow(TypedDict):
    task_type: str
    outcome: str
    n: int


class RunningTaskRow(TaskRow):
    """A task processing now, with who holds it and until when."""

    worker_id: str | None
    lease_expires_at: datetime | None


class ThroughputRow(TypedDict):
    """Attempts finished in one minute in one queue (task_throughput, summed over workers)."""

    minute: datetime
    queue: str
    completed: int
    failed: int
    run_seconds: float


def queue_summaries(conn: Connection) -> list[QueueSummaryRow]:
    """queue_summaries: per queue with unfinished tasks, a row in task_queues, a limit or tasks
    expired in the last hour: due (of which waiting on a limit), scheduled, reserved and running
    counts, the oldest due task's wait, whether it is paused, its limit. Counts what is
    unfinished (through the partial indexes) and what finished in the last hour
    (tasks_finished_at_idx), never the older finished rows."""
    return conn.execute(
        """
        WITH pending_rows AS (
            -- Every pending task once, each part through its partial index (a plain
            -- status = 'pending' reads the whole table behind a backlog): not due yet or in
            -- backoff (tasks_scheduled_idx), runnable (tasks_runnable_queue_idx), waiting on a
            -- limit (tasks_waiting_idx).
            SELECT queue, run_at, false AS waiting FROM tasks WHERE status = 'pending' AND turn IS NULL
            UNION ALL
            SELECT queue, run_at, false FROM tasks
            WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL AND queue IS NOT NULL
            UNION ALL
            SELECT queue, run_at, true FROM tasks
            WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NOT NULL
        ), pending AS (
            SELECT queue, count(*) FILTER (WHERE run_at <= now()) AS due,
                   count(*) FILTER (WHERE run_at > now()) AS scheduled,
                   count(*) FILTER (WHERE waiting) AS waiting_on_limit,
                   min(run_at) FILTER (WHERE run_at <= now()) AS oldest_due
            FROM pending_rows GROUP BY queue
        ), processing AS (
            SELECT queue, count(*) FILTER (WHERE started_at IS NOT NULL) AS running,
                   count(*) FILTER (WHERE started_at IS NULL) AS reserved
            FROM tasks WHERE status = 'processing' GROUP BY queue
        ), expired AS (
            SELECT queue, count(*) AS n FROM tasks
            WHERE finished_at > now() - interval '1 hour' AND status = 'expired' GROUP BY queue
        ), limits AS (
            SELECT name AS queue, json_build_object(
                       'max_running', max_running, 'max_starts_per_second', max_starts_per_second,
                       'burst', burst, 'running', running, 'waiting', waiting) AS "limit"
            FROM task_limit_usage WHERE scope = 'queue'
        ), queues AS (
            SELECT queue FROM pending UNION SELECT queue FROM processing UNION SELECT queue FROM expired
            UNION SELECT queue FROM task_queues UNION SELECT queue FROM limits
        )
        SELECT q.queue,
               coalesce(p.due, 0) AS due, coalesce(p.scheduled, 0) AS scheduled,
               coalesce(p.waiting_on_limit, 0) AS waiting_on_limit,
               coalesce(r.running, 0) AS running, coalesce(r.reserved, 0) AS reserved,
               extract(epoch FROM now() - p.oldest_due)::float8 AS oldest_due_wait_seconds,
               coalesce(s.paused, false) AS paused,
               coalesce(e.n, 0) AS expired_last_hour,
               l."limit"
        FROM queues q
        LEFT JOIN pending p ON p.queue = q.queue
        LEFT JOIN processing r ON r.queue = q.queue
        LEFT JOIN expired e ON e.queue = q.queue
        LEFT JOIN task_queues s ON s.queue = q.queue
        LEFT JOIN limits l ON l.queue = q.queue
        ORDER BY 1
        """
    ).fetchall()


def limit_usage_all(conn: Connection) -> list[LimitRow]:
    """limit_usage_all: every limit with what runs and waits under it (the task_limit_usage view:
    one pass over the tasks holding slots, whatever the number of limits, and a probe of
    tasks_waiting_idx per limit for what waits). For /metrics and the dashboard, which read
    them all every few seconds."""
    return conn.execute("SELECT * FROM task_limit_usage ORDER BY scope, owner_key_id, name").fetchall()


def task_queue_set_paused(conn: Connection, *, queue: str, paused: bool, by: str | None) -> QueueStateRow:
    """task_queue_set_paused: pause or resume a queue (workers see it within a second; a resume
    also wakes idle workers)."""
    cursor = conn.execute(
        """
        INSERT INTO task_queues (queue, paused, changed_by) VALUES (%(queue)s, %(paused)s, %(by)s)
        ON CONFLICT (queue) DO UPDATE SET paused = excluded.paused, changed_at = now(), changed_by = excluded.changed_by
        RETURNING queue, paused, changed_at, changed_by,
                  CASE WHEN NOT paused THEN pg_notify(%(channel)s, '') END AS notified
        """,
        {"queue": queue, "paused": paused, "by": by, "channel": PENDING_CHANNEL},
    )
    return one_row(cursor)


def task_queues_paused(conn: Connection) -> list[str]:
    """task_queues_paused: the queues no worker may claim from."""
    return [r["queue"] for r in conn.execute("SELECT queue FROM task_queues WHERE paused ORDER BY queue")]


def task_pending_queues(conn: Connection) -> list[str]:
    """task_pending_queues: every queue with a pending task, by a skip scan of
    tasks_claim_queue_idx (one probe per queue, however many tasks each holds)."""
    rows = conn.execute(
        """
        WITH RECURSIVE queues AS (
            (SELECT queue FROM tasks
             WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL AND queue IS NOT NULL
             ORDER BY queue LIMIT 1)
            UNION ALL
            SELECT (SELECT t.queue FROM tasks t
                    WHERE t.status = 'pending' AND t.turn IS NOT NULL AND t.waiting_on IS NULL
                      AND t.queue IS NOT NULL AND t.queue > queues.queue
                    ORDER BY t.queue LIMIT 1)
            FROM queues WHERE queues.queue IS NOT NULL
        )
        SELECT queue FROM queues WHERE queue IS NOT NULL
        """
    ).fetchall()
    return [r["queue"] for r in rows]


def _planned_for(bound: int) -> int:
    """A limit or a window an operator's read is called with, checked to be an integer, for its
    statement's text rather than a parameter. The callers pass the same constant every time;
    prepared (psycopg, after 5 runs), a statement whose bound is a parameter has a generic plan
    that cannot see it, and on a big history task_failures' generic plan guessed a large share
    of a day's failed attempts (a parallel bitmap scan, 60 ms for 200 rows), so Postgres
    re-planned it on every run instead: as a literal, the one plan made for the value is the
    one kept (bench/big_tables.py's rows)."""
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
        raise ValueError(f"a bound must be a non-negative integer, not {bound!r}")
    return int(bound)  # a plain int: a subclass could format itself otherwise


def task_health_get(conn: Connection) -> HealthRow:
    """task_health_get: the one row of the task_health view."""
    return one_row(conn.execute("SELECT * FROM task_health"))


def task_failures_recent(conn: Connection, *, limit: int = 20) -> list[FailureRow]:
    """task_failures_recent: the newest failed attempts (task_failures), with the task's
    traceback of its latest failure. The limit is in the statement (_planned_for)."""
    limit = _planned_for(limit)
    return conn.execute(
        f"""
        SELECT f.*, t.error_traceback FROM (SELECT * FROM task_failures LIMIT {limit}) f
        JOIN tasks t ON t.id = f.task_id
        ORDER BY f.finished_at DESC
        """
    ).fetchall()


def task_failure_counts(conn: Connection, *, minutes: int = 60) -> list[FailureCountRow]:
    """task_failure_counts: failed, timed out, crashed and lost attempts of the last `minutes`,
    per task type and outcome (through task_attempts_failures_idx). The window is in the
    statement (_planned_for). Each attempt's type is a primary-key probe of its task: joined,
    as the task_failures view joins them, a table of 12,000 tasks was read whole into a hash
    (2 ms, against 0.3 for the probes), and /metrics sends this on every scrape."""
    minutes = _planned_for(minutes)
    return conn.execute(
        f"""
        SELECT (SELECT t.task_type FROM tasks t WHERE t.id = a.task_id) AS task_type,
               a.outcome::text AS outcome, count(*)::int AS n
        FROM task_attempts a
        WHERE a.outcome IN ('failed', 'timed_out', 'crashed', 'lost')
          AND a.finished_at > now() - make_interval(mins => {minutes})
        GROUP BY 1, 2 ORDER BY 1, 2
        """
    ).fetchall()


def task_invariant_violation_count(conn: Connection) -> int:
    """task_invariant_violation_count: rows of the self-audit (task_invariant_violations)."""
    return one_row(conn.execute("SELECT count(*) AS n FROM task_invariant_violations"))["n"]


def tasks_running_list(conn: Connection, *, limit: int = 50) -> list[RunningTaskRow]:
    """tasks_running_list: tasks processing now (running first, then reserved), oldest start
    first, with their progress."""
    return conn.execute(
        f"""
        SELECT {TASK_COLUMNS}, worker_id, lease_expires_at FROM tasks
        WHERE status = 'processing'
        ORDER BY started_at NULLS LAST, id
        LIMIT %(limit)s
        """,
        {"limit": limit},
    ).fetchall()


@dataclass(frozen=True)
class Throughput:
    """What one worker finished in one minute for one queue and task type (task_throughput)."""

    queue: str
    task_type: str
    completed: int
    failed: int
    run_seconds: float


def task_throughput_add(conn: Connection, *, worker_id: str, rows: Sequence[Throughput]) -> None:
    """task_throughput_add: add to this minute's rows (database clock) what the worker finished
    since its last call."""
    if not rows:
        return
    conn.execute(
        """
        INSERT INTO task_throughput AS t (minute, queue, task_type, worker_id, completed, failed, run_seconds)
        SELECT date_trunc('minute', now()), r.queue, r.task_type, %(worker)s, r.completed, r.failed, r.seconds
        FROM unnest(%(queues)s::text[], %(types)s::text[], %(completed)s::int[], %(failed)s::int[],
                    %(seconds)s::float8[]) AS r(queue, task_type, completed, failed, seconds)
        ON CONFLICT (minute, queue, task_type, worker_id) DO UPDATE
        SET completed = t.completed + excluded.completed, failed = t.failed + excluded.failed,
            run_seconds = t.run_seconds + excluded.run_seconds
        """,
        {
            "worker": worker_id,
            "queues": [r.queue for r in rows],
            "types": [r.task_type for r in rows],
            "completed": [r.completed for r in rows],
            "failed": [r.failed for r in rows],
            "seconds": [r.run_seconds for r in rows],
        },
    )


def task_throughput_recent(conn: Connection, *, minutes: int = 60) -> list[ThroughputRow]:
    """task_throughput_recent: per minute and queue, attempts completed and failed over the last
    `minutes` minutes (a range of task_throughput's primary key)."""
    return conn.execute(
        """
        SELECT minute, queue, sum(completed)::int AS completed, sum(failed)::int AS failed,
               sum(run_seconds) AS run_seconds
        FROM task_throughput
        WHERE minute >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s)
        GROUP BY minute, queue ORDER BY minute, queue
        """,
        {"minutes": minutes},
    ).fetchall()


def task_throughput_prune(conn: Connection, *, older_than_seconds: float) -> int:
    """task_throughput_prune: forget the minutes older than this."""
    return conn.execute(
        "DELETE FROM task_throughput WHERE minute < now() - make_interval(secs => %(age)s)",
        {"age": older_than_seconds},
    ).rowcount


def api_secret(conn: Connection, *, name: str, candidate: bytes) -> bytes:
    """api_secret: the shared secret of this name, made of `candidate` if there is none yet
    (the first process to ask wins; every other gets the same)."""
    cursor = conn.execute(
        """
        WITH made AS (
            INSERT INTO api_secrets (name, value) VALUES (%(name)s, %(candidate)s)
            ON CONFLICT (name) DO NOTHING RETURNING value
        )
        SELECT value FROM made UNION ALL SELECT value FROM api_secrets WHERE name = %(name)s
        LIMIT 1
        """,
        {"name": name, "candidate": candidate},
    )
    return one_row(cursor)["value"]


def skiplock_schema_version(conn: Connection) -> int | None:
    """skiplock_schema_version: the version of the schema.sql last applied (skiplock_schema); 0
    for a schema from before versions; None if the database has no skiplock schema (no tasks)."""
    found = one_row(
        conn.execute(
            "SELECT to_regclass('tasks') IS NOT NULL AS tasks, "
            "to_regclass('skiplock_schema') IS NOT NULL AS versioned"
        )
    )
    if not found["tasks"]:
        return None
    if not found["versioned"]:
        return 0
    row = conn.execute("SELECT max(version) AS version FROM skiplock_schema").fetchone()
    return (row["version"] if row else None) or 0


# task_unserved_counts walks at most this many runnable tasks, in claim order: enough to find the
# types nobody serves (never claimed, they keep the front of their priority), bounded on a backlog.
UNSERVED_SCAN_LIMIT = 10_000


# A CTE `live`: the workers alive now: registered, not marked gone, and their session still
# holds its lock (taken and released at once if free: a worker that died unseen is not live).
LIVE_WORKERS = """
    live AS MATERIALIZED (
        SELECT queues, task_types FROM task_workers
        WHERE gone_at IS NULL AND NOT pg_try_advisory_xact_lock(lock_key)
    )"""


def unserved_by_live_workers(task_type: str, queue: str) -> str:
    """SQL, under WITH LIVE_WORKERS: true if workers are live but none runs this task type (a
    worker that recorded none runs every type) from this queue. Column expressions, not values."""
    return f"""(EXISTS (SELECT FROM live) AND NOT EXISTS (
        SELECT FROM live w
        WHERE (w.task_types IS NULL OR {task_type} = ANY(w.task_types))
          AND (w.queues IS NULL OR {queue} = ANY(w.queues))))"""


class UnservedRow(TypedDict):
    """Runnable tasks of a type (in a queue) that no live worker serves (task_unserved_counts)."""

    task_type: str
    queue: str
    tasks: int  # among the first UNSERVED_SCAN_LIMIT runnable tasks in claim order


def task_unserved_counts(conn: Connection) -> list[UnservedRow]:
    """task_unserved_counts: runnable tasks (due, waiting on no limit) whose type or queue no live
    worker serves (task_workers.task_types and queues; a worker whose session ended is not live,
    whether or not another has marked it gone), counted per type and queue among the first
    UNSERVED_SCAN_LIMIT in claim order (tasks_runnable_idx). With no live worker at all nothing
    counts: that is another alarm (task_health.workers is 0), not one per type."""
    return conn.execute(
        f"""
        WITH {LIVE_WORKERS}, runnable AS (
            SELECT task_type, queue FROM tasks
            WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL
            ORDER BY priority DESC, turn, id
            LIMIT %(limit)s
        )
        SELECT task_type, queue, count(*)::int AS tasks
        FROM runnable r
        WHERE {unserved_by_live_workers("r.task_type", "r.queue")}
        GROUP BY task_type, queue
        ORDER BY task_type, queue
        """,
        {"limit": UNSERVED_SCAN_LIMIT},
    ).fetchall()


def task_prune(conn: Connection, *, older_than_seconds: float, limit: int) -> int:
    """task_prune: delete up to `limit` tasks that finished (any final status: finished_at is set
    exactly then, tasks_finished_iff_final) more than older_than_seconds ago, oldest first, with
    their attempts; returns how many. tasks_finished_at_idx."""
    return conn.execute(
        """
        WITH doomed AS (
            SELECT id FROM tasks
            WHERE finished_at < now() - make_interval(secs => %(age)s)
            ORDER BY finished_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM tasks t USING doomed WHERE t.id = doomed.id
        """,
        {"age": older_than_seconds, "limit": limit},
    ).rowcount
