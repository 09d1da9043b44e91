"""`skiplock queues|pause|resume|prune|health|schema apply|worker`: running the queue."""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from skiplock import queries
from skiplock.cli_common import (
    Context,
    emit,
    emit_record,
    fail,
    json_option,
    name_check,
    queue_name,
    to_json,
)
from skiplock.db import SCHEMA_PATH, apply_schema
from skiplock.pruner import PRUNE_BATCH

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
        rows = queries.queue_summaries(conn)
    emit(ctx, rows, QUEUE_COLUMNS)


def _set_paused(ctx: Context, queue: str, paused: bool) -> None:
    with ctx.connect() as conn:
        row = queries.task_queue_set_paused(conn, queue=queue, paused=paused, by=CHANGED_BY)
    row.pop("notified", None)
    emit(ctx, row, QUEUE_STATE_COLUMNS)


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


def _in_batches(delete_batch) -> int:
    """Call delete_batch until it deletes less than a full batch; how many in all."""
    deleted = 0
    while True:
        batch = delete_batch()
        deleted += batch
        if batch < PRUNE_BATCH:
            return deleted


@click.command("prune", short_help="Delete old finished tasks and expired Idempotency-Keys.")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Delete tasks finished longer ago than this (default: SKIPLOCK_RETENTION_SECONDS, 7 days).",
)
@json_option
@click.pass_obj
def prune(ctx: Context, older_than: float | None) -> None:
    """Delete finished tasks (completed, failed, cancelled) with their attempts, and the
    Idempotency-Keys past their window, now rather than at the workers' next round."""
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
            _in_batches(lambda: queries.task_prune(conn, older_than_seconds=older_than, limit=PRUNE_BATCH))
            if prune_tasks
            else 0
        )
        keys = _in_batches(
            lambda: queries.idempotency_keys_prune(
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
    the audit finds a violation or a lease has lapsed: usable as a cron or monitoring check."""
    with ctx.connect() as conn:
        row = queries.task_health_get(conn)
        violations = queries.task_invariant_violation_count(conn)
    problems = []
    if violations:
        problems.append(f"{violations} invariant violation(s) (SELECT * FROM task_invariant_violations)")
    if row["lapsed_leases"]:
        problems.append(
            f"{row['lapsed_leases']} task(s) processing past their lease (is any worker rescuing?)"
        )
    data = {"healthy": not problems, "invariant_violations": violations, **row}
    if ctx.as_json:
        click.echo(to_json({**data, "problems": problems}))
    else:
        emit_record(ctx, data, data.keys())
    if problems:
        fail("unhealthy: " + "; ".join(problems))


@click.group("schema", short_help="Apply schema.sql (schema apply).")
def schema_group() -> None:
    """The database schema (schema.sql)."""


@schema_group.command("apply")
@json_option
@click.pass_obj
def schema_apply(ctx: Context) -> None:
    """Apply schema.sql (idempotent: run it on every deploy). Waits at most 2 s at a time for
    the locks its DDL needs, so a long transaction does not stall the queue behind it."""
    url = ctx.require_url()
    try:
        apply_schema(url)
    except OSError as exc:
        fail(f"cannot read {SCHEMA_PATH}: {exc.strerror}")
    if ctx.as_json:
        click.echo(to_json({"applied": True, "schema": str(SCHEMA_PATH)}))
    else:
        click.echo(f"applied {SCHEMA_PATH.name}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@click.command("worker", short_help="Run a worker (as python worker.py).")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Task processes (default: CPU count, env SKIPLOCK_CONCURRENCY).",
)
@click.option(
    "--queue",
    "-q",
    "queues_",
    multiple=True,
    callback=name_check("queue name"),
    help="Claim only from this queue; repeat for several (default: all, env SKIPLOCK_QUEUES).",
)
@click.option(
    "--lease-seconds", type=click.FloatRange(min=0, min_open=True), help="env SKIPLOCK_LEASE_SECONDS"
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between claims when no notification arrives.",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    help="Seconds running tasks get to finish on SIGTERM before being handed back.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics on this port (default: off, env SKIPLOCK_METRICS_PORT).",
)
@click.option("--metrics-address", help="Address for --metrics-port (default 127.0.0.1).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO")
@click.pass_obj
def worker(
    ctx: Context,
    concurrency: int | None,
    queues_: tuple[str, ...],
    lease_seconds: float | None,
    poll_interval: float | None,
    shutdown_grace: float | None,
    metrics_port: int | None,
    metrics_address: str | None,
    log_level: str,
) -> None:
    """Run a worker, as `python worker.py` does: a supervisor and its task processes, until
    SIGTERM or Ctrl-C (a graceful stop; exit 0). Every other setting comes from the environment
    (SKIPLOCK_*). A database that is down is waited for, not an error."""
    overrides = {
        "concurrency": concurrency,
        "queues": queues_ or None,
        "lease_seconds": lease_seconds,
        "poll_interval_seconds": poll_interval,
        "shutdown_grace_seconds": shutdown_grace,
        "metrics_port": metrics_port,
        "metrics_address": metrics_address,
    }
    settings = replace(
        ctx.settings,
        database_url=ctx.require_url(),
        **{name: value for name, value in overrides.items() if value is not None},
    )
    from skiplock import logs  # only here, as the supervisor: the other commands do not log
    from skiplock.supervisor import Supervisor  # only here: it is the heaviest import

    logs.configure(log_level, settings.log_format)
    supervisor = Supervisor(settings)
    logs.bind(worker_id=supervisor.worker_id)
    sys.exit(supervisor.run())


COMMANDS = (queues, pause, resume, prune, health, schema_group, worker)
