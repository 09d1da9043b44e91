"""API keys and what they limit (api_keys, idempotency_keys): tokens, rate buckets, quotas,
idempotent submits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypedDict

from psycopg.types.json import Jsonb

from skiplock.sql.rows import Connection, one_row

# weight is real (4 bytes: it is read by every submit's turn); through numeric it reads as set
# (0.1, not 0.10000000149011612).
_API_KEY_COLUMNS = (
    "id, name, role::text AS role, prefix, rate_per_second, burst, max_unfinished, "
    "weight::numeric::float8 AS weight, created_at, revoked_at, last_used_at"
)
# api_keys.weight: 0 < weight <= MAX_WEIGHT (api_keys_weight_in_range), 1 unless set; the API and
# the CLI take MIN_WEIGHT and up (smaller ones underflow a real, and would starve nobody anyway).
DEFAULT_WEIGHT = 1.0
MIN_WEIGHT = 0.001
MAX_WEIGHT = 1000.0


class ApiKeyRow(TypedDict):
    """An API key as lists show it (never its token, only the token's non-secret prefix)."""

    id: int
    name: str
    role: str  # admin | client
    prefix: str
    rate_per_second: float | None
    burst: int | None
    max_unfinished: int | None
    weight: float  # its fair share (tasks.turn)
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyDigestRow(ApiKeyRow):
    """A key with its token's digest (what a session checks it was made for)."""

    token_sha256: bytes


class IdempotencyRow(TypedDict):
    """The earlier use of an Idempotency-Key: the request it was made for, and its answer."""

    request_sha256: bytes
    status_code: int
    response: Any
    location: str | None
    task_ids: list[int]


def api_key_insert(
    conn: Connection,
    *,
    name: str,
    role: str,
    prefix: str,
    token_sha256: bytes,
    rate_per_second: float | None = None,
    burst: int | None = None,
    max_unfinished: int | None = None,
    weight: float = DEFAULT_WEIGHT,
) -> ApiKeyRow:
    """api_key_insert: a new key (only the token's digest and prefix are stored)."""
    cursor = conn.execute(
        f"""
        INSERT INTO api_keys (name, role, prefix, token_sha256, rate_per_second, burst, max_unfinished, weight)
        VALUES (%(name)s, %(role)s, %(prefix)s, %(digest)s, %(rate)s, %(burst)s, %(max_unfinished)s, %(weight)s)
        RETURNING {_API_KEY_COLUMNS}
        """,
        {
            "name": name,
            "role": role,
            "prefix": prefix,
            "digest": token_sha256,
            "rate": rate_per_second,
            "burst": burst,
            "max_unfinished": max_unfinished,
            "weight": weight,
        },
    )
    return one_row(cursor)


def api_key_set_weight(conn: Connection, *, key_id: int, weight: float) -> ApiKeyRow | None:
    """api_key_set_weight: change a key's fair share (its tasks that get their turn from now on
    are spaced by it; those queued keep theirs); None if no such key."""
    return conn.execute(
        f"UPDATE api_keys SET weight = %(weight)s WHERE id = %(id)s RETURNING {_API_KEY_COLUMNS}",
        {"id": key_id, "weight": weight},
    ).fetchone()


def api_key_by_digest(conn: Connection, token_sha256: bytes) -> ApiKeyRow | None:
    """api_key_by_digest: the key a presented token belongs to (revoked ones too), or None."""
    return conn.execute(
        f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE token_sha256 = %s", (token_sha256,)
    ).fetchone()


def api_key_get(conn: Connection, key_id: int) -> ApiKeyDigestRow | None:
    """api_key_get: the key with this id, revoked or not, with its token's digest."""
    return conn.execute(
        f"SELECT {_API_KEY_COLUMNS}, token_sha256 FROM api_keys WHERE id = %s", (key_id,)
    ).fetchone()


def api_key_list(conn: Connection, *, include_revoked: bool = False) -> list[ApiKeyRow]:
    """api_key_list: every key, oldest first."""
    return conn.execute(
        f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE %(all)s OR revoked_at IS NULL ORDER BY id",
        {"all": include_revoked},
    ).fetchall()


def api_key_revoke(
    conn: Connection,
    *,
    key_id: int | None = None,
    prefix: str | None = None,
    token_sha256: bytes | None = None,
) -> ApiKeyRow | None:
    """api_key_revoke: revoke a key by id, prefix or token digest (again: a no-op); None if no
    such key."""
    return conn.execute(
        f"""
        UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
        WHERE id = %(id)s OR prefix = %(prefix)s OR token_sha256 = %(digest)s
        RETURNING {_API_KEY_COLUMNS}
        """,
        {"id": key_id, "prefix": prefix, "digest": token_sha256},
    ).fetchone()


def api_keys_touch(conn: Connection, key_ids: Sequence[int]) -> None:
    """api_keys_touch: note that these keys were used (batched, at most once a minute)."""
    conn.execute(
        "UPDATE api_keys SET last_used_at = now() WHERE id = ANY(%s) AND revoked_at IS NULL",
        (list(key_ids),),
    )


def api_key_take_tokens(
    conn: Connection, *, key_id: int, rate: float, burst: float, want: int
) -> tuple[int, float, float]:
    """api_key_take_tokens: refill the key's bucket for the time elapsed (rate per second, up to
    burst) and take up to `want` tokens from it, atomically (the row lock orders concurrent
    takers; nothing is spent twice). Returns (granted, tokens left, seconds until `want` more)."""
    cursor = conn.execute(
        """
        INSERT INTO api_key_buckets AS b (key_id, tokens, updated_at, granted)
        VALUES (%(key)s, %(burst)s - least(%(want)s, floor(%(burst)s)), clock_timestamp(),
                least(%(want)s, floor(%(burst)s)))
        ON CONFLICT (key_id) DO UPDATE
        SET (tokens, updated_at, granted) = (
            SELECT available.tokens - grant_.n, available.at, grant_.n
            FROM (SELECT greatest(b.updated_at, clock_timestamp()) AS at) AS now_
            CROSS JOIN LATERAL (
                SELECT now_.at, least(%(burst)s, b.tokens + %(rate)s * extract(epoch FROM now_.at - b.updated_at))
                       AS tokens
            ) AS available
            CROSS JOIN LATERAL (SELECT least(%(want)s, floor(available.tokens))::int AS n) AS grant_
        )
        RETURNING granted, tokens, greatest(0, (%(want)s - tokens) / %(rate)s) AS wait
        """,
        {"key": key_id, "rate": rate, "burst": burst, "want": want},
    )
    row = one_row(cursor)
    return row["granted"], row["tokens"], row["wait"]


def api_key_return_tokens(conn: Connection, *, key_id: int, burst: float, tokens: int) -> None:
    """api_key_return_tokens: give back tokens a process took but did not use."""
    conn.execute(
        "UPDATE api_key_buckets SET tokens = least(%(burst)s, tokens + %(n)s) WHERE key_id = %(key)s",
        {"key": key_id, "burst": burst, "n": tokens},
    )


def task_quota_free_slots(conn: Connection, *, owner: int, cap: int, want: int) -> tuple[int, list[int]]:
    """task_quota_free_slots: how many unfinished tasks of the key hold a quota slot, and up to
    `want` slot numbers in 1..cap that none holds, lowest first. One range of
    tasks_quota_slot_idx (at most cap entries: the key's slots) and the gaps between them."""
    row = one_row(
        conn.execute(
            """
            WITH held AS (
                SELECT quota_slot AS s FROM tasks
                WHERE owner_key_id = %(owner)s AND quota_slot IS NOT NULL AND status IN ('pending', 'processing')
            ), gaps AS (
                SELECT s + 1 AS lo, coalesce(lead(s) OVER (ORDER BY s), %(cap)s + 1) - 1 AS hi
                FROM (SELECT 0 AS s UNION ALL SELECT s FROM held WHERE s <= %(cap)s) b
            )
            SELECT (SELECT count(*) FROM held) AS held,
                   array(SELECT f FROM gaps CROSS JOIN LATERAL generate_series(lo, least(hi, lo + %(want)s - 1)) f
                         WHERE lo <= hi ORDER BY f LIMIT %(want)s) AS free
            """,
            {"owner": owner, "cap": cap, "want": want},
        )
    )
    return row["held"], row["free"]


def idempotency_key_claim(
    conn: Connection, *, owner: int | None, key: str, request_sha256: bytes, ttl_seconds: float
) -> IdempotencyRow | None:
    """idempotency_key_claim: in the submit's transaction, take the key (forgetting an expired
    use of it first). None: taken, the caller inserts and then idempotency_key_record. Else the
    earlier use's row. A concurrent request with the same key waits here on the unique index
    until the first commits (then gets its row) or rolls back (then takes the key)."""
    conn.execute(
        """
        DELETE FROM task_idempotency_keys
        WHERE coalesce(owner_key_id, 0) = coalesce(%(owner)s, 0) AND idempotency_key = %(key)s
          AND created_at < now() - make_interval(secs => %(ttl)s)
        """,
        {"owner": owner, "key": key, "ttl": ttl_seconds},
    )
    taken = conn.execute(
        """
        INSERT INTO task_idempotency_keys (owner_key_id, idempotency_key, request_sha256, status_code,
                                           response, task_ids)
        VALUES (%(owner)s, %(key)s, %(sha)s, 0, 'null', '{}')
        ON CONFLICT (coalesce(owner_key_id, 0), idempotency_key) DO NOTHING
        RETURNING 1
        """,
        {"owner": owner, "key": key, "sha": request_sha256},
    ).fetchone()
    if taken:
        return None
    return conn.execute(
        """
        SELECT request_sha256, status_code, response, location, task_ids FROM task_idempotency_keys
        WHERE coalesce(owner_key_id, 0) = coalesce(%(owner)s, 0) AND idempotency_key = %(key)s
        """,
        {"owner": owner, "key": key},
    ).fetchone()


def idempotency_key_record(
    conn: Connection,
    *,
    owner: int | None,
    key: str,
    status_code: int,
    response: Any,
    location: str | None,
    task_ids: Sequence[int],
) -> None:
    """idempotency_key_record: the answer to replay for this key (same transaction as the insert)."""
    conn.execute(
        """
        UPDATE task_idempotency_keys
        SET status_code = %(code)s, response = %(response)s, location = %(location)s, task_ids = %(ids)s
        WHERE coalesce(owner_key_id, 0) = coalesce(%(owner)s, 0) AND idempotency_key = %(key)s
        """,
        {
            "owner": owner,
            "key": key,
            "code": status_code,
            "response": Jsonb(response),
            "location": location,
            "ids": list(task_ids),
        },
    )


def idempotency_keys_prune(conn: Connection, *, older_than_seconds: float, limit: int) -> int:
    """idempotency_keys_prune: forget up to `limit` Idempotency-Keys older than their window."""
    return conn.execute(
        """
        DELETE FROM task_idempotency_keys WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM task_idempotency_keys
            WHERE created_at < now() - make_interval(secs => %(age)s)
            ORDER BY created_at LIMIT %(limit)s))
        """,
        {"age": older_than_seconds, "limit": limit},
    ).rowcount
