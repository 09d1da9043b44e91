"""Who is calling, and whether its role may: every /api request names an API key
(Authorization: Bearer <token>, or on an event stream a stream token: api/stream_auth.py) unless
auth is off. /healthz, /readyz, /openapi.json and /docs stay public.

What each role may (skiplock/keys.py ROLES) is decided here, for every /api request before its
view runs: a metrics key is refused all of /api (it reads GET /metrics only), a viewer key every
request that could change something (any method but GET, HEAD and OPTIONS, but for minting a
stream token, which changes nothing). A viewer submits nothing: it is for people and pages that
watch. Views then only tell a client key from the keys that see every owner's tasks.

Each process keeps what it read about a key for key_cache_seconds (2 s): authentication costs a
dictionary lookup, and a revoked key is refused by every process within that time. Unknown
tokens are cached too, so a flood of bad tokens does not become a flood of queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NoReturn

from flask import Flask, g, request
from webargs.flaskparser import abort  # flask_smorest.abort, typed (NoReturn)

from skiplock.keys import KeyRows
from skiplock.sql.keys import ApiKeyRow, api_key_by_digest, api_keys_touch
from skiplock.sql.rows import Connection
from skiplock.tokens import token_digest, well_formed

from . import stream_auth
from .extensions import db, store

REALM = 'Bearer realm="skiplock"'
# last_used_at is written at most this often per key and process.
TOUCH_INTERVAL_SECONDS = 60.0
# The roles that see every owner's tasks (the others see their own).
SEES_ALL = ("admin", "viewer")
# The roles that may read GET /metrics.
SCRAPERS = ("admin", "viewer", "metrics")
# What a viewer may do: read. These POSTs change nothing, so it may make them too.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
VIEWER_POSTS = frozenset({"tasks.TaskStreamToken", "workflows.WorkflowStreamToken"})
# Reads a viewer may not make: its own webhook secret is made on first read, for tasks it cannot submit.
VIEWER_REFUSED = frozenset({"webhooks.WebhookSecret"})


@dataclass(frozen=True)
class Principal:
    """The caller: an API key, or everyone when auth is off."""

    key_id: int | None
    role: str  # client | admin | viewer | metrics (skiplock.keys.ROLES)
    name: str
    prefix: str | None = None
    rate_per_second: float | None = None
    burst: int | None = None
    max_unfinished: int | None = None

    @property
    def owner(self) -> int | None:
        """Whose tasks it sees: its own (a client key), or all (None: an admin or a viewer, or
        auth off)."""
        return None if self.role in SEES_ALL else self.key_id

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @classmethod
    def of_key(cls, row: ApiKeyRow) -> Principal:
        return cls(
            key_id=row["id"],
            role=row["role"],
            name=row["name"],
            prefix=row["prefix"],
            rate_per_second=row["rate_per_second"],
            burst=row["burst"],
            max_unfinished=row["max_unfinished"],
        )


AUTH_OFF = Principal(key_id=None, role="admin", name="auth off")

KeysByDigest = KeyRows[bytes, ApiKeyRow]


class KeyUse:
    """Notes a key's use in last_used_at, at most every TOUCH_INTERVAL_SECONDS per key and
    process."""

    def __init__(self) -> None:
        self._last_touched: dict[int, float] = {}

    def touch(self, conn: Connection, row: ApiKeyRow | None) -> None:
        if row is None or row["revoked_at"] is not None:
            return
        now = time.monotonic()
        if now - self._last_touched.get(row["id"], -TOUCH_INTERVAL_SECONDS) >= TOUCH_INTERVAL_SECONDS:
            self._last_touched[row["id"]] = now
            api_keys_touch(conn, [row["id"]])


def keys_by_digest(ttl: float) -> KeysByDigest:
    """Token digest -> key row (None: unknown), read at most `ttl` seconds ago; a read notes
    the key's use on the same connection."""
    use = KeyUse()

    def read(digest: bytes) -> ApiKeyRow | None:
        with db() as conn:
            row = api_key_by_digest(conn, digest)
            use.touch(conn, row)
        return row

    return KeyRows(ttl, read)


def principal() -> Principal:
    return g.principal


def register(app: Flask) -> None:
    app.before_request(authenticate)
    stream_auth.install(app)


def authenticate() -> None:
    """Every /api request: who calls (g.principal), and whether its role may make this request."""
    if not request.path.startswith("/api/"):
        return
    g.principal = caller()
    check_role(g.principal)


def caller() -> Principal:
    """The key this request names (else 401), or everyone when auth is off."""
    task_store = store()
    if not task_store.settings.auth_on:
        return AUTH_OFF
    header = request.headers.get("Authorization")
    if not header and stream_auth.carries_token():
        try:
            return Principal.of_key(stream_auth.key_of_token())
        except stream_auth.StreamTokenRefused as refused:
            if refused.status == 401:
                _refuse(str(refused))
            abort(refused.status, message=str(refused))
    if not header:
        _refuse("This endpoint needs an API key: send Authorization: Bearer <token>.", error=None)
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not well_formed(token):
        _refuse("The Authorization header is not a skiplock key (Bearer skl_...).")
    key = task_store.keys.get(token_digest(token))
    if key is None:
        _refuse("Unknown API key.")
    if key["revoked_at"] is not None:
        _refuse(f"API key {key['prefix']} was revoked.")
    return Principal.of_key(key)


def check_role(who: Principal) -> None:
    """403 if this key's role may not make this /api request (see the module's docstring)."""
    if who.role == "metrics":
        abort(403, message=f"API key {who.prefix} is a metrics key: it may read GET /metrics only, not /api.")
    if who.role == "viewer":
        reads = request.method in SAFE_METHODS or request.endpoint in VIEWER_POSTS
        if not reads or request.endpoint in VIEWER_REFUSED:
            abort(
                403,
                message=f"API key {who.prefix} is a viewer key: it may read, never change "
                f"({request.method} {request.path} needs an admin or a client key).",
            )


def authenticate_scraper() -> Principal:
    """For GET /metrics (outside /api): authenticate as /api does, then require a key that may
    read metrics (metrics, viewer or admin)."""
    who = g.principal = caller()
    if who.role not in SCRAPERS:
        abort(
            403,
            message=f"API key {who.prefix} is a {who.role} key: /metrics needs a metrics, viewer or admin key "
            "(skiplock keys create --role metrics).",
        )
    return who


def _refuse(message: str, error: str | None = "invalid_token") -> NoReturn:
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    abort(401, message=message, headers={"WWW-Authenticate": challenge})


def require_admin() -> Principal:
    """An admin key; a viewer key too on a read (check_role refused it anything else)."""
    who = principal()
    if not (who.is_admin or (who.role == "viewer" and request.method in SAFE_METHODS)):
        abort(403, message="This needs an admin key.")
    return who
