"""The claim: pending tasks taken FOR UPDATE SKIP LOCKED in priority order, and when the next
delayed task falls due."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from skiplock.sql.fragments import ANNOUNCED, announce
from skiplock.sql.rows import Connection, one_row


@dataclass(frozen=True)
class ClaimedTask:
    id: int
    task_type: str
    queue: str
    input: Any
    attempt: int
    max_attempts: int
    timeout_seconds: int
    priority: int
    run_at: datetime
    has_callback: bool = False  # its final write makes a webhook delivery (wake the sender)


# task_claim's statements, at module level so the query-plan tests EXPLAIN exactly this text.
# Both lock the rows they pick (SKIP LOCKED) and hand them to the same UPDATE.
_CLAIM_UPDATE = (
    """, claimed AS (
UPDATE tasks t
SET status = 'processing', attempts = t.attempts + 1, worker_id = %(worker_id)s,
    -- a row a DBA set back to pending with no attempts left gets one more, not a CHECK error
    max_attempts = greatest(t.max_attempts, t.attempts + 1),
    -- reserved, not started: the worker marks it started when a process begins running it
    started_at = NULL, progress = NULL,
    lease_expires_at = now() + make_interval(secs => %(lease)s)
FROM next
WHERE t.id = next.id
RETURNING t.id, t.task_type, t.queue, t.input, t.attempts, t.max_attempts, t.timeout_seconds,
          t.priority, t.run_at, t.callback_url IS NOT NULL AS has_callback
), """
    + announce("claimed", "false")
    + f"""
SELECT * FROM claimed WHERE {ANNOUNCED}
"""
)


# A worker of every queue walks tasks_claim_idx in claim order.
TASK_CLAIM_SQL = (
    """
WITH next AS (
    SELECT id FROM tasks
    WHERE status = 'pending' AND run_at <= now()
      AND (%(types)s::text[] IS NULL OR task_type = ANY(%(types)s::text[]))
    ORDER BY priority DESC, run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)"""
    + _CLAIM_UPDATE
)


# A worker of some queues probes tasks_claim_queue_idx once per queue, in claim order, and keeps
# the best `limit` of what the probes found. Filtering tasks_claim_idx by queue instead walks
# every pending row of the other queues first: with 500,000 tasks waiting in another queue the
# planner chose a scan of the whole table, 40 ms per claim, even for an empty queue. Each probe
# names its queue as a parameter of its own (not a join to an array), so the planner sees the
# value and its statistics and takes the queue's index; with a join it could not tell a rare
# queue from a common one and sometimes walked tasks_claim_idx through the backlog.
# (A sub-select of its own: UNION does not take FOR UPDATE directly.)
_CLAIM_QUEUE_PROBE = """SELECT * FROM (
        SELECT id, priority, run_at FROM tasks
        WHERE status = 'pending' AND queue = %(queue_{n})s AND run_at <= now()
          AND (%(types)s::text[] IS NULL OR task_type = ANY(%(types)s::text[]))
        ORDER BY priority DESC, run_at, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS probe_{n}"""


@functools.cache
def task_claim_from_queues_sql(queue_count: int) -> str:
    """The claim of a worker of `queue_count` queues (parameters queue_0, queue_1, ...). Rows a
    probe locks beyond the final `limit` stay pending; their lock ends with the statement."""
    probes = "\n    UNION ALL\n    ".join(_CLAIM_QUEUE_PROBE.format(n=n) for n in range(queue_count))
    return (
        f"""
WITH next AS (
    SELECT id FROM (
    {probes}
    ) AS probes
    ORDER BY priority DESC, run_at, id
    LIMIT %(limit)s
)"""
        + _CLAIM_UPDATE
    )


def task_claim_statement(queues: Sequence[str] | None) -> tuple[str, dict[str, str]]:
    """The statement task_claim runs for a worker of these queues (None or empty: every queue),
    with its queue parameters."""
    if not queues:
        return TASK_CLAIM_SQL, {}
    distinct = list(dict.fromkeys(queues))
    return task_claim_from_queues_sql(len(distinct)), {f"queue_{n}": q for n, q in enumerate(distinct)}


def task_claim(
    conn: Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    task_types: Sequence[str] | None = None,
) -> list[ClaimedTask]:
    """task_claim: take up to `limit` due pending tasks of the given queues and types (None: any),
    highest priority then oldest first, skipping rows other workers hold; mark them processing under a fresh lease. Commits at once.

    Never prepared (prepare=False): an unnamed statement is planned with the actual parameters
    every time, so a plan cached while the table was empty can never turn into a full scan."""
    statement, queue_params = task_claim_statement(queues)
    rows = conn.execute(
        statement,
        {
            **queue_params,
            "types": list(task_types) if task_types else None,
            "limit": limit,
            "worker_id": worker_id,
            "lease": lease_seconds,
        },
        prepare=False,
    ).fetchall()
    tasks = [
        ClaimedTask(
            id=r["id"],
            task_type=r["task_type"],
            queue=r["queue"],
            input=r["input"],
            attempt=r["attempts"],
            max_attempts=r["max_attempts"],
            timeout_seconds=r["timeout_seconds"],
            priority=r["priority"],
            run_at=r["run_at"],
            has_callback=r["has_callback"],
        )
        for r in rows
    ]
    # RETURNING has no order; run them in claim order.
    tasks.sort(key=lambda t: (-t.priority, t.run_at, t.id))
    return tasks


# At most this many distinct priorities are visited (one index probe each); scheduled tasks
# below them are left to the worker's poll.
NEXT_DUE_MAX_PRIORITIES = 64


TASK_NEXT_DUE_SQL = """
WITH RECURSIVE levels AS (
    -- The distinct priorities of pending tasks, highest first: one probe of tasks_claim_idx
    -- each (a skip scan), however many tasks share a priority.
    (SELECT priority, 1 AS n FROM tasks WHERE status = 'pending' ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT t.priority FROM tasks t
            WHERE t.status = 'pending' AND t.priority < levels.priority
            ORDER BY t.priority DESC LIMIT 1),
           levels.n + 1
    FROM levels
    WHERE levels.priority IS NOT NULL AND levels.n < %(max_priorities)s
)
SELECT extract(epoch FROM min(due.run_at) - now())::float8 AS due_in
FROM levels
CROSS JOIN LATERAL (
    SELECT t.run_at FROM tasks t
    WHERE t.status = 'pending' AND t.priority = levels.priority AND t.run_at > now()
    ORDER BY t.run_at LIMIT 1
) due
"""


def task_next_due_in(conn: Connection) -> float | None:
    """task_next_due_in: seconds until the earliest scheduled task (pending, run_at in the
    future: delayed, or waiting out a retry backoff) falls due; None if there is none.

    Walks tasks_claim_idx by priority, so its cost does not grow with the number of scheduled
    tasks. Not filtered by queue or task type (that would walk other queues' rows): a worker
    serving some queues only may wake for another queue's task and find nothing, one claim."""
    row = one_row(conn.execute(TASK_NEXT_DUE_SQL, {"max_priorities": NEXT_DUE_MAX_PRIORITIES}))
    due_in: float | None = row["due_in"]
    return due_in
