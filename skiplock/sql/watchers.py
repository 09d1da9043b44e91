"""Clients waiting on tasks (task_watchers): long-polls and event streams register here so that
only watched tasks NOTIFY."""

from __future__ import annotations

from collections.abc import Sequence

from skiplock.sql.rows import Connection

# (status, progress, attempts) of a task: what a waiter compares to what it last saw.
TaskState = tuple[str, float | None, int]


def task_watch(conn: Connection, *, task_ids: Sequence[int], watcher: str) -> None:
    """task_watch: this API process waits on these tasks: changes to them are announced (NOTIFY
    skiplock_task_changed). Refreshes `since` of those it already watched."""
    conn.execute(
        """
        INSERT INTO task_watchers (task_id, watcher) SELECT unnest(%(ids)s::bigint[]), %(watcher)s
        ON CONFLICT (task_id, watcher) DO UPDATE SET since = now()
        """,
        {"ids": list(task_ids), "watcher": watcher},
    )


def task_unwatch(conn: Connection, *, task_ids: Sequence[int], watcher: str) -> None:
    """task_unwatch: nobody in this API process waits on these tasks any more."""
    conn.execute(
        "DELETE FROM task_watchers WHERE task_id = ANY(%(ids)s::bigint[]) AND watcher = %(watcher)s",
        {"ids": list(task_ids), "watcher": watcher},
    )


def task_watchers_prune(conn: Connection, *, older_than_seconds: float) -> int:
    """task_watchers_prune: forget watches not refreshed for this long (their API process died,
    or lost its connection before it could say it stopped waiting)."""
    return conn.execute(
        "DELETE FROM task_watchers WHERE since < now() - make_interval(secs => %(age)s)",
        {"age": older_than_seconds},
    ).rowcount


def task_states(conn: Connection, task_ids: Sequence[int]) -> dict[int, TaskState]:
    """task_states: (status, progress, attempts) of these tasks, by id (by primary key)."""
    rows = conn.execute(
        "SELECT id, status::text AS status, progress, attempts FROM tasks WHERE id = ANY(%(ids)s::bigint[])",
        {"ids": list(task_ids)},
    ).fetchall()
    return {r["id"]: (r["status"], r["progress"], r["attempts"]) for r in rows}
