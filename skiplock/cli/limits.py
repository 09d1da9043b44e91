"""`skiplock limits`: concurrency and start-rate limits (set, list, delete) from the command line,
as PUT/GET/DELETE /api/concurrency-limits and /api/queues/{queue}/limit do over HTTP. A limit
holds when `set` returns (skiplock.sql.limits)."""

from __future__ import annotations

import sys

import click

from skiplock import keys
from skiplock.cli.common import EXIT_NOT_FOUND, Context, FiniteFloatRange, emit, json_option, queue_name
from skiplock.sql.keys import api_key_get
from skiplock.sql.limits import SCOPES, limit_delete, limit_list, limit_put
from skiplock.submission import BIGINT_MAX, MAX_KEY_LENGTH

# Who set a limit (task_limits.updated_by).
CHANGED_BY = "skiplock-cli"
# The most of each (as the API allows: the same bounds as a key's own rate limit).
MAX_RUNNING = keys.MAX_UNFINISHED

LIMIT_COLUMNS = (
    "scope", "owner_key_id", "name", "max_running", "max_starts_per_second", "burst", "running", "waiting",
    "updated_at", "updated_by",
)  # fmt: skip


@click.group("limits", short_help="Concurrency and start-rate limits: set, list, delete.")
def limits_group() -> None:
    """Concurrency and start-rate limits: of a key's concurrency_key (KEY, with --owner the API
    key's id; 0 for tasks submitted with auth off), or of a queue (--queue). Task types declare
    theirs in code."""


def _concurrency_key(click_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise click.BadParameter(f"1 to {MAX_KEY_LENGTH} characters")
    return value


def _target(key: str | None, owner: int | None, queue: str | None) -> tuple[str, int, str]:
    """(scope, owner, name) of KEY [--owner] or --queue: exactly one of KEY and --queue."""
    if (key is None) == (queue is None):
        raise click.UsageError("name a concurrency KEY or a --queue (one of them)")
    if queue is not None:
        if owner is not None:
            raise click.UsageError("--owner is for a concurrency KEY, not a --queue")
        return "queue", 0, queue
    assert key is not None
    return "key", owner or 0, key


def target_options(command):
    """KEY, --owner, --queue: what a limit is of."""
    for option in reversed(
        (
            click.argument("key", required=False, callback=_concurrency_key),
            click.option(
                "--owner",
                type=click.IntRange(min=0, max=BIGINT_MAX),
                help="KEY is this API key's concurrency key (its id; default 0: tasks submitted with auth off).",
            ),
            click.option("--queue", callback=queue_name, help="The limit of this queue (instead of KEY)."),
        )
    ):
        command = option(command)
    return command


@limits_group.command("set")
@target_options
@click.option(
    "--max-running",
    type=click.IntRange(min=0, max=MAX_RUNNING),
    help="Most tasks running at once across every worker (0 holds them all).",
)
@click.option(
    "--rate",
    "max_starts_per_second",
    type=FiniteFloatRange(min=keys.MIN_RATE_PER_SECOND, max=keys.MAX_RATE_PER_SECOND),
    help="Most starts per second across every worker.",
)
@click.option(
    "--burst",
    type=click.IntRange(min=1, max=keys.MAX_BURST),
    help="Starts allowed at once (default: a second's worth). Needs --rate.",
)
@json_option
@click.pass_obj
def limits_set(
    ctx: Context,
    key: str | None,
    owner: int | None,
    queue: str | None,
    max_running: int | None,
    max_starts_per_second: float | None,
    burst: int | None,
) -> None:
    """Set (or change) the limit of KEY (a concurrency key) or of --queue. It holds when this
    returns: tasks over it that a worker had claimed but not started wait again."""
    scope, owner_id, name = _target(key, owner, queue)
    if burst is not None and max_starts_per_second is None:
        raise click.UsageError("--burst needs --rate")
    if max_running is None and max_starts_per_second is None:
        raise click.UsageError("give --max-running, --rate or both (`limits delete` removes a limit)")
    with ctx.connect() as conn:
        if owner_id and api_key_get(conn, owner_id) is None:
            click.echo(f"skiplock: no API key {owner_id}", err=True)
            sys.exit(EXIT_NOT_FOUND)
        row = limit_put(
            conn,
            scope=scope,
            owner=owner_id,
            name=name,
            max_running=max_running,
            max_starts_per_second=max_starts_per_second,
            burst=burst,
            by=CHANGED_BY,
        )
    emit(ctx, row, LIMIT_COLUMNS[:8])


@limits_group.command("list")
@click.option("--scope", type=click.Choice(SCOPES), help="Only the limits of this scope.")
@click.option(
    "--owner", type=click.IntRange(min=0, max=BIGINT_MAX), help="Only the concurrency keys of this API key."
)
@json_option
@click.pass_obj
def limits_list(ctx: Context, scope: str | None, owner: int | None) -> None:
    """Every limit (of concurrency keys, task types, queues) with how many of its tasks run and
    wait."""
    if owner is not None:
        scope = scope or "key"
        if scope != "key":
            raise click.UsageError("--owner lists concurrency keys (--scope key)")
    with ctx.connect() as conn:
        rows = limit_list(conn, scope=scope, owner=owner)
    emit(ctx, rows, LIMIT_COLUMNS)


@limits_group.command("delete")
@target_options
@json_option
@click.pass_obj
def limits_delete(ctx: Context, key: str | None, owner: int | None, queue: str | None) -> None:
    """Remove the limit of KEY or of --queue: its waiting tasks may start at once."""
    scope, owner_id, name = _target(key, owner, queue)
    with ctx.connect() as conn:
        deleted = limit_delete(conn, scope=scope, owner=owner_id, name=name)
    shown = f"queue {name}" if scope == "queue" else f"concurrency key {name!r} of key {owner_id}"
    if not deleted:
        click.echo(f"skiplock: no limit on the {shown}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    emit(ctx, {"scope": scope, "owner_key_id": owner_id, "name": name, "deleted": True})


COMMANDS = (limits_group,)
