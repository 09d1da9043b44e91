"""Connections: one-off connections, the API's pool, and applying schema.sql."""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import cast

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from skiplock.errors import DatabaseUnavailable
from skiplock.settings import STATEMENT_TIMEOUT_FACTOR

log = logging.getLogger("skiplock.db")

# The schema ships inside the package: skiplock/sql/schema.sql is, in a checkout, a symlink to the
# top-level schema.sql (the one DBAs read and `psql -f` applies) and, in a wheel, a copy of it.
# Resolved, so that messages name the real file. (A wheel installs as files, never zipped.)
SCHEMA_PATH = Path(str(resources.files("skiplock").joinpath("sql", "schema.sql"))).resolve()

# The schema version this code needs (skiplock_schema.version, which schema.sql writes). Bump it,
# here and in schema.sql's last statement together, when schema.sql changes in a way the code
# depends on: processes then refuse a database whose schema was not applied again
# (skiplock.startup).
SCHEMA_VERSION = 4

# The server ended the session: it went away, or it ended a transaction its client left idle
# too long (idle_in_transaction_session_timeout: the client stalled; see connection_kwargs).
# Either way the connection is gone and the caller reconnects.
SESSION_ENDED: tuple[type[psycopg.Error], ...] = (
    psycopg.OperationalError,
    psycopg.errors.IdleInTransactionSessionTimeout,
)

# Every connection names itself, so a DBA can tell skiplock's sessions apart in pg_stat_activity.
APPLICATION_NAME = "skiplock"


# Reconnecting: the first wait, and the most one waits (a restarting server is back in seconds;
# a flood of reconnects would not help). The exponent is capped so the arithmetic stays small.
RECONNECT_BACKOFF_FIRST_SECONDS = 0.2
RECONNECT_BACKOFF_MAX_SECONDS = 2.0
_RECONNECT_DOUBLINGS_MAX = 5

# Client-side TCP keepalives: a dead peer (host gone, network cut) is noticed in about
# idle + interval x count seconds, not after the kernel's two-hour default.
CLIENT_KEEPALIVE_IDLE_SECONDS = 5
CLIENT_KEEPALIVE_INTERVAL_SECONDS = 2
KEEPALIVE_PROBES = 3

# `skiplock schema apply`: each try waits this long for a lock, then backs off from
# SCHEMA_RETRY_FIRST_SECONDS, doubling up to SCHEMA_RETRY_MAX_SECONDS, SCHEMA_APPLY_ATTEMPTS times.
SCHEMA_LOCK_TIMEOUT_SECONDS = 2.0
SCHEMA_APPLY_ATTEMPTS = 60
SCHEMA_RETRY_FIRST_SECONDS = 0.1
SCHEMA_RETRY_MAX_SECONDS = 2.0


def reconnect_delay(failures: int) -> float:
    """Seconds to wait before reconnecting after `failures` consecutive failures: 0.2 s, doubling
    up to 2 s."""
    doublings = min(failures, _RECONNECT_DOUBLINGS_MAX) - 1
    return min(RECONNECT_BACKOFF_MAX_SECONDS, RECONNECT_BACKOFF_FIRST_SECONDS * 2**doublings)


# What settings.database_pooler may name: "" (none), "session" (PgBouncer in session mode: the
# client keeps one server session for its life) or "transaction" (each transaction may run on
# another server session, shared with other clients). See connection_kwargs.
POOLERS = ("", "session", "transaction")


def server_keepalive_settings(seconds: float) -> dict[str, str]:
    """Server-side TCP keepalives, so that Postgres drops the session of a host that vanished
    without closing its connections (power loss, network cut) after about `seconds`: idle half
    of it, then three probes over the other half. (Ignored on Unix sockets.)"""
    return {
        "tcp_keepalives_idle": str(max(1, round(seconds / 2))),
        "tcp_keepalives_interval": str(max(1, round(seconds / 6))),
        "tcp_keepalives_count": str(KEEPALIVE_PROBES),
        "tcp_user_timeout": str(int(seconds * 1000)),
    }


def server_settings(
    timeout_seconds: float,
    *,
    guarded: bool = True,
    custom_plans: bool = False,
    keepalive_seconds: float | None = None,
) -> dict[str, str]:
    """The server settings a skiplock session starts with (see connection_kwargs)."""
    settings: dict[str, str] = {}
    if guarded:
        settings["jit"] = "off"
        statement_ms = str(int(timeout_seconds * STATEMENT_TIMEOUT_FACTOR * 1000))
        settings["lock_timeout"] = str(int(timeout_seconds * 1000))
        settings["statement_timeout"] = statement_ms
        settings["idle_in_transaction_session_timeout"] = statement_ms
    if custom_plans:
        settings["plan_cache_mode"] = "force_custom_plan"
    if keepalive_seconds is not None:
        settings.update(server_keepalive_settings(keepalive_seconds))
    return settings


def connection_kwargs(
    role: str,
    timeout_seconds: float,
    *,
    guarded: bool = True,
    custom_plans: bool = False,
    keepalive_seconds: float | None = None,
    pooler: str = "",
) -> dict:
    """libpq settings for a skiplock connection. guarded: waiting on a lock or on one statement is
    bounded (lock_timeout = timeout_seconds, statement_timeout = STATEMENT_TIMEOUT_FACTOR times that), so a DBA's lock or a stuck
    query costs an error the caller handles (503, a retry) instead of a hang. And the server
    ends the session of a client that sits in a transaction as long as a statement may take
    (idle_in_transaction_session_timeout): a worker frozen (SIGSTOP, a VM paused, swapping)
    between two statements of its admission held the admission lock, and with it every other
    worker's admissions and retries, for as long as it stayed frozen. Its session ended, it
    reconnects when it wakes, as after any lost connection.

    custom_plans: psycopg prepares a statement after 5 runs, and Postgres then may switch to a
    generic plan, which cannot see how many ids an array parameter holds: for the worker's batch
    writes that plan hash-joins the whole table (2-3x slower per task, and worse as it grows).
    plan_cache_mode=force_custom_plan keeps the parse saved but plans with the real arrays.

    keepalive_seconds: the server drops this session about that long after the client's host
    stops answering (server_keepalive_settings); workers pass their lease.

    guarded, also jit=off: every statement skiplock sends reads a few rows through an index, and
    JIT compilation pays only on long scans. Postgres decides on JIT from the plan's estimated cost,
    and an estimate can be far off: on 20 million finished tasks, a misestimate put the
    self-audit past jit_optimize_above_cost, and it spent 0.9 s compiling to run for 4 ms. (An
    unguarded connection sends no `options` at all, which a pooler in transaction mode accepts:
    startup.check_database's, the API's LISTEN.)

    These travel in the `options` startup parameter, which PgBouncer (1.18) refuses
    ("unsupported startup parameter: options"; told to ignore it, it drops it unseen). So:

    pooler "session": the settings are SET once connected instead (connect, create_pool: the
    server session is this client's until it disconnects, and PgBouncer resets it only then).
    The server's keepalives would watch the pooler, not this client's host: it is the pooler's
    own keepalives (pgbouncer.ini tcp_keepidle...) that end the server session of a vanished
    host.

    pooler "transaction": each transaction may run on another server session, one other clients
    share, so nothing may rest on the session: no settings, and nothing prepared (a statement
    psycopg prepared on one server session is missing from the next, or clashes with another
    client's of the same name; every statement is unnamed and planned with its parameters, which
    custom_plans asks for anyway). The bounds `guarded` asks for become the role's defaults
    (ALTER ROLE ... SET lock_timeout, statement_timeout; README "Behind PgBouncer"): every server
    session starts with them, whoever opened it, whatever the pooler's settings or reset query.
    (A SET through the pooler would stay on one server session, for whichever clients come next;
    SET LOCAL needs a transaction that autocommit statements do not open.) create_pool warns
    when they are missing."""
    if pooler not in POOLERS:
        raise ValueError(f"unknown pooler {pooler!r} (session, transaction, or empty for none)")
    if pooler:
        options = {}
    else:
        options = server_settings(
            timeout_seconds, guarded=guarded, custom_plans=custom_plans, keepalive_seconds=keepalive_seconds
        )
    pooling = {"prepare_threshold": None} if pooler == "transaction" else {}
    return {
        # Empty when pooled, and still given: libpq would take PGOPTIONS from the environment.
        "options": " ".join(f"-c {name}={value}" for name, value in options.items()),
        **pooling,
        "autocommit": True,
        "row_factory": dict_row,
        "connect_timeout": max(1, round(timeout_seconds)),
        "application_name": f"{APPLICATION_NAME}-{role}",
        "keepalives": 1,
        "keepalives_idle": CLIENT_KEEPALIVE_IDLE_SECONDS,
        "keepalives_interval": CLIENT_KEEPALIVE_INTERVAL_SECONDS,
        "keepalives_count": KEEPALIVE_PROBES,
        # Unacknowledged data (a write to a dead peer) fails as a statement would time out.
        "tcp_user_timeout": int(timeout_seconds * STATEMENT_TIMEOUT_FACTOR * 1000),
    }


def set_session_settings(conn: psycopg.Connection, settings: dict[str, str]) -> None:
    """SET these for the session (behind a pooler in session mode, in place of `options`)."""
    if settings:
        calls = ", ".join("set_config(%s, %s, false)" for _ in settings)
        conn.execute(f"SELECT {calls}", [item for pair in settings.items() for item in pair])


def connect(
    url: str,
    role: str = "cli",
    timeout_seconds: float = 5.0,
    *,
    guarded: bool = True,
    custom_plans: bool = False,
    keepalive_seconds: float | None = None,
    pooler: str = "",
) -> psycopg.Connection:
    conn = psycopg.connect(
        url,
        **connection_kwargs(
            role,
            timeout_seconds,
            guarded=guarded,
            custom_plans=custom_plans,
            keepalive_seconds=keepalive_seconds,
            pooler=pooler,
        ),
    )
    if pooler == "session":
        try:
            set_session_settings(
                conn, server_settings(timeout_seconds, guarded=guarded, custom_plans=custom_plans)
            )
        except BaseException:
            conn.close()
            raise
    return conn


def connect_worker(
    url: str,
    timeout_seconds: float,
    role: str = "worker",
    *,
    lease_seconds: float | None = None,
    pooler: str = "",
) -> psycopg.Connection:
    """A worker's statement connection (claims, or result writes): guarded, planning its batch
    statements with the real arrays every time (see custom_plans), and dropped by the server
    about a lease after its host vanished."""
    return connect(
        url,
        role=role,
        timeout_seconds=timeout_seconds,
        custom_plans=True,
        keepalive_seconds=lease_seconds,
        pooler=pooler,
    )


def create_pool(
    url: str, *, size: int, timeout_seconds: float, role: str = "api", pooler: str = ""
) -> ConnectionPool:
    """A pool that fails fast: a request waits at most timeout_seconds for a connection, then the
    caller answers 503. Take connections with pooled_connection(), which skips dead ones.

    pooler (settings.database_pooler): "session", each connection SETs its bounds when opened;
    "transaction", the connections keep nothing in their session (connection_kwargs)."""
    kwargs = connection_kwargs(role, timeout_seconds, pooler=pooler)
    configure: Callable[[psycopg.Connection], None] | None = None
    if pooler == "transaction":
        configure = warn_if_unbounded()
    elif pooler == "session":
        bounds = server_settings(timeout_seconds)
        configure = lambda conn: set_session_settings(conn, bounds)  # noqa: E731
    return ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        timeout=timeout_seconds,
        kwargs=kwargs,
        configure=configure,
        open=True,
        name=f"{APPLICATION_NAME}-{role}-{os.getpid()}",
    )


# The bounds a guarded connection sends in `options`, which a pooled one takes from the server.
GUARD_SETTINGS = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")


def warn_if_unbounded() -> Callable[[psycopg.Connection], None]:
    """A pool's configure callback: on its first connection, a warning if the server sessions
    behind the pooler wait on locks, statements or idle transactions without bound (the role
    has no defaults)."""
    checked = False

    def configure(conn: psycopg.Connection) -> None:
        nonlocal checked
        if checked:
            return
        checked = True
        query = "SELECT " + ", ".join(f"current_setting('{name}') AS {name}" for name in GUARD_SETTINGS)
        # One row, a dict: the pool's connections have dict rows (connection_kwargs).
        row = cast(DictRow, conn.execute(query).fetchone())
        unbounded = [name for name in GUARD_SETTINGS if row[name] == "0"]
        if unbounded:
            log.warning(
                "through the pooler, %s unbounded: a lock, a stuck statement or a stalled "
                "transaction can hang requests; give the role defaults (ALTER ROLE ... SET; "
                "README: Behind PgBouncer)",
                _listed(unbounded) + (" are" if len(unbounded) > 1 else " is"),
            )

    return configure


def _listed(names: list[str]) -> str:
    """a; a and b; a, b and c."""
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def connection_is_stale(conn: psycopg.Connection) -> bool:
    """An idle connection with bytes waiting has been told goodbye by the server (restart,
    pg_terminate_backend) or closed: a zero-timeout select, no round trip."""
    if conn.closed:
        return True
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return bool(readable)


@contextmanager
def pooled_connection(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """A live connection from the pool. Dead ones are closed (the pool replaces them) and the
    next is taken, so a Postgres restart or killed backends cost no failed requests once the
    server is back. (psycopg_pool's own check sleeps a second after each dead connection.)"""
    for _ in range(pool.max_size + 1):
        conn = pool.getconn()
        if not connection_is_stale(conn):
            break
        conn.close()
        pool.putconn(conn)
    else:
        raise DatabaseUnavailable("every pooled connection was dead")
    try:
        yield conn
    finally:
        pool.putconn(conn)


def apply_schema(
    url: str,
    *,
    lock_timeout_seconds: float = SCHEMA_LOCK_TIMEOUT_SECONDS,
    attempts: int = SCHEMA_APPLY_ATTEMPTS,
) -> None:
    """Apply schema.sql (idempotent), exactly as `psql -f schema.sql` would.

    Its DDL needs table locks. Waiting for one behind a long transaction would queue every
    insert and claim behind it (Postgres grants locks in order), stalling the service for as
    long as that transaction lasts. So each try waits at most lock_timeout_seconds for a lock,
    then rolls back and tries again after a pause, up to `attempts` times."""
    text = SCHEMA_PATH.read_text()
    with connect(url, role="schema", guarded=False) as conn:  # the DDL itself may take time
        conn.execute(f"SET lock_timeout = {int(lock_timeout_seconds * 1000)}")
        conn.execute("SET statement_timeout = 0")  # whatever the role's default (pooled API)
        for attempt in range(1, attempts + 1):
            try:
                conn.execute(text)
                return
            except psycopg.errors.LockNotAvailable:
                conn.execute("ROLLBACK")
                if attempt == attempts:
                    raise
                log.warning(
                    "schema.sql: a lock it needs is held (a long transaction?); try %d of %d",
                    attempt,
                    attempts,
                )
                time.sleep(min(SCHEMA_RETRY_MAX_SECONDS, SCHEMA_RETRY_FIRST_SECONDS * 2 ** (attempt - 1)))
