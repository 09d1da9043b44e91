"""Who is calling: every /api request names an API key (Authorization: Bearer <token>) unless
auth is off. /healthz, /readyz, /openapi.json and /docs stay public.

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

from .extensions import db, store

REALM = 'Bearer realm="skiplock"'
# last_used_at is written at most this often per key and process.
TOUCH_INTERVAL_SECONDS = 60.0


@dataclass(frozen=True)
class Principal:
    """The caller: an API key, or everyone when auth is off."""

    key_id: int | None
    role: str  # admin | client
    name: str
    prefix: str | None = None
    rate_per_second: float | None = None
    burst: int | None = None
    max_unfinished: int | None = None

    @property
    def owner(self) -> int | None:
        """Whose tasks it sees: its own (a client key), or all (None: an admin, or auth off)."""
        return None if self.role == "admin" else self.key_id

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


def authenticate(force: bool = False) -> None:
    if not force and not request.path.startswith("/api/"):
        return
    task_store = store()
    if not task_store.settings.auth_on:
        g.principal = AUTH_OFF
        return
    header = request.headers.get("Authorization")
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
    g.principal = Principal.of_key(key)


def authenticate_admin() -> Principal:
    """For the endpoints outside /api (/metrics): authenticate as /api does, then require an
    admin key."""
    authenticate(force=True)
    return require_admin()


def _refuse(message: str, error: str | None = "invalid_token") -> NoReturn:
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    abort(401, message=message, headers={"WWW-Authenticate": challenge})


def require_admin() -> Principal:
    who = principal()
    if not who.is_admin:
        abort(403, message="This needs an admin key.")
    return who
