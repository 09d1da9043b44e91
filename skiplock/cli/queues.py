"""`skiplock queues|pause|resume`: the queues' state, and pausing one."""

from __future__ import annotations

import click

from skiplock.cli.common import (
    Context,
    emit,
    json_option,
    queue_name,
)
from skiplock.sql.operations import (
    queue_summaries,
    task_queue_set_paused,
)

# Who paused or resumed a queue (task_queues.changed_by).
CHANGED_BY = "skiplock-cli"

QUEUE_COLUMNS = ("queue", "paused", "due", "scheduled", "reserved", "running", "oldest_due_wait_seconds")
QUEUE_STATE_COLUMNS = ("queue", "paused", "changed_at", "changed_by")


@click.command("queues", short_help="Queues: due, scheduled, running, paused.")
@json_option
@click.pass_obj
def queues(ctx: Context) -> None:
    """Every queue with unfinished tasks or a setting: due, scheduled, reserved and running
    tasks, how long the oldest due task has waited, and whether it is paused."""
    with ctx.connect() as conn:
        rows = queue_summaries(conn)
    emit(ctx, rows, QUEUE_COLUMNS)


def _set_paused(ctx: Context, queue: str, paused: bool) -> None:
    with ctx.connect() as conn:
        row = task_queue_set_paused(conn, queue=queue, paused=paused, by=CHANGED_BY)
    emit(ctx, {k: v for k, v in row.items() if k != "notified"}, QUEUE_STATE_COLUMNS)


@click.command("pause", short_help="Pause a queue: workers stop claiming from it.")
@click.argument("queue", callback=queue_name)
@json_option
@click.pass_obj
def pause(ctx: Context, queue: str) -> None:
    """Pause QUEUE: no worker claims from it (within a second); running tasks finish."""
    _set_paused(ctx, queue, True)


@click.command("resume", short_help="Resume a paused queue.")
@click.argument("queue", callback=queue_name)
@json_option
@click.pass_obj
def resume(ctx: Context, queue: str) -> None:
    """Resume QUEUE (idle workers are woken at once)."""
    _set_paused(ctx, queue, False)


COMMANDS = (queues, pause, resume)
