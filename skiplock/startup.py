"""What a process checks before it serves (the API under gunicorn, a worker, the CLI), each problem
as one line naming the fix instead of a traceback: DATABASE_URL parses, the database answers, its
schema is the version this code needs (skiplock.db.SCHEMA_VERSION), the task modules import.

Lasting problems (a malformed URL, an unknown host, a refused login, a missing database or schema)
end the process: retrying gains nothing. A server that is down or starting up is waited for by
those that wait (the worker reconnects, the API's /readyz answers 503 meanwhile)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

from skiplock.db import SCHEMA_VERSION, connect
from skiplock.errors import SkiplockError
from skiplock.registry import TaskRegistry, load_registry
from skiplock.settings import Settings
from skiplock.sql.operations import skiplock_schema_version
from skiplock.sql.rows import Connection

log = logging.getLogger("skiplock.startup")

# The fix for a missing or older schema, named in every refusal.
SCHEMA_FIX = "is schema.sql applied? skiplock schema apply (`make run` applies it)"
URL_EXAMPLE = "postgresql://USER:PASSWORD@HOST:5432/DATABASE"
# libpq's words (and the server's) for a login it refused: retrying with the same URL will not help.
_LOGIN_REFUSED = ("authentication failed", "no password supplied", "pg_hba.conf", "role ")


class StartupError(SkiplockError):
    """This process cannot start (or serve): the message is one line naming the fix."""


@dataclass(frozen=True)
class ConnectProblem:
    message: str  # one line naming the fix
    lasting: bool  # the URL itself is wrong (host, user, database): retrying gains nothing


def check_url(url: str) -> None:
    """Raises StartupError if DATABASE_URL is not a connection string libpq can read."""
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        detail = " ".join(str(exc).split())
        raise StartupError(
            f"DATABASE_URL is not a PostgreSQL URL ({detail}): expected {URL_EXAMPLE}"
        ) from None


def _target(url: str) -> dict[str, str]:
    params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    host = params.get("host", "localhost")
    where = host if host.startswith("/") else f"{host}:{params.get('port', '5432')}"
    return {"where": where, "host": host, "user": params.get("user", ""), "dbname": params.get("dbname", "")}


def connect_problem(url: str, exc: psycopg.Error) -> ConnectProblem:
    """What a failed connection to `url` means, in one line naming the fix."""
    if isinstance(exc, psycopg.ProgrammingError):  # libpq could not read the URL
        try:
            check_url(url)
        except StartupError as refused:
            return ConnectProblem(str(refused), lasting=True)
    # libpq's first line says what failed; the next ones are hints ("Is the server running...").
    text = " ".join(str(exc).strip().split("\n")[0].split())
    reason = text.rpartition("failed: ")[2].removeprefix("FATAL: ").strip() or type(exc).__name__
    try:
        target = _target(url)
    except psycopg.Error:
        target = {"where": "?", "host": "?", "user": "", "dbname": ""}
    if "resolve host" in text or "could not translate host name" in text:
        return ConnectProblem(
            f"unknown database host {target['host']!r}: fix the host name in DATABASE_URL", lasting=True
        )
    if "database" in reason and "does not exist" in reason:
        return ConnectProblem(
            f"{reason} on {target['where']}: create it (createdb) or fix the database name in DATABASE_URL",
            lasting=True,
        )
    if any(words in reason for words in _LOGIN_REFUSED):
        return ConnectProblem(
            f"the database at {target['where']} refused the login ({reason}): "
            "fix the user and password in DATABASE_URL (or the server's pg_hba.conf)",
            lasting=True,
        )
    return ConnectProblem(
        f"cannot reach the database at {target['where']} ({reason}): is PostgreSQL running there, "
        "and are DATABASE_URL's host and port right?",
        lasting=False,
    )


@dataclass(frozen=True)
class SchemaState:
    version: int | None  # None: no skiplock schema at all; 0: one from before versions
    refusal: str | None  # missing or older: this code cannot use it (one line naming the fix)
    warning: str | None  # newer than this code: served, with a warning


def schema_state(conn: Connection) -> SchemaState:
    """The database's schema against the version this code needs (SCHEMA_VERSION)."""
    version = skiplock_schema_version(conn)
    if version is None:
        return SchemaState(None, f"the database has no skiplock schema (no tasks table): {SCHEMA_FIX}", None)
    if version < SCHEMA_VERSION:
        found = f"version {version}" if version else "from before schema versions"
        return SchemaState(
            version,
            f"the database's skiplock schema is {found}; this code needs version {SCHEMA_VERSION}: "
            "apply schema.sql again: skiplock schema apply (`make run` applies it)",
            None,
        )
    if version > SCHEMA_VERSION:
        # A rolling deploy applies the new schema first, while the old code still runs: schema.sql
        # only ever adds, so the older code carries on (and says so).
        return SchemaState(
            version,
            None,
            f"the database's skiplock schema is version {version}, newer than this code's "
            f"{SCHEMA_VERSION}: carrying on (schema changes only add); upgrade skiplock here",
        )
    return SchemaState(version, None, None)


def check_schema(conn: Connection) -> None:
    """Raises StartupError for a missing or older schema; logs a warning for a newer one."""
    state = schema_state(conn)
    if state.refusal:
        raise StartupError(state.refusal)
    if state.warning:
        log.warning("%s", state.warning)


def check_database(url: str, *, role: str, wait_if_down: bool) -> None:
    """At start: the URL parses, the database answers, its schema is one this code can use.
    Raises StartupError naming the fix. A server that is down is a StartupError too unless
    wait_if_down (the caller keeps trying): then a warning line, and the schema is checked
    when the caller connects."""
    check_url(url)
    try:
        # Unguarded: no `options`, which a pooler in transaction mode refuses (db.connection_kwargs).
        conn = connect(url, role=role, guarded=False)
    except psycopg.Error as exc:
        problem = connect_problem(url, exc)
        if problem.lasting or not wait_if_down:
            raise StartupError(problem.message) from None
        log.warning("%s; waiting for it", problem.message)
        return
    with conn:
        try:
            check_schema(conn)
        except psycopg.Error as exc:  # lost meanwhile, or a role that may not read the tables
            raise StartupError(f"cannot read the schema's version: {' '.join(str(exc).split())}") from None


def _missing_module_message(module: str, exc: ModuleNotFoundError) -> str:
    missing = exc.name or ""
    if missing and (module == missing or module.startswith(missing + ".")):
        pythonpath = os.environ.get("PYTHONPATH", "")
        return (
            f"task module {module!r} (SKIPLOCK_TASK_MODULES) not found on the Python path "
            f"(PYTHONPATH={pythonpath!r}, and {sys.path[0] or '.'}): add its project's folder, "
            "e.g. PYTHONPATH=/path/to/project"
        )
    return (
        f"task module {module!r} (SKIPLOCK_TASK_MODULES) imports {missing!r}, which is not installed "
        f"here: install it in this environment ({sys.prefix})"
    )


def _import_failure(module: str, exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"task module {module!r} (SKIPLOCK_TASK_MODULES) failed to import: {type(exc).__name__}: {message}"


def load_task_registry(modules: Iterable[str], *, allow_crash: bool) -> TaskRegistry:
    """load_registry, with a task module that does not import (or declares something wrong)
    raised as one StartupError naming the module and the fix."""
    modules = tuple(modules)
    for module in modules:  # one at a time, to name the one that fails (imports are cached)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise StartupError(_missing_module_message(module, exc)) from None
        except Exception as exc:  # an operator's module may raise anything on import
            raise StartupError(_import_failure(module, exc)) from None
    try:
        return load_registry(modules, allow_crash=allow_crash)
    except Exception as exc:  # a declared schedule of an unknown type, a refused input
        raise StartupError(
            f"task modules {','.join(modules)!r} (SKIPLOCK_TASK_MODULES): {type(exc).__name__}: {exc}"
        ) from None


def check_service(settings: Settings) -> None:
    """What the API checks before it serves (its gunicorn master runs `python -m skiplock.startup`):
    raises StartupError naming the fix. A database that is down is a warning (/readyz answers 503
    until it is back). The task modules are imported as each API process will import them."""
    if not settings.database_url:
        raise StartupError("DATABASE_URL is not set (`make run` starts a database for you)")
    check_database(settings.database_url, role="api", wait_if_down=True)
    load_task_registry(settings.task_modules, allow_crash=settings.allow_crash)


def main() -> int:
    """`python -m skiplock.startup`: check_service on the environment's settings, in a process of
    its own, so that the caller (gunicorn's master) imports neither psycopg nor task code before
    its workers fork and patch their I/O (gevent). Warnings on stderr, one per line; a refusal
    as the one line on stdout, and exit 1."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        check_service(Settings.from_env())
    except (StartupError, ValueError) as exc:  # ValueError: a malformed SKIPLOCK_* value
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
