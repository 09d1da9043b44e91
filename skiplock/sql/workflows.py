"""Workflows: tasks that start after other tasks (task_dependencies), and what happens when a
step ends: its dependents are settled and, when it was the last, the workflow is finished, in the
transaction that made it final.

A step with parents waits pending with run_at BLOCKED_RUN_AT and no turn: out of the claim's
index and never promoted by admission (tasks_scheduled_idx ends with them). Nothing is counted or
copied: whether a step may start is derived from its parents' rows. When parents end, their
dependents still waiting are locked (FOR NO KEY UPDATE, in id order), and a later statement,
whose snapshot comes after the lock, decides each: is a parent unfinished (a walk of its edges
from the newest parent down, which meets one at once while a fan-in drains in claim order), and
did one of the parents that just ended end badly. Two parents ending at once in two
transactions: the second to lock sees the first's end, so the last one always releases. Only
once every parent is final is a step's whole list of parents read (did any fail?). A step
released gets its turn at once (as a submit does) and idle workers claim it without waiting for
a poll; a step whose rule can no longer hold ends cancelled, its error naming the parent, and
its own dependents are settled in turn (level by level, in the same transaction).

The end of a workflow is found the same way: its row locked, then a probe of
tasks_workflow_unfinished_idx. The workers' sweep (skiplock.worker.duties.sweeper) settles what
a DBA's hand-made change left behind."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from skiplock.sql.fragments import (
    ANNOUNCED,
    HOOK_COLUMNS,
    PENDING_CHANNEL,
    RUNNABLE,
    WAITING_ON,
    announce,
    outbox,
)
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.turns import turns

# A step waiting for its parents: not due (no admission gives it a turn), last in
# tasks_scheduled_idx. Documented in schema.sql (tasks.trigger_rule).
BLOCKED_RUN_AT = datetime(9999, 12, 31, tzinfo=UTC)
TRIGGER_RULES = ("all_succeeded", "all_done", "any_failed")
# How a step cancelled by its trigger rule's failure begins its error (a retry of the parent
# named there re-arms it).
UPSTREAM = "upstream: "

# Edges of parents that are final now get their status; answers the dependents.
# The dependents still waiting of parents that ended, locked: each parent by primary key, then its
# edges by task_dependencies_parent_idx (OFFSET 0 keeps the planner from flattening the walk into
# a join, which scanned both tables).
_LOCK_SQL = f"""
SELECT c.id, c.workflow_id FROM tasks c
WHERE c.id IN (
    SELECT x.task_id FROM unnest(%(ids)s::bigint[]) AS u(id) CROSS JOIN LATERAL (
        SELECT d.task_id FROM task_dependencies d WHERE d.parent_id = u.id OFFSET 0
    ) x
) AND c.status = 'pending' AND c.run_at = '{BLOCKED_RUN_AT.isoformat()}'
ORDER BY c.id FOR NO KEY UPDATE
"""

# Each locked dependent, from its parents' rows (a snapshot taken after the lock): whether one is
# unfinished, and the first that ended badly among `ended` (the parents whose end brought us
# here). any_failed counts only failed and expired parents as bad.
_BAD = (
    """(p.status IN ('failed', 'expired') OR (c.trigger_rule <> 'any_failed' AND p.status = 'cancelled'))"""
)
# The unfinished parent is looked for from the newest edge down, one primary-key probe at a time
# (a recursive walk the EXISTS stops at its first find: in a fan-in drained in claim order the
# newest parents end last, so it finds one at once; a plan free to sort or hash the edges read
# all 10,000 of them per batch).
_DECIDE_SQL = f"""
SELECT c.id, c.trigger_rule, w.waiting, b.parent_id AS bad_id, b.status AS bad_status, b.ref AS bad_ref
FROM tasks c
CROSS JOIN LATERAL (
    SELECT EXISTS (
        WITH RECURSIVE edge(parent_id) AS (
            (SELECT d.parent_id FROM task_dependencies d WHERE d.task_id = c.id
             ORDER BY d.parent_id DESC LIMIT 1)
            UNION ALL
            SELECT (SELECT d.parent_id FROM task_dependencies d
                    WHERE d.task_id = c.id AND d.parent_id < e.parent_id ORDER BY d.parent_id DESC LIMIT 1)
            FROM edge e WHERE e.parent_id IS NOT NULL
        )
        SELECT FROM edge e JOIN tasks p ON p.id = e.parent_id AND p.status IN ('pending', 'processing')
    ) AS waiting
) w
LEFT JOIN LATERAL (
    SELECT u.id AS parent_id, p.status::text AS status, p.workflow_ref AS ref
    FROM unnest(%(ended)s::bigint[]) AS u(id)
    CROSS JOIN LATERAL (SELECT t.status, t.workflow_ref FROM tasks t WHERE t.id = u.id OFFSET 0) p
    WHERE {_BAD} AND EXISTS (SELECT FROM task_dependencies d WHERE d.task_id = c.id AND d.parent_id = u.id)
    ORDER BY u.id LIMIT 1
) b ON true
WHERE c.id = ANY(%(ids)s::bigint[]) AND c.status = 'pending' AND c.run_at = '{BLOCKED_RUN_AT.isoformat()}'
"""

# The first parent that ended badly among all of a step's parents: once per step, when none is
# left unfinished (or for the sweep). Driven by the edges and primary keys (OFFSET 0: the
# planner, left to itself, scanned tasks for a bad status and probed the edges from there, 120 ms
# a batch in a live fan-in).
_BAD_PARENT_SQL = f"""
SELECT c.id, b.parent_id AS bad_id, b.status AS bad_status, b.ref AS bad_ref
FROM tasks c
CROSS JOIN LATERAL (
    SELECT e.parent_id, p.status::text AS status, p.workflow_ref AS ref
    FROM (SELECT d.parent_id FROM task_dependencies d WHERE d.task_id = c.id OFFSET 0) e
    CROSS JOIN LATERAL (SELECT t.status, t.workflow_ref FROM tasks t WHERE t.id = e.parent_id OFFSET 0) p
    WHERE {_BAD}
    ORDER BY e.parent_id LIMIT 1
) b
WHERE c.id = ANY(%(ids)s::bigint[])
"""


# Released dependents get their turn (and wait on a limit if one holds them), as a submit does.
_RELEASE_SQL = f"""
WITH due AS (
    SELECT id, coalesce(owner_key_id, 0) AS owner0, queue, priority, fairness_key, concurrency_key, task_type
    FROM tasks WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending'
), gated AS (
    SELECT s.*, {WAITING_ON} AS waiting_on FROM due s
), fresh AS (
    SELECT id AS n, owner0 AS owner, queue, priority, coalesce(fairness_key, '') AS fkey FROM gated
), {turns("fresh")}, released AS (
    UPDATE tasks t SET run_at = now(), turn = tr.turn, waiting_on = g.waiting_on
    FROM gated g JOIN turned tr ON tr.n = g.id
    WHERE t.id = g.id
    RETURNING t.id
), woken AS (  -- idle workers claim at once (only if some wait: NOTIFY serializes commits)
    SELECT pg_notify(%(channel)s, %(payload)s) FROM task_waiters
    WHERE %(wake)s AND EXISTS (SELECT FROM released) LIMIT 1
)
SELECT (SELECT count(*) FROM released) AS released, (SELECT count(*) FROM woken) AS woken
"""

# Released steps the releasing worker did not take itself: idle workers claim them at once.
_WAKE_SQL = "SELECT pg_notify(%(channel)s, %(payload)s) FROM task_waiters LIMIT 1"

_CANCEL_SQL = f"""
WITH doomed AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS d(id, error)
), changed AS (
    UPDATE tasks t SET status = 'cancelled', finished_at = now(), turn = NULL, waiting_on = NULL,
        error = d.error
    FROM doomed d WHERE t.id = d.id AND t.status = 'pending'
    RETURNING t.id, t.has_dependents, t.workflow_id, {HOOK_COLUMNS}
), {outbox("changed")}, {announce("changed", "true")}
SELECT id, has_dependents, workflow_id FROM changed WHERE {ANNOUNCED}
"""


def _cancel_reason(row: dict[str, Any]) -> str:
    rule = row["trigger_rule"]
    if row["bad_id"] is None:
        return f"{UPSTREAM}every parent ended and none failed: its trigger_rule {rule} can no longer hold"
    ref = f" ({row['bad_ref']})" if row["bad_ref"] else ""
    return f"{UPSTREAM}task {row['bad_id']}{ref} ended {row['bad_status']}: its trigger_rule {rule} can no longer hold"


def task_dependents_settle(
    conn: Connection,
    parent_ids: Collection[int],
    take: TakeReleased | None = None,
    *,
    completed: bool = False,
) -> Settled:
    """task_dependents_settle: in the caller's transaction, after `parent_ids` became final:
    lock their waiting dependents, release those whose rule holds now, cancel those whose rule
    never will, and settle the dependents of those cancelled, level by level. `take`: the
    caller's worker takes what it can of the released steps itself (in this transaction); the
    rest wake idle workers. `completed`: the parents all completed (none of them can make a
    rule fail: a dependent still waiting needs no look at them; in a fan-in, most of them)."""
    settled = Settled(set(), set())
    level = sorted(set(parent_ids))
    good = completed
    while level:
        locked = {r["id"]: r["workflow_id"] for r in conn.execute(_LOCK_SQL, {"ids": level})}
        if not locked:
            break
        release, doomed = _decisions(conn, list(locked), [] if good else level)
        good = False  # the next level's parents were cancelled
        level, workflows = _apply(conn, release, doomed, take)
        settled.ended.update(workflows)
        settled.unfinished.update(w for i, w in locked.items() if i not in doomed)
    return settled


# Takes what it can of these released steps (claims them in the caller's transaction); returns
# how many it took.
TakeReleased = Callable[[list[int]], int]


class Settled(NamedTuple):
    """What settling dependents learnt of their workflows."""

    ended: set[int]  # workflows of steps it cancelled (their end is for workflows_finish)
    unfinished: set[int]  # workflows with a step it left pending (released, or still waiting)


class StepEnded(NamedTuple):
    """A workflow step that became final (what its worker knew of it since its claim)."""

    id: int
    workflow_id: int
    has_dependents: bool


def _apply(
    conn: Connection, release: list[int], doomed: dict[int, str], take: TakeReleased | None = None
) -> tuple[list[int], set[int]]:
    """Release and cancel what was decided; returns the cancelled steps that have dependents of
    their own (the next level) and the workflows of the cancelled steps."""
    if release:
        wake = {"channel": PENDING_CHANNEL, "payload": RUNNABLE}
        conn.execute(_RELEASE_SQL, {"ids": release, "wake": take is None, **wake})
        if take is not None and take(release) < len(release):
            conn.execute(_WAKE_SQL, wake)
    if not doomed:
        return [], set()
    rows = conn.execute(_CANCEL_SQL, {"ids": list(doomed), "errors": list(doomed.values())}).fetchall()
    return [r["id"] for r in rows if r["has_dependents"]], {r["workflow_id"] for r in rows}


def _decisions(
    conn: Connection, locked: list[int], ended: list[int] | None
) -> tuple[list[int], dict[int, str]]:
    """Which locked steps start now, and which end cancelled (with their error). `ended`: the
    parents whose end is being settled, those that may have ended badly (None: look at every
    parent, as the sweep does; empty: they all completed)."""
    release: list[int] = []
    doomed: dict[int, str] = {}
    rows = {r["id"]: dict(r) for r in conn.execute(_DECIDE_SQL, {"ids": locked, "ended": ended})}
    # A step about to start or end (none of its parents unfinished), or any for the sweep: did
    # one of all its parents end badly?
    unsure = [i for i, r in rows.items() if r["bad_id"] is None and (ended is None or not r["waiting"])]
    if unsure:
        for bad in conn.execute(_BAD_PARENT_SQL, {"ids": unsure}):
            rows[bad["id"]].update(bad)
    for row in rows.values():
        rule, waiting, bad = row["trigger_rule"], row["waiting"], row["bad_id"] is not None
        if rule == "all_succeeded" and bad:
            doomed[row["id"]] = _cancel_reason(row)
        elif rule == "any_failed" and bad:
            release.append(row["id"])
        elif not waiting:
            if rule == "any_failed":
                doomed[row["id"]] = _cancel_reason(row)
            else:
                release.append(row["id"])
    return release, doomed


def workflow_tasks_ended(conn: Connection, task_ids: Collection[int]) -> None:
    """workflow_tasks_ended: in the transaction that made these tasks final: for those that are
    workflow steps, settle their dependents and finish their workflows if nothing of them is
    left unfinished. The caller's plan_cache_mode is set back after (its transaction may go on
    with statements that must stay custom-planned)."""
    if not task_ids:
        return
    rows = conn.execute(
        """
        SELECT id, workflow_id, has_dependents, current_setting('plan_cache_mode') AS mode
        FROM tasks WHERE id = ANY(%s::bigint[]) AND workflow_id IS NOT NULL
        """,
        (list(task_ids),),
    ).fetchall()
    if rows:
        workflow_steps_ended(conn, [StepEnded(r["id"], r["workflow_id"], r["has_dependents"]) for r in rows])
        conn.execute("SELECT set_config('plan_cache_mode', %s, true)", (rows[0]["mode"],))


def workflow_steps_ended(
    conn: Connection,
    steps: Collection[StepEnded],
    take: TakeReleased | None = None,
    *,
    completed: bool = False,
) -> None:
    """workflow_steps_ended: in the transaction that made these steps final: settle their
    dependents, then finish their workflows, but for those where a step is known pending (a
    dependent just released or still waiting: in a chain, every step but the last). Leaves
    plan_cache_mode auto until the transaction ends (the worker's writer commits next;
    workflow_tasks_ended sets it back for other callers)."""
    if not steps:
        return
    # plan_cache_mode auto: these statements look up a few ids by primary key: generic plans,
    # cached once prepared, are as good as custom ones, and planning their CTEs anew (the
    # workers' force_custom_plan) took milliseconds of every chain step.
    conn.execute("SELECT set_config('plan_cache_mode', 'force_generic_plan', true)")
    settled = task_dependents_settle(
        conn, [s.id for s in steps if s.has_dependents], take, completed=completed
    )
    workflows = ({s.workflow_id for s in steps} | settled.ended) - settled.unfinished
    workflows_finish(conn, workflows)


# A workflow is final when none of its tasks is: its state, once, and its webhook (outbox).
_FINISH_SQL = """
WITH ended AS (
    SELECT w.id, w.owner_key_id, w.callback_url, w.cancelled_at,
           EXISTS (SELECT FROM tasks t WHERE t.workflow_id = w.id AND t.status IN ('failed', 'expired')) AS failed
    FROM workflows w
    WHERE w.id = ANY(%(ids)s::bigint[]) AND w.finished_at IS NULL
      AND NOT EXISTS (SELECT FROM tasks t WHERE t.workflow_id = w.id AND t.status IN ('pending', 'processing'))
), finished AS (
    UPDATE workflows w
    SET finished_at = now(),
        state = CASE WHEN e.failed THEN 'failed' WHEN e.cancelled_at IS NOT NULL THEN 'cancelled' ELSE 'completed' END
    FROM ended e WHERE w.id = e.id
    RETURNING w.id, w.owner_key_id, w.callback_url, w.state, w.name, w.created_at, w.finished_at
), hooked AS (
    INSERT INTO webhook_deliveries (task_id, workflow_id, owner_key_id, url, event, payload)
    SELECT NULL, f.id, f.owner_key_id, f.callback_url, 'workflow.' || f.state,
           jsonb_build_object('type', 'workflow.' || f.state,
                              'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                              'data', jsonb_build_object('workflow_id', f.id, 'name', f.name, 'state', f.state,
                                  'counts', (SELECT jsonb_object_agg(s, n) FROM (
                                      SELECT status::text AS s, count(*) AS n FROM tasks WHERE workflow_id = f.id
                                      GROUP BY 1) c)))
    FROM finished f WHERE f.callback_url IS NOT NULL
    RETURNING pg_notify('skiplock_webhook_due', '') AS sent
)
SELECT id, state, (SELECT count(*) FROM hooked) AS hooks FROM finished
"""


def workflows_finish(conn: Connection, workflow_ids: Collection[int]) -> list[dict[str, Any]]:
    """workflows_finish: lock these workflows (in id order), then finish those with no
    unfinished task (a snapshot after the lock: of two last steps ending at once, the second
    sees the first). Returns the workflows finished."""
    ids = sorted(set(workflow_ids))
    if not ids:
        return []
    conn.execute(
        "SELECT id FROM workflows WHERE id = ANY(%s::bigint[]) ORDER BY id FOR NO KEY UPDATE", (ids,)
    )
    return [dict(r) for r in conn.execute(_FINISH_SQL, {"ids": ids})]


# Steps cancelled because `ids` ended badly, and theirs in turn: waiting for their parents again.
_REARM_SQL = f"""
WITH RECURSIVE rearmed(id) AS (
    SELECT d.task_id FROM task_dependencies d JOIN tasks c ON c.id = d.task_id
    WHERE d.parent_id = ANY(%(ids)s::bigint[]) AND c.status = 'cancelled'
      AND c.error LIKE '{UPSTREAM}task ' || d.parent_id || ' %%'
    UNION
    SELECT d.task_id FROM rearmed r JOIN task_dependencies d ON d.parent_id = r.id
    JOIN tasks c ON c.id = d.task_id
    WHERE c.status = 'cancelled' AND c.error LIKE '{UPSTREAM}task ' || d.parent_id || ' %%'
), armed AS (
    UPDATE tasks t SET status = 'pending', run_at = '{BLOCKED_RUN_AT.isoformat()}', finished_at = NULL,
        error = NULL, turn = NULL, waiting_on = NULL
    FROM rearmed r WHERE t.id = r.id
    RETURNING t.id
), reopened AS (
    UPDATE workflows w SET finished_at = NULL, state = NULL
    WHERE w.finished_at IS NOT NULL AND w.id IN (SELECT workflow_id FROM tasks WHERE id = ANY(%(ids)s::bigint[]))
)
SELECT count(*) AS n FROM armed
"""


def workflow_rearm(conn: Connection, task_ids: Sequence[int]) -> int:
    """workflow_rearm: after these workflow steps are pending again (a retry), the steps their
    end had cancelled (their error names the step), with those cancelled in turn, wait for their
    parents again; the workflow is unfinished again.
    Returns how many steps were re-armed."""
    return int(one_row(conn.execute(_REARM_SQL, {"ids": list(task_ids)}))["n"])


def workflows_sweep(conn: Connection, *, after_id: int = 0, limit: int = 200) -> tuple[int, int]:
    """workflows_sweep: the safety net, a slice of the waiting steps at a time (those after
    `after_id`, tasks_scheduled_idx): each whose rule holds or never will (its parents ended
    by a DBA's hand, say) is settled, and workflows whose last step ended without their finish
    being seen are finished. Returns how many it settled, and where the next slice starts (0:
    from the beginning)."""
    with conn.transaction():
        waiting = [
            r["id"]
            for r in conn.execute(
                f"""
                SELECT id FROM tasks
                WHERE status = 'pending' AND turn IS NULL AND run_at = '{BLOCKED_RUN_AT.isoformat()}' AND id > %s
                ORDER BY run_at, id LIMIT %s
                FOR NO KEY UPDATE SKIP LOCKED
                """,
                (after_id, limit),
            )
        ]
        release, doomed = _decisions(conn, waiting, None) if waiting else ([], {})
        level, workflows = _apply(conn, release, doomed)
        workflows |= task_dependents_settle(conn, level).ended
        workflows |= {
            r["id"]
            for r in conn.execute(
                """
                SELECT w.id FROM workflows w
                WHERE w.finished_at IS NULL
                  AND NOT EXISTS (SELECT FROM tasks t WHERE t.workflow_id = w.id AND t.status IN ('pending', 'processing'))
                ORDER BY w.id LIMIT %s
                """,
                (limit,),
            )
        }
        finished = workflows_finish(conn, workflows)
    return len(release) + len(doomed) + len(finished), (waiting[-1] if len(waiting) == limit else 0)
