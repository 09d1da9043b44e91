"""Settings, read once from the environment (the twelve-factor way) and passed around explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

# Defaults are named so the README, the CLI help and the code agree.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# A result is stored in a jsonb column: bigger ones bloat the table (and tasks_result_bounded, in
# schema.sql, refuses over 16 MiB stored), so big outputs belong in object storage.
DEFAULT_MAX_RESULT_BYTES = 8 * 1024 * 1024
MAX_RESULT_BYTES_CEILING = 16 * 1024 * 1024
# How task processes start: "forkserver" forks each from a server that imported the task types'
# declaration modules once (fast); "spawn" starts a fresh interpreter each (nothing inherited:
# the safe choice when tasks use CUDA). "fork" is not offered: the supervisor has threads and
# database connections a forked copy would inherit half-held.
START_METHODS = ("forkserver", "spawn")
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_POLL_INTERVAL_SECONDS = 1.0
DEFAULT_RESCUE_INTERVAL_SECONDS = 5.0
# A worker whose session ended gets this long to reconnect (its connections killed, not its
# process) before its tasks are taken; the first reconnection is tried after 0.2 s.
DEFAULT_DEAD_WORKER_GRACE_SECONDS = 0.5
DEFAULT_SHUTDOWN_GRACE_SECONDS = 30.0
DEFAULT_RETRY_BACKOFF_BASE_SECONDS = 1.0
DEFAULT_RETRY_BACKOFF_MAX_SECONDS = 300.0
DEFAULT_DB_TIMEOUT_SECONDS = 2.0
# A connection waits at most db_timeout_seconds for a lock (lock_timeout) and this many times
# that for one statement (statement_timeout): a statement may queue behind a lock, then run.
STATEMENT_TIMEOUT_FACTOR = 5
DEFAULT_POOL_SIZE = 4
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600.0
DEFAULT_PRUNE_INTERVAL_SECONDS = 60.0
DEFAULT_IDEMPOTENCY_TTL_SECONDS = 24 * 3600.0
# How long an API process trusts what it read about a key: a revoked key is refused by every
# process within this (plus a request).
DEFAULT_KEY_CACHE_SECONDS = 2.0
# An event stream sends a comment this often while its task does not change: proxies keep the
# connection open, and a client that went away is noticed.
DEFAULT_STREAM_HEARTBEAT_SECONDS = 15.0
# Webhooks: a try waits this long for the receiver's answer; failed tries are retried after
# base * 2^(try - 1) (jittered, at most max) until max_attempts, then the delivery is dead: with
# these defaults, for about 6 hours (16 tries).
DEFAULT_WEBHOOK_TIMEOUT_SECONDS = 10.0
DEFAULT_WEBHOOK_MAX_ATTEMPTS = 16
DEFAULT_WEBHOOK_BACKOFF_BASE_SECONDS = 5.0
DEFAULT_WEBHOOK_BACKOFF_MAX_SECONDS = 3600.0
DEFAULT_WEBHOOK_CONCURRENCY = 8


def _env_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Environment variable: SKIPLOCK_<FIELD NAME> (DATABASE_URL for the database)."""

    database_url: str = ""
    # Where the API LISTENs (long-polls, event streams): a session of its own, so it must bypass
    # a pooler in transaction mode (PgBouncer). Default: database_url.
    listen_database_url: str = ""
    # What database_url goes through (skiplock.db.connection_kwargs). "": Postgres, or a pooler
    # that passes the `options` startup parameter on. "session": a pooler in session mode
    # (PgBouncer): settings are SET after connecting, as PgBouncer refuses `options`; API and
    # workers. "transaction": a pooler in transaction mode, for the API only: its pool keeps
    # nothing in the session, no prepared statements, no settings (its timeouts are the role's
    # defaults: README "Behind PgBouncer"); it needs listen_database_url.
    database_pooler: str = ""
    # Comma-separated modules whose import registers extra task types (e.g. "myapp.tasks").
    task_modules: tuple[str, ...] = ()
    # The `crash` diagnostic task kills its process; never register it by accident in production.
    allow_crash: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # API side: how long a request may wait for a connection (or to connect) before answering 503.
    db_timeout_seconds: float = DEFAULT_DB_TIMEOUT_SECONDS
    pool_size: int = DEFAULT_POOL_SIZE
    # "on": every /api request needs an API key (Authorization: Bearer). "off" is for a local
    # demo, and gunicorn.conf.py refuses it on an address other than loopback unless
    # auth_off_on_public_bind insists.
    auth: str = "on"
    auth_off_on_public_bind: bool = False
    key_cache_seconds: float = DEFAULT_KEY_CACHE_SECONDS
    # Idempotency-Key: how long a submit's answer is remembered for replay.
    idempotency_ttl_seconds: float = DEFAULT_IDEMPOTENCY_TTL_SECONDS
    stream_heartbeat_seconds: float = DEFAULT_STREAM_HEARTBEAT_SECONDS
    # Worker side.
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    start_method: str = "forkserver"  # START_METHODS
    # A task process is replaced after this many tasks (0: never), or once its resident memory
    # is above this many MiB after a task (0: never); the task in hand finishes first.
    max_tasks_per_process: int = 0
    max_memory_per_process_mb: int = 0
    # A result's JSON may be at most this long (bytes, UTF-8); a longer one fails its attempt.
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    queues: tuple[str, ...] = ()  # empty: all queues
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    poll_interval_seconds: float = DEFAULT_POLL_INTERVAL_SECONDS
    rescue_interval_seconds: float = DEFAULT_RESCUE_INTERVAL_SECONDS
    dead_worker_grace_seconds: float = DEFAULT_DEAD_WORKER_GRACE_SECONDS
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS
    retry_backoff_base_seconds: float = DEFAULT_RETRY_BACKOFF_BASE_SECONDS
    retry_backoff_max_seconds: float = DEFAULT_RETRY_BACKOFF_MAX_SECONDS
    # Finished tasks older than this are deleted by the workers (0: keep them forever).
    retention_seconds: float = DEFAULT_RETENTION_SECONDS
    prune_interval_seconds: float = DEFAULT_PRUNE_INTERVAL_SECONDS
    # Prometheus metrics: the API's /metrics and the counting behind them (off: neither).
    metrics: bool = True
    # worker.py serves Prometheus metrics on this port (0: not at all) and address.
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    # Log lines: "text" (people) or "json" (one object per line, for log collectors).
    log_format: str = "text"
    # Webhooks (callback_url). Hosts, addresses or networks (CIDR) a callback may reach although
    # they are loopback, private or link-local (refused otherwise: SSRF), e.g. "10.0.0.0/8,hooks.internal".
    webhook_allow: tuple[str, ...] = ()
    webhook_timeout_seconds: float = DEFAULT_WEBHOOK_TIMEOUT_SECONDS
    webhook_max_attempts: int = DEFAULT_WEBHOOK_MAX_ATTEMPTS
    webhook_backoff_base_seconds: float = DEFAULT_WEBHOOK_BACKOFF_BASE_SECONDS
    webhook_backoff_max_seconds: float = DEFAULT_WEBHOOK_BACKOFF_MAX_SECONDS
    # Deliveries one sender sends at once (threads of its process, off the claim path).
    webhook_concurrency: int = DEFAULT_WEBHOOK_CONCURRENCY
    # "process": each worker starts a webhook sender process of its own; "off": none (run
    # `skiplock webhooks` on some host: deliveries wait in webhook_deliveries until one runs).
    webhook_sender: str = "process"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            name = "DATABASE_URL" if f.name == "database_url" else f"SKIPLOCK_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, getattr(cls(), f.name))
        settings = replace(cls(**values), **overrides)
        if settings.auth not in ("on", "off"):
            raise ValueError(f"invalid value for SKIPLOCK_AUTH: {settings.auth!r} (on or off)")
        if settings.database_pooler not in ("", "session", "transaction"):
            raise ValueError(
                f"invalid value for SKIPLOCK_DATABASE_POOLER: {settings.database_pooler!r} "
                "(session, transaction or empty)"
            )
        if settings.database_pooler == "transaction" and not settings.listen_database_url:
            raise ValueError(
                "SKIPLOCK_DATABASE_POOLER=transaction needs SKIPLOCK_LISTEN_DATABASE_URL: the API's LISTEN "
                "must reach Postgres directly (through the pooler its notifications are lost)"
            )
        if settings.webhook_sender not in ("process", "off"):
            raise ValueError(
                f"invalid value for SKIPLOCK_WEBHOOK_SENDER: {settings.webhook_sender!r} (process or off)"
            )
        if settings.log_format not in ("text", "json"):
            raise ValueError(f"invalid value for SKIPLOCK_LOG_FORMAT: {settings.log_format!r} (text or json)")
        problem = task_process_problem(settings)
        if problem:
            raise ValueError(problem)
        return settings

    @property
    def auth_on(self) -> bool:
        return self.auth != "off"


def task_process_problem(settings: Settings) -> str | None:
    """What is wrong with the task process settings (start method, recycling, result size), if
    anything: one line naming the setting and what it accepts."""
    if settings.start_method not in START_METHODS:
        return (
            f"invalid value for SKIPLOCK_START_METHOD: {settings.start_method!r} "
            f"({' or '.join(START_METHODS)}; spawn for CUDA)"
        )
    for name in ("max_tasks_per_process", "max_memory_per_process_mb"):
        if getattr(settings, name) < 0:
            return f"invalid value for SKIPLOCK_{name.upper()}: {getattr(settings, name)} (0 for no limit, or more)"
    if not 1 <= settings.max_result_bytes <= MAX_RESULT_BYTES_CEILING:
        return (
            f"invalid value for SKIPLOCK_MAX_RESULT_BYTES: {settings.max_result_bytes} "
            f"(1 to {MAX_RESULT_BYTES_CEILING:,}: the database refuses bigger results)"
        )
    return None


def statement_timeout_seconds(settings: Settings) -> float:
    """The longest one statement may run on a skiplock connection (see STATEMENT_TIMEOUT_FACTOR)."""
    return settings.db_timeout_seconds * STATEMENT_TIMEOUT_FACTOR


def _parse(name: str, raw: str, default):
    try:
        if isinstance(default, bool):
            return _env_bool(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"invalid value for {name}: {raw!r}") from None
