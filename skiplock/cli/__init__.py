"""`skiplock`: the command line, talking to the database (DATABASE_URL or --database-url) like
`artisan queue:*` or the `river` CLI. Tables for people, --json (before or after the
subcommand) for scripts: one JSON document on stdout. Errors are one line on stderr, never a
traceback.

    skiplock submit primes '{"limit": 1000000}' --priority 5 --wait
    skiplock status 42 / result 42 / list --status failed / retry 42 / cancel 42
    skiplock queues / pause reports / resume reports
    skiplock prune --older-than 86400 / health / schema apply
    skiplock worker --concurrency 8 --queue default
    skiplock keys create --name ops --admin / keys list / keys revoke skl_3fA9xZq1
    skiplock keys set-weight 7 3 / limits set gpu --owner 7 --max-running 2 / limits list
    skiplock limits set --queue reports --max-running 5 --rate 10 / limits delete --queue reports
    skiplock schedules list / show 3 / pause 3 / resume 3 / run 3 / delete 3
    skiplock schedules create nightly report '{}' --cron '0 2 * * *' --timezone Europe/Paris

Exit codes:
    0  done
    1  not found (an unknown or pruned task id, an unknown key), refused (an input the task
       type's schema rejects, an unknown type, a task in the wrong state for retry, cancel or
       result), failed (submit --wait: the task failed or was cancelled; health: unhealthy)
    2  bad usage (click's): unknown command or option, a malformed value, bad JSON, no DATABASE_URL
    3  the database could not be reached
    4  submit --wait: the task had not finished within --wait-timeout (it carries on)
    (Ctrl-C while submit --wait waits: 130, as for any interrupted command; the task carries on.)

The commands live in skiplock/cli/, one module per command group (tasks, queues, upkeep, schema,
worker, keys, limits, schedules); shared helpers in cli/common.py.
"""

from __future__ import annotations

import click
import psycopg

from skiplock.cli import limits as cli_limits
from skiplock.cli import queues as cli_queues
from skiplock.cli import schema as cli_schema
from skiplock.cli import tasks as cli_tasks
from skiplock.cli import upkeep as cli_upkeep
from skiplock.cli import webhooks as cli_webhooks
from skiplock.cli import worker as cli_worker
from skiplock.cli.common import EXIT_DATABASE, EXIT_FAILED, Context, fail, one_line, unreachable
from skiplock.cli.keys import keys_group
from skiplock.cli.schedules import schedules_group
from skiplock.errors import DatabaseUnavailable, SkiplockError

EXIT_CODES_HELP = """\b
Exit codes:
  0  done
  1  not found, refused, in the wrong state, or the task failed
  2  bad usage (a malformed value, bad JSON, no DATABASE_URL)
  3  the database could not be reached
  4  submit --wait: not finished within --wait-timeout"""


class _Commands(click.Group):
    """Errors end a command with a line on stderr and an exit code, not a traceback. --help lists
    the commands in the order they were added (tasks, queues, upkeep, keys), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DatabaseUnavailable as exc:
            fail(f"cannot reach the database: {exc}", EXIT_DATABASE)
        except SkiplockError as exc:  # TaskNotFound, TaskGone, InvalidTransition
            fail(str(exc), EXIT_FAILED)
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedObject) as exc:
            fail(f"{exc.diag.message_primary} (is schema.sql applied? skiplock schema apply)", EXIT_FAILED)
        except psycopg.Error as exc:
            if unreachable(exc):
                fail(f"cannot reach the database: {one_line(exc)}", EXIT_DATABASE)
            fail(f"the database refused: {exc.diag.message_primary or one_line(exc)}", EXIT_FAILED)


@click.group(cls=_Commands, epilog=EXIT_CODES_HELP)
@click.option("--database-url", envvar="DATABASE_URL", help="PostgreSQL URL (default: $DATABASE_URL).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one JSON document).")
@click.pass_context
def main(click_ctx: click.Context, database_url: str | None, as_json: bool) -> None:
    """skiplock: a task queue whose only moving part is PostgreSQL.

    Tasks (submit, status, result, list, retry, cancel), queues (queues, pause, resume),
    upkeep (prune, health, schema apply), a worker, a webhook sender, API keys, limits and
    schedules."""
    click_ctx.obj = Context(database_url, as_json)


for command in (
    *cli_tasks.COMMANDS,
    *cli_queues.COMMANDS,
    *cli_upkeep.COMMANDS,
    *cli_schema.COMMANDS,
    *cli_worker.COMMANDS,
    *cli_webhooks.COMMANDS,
    keys_group,
    *cli_limits.COMMANDS,
    schedules_group,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
