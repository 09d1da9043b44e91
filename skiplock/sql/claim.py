"""The claim: pending tasks taken FOR UPDATE SKIP LOCKED in priority order, and when the next
delayed task falls due."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from skiplock.sql.admission import task_groups
from skiplock.sql.fenced import in_hand_arrays, record_in_hand
from skiplock.sql.fragments import ANNOUNCED, announce
from skiplock.sql.rows import Connection, one_row


# Not frozen: a frozen dataclass of this many fields took 2.5 us to make, a measurable part of
# the supervisor's time per task at a full drain. Nobody changes one.
@dataclass(slots=True)
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
    limited: bool = False  # holds a slot of a limit: its end frees one (admit soon)
    # The limits whose slot it may hold (see admission.task_groups): its end frees one there.
    limit_groups: tuple[str, ...] = ()
    workflow_id: int | None = None  # a workflow step: its end settles its dependents, its workflow
    has_dependents: bool = False  # a workflow step other steps wait for
    parents: dict[str, Any] | None = None  # a step with parents: their results by ref
    trace_context: dict[str, str] | None = None  # the submit's (skiplock.tracing), if traced
    turn: float | None = None  # its place in the claim order (tasks.turn)
    in_hand: bool = False  # its claim recorded it as handed to a process (task_workers.in_hand)


class ClaimPosition(NamedTuple):
    """A place in the claim order (tasks_runnable_idx): a priority and a turn."""

    priority: int
    turn: float


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
          t.priority, t.run_at, t.turn, t.callback_url IS NOT NULL AS has_callback, t.limited,
          t.owner_key_id, t.concurrency_key, t.workflow_id, t.trigger_rule IS NOT NULL AS has_parents,
          t.has_dependents, t.trace_context
), """
    + announce("claimed", "false")
    + f"""
SELECT * FROM claimed WHERE {ANNOUNCED}
"""
)
# task_claim's own transaction (the statement, autocommit) commits without waiting for its WAL
# flush (set while it returns the rows it claimed: only a claim that wrote anything commits).
# What a crash of Postgres could lose is a claim of the last moments: its tasks are pending again
# (no attempt charged) and the worker, back on a new session, finds at its first lease renewal
# that they are not its own and stops them; they run again, as the tasks of a worker that died
# would. Every later write of the task (a renewal, the result) flushes the claim first. Waiting
# for the flush was a third of the claim's time on a worker woken from idle (0.45 of 1.1 ms), on
# the path from a submit to its start. Not for task_claim_released: that runs in the writer's
# transaction, whose results must be durable.
#
_CLAIM_UPDATE_ASYNC_COMMIT = _CLAIM_UPDATE.replace(
    f"WHERE {ANNOUNCED}", f"WHERE {ANNOUNCED} AND set_config('synchronous_commit', 'off', true) = 'off'"
)
assert _CLAIM_UPDATE_ASYNC_COMMIT != _CLAIM_UPDATE

# The worker's claim can also write its hand-over (skiplock.sql.fenced.task_hand_over) of the
# first `hand_over` tasks it takes, in claim order, when it sends those to idle processes as soon
# as they are back: a round trip less between a submit and its start. The rows are the claim's
# own, locked: nobody can have released them meanwhile. A statement of its own (with_hand_over):
# planning the extra CTEs costs every other claim 0.3 ms.
_HAND_OVER_CLAIMED = """, first AS (
    SELECT id, attempts FROM claimed ORDER BY priority DESC, turn, id LIMIT %(hand_over)s
), """ + record_in_hand("first", where="EXISTS (SELECT FROM first)")


@functools.cache
def with_hand_over(statement: str) -> str:
    """A claim statement (task_claim_statement's) that also records its first %(hand_over)s
    tasks as handed over (kept: %(kept_ids)s, %(kept_attempts)s) and says which (in_hand)."""
    fused = statement.replace(
        "\nSELECT * FROM claimed WHERE",
        _HAND_OVER_CLAIMED
        + "\nSELECT *, EXISTS (SELECT FROM recorded) AND id IN (SELECT id FROM first) AS in_hand"
        + " FROM claimed WHERE",
    )
    assert fused != statement
    return fused


# What the claim skips among runnable rows: a task whose run_at a DBA moved ahead after it got
# its turn (run_at keeps its meaning: never claimed before it; setting turn = NULL as well takes
# it out of the claim's way until admission finds it due), an expired task (task_expire ends it
# soon), and a task of a paused queue, read in the claim's own snapshot, so a pause whose statement has
# committed holds every claim that starts after it (the worker's own list of paused queues, read
# every second, keeps the walk off a paused queue's backlog).
_CLAIMABLE = """t.run_at <= now() AND (t.expires_at IS NULL OR t.expires_at > now())
      AND (NOT (SELECT EXISTS (SELECT FROM task_queues q WHERE q.paused))
           OR NOT EXISTS (SELECT FROM task_queues q WHERE q.queue = t.queue AND q.paused))
      AND (%(types)s::text[] IS NULL OR t.task_type = ANY(%(types)s::text[]))"""


# A worker of every queue walks tasks_runnable_idx in claim order: highest priority, then the
# fair rotation (turn, see skiplock/sql/turns.py).
TASK_CLAIM_SQL = (
    f"""
WITH next AS (
    SELECT id FROM tasks t
    WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL
      AND {_CLAIMABLE}
    ORDER BY priority DESC, turn, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)"""
    + _CLAIM_UPDATE_ASYNC_COMMIT
)


# Workflow steps its writer just released, taken by an idle worker in the same transaction
# (skiplock.worker.writes): the rows by primary key, held to the claim's rules (types, queues, a
# pause, a limit's wait), in claim order.
TASK_CLAIM_RELEASED_SQL = (
    f"""
WITH next AS (
    SELECT id FROM tasks t
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL
      AND {_CLAIMABLE}
      AND (%(queues)s::text[] IS NULL OR t.queue = ANY(%(queues)s::text[]))
    ORDER BY priority DESC, turn, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)"""
    + _CLAIM_UPDATE
)


# A worker of some queues probes tasks_runnable_queue_idx once per queue, in claim order, and keeps
# the best `limit` of what the probes found. Filtering tasks_claim_idx by queue instead walks
# every pending row of the other queues first: with 500,000 tasks waiting in another queue the
# planner chose a scan of the whole table, 40 ms per claim, even for an empty queue. Each probe
# names its queue as a parameter of its own (not a join to an array), so the planner sees the
# value and its statistics and takes the queue's index; with a join it could not tell a rare
# queue from a common one and sometimes walked tasks_claim_idx through the backlog.
# (A sub-select of its own: UNION does not take FOR UPDATE directly.) A queue with a position
# (see TASK_CLAIM_AFTER_SQL) gets two probes: its higher priorities, its priority from the turn on.
def _claim_probe(alias: str, where: str) -> str:
    """One walk of the claim order, limited by `where` (an SQL condition ending in AND)."""
    return f"""SELECT * FROM (
        SELECT id, priority, turn FROM tasks t
        WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL
          AND {where}{_CLAIMABLE}
        ORDER BY priority DESC, turn, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS {alias}"""


def _claim_from_probes(probes: Iterable[str]) -> str:
    """The claim of the best `limit` rows the probes found (rows a probe locks beyond them stay
    pending; their lock ends with the statement)."""
    union = "\n    UNION ALL\n    ".join(probes)
    return (
        f"""
WITH next AS (
    SELECT id FROM (
    {union}
    ) AS probes
    ORDER BY priority DESC, turn, id
    LIMIT %(limit)s
)"""
        + _CLAIM_UPDATE_ASYNC_COMMIT
    )


# From a position: its higher priorities from their start, its priority from its turn on.
_FROM_START = (("", ""),)
_FROM_POSITION = (
    ("priority > %(after_priority{n})s AND ", "_higher"),
    ("priority = %(after_priority{n})s AND turn >= %(after_turn{n})s AND ", "_onwards"),
)

# A worker deep in a backlog claims from where its previous claim began (a ClaimPosition): the
# index entries before it are mostly of rows claimed since, dead until VACUUM, and a claim from
# the start steps over every one of them (500 index pages per 100,000 tasks drained: 1.8 ms per
# claim half-way through a 1,000,000-task backlog). Two probes: higher priorities, from their
# start (they come first in claim order); the position's priority, from its turn. A runnable task
# sorted before the position (rescued with its old turn, of a resumed queue, ...) waits for the
# next claim from the start (task_claim's caller makes one every so often, and whenever a claim
# from a position comes up short).
TASK_CLAIM_AFTER_SQL = _claim_from_probes(
    _claim_probe(part.lstrip("_"), where.format(n="")) for where, part in _FROM_POSITION
)


@functools.cache
def task_claim_from_queues_sql(queue_count: int, positioned: tuple[bool, ...] = ()) -> str:
    """The claim of a worker of `queue_count` queues (parameters queue_0, queue_1, ...; for a queue
    whose `positioned` entry is true, after_priority_N and after_turn_N too)."""
    return _claim_from_probes(
        _claim_probe(f"probe_{n}{part}", f"queue = %(queue_{n})s AND " + where.format(n=f"_{n}"))
        for n in range(queue_count)
        for where, part in (_FROM_POSITION if n < len(positioned) and positioned[n] else _FROM_START)
    )


# Where a worker's previous claim began, per queue it claims from (None: a worker of every queue).
ClaimPositions = Mapping[str | None, ClaimPosition]


def task_claim_statement(
    queues: Sequence[str] | None, after: ClaimPositions | None = None
) -> tuple[str, dict[str, Any]]:
    """The statement task_claim runs for a worker of these queues (None or empty: every queue),
    from these positions (none: from the start), with its queue and position parameters."""
    after = after or {}
    if not queues:
        position = after.get(None)
        if position is None:
            return TASK_CLAIM_SQL, {}
        return TASK_CLAIM_AFTER_SQL, {"after_priority": position.priority, "after_turn": position.turn}
    distinct = list(dict.fromkeys(queues))
    params: dict[str, Any] = {f"queue_{n}": q for n, q in enumerate(distinct)}
    for n, queue in enumerate(distinct):
        if (position := after.get(queue)) is not None:
            params |= {f"after_priority_{n}": position.priority, f"after_turn_{n}": position.turn}
    positioned = tuple(after.get(q) is not None for q in distinct)
    return task_claim_from_queues_sql(len(distinct), positioned if any(positioned) else ()), params


def task_claim(
    conn: Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    task_types: Sequence[str] | None = None,
    after: ClaimPositions | None = None,
    hand_over: int = 0,
    in_hand: Iterable[tuple[int, int]] = (),
) -> list[ClaimedTask]:
    """task_claim: take up to `limit` due pending tasks of the given queues and types (None: any),
    highest priority then oldest first, skipping rows other workers hold; mark them processing under a fresh lease. Commits at once.
    `after`: where the caller's previous claim began (per queue; None for a worker of every
    queue), for a worker deep in a backlog: the claim starts there (TASK_CLAIM_AFTER_SQL), and
    only if that finds fewer than `limit` tasks does a second claim walk from the start.

    `hand_over`: how many of the tasks it takes (the first, in claim order) the caller sends to
    its processes at once: the claim records those as handed over, with `in_hand` (task id,
    attempt: what the caller has in its processes' hands already), in task_workers.in_hand as
    task_hand_over does, and returns them with in_hand set (if the worker's row exists).

    Never prepared (prepare=False): an unnamed statement is planned with the actual parameters
    every time, so a plan cached while the table was empty can never turn into a full scan."""
    params = _claim_params(worker_id, limit, lease_seconds, task_types)
    kept = list(in_hand)
    statement, extra = task_claim_statement(queues, after)
    rows = _claim_rows(conn, statement, {**params, **extra}, hand_over, kept)
    if len(rows) < limit and after:
        from_start, start_extra = task_claim_statement(queues)
        if statement != from_start:  # short from a position: what is left may sort before it
            params["limit"] = limit - len(rows)
            # The second record keeps the first's; nothing is sent before both are back.
            handed = [(r["id"], r["attempts"]) for r in rows if r.get("in_hand")]
            left = max(0, hand_over - len(handed))
            rows += _claim_rows(conn, from_start, {**params, **start_extra}, left, kept + handed)
    return _claimed(conn, rows)


def _claim_rows(
    conn: Connection, statement: str, params: dict[str, Any], hand_over: int, kept: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """One claim statement's rows; with hand_over, its variant that records the first ones."""
    if hand_over:
        statement = with_hand_over(statement)
        kept_ids, kept_attempts = in_hand_arrays(kept)
        params |= {"hand_over": hand_over, "kept_ids": kept_ids, "kept_attempts": kept_attempts}
    return conn.execute(statement, params, prepare=False).fetchall()


def task_claim_released(
    conn: Connection,
    *,
    ids: Sequence[int],
    worker_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    task_types: Sequence[str] | None = None,
) -> list[ClaimedTask]:
    """task_claim_released: in the caller's transaction, take up to `limit` of these tasks
    (workflow steps the caller just released) as task_claim would: only those of the given
    queues and types, runnable now and not waiting on a limit."""
    rows = conn.execute(
        TASK_CLAIM_RELEASED_SQL,
        {
            "ids": list(ids),
            "queues": list(queues) if queues else None,
            **_claim_params(worker_id, limit, lease_seconds, task_types),
        },
    ).fetchall()
    return _claimed(conn, rows)


def _claim_params(
    worker_id: str, limit: int, lease_seconds: float, task_types: Sequence[str] | None
) -> dict[str, Any]:
    """The parameters both claims share (_CLAIMABLE's and _CLAIM_UPDATE's)."""
    return {
        "types": list(task_types) if task_types else None,
        "limit": limit,
        "worker_id": worker_id,
        "lease": lease_seconds,
    }


def _claimed(conn: Connection, rows: list[dict[str, Any]]) -> list[ClaimedTask]:
    """The claimed rows as tasks, with their parents' results, in claim order."""
    # A workflow step's parents' results (only if the batch has such steps: a statement of its own).
    parents = _parent_results(conn, [r["id"] for r in rows if r["has_parents"]])
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
            limited=r["limited"],
            limit_groups=_limit_groups(r),
            workflow_id=r["workflow_id"],
            has_dependents=r["has_dependents"],
            parents=parents.get(r["id"]) if r["has_parents"] else None,
            trace_context=r["trace_context"],
            turn=r["turn"],
            in_hand=r.get("in_hand", False),
        )
        for r in rows
    ]
    # RETURNING has no order; run them in claim order.
    tasks.sort(key=lambda t: (-t.priority, t.turn, t.id))
    return tasks


def _parent_results(conn: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The results of these steps' parents, by step and ref (task_dependencies_pkey, tasks_pkey)."""
    if not ids:
        return {}
    rows = conn.execute(
        """
        SELECT d.task_id, jsonb_object_agg(p.workflow_ref, p.result) AS results
        FROM task_dependencies d JOIN tasks p ON p.id = d.parent_id
        WHERE d.task_id = ANY(%s::bigint[]) GROUP BY d.task_id
        """,
        (ids,),
    ).fetchall()
    return {r["task_id"]: r["results"] for r in rows}


def _limit_groups(row: dict[str, Any]) -> tuple[str, ...]:
    """The limits a claimed task may hold a slot of: none unless it was admitted under one or
    has a concurrency key (it holds its key's slot while processing even if the limit came later)."""
    if not row["limited"] and row["concurrency_key"] is None:
        return ()
    return tuple(
        task_groups(row["owner_key_id"] or 0, row["concurrency_key"], row["task_type"], row["queue"])
    )


TASK_NEXT_DUE_SQL = """
SELECT extract(epoch FROM min(run_at) - now())::float8 AS due_in
FROM tasks WHERE status = 'pending' AND turn IS NULL
"""


def task_next_due_in(conn: Connection) -> float | None:
    """task_next_due_in: seconds until the earliest scheduled task (pending without a turn:
    delayed, or waiting out a retry backoff) falls due and admission should give it a turn (0 or
    less: one is due now); None if there is none. One probe of tasks_scheduled_idx."""
    row = one_row(conn.execute(TASK_NEXT_DUE_SQL))
    due_in: float | None = row["due_in"]
    return due_in
