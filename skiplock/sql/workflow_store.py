"""Workflows stored and read: a workflow and all its tasks and edges in one transaction (all or
nothing), its state derived from its tasks, its cancel, and the re-arm of the steps a failed
task's end cancelled when that task is retried. When steps start and end: skiplock/sql/workflows.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from skiplock.errors import WorkflowNotFound
from skiplock.sql.fragments import ANNOUNCED, HOOK_COLUMNS, OWNED, announce, outbox
from skiplock.sql.inserts import NewTask, task_insert_many
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.workflows import BLOCKED_RUN_AT, workflows_finish
from skiplock.workflows import Graph


def workflow_insert(
    conn: Connection,
    graph: Graph,
    new_task: Callable[[Any], NewTask],
    *,
    owner_key_id: int | None = None,
    name: str | None = None,
    callback_url: str | None = None,
    slots: Sequence[int | None] | None = None,
    more_slots: Callable[[int], list[int]] | None = None,
) -> tuple[int, dict[str, int]]:
    """workflow_insert: the workflow, its tasks (those without parents runnable at once, the
    others waiting for theirs) and its edges, in one transaction. `new_task` makes a step's task
    from its submit; `slots`: a quota slot per step, in graph.steps order. Returns the
    workflow's id and each ref's task id."""
    order = graph.order()
    slot_of = {s.ref: slot for s, slot in zip(graph.steps, slots or [None] * len(graph.steps), strict=True)}
    parents = {p for s in order for p in s.depends_on}
    news = []
    for step in order:
        task = dataclasses.replace(new_task(step.task), quota_slot=slot_of[step.ref])
        if step.depends_on:  # waits for its parents: not due, no turn (see workflows.BLOCKED_RUN_AT)
            task = dataclasses.replace(task, run_at=BLOCKED_RUN_AT, delay_seconds=None)
        news.append(task)
    with conn.transaction():
        workflow_id = one_row(
            conn.execute(
                "INSERT INTO workflows (owner_key_id, name, callback_url) VALUES (%s, %s, %s) RETURNING id",
                (owner_key_id, name, callback_url),
            )
        )["id"]
        answers = task_insert_many(conn, news, owner_key_id=owner_key_id, more_slots=more_slots)
        ids = {step.ref: answer.id for step, answer in zip(order, answers, strict=True)}
        conn.execute(
            """
            UPDATE tasks t SET workflow_id = %(workflow)s, workflow_ref = u.ref, trigger_rule = u.rule,
                has_dependents = u.parent
            FROM unnest(%(ids)s::bigint[], %(refs)s::text[], %(rules)s::text[], %(parents)s::bool[])
                AS u(id, ref, rule, parent)
            WHERE t.id = u.id
            """,
            {
                "workflow": workflow_id,
                "ids": [ids[s.ref] for s in order],
                "refs": [s.ref for s in order],
                "rules": [s.trigger_rule if s.depends_on else None for s in order],
                "parents": [s.ref in parents for s in order],
            },
        )
        edges = [(ids[s.ref], ids[p]) for s in order for p in s.depends_on]
        if edges:
            conn.execute(
                "INSERT INTO task_dependencies (task_id, parent_id) SELECT * FROM unnest(%s::bigint[], %s::bigint[])",
                ([c for c, _ in edges], [p for _, p in edges]),
            )
    return workflow_id, ids


def workflow_get(conn: Connection, workflow_id: int, *, owner: int | None = None) -> dict[str, Any]:
    """workflow_get: the workflow as `owner` may see it (WorkflowNotFound otherwise): its state
    (running until its last task is final), its tasks' counts by status, and each task with its
    ref, status, trigger rule, parents (refs) and error. tasks_workflow_idx."""
    row = conn.execute(
        f"""
        SELECT id, owner_key_id, name, callback_url, created_at, cancelled_at, finished_at,
               coalesce(state, 'running') AS state
        FROM workflows WHERE id = %(id)s AND {OWNED}
        """,
        {"id": workflow_id, "owner": owner},
    ).fetchone()
    if row is None:
        raise WorkflowNotFound(workflow_id)
    tasks = conn.execute(
        """
        SELECT t.id, t.workflow_ref AS ref, t.status::text AS status, t.task_type, t.trigger_rule, t.error,
               coalesce((SELECT array_agg(p.workflow_ref ORDER BY p.id)
                         FROM task_dependencies d JOIN tasks p ON p.id = d.parent_id
                         WHERE d.task_id = t.id), '{}') AS depends_on
        FROM tasks t WHERE t.workflow_id = %s ORDER BY t.id
        """,
        (workflow_id,),
    ).fetchall()
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task["status"]] = counts.get(task["status"], 0) + 1
    return {**row, "counts": counts, "tasks": [dict(t) for t in tasks]}


def workflow_cancel(conn: Connection, workflow_id: int, *, owner: int | None = None) -> dict[str, Any]:
    """workflow_cancel: cancel every unfinished task of the workflow (those running are told to
    stop, as a task's cancel does), in one transaction; the workflow ends cancelled (failed if
    a task had failed). Raises WorkflowNotFound."""
    from skiplock.sql.tasks import task_cancel

    with conn.transaction():
        found = conn.execute(
            f"UPDATE workflows SET cancelled_at = coalesce(cancelled_at, now()) WHERE id = %(id)s AND {OWNED} RETURNING id",
            {"id": workflow_id, "owner": owner},
        ).fetchone()
        if found is None:
            raise WorkflowNotFound(workflow_id)
        conn.execute(
            f"""
            WITH changed AS (
                UPDATE tasks t SET status = 'cancelled', finished_at = now(), turn = NULL, waiting_on = NULL,
                    limited = false, error = 'cancelled with its workflow'
                WHERE t.workflow_id = %(id)s AND t.status = 'pending'
                RETURNING t.id, {HOOK_COLUMNS}
            ), {outbox("changed")}, {announce("changed", "true")}
            SELECT count(*) FROM changed WHERE {ANNOUNCED}
            """,
            {"id": workflow_id},
        )
        running = conn.execute(
            "SELECT id FROM tasks WHERE workflow_id = %s AND status = 'processing' ORDER BY id",
            (workflow_id,),
        ).fetchall()
        for task in running:
            task_cancel(conn, task["id"], settle=False)
        workflows_finish(conn, [workflow_id])
    return workflow_get(conn, workflow_id, owner=owner)


def task_parent_results(conn: Connection, task_id: int) -> dict[str, Any]:
    """task_parent_results: the results of a step's parents, by ref (None for one that did not
    complete)."""
    rows = conn.execute(
        """
        SELECT p.workflow_ref AS ref, p.result FROM task_dependencies d JOIN tasks p ON p.id = d.parent_id
        WHERE d.task_id = %s
        """,
        (task_id,),
    ).fetchall()
    return {r["ref"]: r["result"] for r in rows}


def workflow_metrics(conn: Connection) -> dict[str, Any]:
    """workflow_metrics: workflows running now (workflows_unfinished_idx), and those that
    finished in the last hour by state."""
    running = one_row(conn.execute("SELECT count(*) AS n FROM workflows WHERE finished_at IS NULL"))["n"]
    finished = conn.execute(
        """
        SELECT state, count(*) AS n FROM workflows
        WHERE finished_at IS NOT NULL AND finished_at > now() - interval '1 hour' GROUP BY state
        """
    ).fetchall()
    return {"running": running, "finished_last_hour": {r["state"]: r["n"] for r in finished}}


def workflows_recent(conn: Connection, *, limit: int) -> list[dict[str, Any]]:
    """workflows_recent: the latest workflows, each with its tasks' counts by status."""
    rows = conn.execute(
        """
        SELECT w.id, w.name, w.owner_key_id, w.created_at, w.finished_at, coalesce(w.state, 'running') AS state,
               (SELECT jsonb_object_agg(s, n) FROM (
                    SELECT status::text AS s, count(*) AS n FROM tasks WHERE workflow_id = w.id GROUP BY 1) c) AS counts
        FROM workflows w ORDER BY w.id DESC LIMIT %s
        """,
        (limit,),
    ).fetchall()
    return [dict(r) for r in rows]
