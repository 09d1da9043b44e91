"""`skiplock keys`: API keys (create, list, set-weight, revoke) from the command line."""

from __future__ import annotations

import sys

import click

from skiplock import keys
from skiplock.cli.common import EXIT_NOT_FOUND, Context, FiniteFloatRange, emit, json_option
from skiplock.sql.keys import MAX_WEIGHT, MIN_WEIGHT, api_key_set_weight
from skiplock.tokens import PREFIX_BODY_LENGTH, PREFIX_LENGTH, TOKEN_PREFIX, token_digest, well_formed

KEY_COLUMNS = (
    "id",
    "prefix",
    "name",
    "role",
    "rate_per_second",
    "burst",
    "max_unfinished",
    "weight",
    "created_at",
    "last_used_at",
)
WEIGHT = FiniteFloatRange(min=MIN_WEIGHT, max=MAX_WEIGHT)


@click.group("keys", short_help="API keys: create, list, set-weight, revoke.")
def keys_group() -> None:
    """API keys: create, list, set-weight, revoke."""


def _name(click_ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not 1 <= len(value) <= keys.MAX_NAME_LENGTH:
        raise click.BadParameter(f"1 to {keys.MAX_NAME_LENGTH} characters")
    return value


@keys_group.command("create")
@click.option("--name", required=True, callback=_name, help="What the key is for (shown in lists).")
@click.option(
    "--role",
    type=click.Choice(keys.ROLES),
    help="client (default): its own tasks; admin: every task, and the keys; viewer: reads "
    "everything, changes nothing (a read-only dashboard); metrics: GET /metrics only (Prometheus).",
)
@click.option("--admin", is_flag=True, help="An admin key (the same as --role admin).")
@click.option(
    "--rate",
    "rate_per_second",
    type=FiniteFloatRange(min=keys.MIN_RATE_PER_SECOND, max=keys.MAX_RATE_PER_SECOND),
    help="Requests per second.",
)
@click.option(
    "--burst",
    type=click.IntRange(min=1, max=keys.MAX_BURST),
    help="Requests at once (default: a second's worth).",
)
@click.option(
    "--max-unfinished",
    type=click.IntRange(min=1, max=keys.MAX_UNFINISHED),
    help="Most tasks unfinished at once.",
)
@click.option(
    "--weight",
    type=WEIGHT,
    help="Its fair share of the workers against other keys' (default 1).",
)
@json_option
@click.pass_obj
def keys_create(
    ctx: Context,
    name: str,
    role: str | None,
    admin: bool,
    rate_per_second: float | None,
    burst: int | None,
    max_unfinished: int | None,
    weight: float | None,
) -> None:
    """Create a key and print its token (once: only its digest is stored)."""
    if burst is not None and rate_per_second is None:
        raise click.UsageError("--burst needs --rate")
    if admin and role not in (None, "admin"):
        raise click.UsageError(f"--admin and --role {role} say two different things: pick one")
    with ctx.connect() as conn, conn.transaction():
        created = keys.create_key(
            conn,
            name=name,
            role="admin" if admin else role or "client",
            rate_per_second=rate_per_second,
            burst=burst,
            max_unfinished=max_unfinished,
        )
        if weight is not None:
            created.update(api_key_set_weight(conn, key_id=created["id"], weight=weight) or {})
    if ctx.as_json:
        emit(ctx, created)
        return
    emit(ctx, created, KEY_COLUMNS[:8])
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


@keys_group.command("set-weight")
@click.argument("key_id", type=click.IntRange(min=1))
@click.argument("weight", type=WEIGHT)
@json_option
@click.pass_obj
def keys_set_weight(ctx: Context, key_id: int, weight: float) -> None:
    """Set the weight of the key KEY_ID: its fair share of the workers (its tasks that fall due
    from now on; those queued keep their place)."""
    with ctx.connect() as conn:
        changed = api_key_set_weight(conn, key_id=key_id, weight=weight)
    if changed is None:
        click.echo(f"skiplock: no API key {key_id}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    emit(ctx, changed, ("id", "prefix", "name", "weight"))


@keys_group.command("revoke")
@click.argument("key")
@json_option
@click.pass_obj
def keys_revoke(ctx: Context, key: str) -> None:
    """Revoke KEY (its id, its prefix skl_..., or the whole token): refused everywhere within
    seconds."""
    key_id, prefix, digest = None, None, None
    if well_formed(key):
        digest = token_digest(key)  # the token itself, not only its prefix
        shown = key[:PREFIX_LENGTH]
    elif key.startswith(TOKEN_PREFIX) and len(key) == PREFIX_LENGTH:
        prefix = shown = key
    elif key.isdigit():
        key_id, shown = int(key), key
    else:
        raise click.UsageError(
            f"KEY is a key id, a prefix ({TOKEN_PREFIX} and {PREFIX_BODY_LENGTH} characters) or a token, "
            f"not {key!r}"
        )
    with ctx.connect() as conn:
        revoked = keys.revoke_key(conn, key_id=key_id, prefix=prefix, token_sha256=digest)
    if revoked is None:
        click.echo(f"skiplock: no API key {shown}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    emit(ctx, revoked, ("id", "prefix", "name", "revoked_at"))
