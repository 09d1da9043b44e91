"""Who is calling: every /api request names an API key (Authorization: Bearer <token>) unless
auth is off. /healthz, /readyz, /openapi.json and /docs stay public.

Each process keeps what it read about a key for key_cache_seconds (2 s): authentication costs a
dictionary lookup, and a revoked key is refused by every process within that time. Unknown
tokens are cached too, so a flood of bad tokens does not become a flood of queries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psycopg
from flask import Flask, g, request
from flask_smorest import abort

from skiplock.sql.keys import api_key_by_digest, api_keys_touch
from skiplock.tokens import token_digest, well_formed

from .extensions import db, store

REALM = 'Bearer realm="skiplock"'
# Most keys a process remembers; beyond, the oldest entries are dropped (and read again).
KEY_CACHE_SIZE = 10_000
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
    def of_key(cls, row: dict) -> Principal:
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


class KeyCache:
    """Token digest -> key row (or None: unknown), as read at most `ttl` seconds ago."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._entries: dict[bytes, tuple[float, dict | None]] = {}
        self._last_touched: dict[int, float] = {}
        self._lock = threading.Lock()  # threaded gunicorn workers share it

    def peek(self, digest: bytes) -> dict | None:
        """The key if it was read less than `ttl` seconds ago (no query), else None."""
        entry = self._entries.get(digest)
        if entry is not None and time.monotonic() - entry[0] < self.ttl:
            return entry[1]
        return None

    def lookup(self, digest: bytes) -> dict | None:
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        with db() as conn:
            row = api_key_by_digest(conn, digest)
            self._touch(conn, row, now)
        with self._lock:
            if len(self._entries) >= KEY_CACHE_SIZE:
                for stale in list(self._entries)[: KEY_CACHE_SIZE // 10]:
                    del self._entries[stale]
            self._entries[digest] = (now, row)
        return row

    def _touch(self, conn: psycopg.Connection, row: dict | None, now: float) -> None:
        """Note the key's use (at most once a minute per process), on the read's connection."""
        if row is None or row["revoked_at"] is not None:
            return
        if now - self._last_touched.get(row["id"], -TOUCH_INTERVAL_SECONDS) >= TOUCH_INTERVAL_SECONDS:
            self._last_touched[row["id"]] = now
            api_keys_touch(conn, [row["id"]])


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
    key = task_store.keys.lookup(token_digest(token))
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


def _refuse(message: str, error: str | None = "invalid_token") -> None:
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    abort(401, message=message, headers={"WWW-Authenticate": challenge})


def require_admin() -> Principal:
    who = principal()
    if not who.is_admin:
        abort(403, message="This needs an admin key.")
    return who
