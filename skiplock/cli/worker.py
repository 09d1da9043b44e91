"""`skiplock worker`: run a worker (a supervisor and its task processes).

The one definition of a worker's command line: `python worker.py` (the checkout's script, which
the Procfile and the systemd unit run) runs this very command (run_standalone), with the same
options, help, refusals (skiplock.worker.checks) and exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NoReturn

import click

from skiplock.cli.common import Context, name_check

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# A port number: 0 (off) to the highest TCP port.
MAX_PORT = 65535
# click's own exit code for bad usage, which a worker that refuses its settings shares.
USAGE_EXIT = 2


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
    type=click.IntRange(0, MAX_PORT),
    help="Serve Prometheus metrics on this port (default: off, env SKIPLOCK_METRICS_PORT).",
)
@click.option("--metrics-address", help="Address for --metrics-port (default 127.0.0.1).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO")
@click.pass_context
def worker(
    click_ctx: click.Context,
    concurrency: int | None,
    queues_: tuple[str, ...],
    lease_seconds: float | None,
    poll_interval: float | None,
    shutdown_grace: float | None,
    metrics_port: int | None,
    metrics_address: str | None,
    log_level: str,
) -> None:
    """Run a worker (`skiplock worker` and `python worker.py` are the same command): a
    supervisor and its task processes, until SIGTERM or Ctrl-C (a graceful stop; exit 0). Every
    other setting comes from the environment (SKIPLOCK_*). A database that is down is waited
    for, not an error; a wrong DATABASE_URL or login, a database whose schema is missing or
    older than this code's, or a task module that does not import is refused in one line."""
    from skiplock.worker.checks import WorkerRefused, check_worker_settings

    # Under `skiplock`, its Context (--database-url); run alone (worker.py), the environment's.
    ctx = click_ctx.find_object(Context) or Context(None, as_json=False)
    overrides: dict[str, Any] = {
        "database_url": ctx.database_url,
        "concurrency": concurrency,
        "queues": queues_ or None,
        "lease_seconds": lease_seconds,
        "poll_interval_seconds": poll_interval,
        "shutdown_grace_seconds": shutdown_grace,
        "metrics_port": metrics_port,
        "metrics_address": metrics_address,
    }
    try:
        settings = replace(
            ctx.settings, **{name: value for name, value in overrides.items() if value is not None}
        )
        check_worker_settings(settings)
    except (click.UsageError, WorkerRefused) as exc:  # a malformed SKIPLOCK_* value, a refusal
        refuse(click_ctx, exc.message if isinstance(exc, click.UsageError) else str(exc))
    from skiplock import logs
    from skiplock.startup import StartupError, check_database
    from skiplock.worker.supervisor import Supervisor  # only here: it is the heaviest import

    logs.configure(log_level, settings.log_format)
    try:
        # A wrong URL, login or schema ends it here; a database that is down is waited for.
        check_database(settings.database_url, role="worker", wait_if_down=True)
        supervisor = Supervisor(settings)  # imports the task modules
        logs.bind(worker_id=supervisor.worker_id)
        code = supervisor.run()
    except StartupError as exc:  # also a schema found missing or older on a later connection
        refuse(click_ctx, str(exc))
    sys.exit(code)


def refuse(click_ctx: click.Context, message: str) -> NoReturn:
    """A worker that cannot start says why in one line, under the name it was run by
    (`worker.py: …` or `skiplock: …`), and exits as bad usage does: a supervisor (systemd, a
    Procfile runner) restarting it gains nothing."""
    program = "skiplock" if click_ctx.parent is not None else click_ctx.info_name  # worker.py alone
    click.echo(f"{program}: {message}", err=True)
    sys.exit(USAGE_EXIT)


def run_standalone(argv: Sequence[str] | None = None, prog_name: str = "worker.py") -> None:
    """`python worker.py [OPTIONS]`: this command on its own (no `skiplock` group around it)."""
    worker.main(args=list(argv) if argv is not None else None, prog_name=prog_name)


COMMANDS = (worker,)
