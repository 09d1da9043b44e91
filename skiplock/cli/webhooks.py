"""`skiplock webhooks`: a webhook sender on its own, on any host, until SIGTERM or Ctrl-C.

Each worker runs one in a process of its own by default (SKIPLOCK_WEBHOOK_SENDER=process); run
this instead where webhooks should go out from elsewhere (workers with SKIPLOCK_WEBHOOK_SENDER=off),
or beside them for more senders: deliveries are leased rows, any number of senders share them.
"""

from __future__ import annotations

import sys

import click

from skiplock.cli.common import Context
from skiplock.cli.worker import LOG_LEVELS, refuse


@click.command("webhooks", short_help="Send webhooks (a sender on its own).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO")
@click.pass_context
def webhooks(click_ctx: click.Context, log_level: str) -> None:
    """Send due webhook deliveries until SIGTERM or Ctrl-C (exit 0; tries under way get their
    timeout to finish). Settings come from the environment (SKIPLOCK_WEBHOOK_*). A wrong
    DATABASE_URL, login or schema is refused in one line; a database that is down is waited for."""
    ctx = click_ctx.find_object(Context) or Context(None, as_json=False)
    try:
        settings = ctx.settings
    except click.UsageError as exc:
        refuse(click_ctx, exc.message)
    from skiplock import logs
    from skiplock.startup import StartupError, check_database
    from skiplock.webhooks.process import run_foreground
    from skiplock.worker.supervisor import default_worker_id

    logs.configure(log_level, settings.log_format)
    sender_id = default_worker_id()
    logs.bind(worker_id=sender_id)
    try:
        check_database(settings.database_url, role="webhooks", wait_if_down=True)
    except StartupError as exc:
        refuse(click_ctx, str(exc))
    sys.exit(run_foreground(settings, sender_id))


COMMANDS = (webhooks,)
