"""Every queue query, and nothing else. DDL lives in schema.sql.

Each function takes an open connection (autocommit, dict rows) and runs one short statement, so no
transaction ever holds a row lock while a task runs. Names are noun_verb; batches travel as arrays.

Worker writes are *fenced*: they match on (id, attempts, worker_id, status = 'processing'), so a
worker whose task was rescued, cancelled or re-claimed updates 0 rows instead of clobbering the
newer attempt.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from skiplock.errors import InvalidTransition, TaskGone, TaskNotFound

PENDING_CHANNEL = "skiplock_task_pending"
CANCEL_CHANNEL = "skiplock_task_cancelled"
CHANGED_CHANNEL = "skiplock_task_changed"
# NOTIFY payloads are limited to 8,000 bytes: past this, "*" tells listeners to look again at
# every task they watch.
_CHANGED_PAYLOAD_MAX = 7900


def _announce(changed: str, final: str) -> str:
    """A CTE `announced` that NOTIFYs skiplock_task_changed with the ids of the rows of CTE
    `changed` (it has an `id` column) that a client waits on (task_watchers), and nothing at all
    when nobody waits on anything: one probe of an empty table. `final` is an SQL condition on a
    row `c` of `changed`: its id is sent as "<id>!" when the change made the task final (a
    long-poll wakes for those only). The statement must reference `announced` (a SELECT CTE is
    only run when referenced)."""
    return f"""announced AS (
        SELECT pg_notify('{CHANGED_CHANNEL}',
                         CASE WHEN length(ids) > {_CHANGED_PAYLOAD_MAX} THEN '*' ELSE ids END) AS sent
        FROM (SELECT string_agg(c.id::text || CASE WHEN {final} THEN '!' ELSE '' END, ',') AS ids
              FROM {changed} c
              WHERE EXISTS (SELECT FROM task_watchers w WHERE w.task_id = c.id)) AS watched
        WHERE ids IS NOT NULL AND EXISTS (SELECT FROM task_watchers)
    )"""


# A task in one of these states stays there unless a client retries it.
FINAL_STATUSES = ("completed", "failed", "cancelled")
_NOW_FINAL = "c.status IN ({})".format(", ".join(f"'{s}'" for s in FINAL_STATUSES))


def _iso(timestamp: str) -> str:
    """SQL: a timestamptz as ISO 8601 text in UTC, whatever the session's TimeZone."""
    return f"""to_char({timestamp} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""


# RETURNING columns of a statement that may make tasks (alias t) final: what a webhook needs.
# The payload is built only for a task with a callback that is final now (retries get none).
_HOOK_COLUMNS = f"""t.callback_url, t.owner_key_id,
    CASE WHEN t.callback_url IS NOT NULL AND t.status IN ('completed', 'failed', 'cancelled')
         THEN jsonb_build_object(
            'type', 'task.' || t.status::text,
            'timestamp', {_iso("now()")},
            'data', jsonb_build_object(
                'task_id', t.id, 'status', t.status::text, 'result', t.result, 'error', t.error,
                'progress', t.progress, 'attempts', t.attempts, 'max_attempts', t.max_attempts,
                'task_type', t.task_type, 'queue', t.queue, 'priority', t.priority,
                'timeout_seconds', t.timeout_seconds, 'created_at', {_iso("t.created_at")},
                'run_at', {_iso("t.run_at")}, 'started_at', {_iso("t.started_at")},
                'finished_at', {_iso("t.finished_at")}))
    END AS hook_payload"""


def _outbox(changed: str) -> str:
    """A CTE `outboxed` writing a webhook delivery for each row of CTE `changed` (returning
    _HOOK_COLUMNS) that has a payload: in the statement that made its task final. A data-modifying
    CTE runs whether or not the statement references it."""
    return f"""outboxed AS (
        INSERT INTO webhook_deliveries (task_id, owner_key_id, url, event, payload)
        SELECT c.id, c.owner_key_id, c.callback_url, c.hook_payload->>'type', c.hook_payload
        FROM {changed} c WHERE c.hook_payload IS NOT NULL
    )"""


# Appended to a statement's final WHERE: makes it run `announced` (see _announce).
_ANNOUNCED = "(SELECT count(*) FROM announced) >= 0"

# Columns a client sees (task-status); input is fetched only when asked for.
_TASK_FIELDS = (
    "id", "task_type", "queue", "priority", "status", "result", "error", "progress", "attempts",
    "max_attempts", "timeout_seconds", "created_at", "run_at", "started_at", "finished_at",
)  # fmt: skip


def _task_columns(alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(
        f"{prefix}status::text AS status" if name == "status" else prefix + name for name in _TASK_FIELDS
    )


_TASK_COLUMNS = _task_columns()


@dataclass(frozen=True)
class ClaimedTask:
    id: int
    task_type: str
    queue: str
    input: Any
    attempt: int
    max_attempts: int
    timeout_seconds: int
    priority: int
    run_at: datetime
    has_callback: bool = False  # its final write makes a webhook delivery (wake the sender)


@dataclass(frozen=True)
class AttemptRef:
    """Names one attempt of one task: what a fenced write must match."""

    task_id: int
    attempt: int


def storable_text(text: str | None) -> str | None:
    """Text Postgres accepts: no NUL, no lone surrogates (exception messages may carry both)."""
    if text is None:
        return None
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class AttemptFailure:
    task_id: int
    attempt: int
    outcome: str  # a task_attempt_outcome other than completed/handed_back
    error: str
    traceback: str | None = None


# --- Clients (API) ---------------------------------------------------------------------------


def task_insert(
    conn: psycopg.Connection,
    *,
    task_type: str,
    input: Any,
    queue: str,
    priority: int,
    max_attempts: int,
    timeout_seconds: int,
    run_at: datetime | None = None,
    delay_seconds: float | None = None,
    owner_key_id: int | None = None,
    full_row: bool = True,
    callback_url: str | None = None,
    callback_secret: str | None = None,
) -> dict:
    """task_insert: enqueue one task; the insert trigger wakes waiting workers. run_at defaults
    to now() (the database clock), optionally pushed back by delay_seconds. Returns the stored
    task, or only its id and status (full_row=False: a hot path that needs no more). A
    callback_secret is stored in the same statement (task_callback_secrets)."""
    returning = _TASK_COLUMNS if full_row else "id, status::text AS status"
    insert = """
        INSERT INTO tasks (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at,
                           owner_key_id, callback_url)
        VALUES (%(task_type)s, %(input)s, %(queue)s, %(priority)s, %(max_attempts)s,
                %(timeout_seconds)s,
                coalesce(%(run_at)s, now()) + make_interval(secs => coalesce(%(delay)s, 0)),
                %(owner)s, %(callback_url)s)"""
    if callback_secret is None:  # the hot path: one INSERT
        statement = f"{insert} RETURNING {returning}"
    else:
        statement = f"""
        WITH inserted AS ({insert} RETURNING *), secret AS (
            INSERT INTO task_callback_secrets (task_id, secret) SELECT id, %(secret)s FROM inserted
        )
        SELECT {returning} FROM inserted"""
    return conn.execute(
        statement,
        {
            "callback_url": callback_url,
            "secret": callback_secret,
            "owner": owner_key_id,
            "task_type": task_type,
            "input": Jsonb(input),
            "queue": queue,
            "priority": priority,
            "max_attempts": max_attempts,
            "timeout_seconds": timeout_seconds,
            "run_at": run_at,
            "delay": delay_seconds,
        },
    ).fetchone()


@dataclass(frozen=True)
class NewTask:
    """One task of a batch submit (task_insert_many)."""

    task_type: str
    input_json: str  # JSON text, already validated
    queue: str
    priority: int
    max_attempts: int
    timeout_seconds: int
    run_at: datetime | None = None
    delay_seconds: float | None = None
    callback_url: str | None = None
    callback_secret: str | None = None


def task_insert_many(
    conn: psycopg.Connection, tasks: Sequence[NewTask], *, owner_key_id: int | None = None
) -> list[int]:
    """task_insert_many: enqueue a batch in one statement (all or nothing, one NOTIFY); returns
    the new ids in the order given (identity values follow the insertion order).

    Arrays go in binary (%b): psycopg's text format quotes every element with a regex, which
    cost the API more CPU per batch than Postgres spent storing it. Callback secrets, if any,
    are stored in the same statement."""
    insert = """
        INSERT INTO tasks (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at,
                           owner_key_id, callback_url)
        SELECT r.task_type, r.input, r.queue, r.priority, r.max_attempts, r.timeout_seconds,
               coalesce(r.run_at, now()) + make_interval(secs => coalesce(r.delay, 0)), %(owner)s,
               r.callback_url
        FROM unnest(%(types)b::text[], %(inputs)b::text[]::jsonb[], %(queues)b::text[], %(priorities)b::int[],
                    %(max_attempts)b::int[], %(timeouts)b::int[], %(run_ats)b::timestamptz[],
                    %(delays)b::float8[], %(callback_urls)b::text[])
            WITH ORDINALITY AS r(task_type, input, queue, priority, max_attempts, timeout_seconds,
                                 run_at, delay, callback_url, n)
        ORDER BY r.n
        RETURNING id"""
    secrets = [t.callback_secret for t in tasks]
    if not any(secrets):
        statement = insert
    else:
        # Identity values follow the insertion order: the n-th smallest new id is the n-th task.
        statement = f"""
        WITH inserted AS ({insert}), secrets AS (
            INSERT INTO task_callback_secrets (task_id, secret)
            SELECT i.id, s.secret
            FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM inserted) i
            JOIN unnest(%(secrets)s::text[]) WITH ORDINALITY AS s(secret, n) ON s.n = i.n
            WHERE s.secret IS NOT NULL
        )
        SELECT id FROM inserted"""
    rows = conn.execute(
        statement,
        {
            "callback_urls": [t.callback_url for t in tasks],
            "secrets": secrets,
            "owner": owner_key_id,
            "types": [t.task_type for t in tasks],
            "inputs": [t.input_json for t in tasks],
            "queues": [t.queue for t in tasks],
            "priorities": [t.priority for t in tasks],
            "max_attempts": [t.max_attempts for t in tasks],
            "timeouts": [t.timeout_seconds for t in tasks],
            "run_ats": [t.run_at for t in tasks],
            "delays": [t.delay_seconds for t in tasks],
        },
    ).fetchall()
    return sorted(r["id"] for r in rows)


# A client key sees its own tasks only (owner given); an admin, or auth off, sees all (None).
_OWNED = "(%(owner)s::bigint IS NULL OR owner_key_id = %(owner)s)"


def task_get(
    conn: psycopg.Connection, task_id: int, *, with_input: bool = False, owner: int | None = None
) -> dict:
    """task_get: one task as clients see it; raises TaskNotFound (also for another owner's
    task: it answers exactly as an id never issued), or TaskGone for an id that was issued but
    whose row is gone (pruned after its retention period, or deleted)."""
    columns = _TASK_COLUMNS + (", input" if with_input else "")
    row = conn.execute(
        f"SELECT {columns} FROM tasks WHERE id = %(id)s AND {_OWNED}", {"id": task_id, "owner": owner}
    ).fetchone()
    if row is None:
        _raise_missing(conn, task_id)
    return row


def _raise_missing(conn: psycopg.Connection, task_id: int):
    """TaskGone for an id issued whose row is gone, else TaskNotFound (also when the row exists
    but belongs to another owner)."""
    gone = conn.execute(
        """
        SELECT %(id)s BETWEEN 1 AND CASE WHEN is_called THEN last_value ELSE 0 END
               AND NOT EXISTS (SELECT FROM tasks WHERE id = %(id)s) AS gone
        FROM tasks_id_seq
        """,
        {"id": task_id},
    ).fetchone()["gone"]
    raise TaskGone(task_id) if gone else TaskNotFound(task_id)


def task_list(
    conn: psycopg.Connection,
    *,
    status: str | None = None,
    task_type: str | None = None,
    queue: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
    owner: int | None = None,
) -> list[dict]:
    """task_list: newest first, keyset-paginated on id (pass the last id seen as before_id); a
    client key's own tasks only (owner), through tasks_owner_idx."""
    return conn.execute(
        f"""
        SELECT {_TASK_COLUMNS} FROM tasks
        WHERE {_OWNED}
          AND (%(status)s::task_status IS NULL OR status = %(status)s::task_status)
          AND (%(task_type)s::text IS NULL OR task_type = %(task_type)s)
          AND (%(queue)s::text IS NULL OR queue = %(queue)s)
          AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
        ORDER BY id DESC
        LIMIT %(limit)s
        """,
        {
            "status": status,
            "task_type": task_type,
            "queue": queue,
            "before_id": before_id,
            "limit": limit,
            "owner": owner,
        },
    ).fetchall()


def task_cancel(conn: psycopg.Connection, task_id: int, *, owner: int | None = None) -> dict:
    """task_cancel: pending or processing -> cancelled. A processing attempt is recorded as
    cancelled here (released, uncounted, if it had not started) and its worker is told (NOTIFY)
    to stop it; its late writes are fenced out."""
    row = conn.execute(
        f"""
        WITH target AS (
            SELECT id, status AS previous_status, attempts, worker_id, started_at
            FROM tasks WHERE id = %(id)s AND status IN ('pending', 'processing') AND {_OWNED}
            FOR UPDATE
        ), cancelled AS (
            UPDATE tasks t
            SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                attempts = CASE WHEN target.previous_status = 'processing' AND target.started_at IS NULL
                                THEN t.attempts - 1 ELSE t.attempts END
            FROM target
            WHERE t.id = target.id
            RETURNING {_task_columns("t")},
                      target.previous_status, target.worker_id AS holder, target.started_at AS attempt_started_at,
                      target.attempts AS attempt, {_HOOK_COLUMNS}
        ), {_outbox("cancelled")}, logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
            SELECT id, attempt, holder,
                   CASE WHEN attempt_started_at IS NULL THEN 'released' ELSE 'cancelled' END::task_attempt_outcome,
                   attempt_started_at,
                   CASE WHEN attempt_started_at IS NULL THEN 'cancelled by a client before it started'
                        ELSE 'cancelled by a client' END
            FROM cancelled WHERE previous_status = 'processing'
        ), {_announce("cancelled", "true")}
        SELECT cancelled.*,
               CASE WHEN previous_status = 'processing'
                    THEN pg_notify(%(channel)s, id::text) END AS notified
        FROM cancelled WHERE {_ANNOUNCED}
        """,
        {"id": task_id, "channel": CANCEL_CHANNEL, "owner": owner},
    ).fetchone()
    if row is None:
        current = task_get(conn, task_id, owner=owner)
        raise InvalidTransition(task_id, current["status"], "cancelled", current["error"])
    for extra in (
        *("previous_status", "holder", "attempt_started_at", "attempt", "notified"),
        *("callback_url", "owner_key_id", "hook_payload"),
    ):
        row.pop(extra)
    return row


def task_retry(conn: psycopg.Connection, task_id: int, *, owner: int | None = None) -> dict:
    """task_retry: failed or cancelled -> pending, due now. Grants one more attempt if the task
    had used them all (attempts are not reset: with worker_id they are the fencing token)."""
    row = conn.execute(
        f"""
        WITH retried AS (
            UPDATE tasks
            SET status = 'pending', run_at = now(), finished_at = NULL, progress = NULL,
                max_attempts = greatest(max_attempts, attempts + 1)
            WHERE id = %(id)s AND status IN ('failed', 'cancelled') AND {_OWNED}
              AND attempts < 1000  -- tasks_max_attempts_in_range: no attempt can be granted past it
            RETURNING {_TASK_COLUMNS}, pg_notify(%(channel)s, '') AS notified
        ), {_announce("retried", "false")}
        SELECT * FROM retried WHERE {_ANNOUNCED}
        """,
        {"id": task_id, "channel": PENDING_CHANNEL, "owner": owner},
    ).fetchone()
    if row is None:
        current = task_get(conn, task_id, owner=owner)
        raise InvalidTransition(task_id, current["status"], "retried", current["error"])
    row.pop("notified")
    return row


def task_attempts_list(conn: psycopg.Connection, task_id: int) -> list[dict]:
    """task_attempts_list: a task's ended attempts, oldest first."""
    return conn.execute(
        """
        SELECT attempt, worker_id, outcome::text AS outcome, started_at, finished_at, error
        FROM task_attempts WHERE task_id = %s ORDER BY id
        """,
        (task_id,),
    ).fetchall()


# --- API keys, limits and idempotency (api/) ---------------------------------------------------

_API_KEY_COLUMNS = (
    "id, name, role::text AS role, prefix, rate_per_second, burst, max_unfinished, created_at, "
    "revoked_at, last_used_at"
)


def api_key_insert(
    conn: psycopg.Connection,
    *,
    name: str,
    role: str,
    prefix: str,
    token_sha256: bytes,
    rate_per_second: float | None = None,
    burst: int | None = None,
    max_unfinished: int | None = None,
) -> dict:
    """api_key_insert: a new key (only the token's digest and prefix are stored)."""
    return conn.execute(
        f"""
        INSERT INTO api_keys (name, role, prefix, token_sha256, rate_per_second, burst, max_unfinished)
        VALUES (%(name)s, %(role)s, %(prefix)s, %(digest)s, %(rate)s, %(burst)s, %(max_unfinished)s)
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
        },
    ).fetchone()


def api_key_by_digest(conn: psycopg.Connection, token_sha256: bytes) -> dict | None:
    """api_key_by_digest: the key a presented token belongs to (revoked ones too), or None."""
    return conn.execute(
        f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE token_sha256 = %s", (token_sha256,)
    ).fetchone()


def api_key_get(conn: psycopg.Connection, key_id: int) -> dict | None:
    """api_key_get: the key with this id, revoked or not, with its token's digest."""
    return conn.execute(
        f"SELECT {_API_KEY_COLUMNS}, token_sha256 FROM api_keys WHERE id = %s", (key_id,)
    ).fetchone()


def api_key_list(conn: psycopg.Connection, *, include_revoked: bool = False) -> list[dict]:
    """api_key_list: every key, oldest first."""
    return conn.execute(
        f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE %(all)s OR revoked_at IS NULL ORDER BY id",
        {"all": include_revoked},
    ).fetchall()


def api_key_revoke(
    conn: psycopg.Connection,
    *,
    key_id: int | None = None,
    prefix: str | None = None,
    token_sha256: bytes | None = None,
) -> dict | None:
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


def api_keys_touch(conn: psycopg.Connection, key_ids: Sequence[int]) -> None:
    """api_keys_touch: note that these keys were used (batched, at most once a minute)."""
    conn.execute(
        "UPDATE api_keys SET last_used_at = now() WHERE id = ANY(%s) AND revoked_at IS NULL",
        (list(key_ids),),
    )


def api_key_take_tokens(
    conn: psycopg.Connection, *, key_id: int, rate: float, burst: float, want: int
) -> tuple[int, float, float]:
    """api_key_take_tokens: refill the key's bucket for the time elapsed (rate per second, up to
    burst) and take up to `want` tokens from it, atomically (the row lock orders concurrent
    takers; nothing is spent twice). Returns (granted, tokens left, seconds until `want` more)."""
    row = conn.execute(
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
    ).fetchone()
    return row["granted"], row["tokens"], row["wait"]


def api_key_return_tokens(conn: psycopg.Connection, *, key_id: int, burst: float, tokens: int) -> None:
    """api_key_return_tokens: give back tokens a process took but did not use."""
    conn.execute(
        "UPDATE api_key_buckets SET tokens = least(%(burst)s, tokens + %(n)s) WHERE key_id = %(key)s",
        {"key": key_id, "burst": burst, "n": tokens},
    )


def task_unfinished_count(conn: psycopg.Connection, *, owner: int, up_to: int) -> tuple[int, int]:
    """task_unfinished_count: how many of the key's tasks are pending or processing, counted up
    to `up_to` (the cap: no need to count further), through tasks_owner_unfinished_idx; and the
    highest id the key has (task_owned_since counts from there)."""
    row = conn.execute(
        """
        SELECT (SELECT count(*) FROM (
                    SELECT 1 FROM tasks
                    WHERE owner_key_id = %(owner)s AND status IN ('pending', 'processing')
                    LIMIT %(up_to)s) AS unfinished) AS n,
               (SELECT coalesce(max(id), 0) FROM tasks WHERE owner_key_id = %(owner)s) AS max_id
        """,
        {"owner": owner, "up_to": up_to},
    ).fetchone()
    return row["n"], row["max_id"]


def task_owned_since(conn: psycopg.Connection, *, owner: int, after_id: int) -> tuple[int, int]:
    """task_owned_since: how many tasks the key submitted with ids above after_id (whatever
    their status), and the highest id: a range of tasks_owner_idx, as long as what is new."""
    row = conn.execute(
        """
        SELECT count(*) AS n, coalesce(max(id), %(after)s) AS max_id FROM tasks
        WHERE owner_key_id = %(owner)s AND id > %(after)s
        """,
        {"owner": owner, "after": after_id},
    ).fetchone()
    return row["n"], row["max_id"]


def idempotency_key_claim(
    conn: psycopg.Connection, *, owner: int | None, key: str, request_sha256: bytes, ttl_seconds: float
) -> dict | None:
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
    conn: psycopg.Connection,
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


def idempotency_keys_prune(conn: psycopg.Connection, *, older_than_seconds: float, limit: int) -> int:
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


# --- operators: queues, health, failures, throughput (api/, the dashboard, /metrics, the CLI) ----


def queue_summaries(conn: psycopg.Connection) -> list[dict]:
    """queue_summaries: per queue with unfinished tasks (or a row in task_queues): due,
    scheduled, reserved and running counts, the oldest due task's wait, and whether it is
    paused. Counts what is unfinished (through the partial indexes), never the finished rows."""
    return conn.execute(
        """
        WITH pending AS (
            SELECT queue, count(*) FILTER (WHERE run_at <= now()) AS due,
                   count(*) FILTER (WHERE run_at > now()) AS scheduled,
                   min(run_at) FILTER (WHERE run_at <= now()) AS oldest_due
            -- queue IS NOT NULL (always true) lets this read tasks_claim_queue_idx, not the table
            FROM tasks WHERE status = 'pending' AND queue IS NOT NULL GROUP BY queue
        ), processing AS (
            SELECT queue, count(*) FILTER (WHERE started_at IS NOT NULL) AS running,
                   count(*) FILTER (WHERE started_at IS NULL) AS reserved
            FROM tasks WHERE status = 'processing' GROUP BY queue
        )
        SELECT coalesce(p.queue, r.queue, q.queue) AS queue,
               coalesce(p.due, 0) AS due, coalesce(p.scheduled, 0) AS scheduled,
               coalesce(r.running, 0) AS running, coalesce(r.reserved, 0) AS reserved,
               extract(epoch FROM now() - p.oldest_due)::float8 AS oldest_due_wait_seconds,
               coalesce(q.paused, false) AS paused
        FROM pending p
        FULL JOIN processing r ON r.queue = p.queue
        FULL JOIN task_queues q ON q.queue = coalesce(p.queue, r.queue)
        ORDER BY 1
        """
    ).fetchall()


def task_queue_set_paused(conn: psycopg.Connection, *, queue: str, paused: bool, by: str | None) -> dict:
    """task_queue_set_paused: pause or resume a queue (workers see it within a second; a resume
    also wakes idle workers)."""
    return conn.execute(
        """
        INSERT INTO task_queues (queue, paused, changed_by) VALUES (%(queue)s, %(paused)s, %(by)s)
        ON CONFLICT (queue) DO UPDATE SET paused = excluded.paused, changed_at = now(), changed_by = excluded.changed_by
        RETURNING queue, paused, changed_at, changed_by,
                  CASE WHEN NOT paused THEN pg_notify(%(channel)s, '') END AS notified
        """,
        {"queue": queue, "paused": paused, "by": by, "channel": PENDING_CHANNEL},
    ).fetchone()


def task_queues_paused(conn: psycopg.Connection) -> list[str]:
    """task_queues_paused: the queues no worker may claim from."""
    return [r["queue"] for r in conn.execute("SELECT queue FROM task_queues WHERE paused ORDER BY queue")]


def task_pending_queues(conn: psycopg.Connection) -> list[str]:
    """task_pending_queues: every queue with a pending task, by a skip scan of
    tasks_claim_queue_idx (one probe per queue, however many tasks each holds)."""
    rows = conn.execute(
        """
        WITH RECURSIVE queues AS (
            (SELECT queue FROM tasks WHERE status = 'pending' AND queue IS NOT NULL ORDER BY queue LIMIT 1)
            UNION ALL
            SELECT (SELECT t.queue FROM tasks t
                    WHERE t.status = 'pending' AND t.queue IS NOT NULL AND t.queue > queues.queue
                    ORDER BY t.queue LIMIT 1)
            FROM queues WHERE queues.queue IS NOT NULL
        )
        SELECT queue FROM queues WHERE queue IS NOT NULL
        """
    ).fetchall()
    return [r["queue"] for r in rows]


def task_health_get(conn: psycopg.Connection) -> dict:
    """task_health_get: the one row of the task_health view."""
    return conn.execute("SELECT * FROM task_health").fetchone()


def task_failures_recent(conn: psycopg.Connection, *, limit: int = 20) -> list[dict]:
    """task_failures_recent: the newest failed attempts (task_failures), with the task's
    traceback of its latest failure."""
    return conn.execute(
        """
        SELECT f.*, t.error_traceback FROM (SELECT * FROM task_failures LIMIT %(limit)s) f
        JOIN tasks t ON t.id = f.task_id
        ORDER BY f.finished_at DESC
        """,
        {"limit": limit},
    ).fetchall()


def task_failure_counts(conn: psycopg.Connection, *, minutes: int = 60) -> list[dict]:
    """task_failure_counts: failed, timed out, crashed and lost attempts of the last `minutes`,
    per task type and outcome (through task_attempts_failures_idx)."""
    return conn.execute(
        """
        SELECT task_type, outcome, count(*)::int AS n FROM task_failures
        WHERE finished_at > now() - make_interval(mins => %(minutes)s)
        GROUP BY 1, 2 ORDER BY 1, 2
        """,
        {"minutes": minutes},
    ).fetchall()


def task_invariant_violation_count(conn: psycopg.Connection) -> int:
    """task_invariant_violation_count: rows of the self-audit (task_invariant_violations)."""
    return conn.execute("SELECT count(*) AS n FROM task_invariant_violations").fetchone()["n"]


def tasks_running_list(conn: psycopg.Connection, *, limit: int = 50) -> list[dict]:
    """tasks_running_list: tasks processing now (running first, then reserved), oldest start
    first, with their progress."""
    return conn.execute(
        f"""
        SELECT {_TASK_COLUMNS}, worker_id, lease_expires_at FROM tasks
        WHERE status = 'processing'
        ORDER BY started_at NULLS LAST, id
        LIMIT %(limit)s
        """,
        {"limit": limit},
    ).fetchall()


@dataclass(frozen=True)
class Throughput:
    """What one worker finished in one minute for one queue and task type (task_throughput)."""

    queue: str
    task_type: str
    completed: int
    failed: int
    run_seconds: float


def task_throughput_add(conn: psycopg.Connection, *, worker_id: str, rows: Sequence[Throughput]) -> None:
    """task_throughput_add: add to this minute's rows (database clock) what the worker finished
    since its last call."""
    if not rows:
        return
    conn.execute(
        """
        INSERT INTO task_throughput AS t (minute, queue, task_type, worker_id, completed, failed, run_seconds)
        SELECT date_trunc('minute', now()), r.queue, r.task_type, %(worker)s, r.completed, r.failed, r.seconds
        FROM unnest(%(queues)s::text[], %(types)s::text[], %(completed)s::int[], %(failed)s::int[],
                    %(seconds)s::float8[]) AS r(queue, task_type, completed, failed, seconds)
        ON CONFLICT (minute, queue, task_type, worker_id) DO UPDATE
        SET completed = t.completed + excluded.completed, failed = t.failed + excluded.failed,
            run_seconds = t.run_seconds + excluded.run_seconds
        """,
        {
            "worker": worker_id,
            "queues": [r.queue for r in rows],
            "types": [r.task_type for r in rows],
            "completed": [r.completed for r in rows],
            "failed": [r.failed for r in rows],
            "seconds": [r.run_seconds for r in rows],
        },
    )


def task_throughput_recent(conn: psycopg.Connection, *, minutes: int = 60) -> list[dict]:
    """task_throughput_recent: per minute and queue, attempts completed and failed over the last
    `minutes` minutes (a range of task_throughput's primary key)."""
    return conn.execute(
        """
        SELECT minute, queue, sum(completed)::int AS completed, sum(failed)::int AS failed,
               sum(run_seconds) AS run_seconds
        FROM task_throughput
        WHERE minute >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s)
        GROUP BY minute, queue ORDER BY minute, queue
        """,
        {"minutes": minutes},
    ).fetchall()


def task_throughput_prune(conn: psycopg.Connection, *, older_than_seconds: float) -> int:
    """task_throughput_prune: forget the minutes older than this."""
    return conn.execute(
        "DELETE FROM task_throughput WHERE minute < now() - make_interval(secs => %(age)s)",
        {"age": older_than_seconds},
    ).rowcount


# --- clients waiting on tasks (task_watchers): long-polls and event streams ------------------


def task_watch(conn: psycopg.Connection, *, task_ids: Sequence[int], watcher: str) -> None:
    """task_watch: this API process waits on these tasks: changes to them are announced (NOTIFY
    skiplock_task_changed). Refreshes `since` of those it already watched."""
    conn.execute(
        """
        INSERT INTO task_watchers (task_id, watcher) SELECT unnest(%(ids)s::bigint[]), %(watcher)s
        ON CONFLICT (task_id, watcher) DO UPDATE SET since = now()
        """,
        {"ids": list(task_ids), "watcher": watcher},
    )


def task_unwatch(conn: psycopg.Connection, *, task_ids: Sequence[int], watcher: str) -> None:
    """task_unwatch: nobody in this API process waits on these tasks any more."""
    conn.execute(
        "DELETE FROM task_watchers WHERE task_id = ANY(%(ids)s::bigint[]) AND watcher = %(watcher)s",
        {"ids": list(task_ids), "watcher": watcher},
    )


def task_watchers_prune(conn: psycopg.Connection, *, older_than_seconds: float) -> int:
    """task_watchers_prune: forget watches not refreshed for this long (their API process died,
    or lost its connection before it could say it stopped waiting)."""
    return conn.execute(
        "DELETE FROM task_watchers WHERE since < now() - make_interval(secs => %(age)s)",
        {"age": older_than_seconds},
    ).rowcount


def task_states(conn: psycopg.Connection, task_ids: Sequence[int]) -> dict[int, tuple]:
    """task_states: (status, progress, attempts) of these tasks, by id (by primary key)."""
    rows = conn.execute(
        "SELECT id, status::text AS status, progress, attempts FROM tasks WHERE id = ANY(%(ids)s::bigint[])",
        {"ids": list(task_ids)},
    ).fetchall()
    return {r["id"]: (r["status"], r["progress"], r["attempts"]) for r in rows}


def api_secret(conn: psycopg.Connection, *, name: str, candidate: bytes) -> bytes:
    """api_secret: the shared secret of this name, made of `candidate` if there is none yet
    (the first process to ask wins; every other gets the same)."""
    return conn.execute(
        """
        WITH made AS (
            INSERT INTO api_secrets (name, value) VALUES (%(name)s, %(candidate)s)
            ON CONFLICT (name) DO NOTHING RETURNING value
        )
        SELECT value FROM made UNION ALL SELECT value FROM api_secrets WHERE name = %(name)s
        LIMIT 1
        """,
        {"name": name, "candidate": candidate},
    ).fetchone()["value"]


# --- webhooks (webhook_deliveries, webhook_attempts, webhook_secrets) --------------------------

# Tries a sender has begun and not recorded are closed with this when the delivery is taken again.
_LAPSED_TRY = "the sender stopped before recording an answer (it died, froze or lost its connection)"


def webhook_secret(conn: psycopg.Connection, *, owner_key_id: int | None, candidate: str) -> str:
    """webhook_secret: the secret that signs this key's webhooks (None: auth off), made of
    `candidate` if it has none yet (the first to ask wins)."""
    return conn.execute(
        """
        WITH made AS (
            INSERT INTO webhook_secrets (owner_key_id, secret) VALUES (coalesce(%(owner)s, 0), %(candidate)s)
            ON CONFLICT (owner_key_id) DO NOTHING RETURNING secret
        )
        SELECT secret FROM made
        UNION ALL SELECT secret FROM webhook_secrets WHERE owner_key_id = coalesce(%(owner)s, 0)
        LIMIT 1
        """,
        {"owner": owner_key_id, "candidate": candidate},
    ).fetchone()["secret"]


def webhook_deliveries_claim(
    conn: psycopg.Connection, *, sender: str, limit: int, lease_seconds: float, max_attempts: int
) -> list[dict]:
    """webhook_deliveries_claim: take up to `limit` due deliveries to send now, oldest due first,
    skipping those another sender holds. Each gets a try (webhook_attempts, begun now) and is due
    again when the lease ends: a sender that dies mid-send leaves it to the next one (same
    webhook-id: at least once). A try begun earlier and never recorded is closed as lapsed; a
    delivery whose tries are all used up by lapsed ones is dead. Returns id, task_id, url,
    payload, attempt and the secret that signs it (NULL: the owner's key has none yet)."""
    return conn.execute(
        f"""
        WITH due AS (
            SELECT id, attempts, coalesce(max_attempts, %(max)s) AS allowed
            FROM webhook_deliveries
            WHERE status = 'pending' AND next_attempt_at <= now()
            ORDER BY next_attempt_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ), lapsed AS (
            UPDATE webhook_attempts a SET error = '{_LAPSED_TRY}'
            FROM due
            WHERE a.delivery_id = due.id AND a.attempt = due.attempts
              AND a.latency_ms IS NULL AND a.error IS NULL
        ), exhausted AS (
            UPDATE webhook_deliveries d SET status = 'dead', last_error = '{_LAPSED_TRY}'
            FROM due WHERE d.id = due.id AND due.attempts >= due.allowed
        ), claimed AS (
            UPDATE webhook_deliveries d
            SET attempts = d.attempts + 1, sender = %(sender)s,
                next_attempt_at = now() + make_interval(secs => %(lease)s)
            FROM due WHERE d.id = due.id AND due.attempts < due.allowed
            RETURNING d.id, d.task_id, d.owner_key_id, d.url, d.payload, d.attempts AS attempt
        ), tried AS (
            INSERT INTO webhook_attempts (delivery_id, attempt, sender, started_at)
            SELECT id, attempt, %(sender)s, now() FROM claimed
        )
        SELECT c.*, coalesce(s.secret, k.secret) AS secret
        FROM claimed c
        LEFT JOIN task_callback_secrets s ON s.task_id = c.task_id
        LEFT JOIN webhook_secrets k ON k.owner_key_id = coalesce(c.owner_key_id, 0)
        ORDER BY c.id
        """,
        {"sender": sender, "limit": limit, "lease": lease_seconds, "max": max_attempts},
    ).fetchall()


@dataclass(frozen=True)
class WebhookTry:
    """How one try of a delivery went (webhook_deliveries_record)."""

    delivery_id: int
    attempt: int
    latency_ms: float
    status_code: int | None  # None: no answer
    error: str | None  # None: a 2xx


def webhook_deliveries_record(
    conn: psycopg.Connection,
    *,
    sender: str,
    tries: Sequence[WebhookTry],
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
) -> None:
    """webhook_deliveries_record: record tries this sender made: each in webhook_attempts, and
    its delivery delivered (2xx), dead (no tries left) or due again after the backoff (base *
    2^(try - 1), jittered ±25%, at most max). A delivery another sender took meanwhile (this
    one's lease ran out) keeps its new state; the try is still recorded."""
    if not tries:
        return
    conn.execute(
        """
        WITH r AS (
            SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(latencies)s::real[],
                                 %(codes)s::int[], %(errors)s::text[])
                AS r(id, attempt, latency_ms, status_code, error)
        ), logged AS (
            UPDATE webhook_attempts a
            SET latency_ms = r.latency_ms, status_code = r.status_code, error = r.error
            FROM r WHERE a.delivery_id = r.id AND a.attempt = r.attempt
        )
        UPDATE webhook_deliveries d
        SET status = CASE WHEN r.error IS NULL THEN 'delivered'
                          WHEN d.attempts >= coalesce(d.max_attempts, %(max)s) THEN 'dead'
                          ELSE 'pending' END::webhook_delivery_status,
            delivered_at = CASE WHEN r.error IS NULL THEN now() END,
            next_attempt_at = CASE WHEN r.error IS NULL THEN d.next_attempt_at
                                   ELSE now() + make_interval(secs =>
                                       least(%(backoff_max)s, %(backoff_base)s * power(2, d.attempts - 1))
                                       * (0.75 + 0.5 * random())) END,
            last_status_code = r.status_code, last_error = r.error
        FROM r
        WHERE d.id = r.id AND d.attempts = r.attempt AND d.sender = %(sender)s AND d.status = 'pending'
        """,
        {
            "ids": [t.delivery_id for t in tries],
            "attempts": [t.attempt for t in tries],
            "latencies": [t.latency_ms for t in tries],
            "codes": [t.status_code for t in tries],
            "errors": [storable_text(t.error) for t in tries],
            "sender": sender,
            "max": max_attempts,
            "backoff_base": backoff_base,
            "backoff_max": backoff_max,
        },
    )


_DELIVERY_COLUMNS = (
    "d.id, d.task_id, d.url, d.event, d.status::text AS status, d.attempts, d.max_attempts, "
    "d.next_attempt_at, d.created_at, d.delivered_at, d.last_status_code, d.last_error"
)
# A client key sees the deliveries of its own tasks only (owner given); an admin, or auth off, all.
_OWNED_DELIVERY = "(%(owner)s::bigint IS NULL OR d.owner_key_id = %(owner)s)"


def webhook_deliveries_of_task(conn: psycopg.Connection, task_id: int, *, owner: int | None) -> list[dict]:
    """webhook_deliveries_of_task: a task's deliveries, oldest first, each with its tries."""
    return conn.execute(
        f"""
        SELECT {_DELIVERY_COLUMNS},
               coalesce((SELECT jsonb_agg(jsonb_build_object(
                                'attempt', a.attempt, 'sender', a.sender, 'started_at', a.started_at,
                                'latency_ms', a.latency_ms, 'status_code', a.status_code, 'error', a.error)
                            ORDER BY a.attempt)
                         FROM webhook_attempts a WHERE a.delivery_id = d.id), '[]') AS tries
        FROM webhook_deliveries d
        WHERE d.task_id = %(task_id)s AND {_OWNED_DELIVERY}
        ORDER BY d.id
        """,
        {"task_id": task_id, "owner": owner},
    ).fetchall()


def webhook_resend(
    conn: psycopg.Connection, delivery_id: int, *, owner: int | None, max_attempts: int
) -> tuple[bool, dict | None]:
    """webhook_resend: send a delivered or dead delivery again, now, with `max_attempts` more
    tries (same webhook-id and body). Returns (resent, the delivery): (False, None) if there is
    no such delivery (for this owner), (False, it) if it is still pending (it will be sent)."""
    row = conn.execute(
        f"""
        UPDATE webhook_deliveries d
        SET status = 'pending', next_attempt_at = now(), delivered_at = NULL,
            max_attempts = d.attempts + %(max)s
        WHERE d.id = %(id)s AND d.status <> 'pending' AND {_OWNED_DELIVERY}
        RETURNING {_DELIVERY_COLUMNS}
        """,
        {"id": delivery_id, "owner": owner, "max": max_attempts},
    ).fetchone()
    if row is not None:
        return True, row
    return False, conn.execute(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.id = %(id)s AND {_OWNED_DELIVERY}",
        {"id": delivery_id, "owner": owner},
    ).fetchone()


def database_ping(conn: psycopg.Connection) -> None:
    """database_ping: the cheapest round trip, for readiness checks."""
    conn.execute("SELECT 1")


# --- Workers ---------------------------------------------------------------------------------


# task_claim's statements, at module level so the query-plan tests EXPLAIN exactly this text.
# Both lock the rows they pick (SKIP LOCKED) and hand them to the same UPDATE.
_CLAIM_UPDATE = (
    """, claimed AS (
UPDATE tasks t
SET status = 'processing', attempts = t.attempts + 1, worker_id = %(worker_id)s,
    -- a row a DBA set back to pending with no attempts left gets one more, not a CHECK error
    max_attempts = greatest(t.max_attempts, t.attempts + 1),
    -- reserved, not started: the worker marks it started when a process begins running it
    started_at = NULL, progress = NULL,
    lease_expires_at = now() + make_interval(secs => %(lease)s)
FROM next
WHERE t.id = next.id
RETURNING t.id, t.task_type, t.queue, t.input, t.attempts, t.max_attempts, t.timeout_seconds,
          t.priority, t.run_at, t.callback_url IS NOT NULL AS has_callback
), """
    + _announce("claimed", "false")
    + f"""
SELECT * FROM claimed WHERE {_ANNOUNCED}
"""
)

# A worker of every queue walks tasks_claim_idx in claim order.
TASK_CLAIM_SQL = (
    """
WITH next AS (
    SELECT id FROM tasks
    WHERE status = 'pending' AND run_at <= now()
      AND (%(types)s::text[] IS NULL OR task_type = ANY(%(types)s::text[]))
    ORDER BY priority DESC, run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)"""
    + _CLAIM_UPDATE
)

# A worker of some queues probes tasks_claim_queue_idx once per queue, in claim order, and keeps
# the best `limit` of what the probes found. Filtering tasks_claim_idx by queue instead walks
# every pending row of the other queues first: with 500,000 tasks waiting in another queue the
# planner chose a scan of the whole table, 40 ms per claim, even for an empty queue. Each probe
# names its queue as a parameter of its own (not a join to an array), so the planner sees the
# value and its statistics and takes the queue's index; with a join it could not tell a rare
# queue from a common one and sometimes walked tasks_claim_idx through the backlog.
# (A sub-select of its own: UNION does not take FOR UPDATE directly.)
_CLAIM_QUEUE_PROBE = """SELECT * FROM (
        SELECT id, priority, run_at FROM tasks
        WHERE status = 'pending' AND queue = %(queue_{n})s AND run_at <= now()
          AND (%(types)s::text[] IS NULL OR task_type = ANY(%(types)s::text[]))
        ORDER BY priority DESC, run_at, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS probe_{n}"""


@functools.cache
def task_claim_from_queues_sql(queue_count: int) -> str:
    """The claim of a worker of `queue_count` queues (parameters queue_0, queue_1, ...). Rows a
    probe locks beyond the final `limit` stay pending; their lock ends with the statement."""
    probes = "\n    UNION ALL\n    ".join(_CLAIM_QUEUE_PROBE.format(n=n) for n in range(queue_count))
    return (
        f"""
WITH next AS (
    SELECT id FROM (
    {probes}
    ) AS probes
    ORDER BY priority DESC, run_at, id
    LIMIT %(limit)s
)"""
        + _CLAIM_UPDATE
    )


def task_claim_statement(queues: Sequence[str] | None) -> tuple[str, dict]:
    """The statement task_claim runs for a worker of these queues (None or empty: every queue),
    with its queue parameters."""
    if not queues:
        return TASK_CLAIM_SQL, {}
    distinct = list(dict.fromkeys(queues))
    return task_claim_from_queues_sql(len(distinct)), {f"queue_{n}": q for n, q in enumerate(distinct)}


def task_claim(
    conn: psycopg.Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    task_types: Sequence[str] | None = None,
) -> list[ClaimedTask]:
    """task_claim: take up to `limit` due pending tasks of the given queues and types (None: any),
    highest priority then oldest first, skipping rows other workers hold; mark them processing under a fresh lease. Commits at once.

    Never prepared (prepare=False): an unnamed statement is planned with the actual parameters
    every time, so a plan cached while the table was empty can never turn into a full scan."""
    statement, queue_params = task_claim_statement(queues)
    rows = conn.execute(
        statement,
        {
            **queue_params,
            "types": list(task_types) if task_types else None,
            "limit": limit,
            "worker_id": worker_id,
            "lease": lease_seconds,
        },
        prepare=False,
    ).fetchall()
    tasks = [
        ClaimedTask(
            id=r["id"],
            task_type=r["task_type"],
            queue=r["queue"],
            input=r["input"],
            attempt=r["attempts"],
            max_attempts=r["max_attempts"],
            timeout_seconds=r["timeout_seconds"],
            priority=r["priority"],
            run_at=r["run_at"],
            has_callback=r["has_callback"],
        )
        for r in rows
    ]
    # RETURNING has no order; run them in claim order.
    tasks.sort(key=lambda t: (-t.priority, t.run_at, t.id))
    return tasks


# At most this many distinct priorities are visited (one index probe each); scheduled tasks
# below them are left to the worker's poll.
NEXT_DUE_MAX_PRIORITIES = 64

TASK_NEXT_DUE_SQL = """
WITH RECURSIVE levels AS (
    -- The distinct priorities of pending tasks, highest first: one probe of tasks_claim_idx
    -- each (a skip scan), however many tasks share a priority.
    (SELECT priority, 1 AS n FROM tasks WHERE status = 'pending' ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT t.priority FROM tasks t
            WHERE t.status = 'pending' AND t.priority < levels.priority
            ORDER BY t.priority DESC LIMIT 1),
           levels.n + 1
    FROM levels
    WHERE levels.priority IS NOT NULL AND levels.n < %(max_priorities)s
)
SELECT extract(epoch FROM min(due.run_at) - now())::float8 AS due_in
FROM levels
CROSS JOIN LATERAL (
    SELECT t.run_at FROM tasks t
    WHERE t.status = 'pending' AND t.priority = levels.priority AND t.run_at > now()
    ORDER BY t.run_at LIMIT 1
) due
"""


def task_next_due_in(conn: psycopg.Connection) -> float | None:
    """task_next_due_in: seconds until the earliest scheduled task (pending, run_at in the
    future: delayed, or waiting out a retry backoff) falls due; None if there is none.

    Walks tasks_claim_idx by priority, so its cost does not grow with the number of scheduled
    tasks. Not filtered by queue or task type (that would walk other queues' rows): a worker
    serving some queues only may wake for another queue's task and find nothing, one claim."""
    row = conn.execute(TASK_NEXT_DUE_SQL, {"max_priorities": NEXT_DUE_MAX_PRIORITIES}).fetchone()
    return row["due_in"]


# The fence every worker write goes through: the rows (id, attempt) in `refs` that this worker
# still holds, locked for the statement. SKIP LOCKED: a row someone else has locked (a DBA's
# session, a cancel in flight) is left out rather than waited for, so one locked row never stalls
# a worker's whole batch; task_held_ids tells such rows from rows that are no longer ours.
#
# Rows are reached by primary key, one probe per ref: the LATERAL subquery makes that the only
# plan. Joined plainly, a batch of ~1,000 refs on a table of ~100k rows was planned as a scan of
# the whole table (the filter below looks very selective to the planner): 250 ms instead of
# 20. `status::text` keeps the planner off tasks_processing_idx: between vacuums that partial
# index fills with entries of rows that are no longer processing.
_HELD = """
    held AS (
        SELECT t.id, t.attempts FROM refs r
        CROSS JOIN LATERAL (
            SELECT t.id, t.attempts FROM tasks t
            WHERE t.id = r.id AND t.attempts = r.attempt AND t.worker_id = %(worker_id)s
              AND t.status::text = 'processing'
            FOR UPDATE OF t SKIP LOCKED
        ) t
    )"""


def _ref_params(worker_id: str, refs: Sequence[AttemptRef], **extra) -> dict:
    return {
        "ids": [r.task_id for r in refs],
        "attempts": [r.attempt for r in refs],
        "worker_id": worker_id,
        **extra,
    }


def _started_ago(refs: Sequence[AttemptRef], started_ago: Mapping[AttemptRef, float] | None) -> list:
    """Per ref, seconds since its process started it (None: not known here, or never started)."""
    started_ago = started_ago or {}
    return [started_ago.get(ref) for ref in refs]


# When an attempt started, on the database clock: the worker sends how long ago (measured on its
# own monotonic clock), never a time of its own, so a worker whose clock is off changes nothing.
# A start already recorded is kept.
_STARTED_AT = "coalesce(t.started_at, now() - make_interval(secs => coalesce(r.started_ago, 0)))"


def task_held_ids(conn: psycopg.Connection, *, worker_id: str, refs: Iterable[AttemptRef]) -> set[int]:
    """task_held_ids: which of these attempts this worker still holds (a plain read: takes no
    lock, waits for none). After a fenced write skipped rows, tells "locked, try again later"
    from "no longer ours"."""
    refs = list(refs)
    if not refs:
        return set()
    rows = conn.execute(
        """
        SELECT t.id FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS r(id, attempt)
        CROSS JOIN LATERAL (  -- one primary-key probe per ref, as in _HELD
            SELECT t.id FROM tasks t
            WHERE t.id = r.id AND t.attempts = r.attempt AND t.worker_id = %(worker_id)s
              AND t.status::text = 'processing'
            LIMIT 1  -- one row per id anyway; it keeps the planner from flattening this into a join
        ) t
        """,
        _ref_params(worker_id, refs),
    ).fetchall()
    return {r["id"] for r in rows}


def task_start_many(
    conn: psycopg.Connection, *, worker_id: str, started_ago: Mapping[AttemptRef, float]
) -> set[int]:
    """task_start_many: record that these attempts started running (seconds ago), which charges
    them: from now on a rescue counts them as lost, not released. Returns the ids still held
    (whether or not their start was already recorded)."""
    refs = list(started_ago)
    if not refs:
        return set()
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(started_ago)s::float8[])
                AS r(id, attempt, started_ago)
        ), {_HELD}, marked AS (
            UPDATE tasks t SET started_at = {_STARTED_AT}
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id AND t.started_at IS NULL
        )
        SELECT id FROM held
        """,
        _ref_params(worker_id, refs, started_ago=_started_ago(refs, started_ago)),
    ).fetchall()
    return {r["id"] for r in rows}


def task_complete_many(
    conn: psycopg.Connection,
    *,
    worker_id: str,
    results: Iterable[tuple[AttemptRef, str]],
    started_ago: Mapping[AttemptRef, float] | None = None,
) -> set[int]:
    """task_complete_many: store results (JSON text) of attempts this worker still holds and log
    the attempts; returns the ids written. Ids missing from the answer were fenced out (or were
    locked by another session: see task_held_ids). An attempt whose start was not recorded yet
    (a short task) gets it from started_ago."""
    results = list(results)
    if not results:
        return set()
    refs = [ref for ref, _ in results]
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(results)s::jsonb[],
                                 %(started_ago)s::float8[])
                AS r(id, attempt, result, started_ago)
        ), {_HELD}, completed AS (
            UPDATE tasks t
            SET status = 'completed', result = r.result, error = NULL, error_traceback = NULL,
                progress = 1, finished_at = now(), lease_expires_at = NULL, started_at = {_STARTED_AT}
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id, t.attempts, t.started_at, {_HOOK_COLUMNS}
        ), logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at)
            SELECT id, attempts, %(worker_id)s, 'completed', started_at FROM completed
        ), {_outbox("completed")}, {_announce("completed", "true")}
        SELECT id FROM completed WHERE {_ANNOUNCED}
        """,
        _ref_params(
            worker_id,
            refs,
            results=[result for _, result in results],
            started_ago=_started_ago(refs, started_ago),
        ),
    ).fetchall()
    return {r["id"] for r in rows}


# Shared by failures and rescues: retry after exponential backoff with ±25% jitter, computed on
# the database clock, or fail for good once max_attempts is used up.
_RETRY_OR_FAIL = """
    status = CASE WHEN t.attempts >= t.max_attempts THEN 'failed' ELSE 'pending' END::task_status,
    run_at = CASE WHEN t.attempts >= t.max_attempts THEN t.run_at
                  ELSE now() + make_interval(secs =>
                      least(%(backoff_max)s, %(backoff_base)s * power(2, t.attempts - 1))
                      * (0.75 + 0.5 * random()))
             END,
    finished_at = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
    lease_expires_at = NULL
"""


def task_fail_many(
    conn: psycopg.Connection,
    *,
    worker_id: str,
    failures: Iterable[AttemptFailure],
    backoff_base: float,
    backoff_max: float,
    started_ago: Mapping[AttemptRef, float] | None = None,
) -> dict[int, str]:
    """task_fail_many: end attempts that failed (raised, timed out, crashed): retry after backoff
    or fail for good; log the attempts. Returns {id: new status} for the attempts still held."""
    failures = list(failures)
    if not failures:
        return {}
    refs = [AttemptRef(f.task_id, f.attempt) for f in failures]
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[],
                                 %(outcomes)s::task_attempt_outcome[], %(errors)s::text[],
                                 %(tracebacks)s::text[], %(started_ago)s::float8[])
                AS r(id, attempt, outcome, error, traceback, started_ago)
        ), {_HELD}, ended AS (
            UPDATE tasks t
            SET {_RETRY_OR_FAIL}, error = r.error, error_traceback = r.traceback,
                started_at = {_STARTED_AT}
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id, t.attempts, t.started_at, t.status, r.outcome, r.error, {_HOOK_COLUMNS}
        ), logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
            SELECT id, attempts, %(worker_id)s, outcome, started_at, error FROM ended
        ), {_outbox("ended")}, {_announce("ended", _NOW_FINAL)}
        SELECT id, status::text AS status FROM ended WHERE {_ANNOUNCED}
        """,
        _ref_params(
            worker_id,
            refs,
            outcomes=[f.outcome for f in failures],
            errors=[storable_text(f.error) for f in failures],
            tracebacks=[storable_text(f.traceback) for f in failures],
            started_ago=_started_ago(refs, started_ago),
            backoff_base=backoff_base,
            backoff_max=backoff_max,
        ),
    ).fetchall()
    return {r["id"]: r["status"] for r in rows}


def task_hand_back_many(
    conn: psycopg.Connection,
    *,
    worker_id: str,
    refs: Iterable[AttemptRef],
    started_ago: Mapping[AttemptRef, float] | None = None,
) -> set[int]:
    """task_hand_back_many: a stopping worker returns tasks to pending, due now, in one statement
    and uncounted: handed_back if a process had started them (started_ago, or a recorded start),
    released if they never started. The next attempt reuses the number: safe for fencing because
    only an exiting worker hands back (after killing its processes), and the next claim is made
    under another worker_id."""
    refs = list(refs)
    if not refs:
        return set()
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(started_ago)s::float8[])
                AS r(id, attempt, started_ago)
        ), {_HELD}, returned AS (
            UPDATE tasks t
            SET status = 'pending', attempts = t.attempts - 1, lease_expires_at = NULL,
                progress = NULL,
                started_at = CASE WHEN r.started_ago IS NULL THEN t.started_at ELSE {_STARTED_AT} END
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id, r.attempt, t.started_at
        ), logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
            SELECT id, attempt, %(worker_id)s,
                   CASE WHEN started_at IS NULL THEN 'released' ELSE 'handed_back' END::task_attempt_outcome,
                   started_at,
                   CASE WHEN started_at IS NULL THEN 'worker shut down before starting it'
                        ELSE 'worker shut down' END
            FROM returned
        ), {_announce("returned", "false")}
        SELECT id, pg_notify(%(channel)s, '') AS notified FROM returned WHERE {_ANNOUNCED}
        """,
        _ref_params(worker_id, refs, started_ago=_started_ago(refs, started_ago), channel=PENDING_CHANNEL),
    ).fetchall()
    return {r["id"] for r in rows}


def task_progress_many(
    conn: psycopg.Connection, *, worker_id: str, progress: Iterable[tuple[AttemptRef, float]]
) -> None:
    """task_progress_many: record reported progress of attempts this worker still holds."""
    progress = list(progress)
    if not progress:
        return
    conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(values)s::real[])
                AS r(id, attempt, progress)
        ), {_HELD}, progressed AS (
            UPDATE tasks t SET progress = r.progress
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id
        ), {_announce("progressed", "false")}
        SELECT count(*) FROM progressed WHERE {_ANNOUNCED}
        """,
        _ref_params(worker_id, [ref for ref, _ in progress], values=[value for _, value in progress]),
    )


def task_lease_renew(
    conn: psycopg.Connection, *, worker_id: str, refs: Iterable[AttemptRef], lease_seconds: float
) -> set[int]:
    """task_lease_renew: extend the leases this worker still holds; returns their ids. A task
    missing from the answer was cancelled or rescued (its attempt must be abandoned), or is
    locked by another session right now (task_held_ids tells which)."""
    refs = list(refs)
    if not refs:
        return set()
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS r(id, attempt)
        ), {_HELD}
        UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => %(lease)s)
        FROM held h
        WHERE t.id = h.id
        RETURNING t.id
        """,
        _ref_params(worker_id, refs, lease=lease_seconds),
    ).fetchall()
    return {r["id"] for r in rows}


def task_prune(conn: psycopg.Connection, *, older_than_seconds: float, limit: int) -> int:
    """task_prune: delete up to `limit` tasks that finished (completed, failed, cancelled) more
    than older_than_seconds ago, oldest first, with their attempts; returns how many."""
    return conn.execute(
        """
        WITH doomed AS (
            SELECT id FROM tasks
            WHERE status IN ('completed', 'failed', 'cancelled')
              AND finished_at < now() - make_interval(secs => %(age)s)
            ORDER BY finished_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM tasks t USING doomed WHERE t.id = doomed.id
        """,
        {"age": older_than_seconds, "limit": limit},
    ).rowcount


# Workers whose session ended more than the grace ago: their advisory lock is free right now
# (checked again here, so a worker that reconnected meanwhile keeps its tasks). Sessions older
# than the server are left to their leases: after a restart every worker is reconnecting.
_DEAD_WORKERS = """
    dead AS (
        SELECT worker_id FROM task_workers
        WHERE gone_at < now() - make_interval(secs => %(grace)s)
          AND connected_at >= pg_postmaster_start_time()
          AND pg_try_advisory_xact_lock(lock_key)
    )"""

TASK_RESCUE_SQL = f"""
WITH {_DEAD_WORKERS}, doomed AS (
    SELECT t.id, t.worker_id IN (SELECT worker_id FROM dead) AS worker_died
    FROM tasks t
    WHERE t.status = 'processing'
      AND (t.lease_expires_at < now() OR t.worker_id IN (SELECT worker_id FROM dead))
    ORDER BY t.id
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
), released AS (
    UPDATE tasks t
    SET status = 'pending', attempts = t.attempts - 1, lease_expires_at = NULL, progress = NULL
    FROM doomed d
    WHERE t.id = d.id AND t.started_at IS NULL
    RETURNING t.id, t.attempts + 1 AS attempt, t.worker_id, d.worker_died, t.task_type, t.queue
), lost AS (
    UPDATE tasks t
    SET {_RETRY_OR_FAIL},
        error = CASE WHEN d.worker_died
                     THEN 'worker ' || t.worker_id || ' died (its database session ended)'
                     ELSE 'lease expired: worker ' || t.worker_id
                          || ' stopped renewing it (died, froze or lost its connection)' END,
        error_traceback = NULL
    FROM doomed d
    WHERE t.id = d.id AND t.started_at IS NOT NULL
    RETURNING t.id, t.attempts, t.worker_id, t.started_at, t.status, t.error, t.task_type, t.queue,
              {_HOOK_COLUMNS}
), {_outbox("lost")}, logged AS (
    INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
    SELECT id, attempts, worker_id, 'lost'::task_attempt_outcome, started_at, error FROM lost
    UNION ALL
    SELECT id, attempt, worker_id, 'released'::task_attempt_outcome, NULL,
           CASE WHEN worker_died THEN 'worker ' || worker_id || ' died before starting it'
                ELSE 'lease expired before worker ' || worker_id || ' started it' END
    FROM released
), rescued AS (
    SELECT id, status::text AS status, 'lost' AS outcome, task_type, queue FROM lost
    UNION ALL
    SELECT id, 'pending', 'released', task_type, queue FROM released
), {_announce("rescued", _NOW_FINAL)}
SELECT * FROM rescued WHERE {_ANNOUNCED}
"""


def task_rescue(
    conn: psycopg.Connection, *, limit: int, grace_seconds: float, backoff_base: float, backoff_max: float
) -> list[dict]:
    """task_rescue: take back up to `limit` processing tasks whose lease lapsed (their worker
    froze, was cut off or died unseen) or whose worker's session ended more than grace_seconds
    ago (task_workers_mark_gone). A task that had started counts a lost attempt and is retried
    after its backoff, or failed; one that had not is released: pending again, due now,
    uncounted. Returns a row per task: id, status (new), outcome (lost or released), task_type,
    queue."""
    return conn.execute(
        TASK_RESCUE_SQL,
        {"limit": limit, "grace": grace_seconds, "backoff_base": backoff_base, "backoff_max": backoff_max},
    ).fetchall()


# --- the worker registry (task_workers): a dead worker's tasks are taken back at once ---------


def task_worker_register(
    conn: psycopg.Connection,
    *,
    worker_id: str,
    lock_key: int,
    session_pid: int,
    host: str,
    pid: int,
    version: str,
    queues: Sequence[str] | None,
    concurrency: int,
    lease_seconds: float,
    rescue_interval_seconds: float,
) -> None:
    """task_worker_register: this worker is alive for as long as the session `session_pid` holds
    the advisory lock `lock_key` (take it first). Called on every (re)connection."""
    conn.execute(
        """
        INSERT INTO task_workers (worker_id, host, pid, version, queues, concurrency, lease_seconds,
                                  rescue_interval_seconds, lock_key, session_pid)
        VALUES (%(worker_id)s, %(host)s, %(pid)s, %(version)s, %(queues)s, %(concurrency)s,
                %(lease)s, %(rescue)s, %(lock_key)s, %(session_pid)s)
        ON CONFLICT (worker_id) DO UPDATE
        SET lock_key = excluded.lock_key, session_pid = excluded.session_pid,
            connected_at = now(), gone_at = NULL
        """,
        {
            "worker_id": worker_id,
            "host": host,
            "pid": pid,
            "version": version,
            "queues": list(queues) if queues else None,
            "concurrency": concurrency,
            "lease": lease_seconds,
            "rescue": rescue_interval_seconds,
            "lock_key": lock_key,
            "session_pid": session_pid,
        },
    )


def task_worker_unregister(conn: psycopg.Connection, *, worker_id: str) -> None:
    """task_worker_unregister: this worker stops (after handing back what it held)."""
    conn.execute("DELETE FROM task_workers WHERE worker_id = %(worker_id)s", {"worker_id": worker_id})


def task_workers_mark_gone(conn: psycopg.Connection) -> list[str]:
    """task_workers_mark_gone: note the workers whose session has ended (their advisory lock is
    free); task_rescue takes their tasks once they have not come back within the grace."""
    rows = conn.execute(
        """
        UPDATE task_workers SET gone_at = now()
        WHERE gone_at IS NULL AND pg_try_advisory_xact_lock(lock_key)
        RETURNING worker_id
        """
    ).fetchall()
    return [r["worker_id"] for r in rows]


def task_workers_forget(conn: psycopg.Connection, *, grace_seconds: float) -> int:
    """task_workers_forget: delete the rows of workers gone for good that hold no task any more."""
    return conn.execute(
        """
        DELETE FROM task_workers w
        WHERE gone_at < now() - make_interval(secs => %(grace)s)
          AND NOT EXISTS (SELECT FROM tasks t WHERE t.status = 'processing' AND t.worker_id = w.worker_id)
          AND pg_try_advisory_xact_lock(lock_key)  -- still free: no session came back
        """,
        {"grace": grace_seconds},
    ).rowcount


# --- idle workers (task_waiters): inserts NOTIFY only while someone waits ----------------------


def task_waiter_register(conn: psycopg.Connection, *, worker_id: str) -> None:
    """task_waiter_register: this worker is idle and waits for NOTIFY skiplock_task_pending.
    Commits at once; before relying on notifications, call task_waiters_settled."""
    conn.execute(
        """
        INSERT INTO task_waiters (worker_id, pid, backend_start)
        SELECT %(worker_id)s, pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()
        ON CONFLICT (worker_id) DO UPDATE
        SET pid = excluded.pid, backend_start = excluded.backend_start, since = now()
        """,
        {"worker_id": worker_id},
    )


def task_waiters_settled(conn: psycopg.Connection) -> bool:
    """task_waiters_settled: True once no transaction that inserted tasks without seeing the
    waiters is still uncommitted (each holds the advisory key shared until commit; see
    tasks_notify_inserted). Never waits: False means "an insert is in flight, ask again soon".
    After True, one more claim sees every task that was not announced."""
    return conn.execute(
        "SELECT pg_try_advisory_xact_lock(hashtext('skiplock.task_waiters')) AS settled"
    ).fetchone()["settled"]


def task_retries_announce(conn: psycopg.Connection) -> None:
    """task_retries_announce: after failures or rescues were stored as retries, wake the idle
    workers (if any wait) the way an insert would: each claims, finds the retry not yet due and
    looks up when it falls due (task_next_due_in). No insert trigger sees a row set back to
    pending, and the worker that wrote it may be too busy to run it."""
    conn.execute(
        "SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT FROM task_waiters)",
        {"channel": PENDING_CHANNEL},
    )


def task_waiter_unregister(conn: psycopg.Connection, *, worker_id: str) -> None:
    """task_waiter_unregister: this worker is busy and claims without waiting for notifications."""
    conn.execute("DELETE FROM task_waiters WHERE worker_id = %(worker_id)s", {"worker_id": worker_id})


def task_waiters_prune_dead(conn: psycopg.Connection) -> int:
    """task_waiters_prune_dead: forget waiters whose session is gone (a worker that crashed or
    reconnected): they would only make every insert NOTIFY for nobody. A session is its pid and
    start time, so a reused pid does not keep a dead worker's row."""
    return conn.execute(
        """
        DELETE FROM task_waiters w WHERE NOT EXISTS (
            SELECT FROM pg_stat_activity a
            WHERE a.pid = w.pid AND a.backend_start IS NOT DISTINCT FROM w.backend_start)
        """
    ).rowcount
