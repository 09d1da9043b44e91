"""Webhook deliveries (webhook_deliveries, webhook_attempts, webhook_secrets): the sender's claim
and record, a task's deliveries, resend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

from skiplock.sql.fragments import JITTER, storable_text
from skiplock.sql.rows import Connection, one_row


class DueDelivery(TypedDict):
    """A delivery a sender took (webhook_deliveries_claim), with the secret that signs it."""

    id: int
    task_id: int
    owner_key_id: int | None
    url: str
    body: str  # the payload as JSON text, as Postgres writes jsonb: what is signed and sent
    attempt: int
    secret: str | None  # None: the owner's key has none yet
    trace_context: dict[str, str] | None  # its task's (tasks.trace_context): sent as traceparent


class DeliveryRow(TypedDict):
    """A delivery as clients see it (_DELIVERY_COLUMNS)."""

    id: int
    task_id: int
    url: str
    event: str
    status: str
    attempts: int
    max_attempts: int | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None


class DeliveryWithTriesRow(DeliveryRow):
    """A delivery with its tries (webhook_deliveries_of_task): dicts of attempt, sender,
    started_at, latency_ms, status_code, error."""

    tries: list[dict[str, Any]]


# Tries a sender has begun and not recorded are closed with this when the delivery is taken again.
_LAPSED_TRY = "the sender stopped before recording an answer (it died, froze or lost its connection)"


def webhook_secret(conn: Connection, *, owner_key_id: int | None, candidate: str) -> str:
    """webhook_secret: the secret that signs this key's webhooks (None: auth off), made of
    `candidate` if it has none yet (the first to ask wins)."""
    row = one_row(
        conn.execute(
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
        )
    )
    secret: str = row["secret"]
    return secret


def webhook_deliveries_waiting(conn: Connection) -> bool:
    """webhook_deliveries_waiting: whether any delivery is pending (due or in its backoff): a
    worker starts its sender when there is something to send (webhook_deliveries_due_idx)."""
    row = conn.execute("SELECT EXISTS (SELECT FROM webhook_deliveries WHERE status = 'pending') AS waiting")
    return bool(row.fetchone()["waiting"])  # type: ignore[index]


def webhook_deliveries_claim(
    conn: Connection, *, sender: str, limit: int, lease_seconds: float, max_attempts: int
) -> list[DueDelivery]:
    """webhook_deliveries_claim: take up to `limit` due deliveries to send now, oldest due first,
    skipping those another sender holds. Each gets a try (webhook_attempts, begun now) and is due
    again when the lease ends: a sender that dies mid-send leaves it to the next one (same
    webhook-id: at least once). A try begun earlier and never recorded is closed as lapsed; a
    delivery whose tries are all used up by lapsed ones is dead. Returns id, task_id, url, body
    (the payload as Postgres writes jsonb: the sender signs and sends it as it is, with no parse
    and dump), attempt, the secret that signs it (NULL: the owner's key has none yet) and its
    task's trace context."""
    rows: list[DueDelivery] = conn.execute(
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
            RETURNING d.id, d.task_id, d.owner_key_id, d.url, d.payload::text AS body, d.attempts AS attempt
        ), tried AS (
            INSERT INTO webhook_attempts (delivery_id, attempt, sender, started_at)
            SELECT id, attempt, %(sender)s, now() FROM claimed
        )
        SELECT c.*, coalesce(s.secret, k.secret) AS secret,
               (SELECT t.trace_context FROM tasks t WHERE t.id = c.task_id) AS trace_context
        FROM claimed c
        LEFT JOIN task_callback_secrets s ON s.task_id = c.task_id
        LEFT JOIN webhook_secrets k ON k.owner_key_id = coalesce(c.owner_key_id, 0)
        ORDER BY c.id
        """,
        {"sender": sender, "limit": limit, "lease": lease_seconds, "max": max_attempts},
    ).fetchall()
    return rows


@dataclass(frozen=True)
class WebhookTry:
    """How one try of a delivery went (webhook_deliveries_record)."""

    delivery_id: int
    attempt: int
    latency_ms: float
    status_code: int | None  # None: no answer
    error: str | None  # None: a 2xx


def webhook_deliveries_record(
    conn: Connection,
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
        f"""
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
                                       * {JITTER}) END,
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


def webhook_deliveries_of_task(
    conn: Connection, task_id: int, *, owner: int | None
) -> list[DeliveryWithTriesRow]:
    """webhook_deliveries_of_task: a task's deliveries, oldest first, each with its tries."""
    rows: list[DeliveryWithTriesRow] = conn.execute(
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
    return rows


def webhook_resend(
    conn: Connection, delivery_id: int, *, owner: int | None, max_attempts: int
) -> tuple[bool, DeliveryRow | None]:
    """webhook_resend: send a delivered or dead delivery again, now, with `max_attempts` more
    tries (same webhook-id and body). Returns (resent, the delivery): (False, None) if there is
    no such delivery (for this owner), (False, it) if it is still pending (it will be sent)."""
    row: DeliveryRow | None = conn.execute(
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
    current: DeliveryRow | None = conn.execute(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.id = %(id)s AND {_OWNED_DELIVERY}",
        {"id": delivery_id, "owner": owner},
    ).fetchone()
    return False, current
