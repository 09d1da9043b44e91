"""API keys: the rules of a key (what `skiplock keys` and /api/keys both check), managing them,
and the per-process cache of the key rows a request or a session reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from skiplock.sql.keys import ApiKeyRow, api_key_insert, api_key_list, api_key_revoke
from skiplock.sql.rows import Connection
from skiplock.tokens import new_token

# What a key may do (schema.sql api_key_role; api/auth.py enforces it on every request).
#   client:  submits, and sees and steers its own tasks only;
#   admin:   every task, queue, limit and schedule, and the keys themselves;
#   viewer:  reads everything an admin reads (API and dashboard) and changes nothing;
#   metrics: reads GET /metrics only (a Prometheus scrape credential).
ROLES = ("client", "admin", "viewer", "metrics")
# What a key may be given (api/schemas.py ApiKeyCreateSchema, `skiplock keys create`).
MAX_NAME_LENGTH = 100
MIN_RATE_PER_SECOND = 0.001
MAX_RATE_PER_SECOND = 1_000_000
MAX_BURST = 1_000_000
MAX_UNFINISHED = 100_000_000
# Most key rows a cache holds; past it, the oldest tenth is dropped (and read again when asked).
KEY_CACHE_SIZE = 10_000


class CreatedKey(ApiKeyRow):
    token: str  # shown once, stored nowhere


K = TypeVar("K", bound=Hashable)
Row = TypeVar("Row")


class KeyRows(Generic[K, Row]):
    """Key rows (or None: no such key) by what the caller knows of the key (a token's digest, a
    session's key id), each as `read` returned it at most `ttl` seconds ago. A revoked key is
    then refused by every process within `ttl`; a flood of unknown tokens costs one read each per
    `ttl`, not one per request. Threads share it (threaded gunicorn workers)."""

    def __init__(self, ttl: float, read: Callable[[K], Row | None], *, size: int = KEY_CACHE_SIZE):
        self.ttl = ttl
        self._read = read
        self._size = size
        self._entries: dict[K, tuple[float, Row | None]] = {}
        self._lock = threading.Lock()

    def peek(self, key: K) -> Row | None:
        """The row if it was read less than `ttl` seconds ago (no query), else None."""
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() - entry[0] < self.ttl:
            return entry[1]
        return None

    def get(self, key: K) -> Row | None:
        """The row, read again if the one held is older than `ttl`."""
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        row = self._read(key)
        with self._lock:
            if len(self._entries) >= self._size:
                for stale in list(self._entries)[: self._size // 10]:
                    del self._entries[stale]
            self._entries[key] = (now, row)
        return row


def create_key(
    conn: Connection,
    *,
    name: str,
    role: str = "client",
    rate_per_second: float | None = None,
    burst: int | None = None,
    max_unfinished: int | None = None,
) -> CreatedKey:
    """A new key; the answer carries its token, which is stored nowhere (only its digest)."""
    token = new_token()
    row = api_key_insert(
        conn,
        name=name,
        role=role,
        prefix=token.prefix,
        token_sha256=token.digest,
        rate_per_second=rate_per_second,
        burst=burst,
        max_unfinished=max_unfinished,
    )
    return {**row, "token": token.token}


def list_keys(conn: Connection, *, include_revoked: bool = False) -> list[ApiKeyRow]:
    return api_key_list(conn, include_revoked=include_revoked)


def revoke_key(
    conn: Connection,
    *,
    key_id: int | None = None,
    prefix: str | None = None,
    token_sha256: bytes | None = None,
) -> ApiKeyRow | None:
    """Revoke the key with this id, prefix or token digest (one of them); None if none is."""
    return api_key_revoke(conn, key_id=key_id, prefix=prefix, token_sha256=token_sha256)
