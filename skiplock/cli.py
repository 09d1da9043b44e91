"""`skiplock`: the command line, talking to the database (DATABASE_URL) like `artisan queue:*`.

    skiplock keys create --name ops --admin
    skiplock keys list
    skiplock keys revoke skl_3fA9xZq1

Tables for people, --json for scripts. Exit codes: 0 done, 1 not found or refused, 2 bad usage
(click's), 3 database unreachable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime

import click
import psycopg

from skiplock import keys
from skiplock.db import connect
from skiplock.tokens import PREFIX_LENGTH, TOKEN_PREFIX

EXIT_NOT_FOUND = 1
EXIT_DATABASE = 3


class Context:
    def __init__(self, database_url: str | None, as_json: bool):
        self.database_url = database_url
        self.as_json = as_json

    def connect(self) -> psycopg.Connection:
        if not self.database_url:
            raise click.UsageError("set DATABASE_URL (or pass --database-url)")
        try:
            return connect(self.database_url, role="cli")
        except psycopg.OperationalError as exc:
            click.echo(f"skiplock: cannot reach the database: {str(exc).strip()}", err=True)
            sys.exit(EXIT_DATABASE)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(rows: Sequence[dict], columns: Iterable[str]) -> str:
    columns = list(columns)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def emit(ctx: Context, data, columns: Iterable[str] | None = None) -> None:
    if ctx.as_json:
        click.echo(json.dumps(data, default=_json_default, sort_keys=True))
    elif isinstance(data, list):
        click.echo(table(data, columns or (data[0].keys() if data else [])) if data else "(none)")
    else:
        click.echo(table([data], columns or data.keys()))


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON: {type(value).__name__}")


@click.group()
@click.option("--database-url", envvar="DATABASE_URL", help="PostgreSQL URL (default: $DATABASE_URL).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one JSON document).")
@click.pass_context
def main(click_ctx: click.Context, database_url: str | None, as_json: bool) -> None:
    """skiplock: a task queue whose only moving part is PostgreSQL."""
    click_ctx.obj = Context(database_url, as_json)


KEY_COLUMNS = (
    "id",
    "prefix",
    "name",
    "role",
    "rate_per_second",
    "burst",
    "max_unfinished",
    "created_at",
    "last_used_at",
)


@main.group("keys")
def keys_group() -> None:
    """API keys: create, list, revoke."""


@keys_group.command("create")
@click.option("--name", required=True, help="What the key is for (shown in lists).")
@click.option("--admin", is_flag=True, help="An admin key: every task, and the keys.")
@click.option("--rate", "rate_per_second", type=click.FloatRange(min=0.001), help="Requests per second.")
@click.option("--burst", type=click.IntRange(min=1), help="Requests at once (default: one second's worth).")
@click.option(
    "--max-unfinished", type=click.IntRange(min=1), help="Most tasks pending or processing at once."
)
@click.pass_obj
def keys_create(ctx: Context, name, admin, rate_per_second, burst, max_unfinished) -> None:
    """Create a key and print its token (once: only its digest is stored)."""
    if burst is not None and rate_per_second is None:
        raise click.UsageError("--burst needs --rate")
    with ctx.connect() as conn:
        created = keys.create_key(
            conn,
            name=name,
            role="admin" if admin else "client",
            rate_per_second=rate_per_second,
            burst=burst,
            max_unfinished=max_unfinished,
        )
    if ctx.as_json:
        emit(ctx, created)
        return
    emit(ctx, created, KEY_COLUMNS[:7])
    click.echo(f"\ntoken: {created['token']}")
    click.echo("Shown this once: keep it now. Clients send it as `Authorization: Bearer <token>`.", err=True)


@keys_group.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@click.pass_obj
def keys_list(ctx: Context, include_revoked: bool) -> None:
    """The keys (never their tokens)."""
    with ctx.connect() as conn:
        rows = keys.list_keys(conn, include_revoked=include_revoked)
    emit(ctx, rows, (*KEY_COLUMNS, "revoked_at") if include_revoked else KEY_COLUMNS)


@keys_group.command("revoke")
@click.argument("key")
@click.pass_obj
def keys_revoke(ctx: Context, key: str) -> None:
    """Revoke KEY (its id, or its prefix skl_...): refused everywhere within seconds."""
    by_prefix = key.startswith(TOKEN_PREFIX)
    if by_prefix:
        key = key[:PREFIX_LENGTH]  # a whole token names its key too
    elif not key.isdigit():
        raise click.UsageError(f"KEY is a key id or a prefix ({TOKEN_PREFIX}...), not {key!r}")
    with ctx.connect() as conn:
        revoked = keys.revoke_key(conn, prefix=key) if by_prefix else keys.revoke_key(conn, key_id=int(key))
    if revoked is None:
        click.echo(f"skiplock: no API key {key}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    emit(ctx, revoked, ("id", "prefix", "name", "revoked_at"))
