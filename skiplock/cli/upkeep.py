"""`skiplock prune|health`: retention and the self-audit a cron job runs."""

from __future__ import annotations

import time

import click

from skiplock.cli.common import (
    Context,
    emit,
    emit_record,
    fail,
    json_option,
    to_json,
)
from skiplock.sql.keys import idempotency_keys_prune
from skiplock.sql.operations import (
    task_health_get,
    task_invariant_violation_count,
    task_prune,
    task_unserved_counts,
)
from skiplock.worker.duties.pruner import PRUNE_BATCH

# `skiplock prune`'s default share of the time it spends deleting (--duty): the rest it sleeps,
# so that a day's worth of history (a million tasks, half a minute of deletes at full speed on
# two cores, which cost a running drain a quarter of its rate) leaves the queue's own work be.
DEFAULT_PRUNE_DUTY = 0.1


def _in_batches(delete_batch, duty: float = 1.0) -> int:
    """Call delete_batch until it deletes less than a full batch; how many in all. After each
    batch it sleeps so that deleting takes `duty` of the time (1: no sleep)."""
    deleted = 0
    while True:
        started = time.monotonic()
        batch = delete_batch()
        deleted += batch
        if batch < PRUNE_BATCH:
            return deleted
        time.sleep((time.monotonic() - started) * (1 - duty) / duty)


@click.command("prune", short_help="Delete old finished tasks and expired Idempotency-Keys.")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Delete tasks finished longer ago than this (default: SKIPLOCK_RETENTION_SECONDS, 7 days).",
)
@click.option(
    "--duty",
    type=click.FloatRange(min=0.01, max=1.0),
    default=DEFAULT_PRUNE_DUTY,
    show_default=True,
    help="The share of its time it spends deleting (it sleeps the rest): 1 deletes at full speed.",
)
@json_option
@click.pass_obj
def prune(ctx: Context, older_than: float | None, duty: float) -> None:
    """Delete finished tasks (completed, failed, cancelled, expired) with their attempts, and the
    Idempotency-Keys past their window, now rather than at the workers' next round; paced
    (--duty) so that the queue's own work goes on at its pace meanwhile."""
    settings = ctx.settings
    # SKIPLOCK_RETENTION_SECONDS=0 means "keep forever", not "older than 0 s".
    prune_tasks = older_than is not None or settings.retention_seconds > 0
    if older_than is None:
        older_than = settings.retention_seconds
    if not prune_tasks:
        click.echo(
            "retention is off (SKIPLOCK_RETENTION_SECONDS=0): pass --older-than to prune tasks", err=True
        )
    with ctx.connect() as conn:
        tasks = (
            _in_batches(lambda: task_prune(conn, older_than_seconds=older_than, limit=PRUNE_BATCH), duty)
            if prune_tasks
            else 0
        )
        keys = _in_batches(
            lambda: idempotency_keys_prune(
                conn, older_than_seconds=settings.idempotency_ttl_seconds, limit=PRUNE_BATCH
            )
        )
    emit(
        ctx,
        {"tasks_pruned": tasks, "idempotency_keys_pruned": keys, "older_than_seconds": older_than},
        ("tasks_pruned", "idempotency_keys_pruned", "older_than_seconds"),
    )


@click.command("health", short_help="Health and self-audit (exit 1 if unhealthy: a cron check).")
@json_option
@click.pass_obj
def health(ctx: Context) -> None:
    """The queue's health (task_health) and its self-audit (task_invariant_violations). Exit 1 if
    the audit finds a violation, a lease has lapsed, or due tasks are of a type (or in a queue) no
    live worker runs: usable as a cron or monitoring check."""
    with ctx.connect() as conn:
        row = task_health_get(conn)
        violations = task_invariant_violation_count(conn)
        unserved = task_unserved_counts(conn)
    problems = [
        f"{u['tasks']} due task(s) of type {u['task_type']!r} in queue {u['queue']!r}: no live worker "
        "runs that type there (start one with its module in SKIPLOCK_TASK_MODULES and the queue in "
        "SKIPLOCK_QUEUES)"
        for u in unserved
    ]
    if violations:
        problems.append(f"{violations} invariant violation(s) (SELECT * FROM task_invariant_violations)")
    if row["lapsed_leases"]:
        problems.append(
            f"{row['lapsed_leases']} task(s) processing past their lease (is any worker rescuing?)"
        )
    data = {
        "healthy": not problems,
        "invariant_violations": violations,
        "unserved_tasks": sum(u["tasks"] for u in unserved),
        **row,
    }
    if ctx.as_json:
        click.echo(to_json({**data, "unserved": unserved, "problems": problems}))
    else:
        emit_record(ctx, data, data.keys())
    if problems:
        fail("unhealthy: " + "; ".join(problems))


COMMANDS = (prune, health)
