"""Managing API keys: what `skiplock keys` and /api/keys both do."""

from __future__ import annotations

import psycopg

from skiplock.sql.keys import api_key_insert, api_key_list, api_key_revoke
from skiplock.tokens import new_token


def create_key(
    conn: psycopg.Connection,
    *,
    name: str,
    role: str = "client",
    rate_per_second: float | None = None,
    burst: int | None = None,
    max_unfinished: int | None = None,
) -> dict:
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


def list_keys(conn: psycopg.Connection, *, include_revoked: bool = False) -> list[dict]:
    return api_key_list(conn, include_revoked=include_revoked)


def revoke_key(
    conn: psycopg.Connection,
    *,
    key_id: int | None = None,
    prefix: str | None = None,
    token_sha256: bytes | None = None,
) -> dict | None:
    """Revoke the key with this id, prefix or token digest (one of them); None if none is."""
    return api_key_revoke(conn, key_id=key_id, prefix=prefix, token_sha256=token_sha256)
