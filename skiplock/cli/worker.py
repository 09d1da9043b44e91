"""`skiplock worker`: run a worker (a supervisor and its task processes)."""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from skiplock.cli.common import (
    Context,
    name_check,
)

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
    from skiplock import logs
    from skiplock.worker.supervisor import Supervisor  # only here: it is the heaviest import

    logs.configure(log_level, settings.log_format)
    supervisor = Supervisor(settings)
    logs.bind(worker_id=supervisor.worker_id)
    sys.exit(supervisor.run())


COMMANDS = (worker,)
