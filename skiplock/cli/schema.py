"""`skiplock schema apply`: the database schema (schema.sql)."""

from __future__ import annotations

import click
import psycopg

from skiplock.cli.common import (
    EXIT_DATABASE,
    Context,
    fail,
    json_option,
    to_json,
    unreachable,
)
from skiplock.db import SCHEMA_PATH, SCHEMA_VERSION, apply_schema
from skiplock.startup import connect_problem


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
    except psycopg.OperationalError as exc:
        if not unreachable(exc):
            raise  # a lock it waited for too long: the command's own handler says so
        fail(connect_problem(url, exc).message, EXIT_DATABASE)
    if ctx.as_json:
        click.echo(to_json({"applied": True, "schema": str(SCHEMA_PATH), "schema_version": SCHEMA_VERSION}))
    else:
        click.echo(f"applied {SCHEMA_PATH.name}")


COMMANDS = (schema_group,)
