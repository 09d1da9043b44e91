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
from skiplock.tokens import PREFIX_LENGTH, TOKEN_PREFIX, token_digest, well_formed

EXIT_NOT_FOUND = 1
EXIT_DATABASE = 3


def one_line(exc: Exception) -> str:
    """A database error in one line (psycopg's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


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
            click.echo(f"skiplock: cannot reach the database: {one_line(exc)}", err=True)
            sys.exit(EXIT_DATABASE)


def json_option(command):
    """--json on a subcommand too (`skiplock keys list --json` as well as `skiplock --json ...`)."""

    def set_json(click_ctx: click.Context, param, value: bool) -> None:
        if value:
            click_ctx.find_object(Context).as_json = True

    return click.option(
        "--json", is_flag=True, expose_value=False, callback=set_json, help="Machine-readable output."
    )(command)


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


class _Commands(click.Group):
    """Database errors end a command with a line on stderr and an exit code, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except psycopg.OperationalError as exc:
            click.echo(f"skiplock: cannot reach the database: {one_line(exc)}", err=True)
            sys.exit(EXIT_DATABASE)
        except psycopg.errors.UndefinedTable as exc:
            click.echo(f"skiplock: {exc.diag.message_primary} (is schema.sql applied?)", err=True)
            sys.exit(EXIT_NOT_FOUND)
        except psycopg.Error as exc:
            click.echo(
                f"skiplock: the database refused: {exc.diag.message_primary or one_line(exc)}", err=True
            )
            sys.exit(EXIT_NOT_FOUND)


@click.group(cls=_Commands)
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


def _name(click_ctx, param, value: str) -> str:
    if not 1 <= len(value) <= 100:
        raise click.BadParameter("1 to 100 characters")
    return value


@keys_group.command("create")
@click.option("--name", required=True, callback=_name, help="What the key is for (shown in lists).")
@click.option("--admin", is_flag=True, help="An admin key: every task, and the keys.")
@click.option(
    "--rate", "rate_per_second", type=click.FloatRange(min=0.001, max=1_000_000), help="Requests per second."
)
@click.option(
    "--burst", type=click.IntRange(min=1, max=1_000_000), help="Requests at once (default: a second's worth)."
)
@click.option(
    "--max-unfinished", type=click.IntRange(min=1, max=100_000_000), help="Most tasks unfinished at once."
)
@json_option
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
@json_option
@click.pass_obj
def keys_list(ctx: Context, include_revoked: bool) -> None:
    """The keys (never their tokens)."""
    with ctx.connect() as conn:
        rows = keys.list_keys(conn, include_revoked=include_revoked)
    emit(ctx, rows, (*KEY_COLUMNS, "revoked_at") if include_revoked else KEY_COLUMNS)


@keys_group.command("revoke")
@click.argument("key")
@json_option
@click.pass_obj
def keys_revoke(ctx: Context, key: str) -> None:
    """Revoke KEY (its id, its prefix skl_..., or the whole token): refused everywhere within
    seconds."""
    if well_formed(key):
        lookup = {"token_sha256": token_digest(key)}  # the token itself, not only its prefix
        shown = key[:PREFIX_LENGTH]
    elif key.startswith(TOKEN_PREFIX) and len(key) == PREFIX_LENGTH:
        lookup, shown = {"prefix": key}, key
    elif key.isdigit():
        lookup, shown = {"key_id": int(key)}, key
    else:
        raise click.UsageError(
            f"KEY is a key id, a prefix ({TOKEN_PREFIX} and 8 characters) or a token, not {key!r}"
        )
    with ctx.connect() as conn:
        revoked = keys.revoke_key(conn, **lookup)
    if revoked is None:
        click.echo(f"skiplock: no API key {shown}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    emit(ctx, revoked, ("id", "prefix", "name", "revoked_at"))


if __name__ == "__main__":
    main()
