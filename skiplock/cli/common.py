"""What every `skiplock` command shares: the exit codes, the database connection, the settings
and task registry, and the output (tables for people, one JSON document with --json)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NoReturn

import click
import psycopg

from skiplock import embedded
from skiplock.db import POOLERS, connect
from skiplock.registry import TaskRegistry
from skiplock.settings import Settings
from skiplock.sql.rows import Connection
from skiplock.startup import StartupError, check_url, connect_problem, load_task_registry, schema_state
from skiplock.submission import BIGINT_MAX, NAME_RULE, is_name

# Exit codes scripts can trust (documented in skiplock.cli and `skiplock --help`); 0 is done,
# 2 is click's own for bad usage.
EXIT_FAILED = 1  # not found, refused, in the wrong state, or the task failed / was cancelled
EXIT_NOT_FOUND = EXIT_FAILED
EXIT_USAGE = 2  # click's own for bad usage; also a DATABASE_URL that is not a URL
EXIT_DATABASE = 3  # the database could not be reached
EXIT_WAIT_TIMEOUT = 4  # submit --wait: the task had not finished within --wait-timeout

TASK_ID = click.IntRange(min=1, max=BIGINT_MAX)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, without nan (which every range check lets through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


def one_line(exc: BaseException) -> str:
    """An error in one line (psycopg's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """End the command: one line on stderr, an exit code, no traceback."""
    click.echo(f"skiplock: {message}", err=True)
    sys.exit(code)


def unreachable(exc: psycopg.Error) -> bool:
    """The server could not be reached or went away (not: it refused a statement). Lock and
    statement timeouts are OperationalErrors too, but the server answered them."""
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in {"57P01", "57P02", "57P03"}


NameValue = str | tuple[str, ...] | None


def name_check(kind: str) -> Callable[[click.Context, click.Parameter, NameValue], NameValue]:
    """A click callback: names (of queues, task types) as the submit rules allow them. None
    passes; several values (a repeated option) are each checked."""

    def check(click_ctx: click.Context, param: click.Parameter, value: NameValue) -> NameValue:
        for name in value if isinstance(value, tuple) else () if value is None else (value,):
            if not is_name(name):
                raise click.BadParameter(f"{name!r} is no {kind}: {NAME_RULE}")
        return value

    return check


queue_name = name_check("queue name")


def cli_pooler() -> str:
    """SKIPLOCK_DATABASE_POOLER (the CLI reads no other setting to connect)."""
    pooler = os.environ.get("SKIPLOCK_DATABASE_POOLER", "").strip()
    if pooler not in POOLERS:
        raise click.UsageError(f"SKIPLOCK_DATABASE_POOLER={pooler!r}: session, transaction or empty")
    return pooler


class Context:
    def __init__(self, database_url: str | None, as_json: bool):
        self.database_url = database_url
        self.as_json = as_json
        self._settings: Settings | None = None
        self._from_make_run = False  # the URL came from `make run`'s file (embedded.URL_FILE)

    def require_url(self) -> str:
        """DATABASE_URL (or --database-url); in a checkout without it, the embedded database of
        a `make run` that runs (saying so on stderr, so that no one mistakes the database)."""
        if not self.database_url:
            self.database_url = embedded.published_url()
            if not self.database_url:
                raise click.UsageError("set DATABASE_URL (or pass --database-url)")
            self._from_make_run = True
            click.echo(
                f"skiplock: using the embedded database of `make run` ({embedded.URL_FILE}): "
                f"DATABASE_URL={self.database_url}",
                err=True,
            )
        try:
            check_url(self.database_url)
        except StartupError as exc:
            fail(str(exc), EXIT_USAGE)
        return self.database_url

    def connect(self) -> Connection:
        """A connection to a database whose schema this code can use: else one line naming the
        fix (exit 3 for a database out of reach, 1 for a missing or older schema)."""
        url = self.require_url()
        try:
            conn = connect(url, role="cli", pooler=cli_pooler())
        except psycopg.Error as exc:
            message = connect_problem(url, exc).message
            if self._from_make_run:
                message += f" (is `make run` still running? its URL file: {embedded.URL_FILE})"
            fail(message, EXIT_DATABASE)
        state = schema_state(conn)
        if state.refusal:
            conn.close()
            fail(state.refusal)
        if state.warning:
            click.echo(f"skiplock: warning: {state.warning}", err=True)
        return conn

    @property
    def settings(self) -> Settings:
        """SKIPLOCK_* from the environment, as the API and the workers read them."""
        if self._settings is None:
            try:
                self._settings = Settings.from_env()
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        return self._settings

    def registry(self) -> TaskRegistry:
        """The task types the API would accept (built-in ones and SKIPLOCK_TASK_MODULES)."""
        settings = self.settings
        try:
            return load_task_registry(settings.task_modules, allow_crash=settings.allow_crash)
        except StartupError as exc:  # names the module and the fix (PYTHONPATH, a missing package)
            fail(str(exc), EXIT_USAGE)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--json on a subcommand too (`skiplock keys list --json` as well as `skiplock --json ...`)."""

    def set_json(click_ctx: click.Context, param: click.Parameter, value: bool) -> None:
        ctx = click_ctx.find_object(Context)
        if value and ctx is not None:  # main() always made one
            ctx.as_json = True

    return click.option(
        "--json", is_flag=True, expose_value=False, callback=set_json, help="Machine-readable output."
    )(command)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, timedelta):
        return f"{value.total_seconds():.1f}s"
    if isinstance(value, float):
        # 5.0 -> 5, 2.5 -> 2.5, 604800.0 -> 604800 (not 6.048e+05), 12.34567 -> 12.346
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) >= 1 else f"{value:.3g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return " ".join(str(value).split("\n"))  # a cell stays on its row


def table(rows: Sequence[Mapping[str, Any]], columns: Iterable[str]) -> str:
    columns = list(columns)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def record(data: Mapping[str, Any], fields: Iterable[str]) -> str:
    """One object for people: a field per line (a one-row table of a dozen columns would wrap)."""
    fields = list(fields)
    width = max(len(f) for f in fields)
    return "\n".join(f"{f.ljust(width)}  {_cell(data.get(f))}".rstrip() for f in fields)


def emit(ctx: Context, data: Any, columns: Iterable[str] | None = None) -> None:
    if ctx.as_json:
        click.echo(to_json(data))
    elif isinstance(data, list):
        click.echo(table(data, columns or (data[0].keys() if data else [])) if data else "(none)")
    else:
        click.echo(table([data], columns or data.keys()))


def emit_record(ctx: Context, data: Mapping[str, Any], fields: Iterable[str]) -> None:
    click.echo(to_json(data) if ctx.as_json else record(data, fields))


def to_json(data: Any) -> str:
    return json.dumps(data, default=_json_default, sort_keys=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON: {type(value).__name__}")
