"""Why a pending task has not started (GET /api/tasks/{id}): read from its row, its queue's pause,
the limit it waits on (task_limits, task_limit_usage) and what is ahead of it in the claim order.
A few index probes and, for a runnable task, a walk of the claim's index bounded by
MAX_TASKS_AHEAD: cheap enough for a client polling its task."""

from __future__ import annotations

from datetime import datetime
from typing import NotRequired, TypedDict

from skiplock.sql.operations import LIVE_WORKERS, unserved_by_live_workers
from skiplock.sql.rows import Connection

# A runnable task: the tasks ahead of it in its queue's claim order are walked (tasks_runnable_queue_idx)
# up to this many; the other owners among them are counted up to MAX_OWNERS_AHEAD.
MAX_TASKS_AHEAD = 10_000
MAX_OWNERS_AHEAD = 1_000

REASONS = (
    "run_at", "retry_backoff", "queue_paused", "concurrency_limit", "type_limit", "queue_limit",
    "rate_limit", "fair_share", "worker", "no_worker",
)  # fmt: skip
_LIMIT_REASON = {"key": "concurrency_limit", "type": "type_limit", "queue": "queue_limit"}


class LimitState(TypedDict):
    """A limit as a waiting task sees it (task_limit_usage)."""

    scope: str  # key, type or queue
    name: str  # the concurrency key, task type or queue
    max_running: int | None
    max_starts_per_second: float | None
    running: int
    waiting: int


class WaitingFor(TypedDict):
    """What a pending task waits for: `reason` (one of REASONS) and `detail` in words, with what
    the reason has to say."""

    reason: str
    detail: str
    until: NotRequired[datetime]  # run_at, retry_backoff: when it falls due
    limit: NotRequired[LimitState]  # *_limit, rate_limit
    tasks_ahead: NotRequired[int]  # fair_share: runnable tasks of its queue before it
    owners_ahead: NotRequired[int]  # fair_share: other owners among them (same priority)


def task_waiting_for(conn: Connection, task_id: int) -> WaitingFor | None:
    """task_waiting_for: what the pending task `task_id` waits for; None if it is not pending
    (or not there). In order: not due yet (run_at, or retry_backoff after a failed attempt); its
    queue paused; workers are live but none runs its type in its queue (no_worker); a limit it
    waits on; else it is runnable: behind other tasks in the fair rotation (fair_share), or next
    (worker: it starts when a worker is free)."""
    row = conn.execute(
        f"""
        WITH {LIVE_WORKERS}
        SELECT t.status::text AS status, t.task_type, t.turn, t.run_at, t.run_at > now() AS later, t.attempts,
               t.waiting_on, t.queue, t.priority, coalesce(t.owner_key_id, 0) AS owner,
               EXISTS (SELECT FROM task_queues q WHERE q.queue = t.queue AND q.paused) AS paused,
               {unserved_by_live_workers("t.task_type", "t.queue")} AS unserved
        FROM tasks t WHERE t.id = %(id)s
        """,
        {"id": task_id},
    ).fetchone()
    if row is None or row["status"] != "pending":
        return None
    if row["turn"] is None and row["later"]:
        retry = row["attempts"] > 0
        return {
            "reason": "retry_backoff" if retry else "run_at",
            "detail": ("A failed attempt is retried" if retry else "It is scheduled to run")
            + f" at {row['run_at'].isoformat()}.",
            "until": row["run_at"],
        }
    if row["paused"]:
        return {"reason": "queue_paused", "detail": f"Its queue {row['queue']!r} is paused."}
    if row["unserved"]:
        return {
            "reason": "no_worker",
            "detail": f"No live worker runs task type {row['task_type']!r} in queue {row['queue']!r}: "
            "start one with its module in SKIPLOCK_TASK_MODULES (and the queue in SKIPLOCK_QUEUES, if set).",
        }
    if row["turn"] is None:  # due; the workers' admission has not given it its turn yet
        return {
            "reason": "worker",
            "detail": "It is due: a worker gives it its place in the rotation when it next looks "
            "(are workers running for its queue?).",
        }
    if row["waiting_on"] is not None:
        return _waiting_on_limit(conn, row["waiting_on"])
    return _runnable(conn, task_id, row)


def _parse_group(group: str) -> tuple[str, int, str]:
    """tasks.waiting_on (key:<owner>:<name>, type:<name>, queue:<name>) -> task_limits' key."""
    scope, _, rest = group.partition(":")
    if scope == "key":
        owner, _, name = rest.partition(":")
        return scope, int(owner), name
    return scope, 0, rest


def _waiting_on_limit(conn: Connection, group: str) -> WaitingFor:
    scope, owner, name = _parse_group(group)
    limit = conn.execute(
        """
        SELECT u.scope, u.name, u.max_running, u.max_starts_per_second, u.running, u.waiting,
               -- start tokens now: the bucket as admission last left it, refilled since
               least(coalesce(l.burst, greatest(1, ceil(l.max_starts_per_second))),
                     coalesce(l.tokens, coalesce(l.burst, greatest(1, ceil(l.max_starts_per_second))))
                     + l.max_starts_per_second * extract(epoch FROM now() - coalesce(l.tokens_at, now())))
                   AS tokens
        FROM task_limit_usage u
        JOIN task_limits l USING (scope, owner_key_id, name)
        WHERE u.scope = %(scope)s AND u.owner_key_id = %(owner)s AND u.name = %(name)s
        """,
        {"scope": scope, "owner": owner, "name": name},
    ).fetchone()
    if limit is None:  # removed since: the next admission lets it go
        return {"reason": "worker", "detail": "Its limit was removed: a worker's admission frees it next."}
    tokens = limit.pop("tokens")
    state: LimitState = limit
    full = state["max_running"] is not None and state["running"] >= state["max_running"]
    rate = state["max_starts_per_second"]
    if not full and rate is not None and tokens is not None and tokens < 1:
        return {
            "reason": "rate_limit",
            "detail": f"Its {scope} limit {name!r} allows {rate:g} starts per second; "
            "the next start is due within a second.",
            "limit": state,
        }
    if state["max_running"] == 0:
        detail = f"Its {scope} limit {name!r} holds its tasks (max_running 0)."
    elif full:
        detail = (
            f"Its {scope} limit {name!r} lets {state['max_running']} run at once: "
            f"{state['running']} do, {state['waiting']} wait."
        )
    else:
        detail = f"Its {scope} limit {name!r} has room: a worker's admission lets it go next."
    return {"reason": _LIMIT_REASON[scope], "detail": detail, "limit": state}


def _runnable(conn: Connection, task_id: int, row: dict) -> WaitingFor:
    # The claim's order within the queue: higher priorities first, then the fair rotation (turn).
    # Two walks of tasks_runnable_queue_idx, each a range of it: higher priorities, then the
    # same priority with a lower (turn, id), whose owners are counted.
    ahead = conn.execute(
        """
        SELECT (SELECT count(*) FROM (
                    SELECT 1 FROM tasks a
                    WHERE a.status = 'pending' AND a.turn IS NOT NULL AND a.waiting_on IS NULL
                      AND a.queue = %(queue)s AND a.priority > %(priority)s
                    LIMIT %(max)s) higher) AS higher,
               count(*) AS same,
               count(DISTINCT a.owner) FILTER (WHERE a.owner <> %(owner)s) AS owners
        FROM (
            SELECT coalesce(a.owner_key_id, 0) AS owner FROM tasks a
            WHERE a.status = 'pending' AND a.turn IS NOT NULL AND a.waiting_on IS NULL
              AND a.queue = %(queue)s AND a.priority = %(priority)s AND (a.turn, a.id) < (%(turn)s, %(id)s)
            ORDER BY a.queue, a.priority DESC, a.turn, a.id
            LIMIT %(max)s
        ) a
        """,
        {
            "id": task_id,
            "owner": row["owner"],
            "queue": row["queue"],
            "priority": row["priority"],
            "turn": row["turn"],
            "max": MAX_TASKS_AHEAD,
        },
    ).fetchone()
    tasks = min(MAX_TASKS_AHEAD, ahead["higher"] + ahead["same"]) if ahead else 0
    owners = min(MAX_OWNERS_AHEAD, ahead["owners"]) if ahead else 0
    if tasks == 0:
        return {
            "reason": "worker",
            "detail": f"It is next in queue {row['queue']!r}: it starts when a worker of the queue is free.",
            "tasks_ahead": 0,
            "owners_ahead": 0,
        }
    counted = f"{tasks}{'+' if tasks >= MAX_TASKS_AHEAD else ''}"
    return {
        "reason": "fair_share",
        "detail": f"It is runnable: {counted} task(s) start before it (of {owners} other owner(s) at its "
        "priority, in the fair rotation, and any of higher priority), as workers free up.",
        "tasks_ahead": tasks,
        "owners_ahead": owners,
    }
