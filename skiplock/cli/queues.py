"""`skiplock queues|pause|resume`: the queues' state, and pausing one (it holds when `pause`
returns: tasks a worker had claimed but not started go back to pending). Queue limits:
`skiplock limits set --queue`."""

from __future__ import annotations

import click

from skiplock.cli.common import (
    Context,
    emit,
    json_option,
    queue_name,
)
from skiplock.sql.limits import queue_pause_take_effect
from skiplock.sql.operations import (
    queue_summaries,
    task_queue_set_paused,
)

# Who paused or resumed a queue (task_queues.changed_by).
CHANGED_BY = "skiplock-cli"

QUEUE_COLUMNS = (
    "queue", "paused", "due", "waiting_on_limit", "scheduled", "reserved", "running", "oldest_due_wait_seconds",
    "expired_last_hour", "max_running",
)  # fmt: skip
QUEUE_STATE_COLUMNS = ("queue", "paused", "changed_at", "changed_by")


@click.command("queues", short_help="Queues: due, scheduled, running, paused.")
@json_option
@click.pass_obj
def queues(ctx: Context) -> None:
    """Every queue with unfinished tasks, a setting or tasks expired in the last hour: due
    tasks (of which waiting on a limit), scheduled, reserved and running ones, how long the
    oldest due task has waited, whether it is paused, tasks expired in the last hour, and its
    limit's max_running."""
    with ctx.connect() as conn:
        rows = queue_summaries(conn)
    if ctx.as_json:
        emit(ctx, rows)
        return
    shown = [{**r, "max_running": r["limit"]["max_running"] if r["limit"] else None} for r in rows]
    emit(ctx, shown, QUEUE_COLUMNS)


def _set_paused(ctx: Context, queue: str, paused: bool) -> None:
    with ctx.connect() as conn:  # autocommit: the pause is committed, then it takes effect
        row = dict(task_queue_set_paused(conn, queue=queue, paused=paused, by=CHANGED_BY))
        row.pop("notified")
        if paused:
            row["released"] = queue_pause_take_effect(conn, queue=queue)
    emit(ctx, row, (*QUEUE_STATE_COLUMNS, "released") if paused else QUEUE_STATE_COLUMNS)


@click.command("pause", short_help="Pause a queue: workers stop claiming from it.")
@click.argument("queue", callback=queue_name)
@json_option
@click.pass_obj
def pause(ctx: Context, queue: str) -> None:
    """Pause QUEUE: from when this returns none of its tasks starts (those claimed but not
    started go back to pending: RELEASED); running tasks finish."""
    _set_paused(ctx, queue, True)


@click.command("resume", short_help="Resume a paused queue.")
@click.argument("queue", callback=queue_name)
@json_option
@click.pass_obj
def resume(ctx: Context, queue: str) -> None:
    """Resume QUEUE (idle workers are woken at once)."""
    _set_paused(ctx, queue, False)


COMMANDS = (queues, pause, resume)
