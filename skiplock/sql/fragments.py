"""SQL pieces several statements share: NOTIFY channels, the announce and outbox CTEs, the
final statuses, the columns a client sees. One definition each, so no statement's copy can drift."""

from __future__ import annotations

PENDING_CHANNEL = "skiplock_task_pending"

# The payload on PENDING_CHANNEL that says a schedule was made, changed or resumed: workers look
# at the schedules again (skiplock.worker.duties.scheduler) instead of claiming.
SCHEDULES_CHANGED = "schedules"
# The payload that says tasks became runnable with their turn (a workflow step released): idle
# workers claim at once, without an admission first (nothing of theirs waits on a limit).
RUNNABLE = "runnable"


CANCEL_CHANNEL = "skiplock_task_cancelled"


CHANGED_CHANNEL = "skiplock_task_changed"


# Webhook senders LISTEN here: a statement that wrote webhook deliveries NOTIFYs it (see outbox).
WEBHOOK_CHANNEL = "skiplock_webhook_due"


# NOTIFY payloads are limited to 8,000 bytes: past this, "*" tells listeners to look again at
# every task they watch.
_CHANGED_PAYLOAD_MAX = 7900


def announce(changed: str, final: str) -> str:
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


# Which limit a due task waits on, if any: its key's, else its type's, else its queue's (the
# first that exists; admission checks the others when it admits the task). `s` has owner0,
# concurrency_key, task_type, queue.
WAITING_ON = """CASE
        WHEN s.concurrency_key IS NOT NULL AND EXISTS (
            SELECT FROM task_limits l WHERE l.scope = 'key' AND l.owner_key_id = s.owner0
              AND l.name = s.concurrency_key)
            THEN 'key:' || s.owner0 || ':' || s.concurrency_key
        WHEN EXISTS (SELECT FROM task_limits l WHERE l.scope = 'type' AND l.owner_key_id = 0
                       AND l.name = s.task_type) THEN 'type:' || s.task_type
        WHEN EXISTS (SELECT FROM task_limits l WHERE l.scope = 'queue' AND l.owner_key_id = 0
                       AND l.name = s.queue) THEN 'queue:' || s.queue
    END"""


# A task in one of these states stays there unless a client retries it.
FINAL_STATUSES = ("completed", "failed", "cancelled", "expired")


NOW_FINAL = "c.status IN ({})".format(", ".join(f"'{s}'" for s in FINAL_STATUSES))


def iso(timestamp: str) -> str:
    """SQL: a timestamptz as ISO 8601 text in UTC, whatever the session's TimeZone."""
    return f"""to_char({timestamp} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""


# RETURNING columns of a statement that may make tasks (alias t) final: what a webhook needs.
# The payload is built only for a task with a callback that is final now (retries get none).
HOOK_COLUMNS = f"""t.callback_url, t.owner_key_id,
    CASE WHEN t.callback_url IS NOT NULL AND t.status IN ('completed', 'failed', 'cancelled', 'expired')
         THEN jsonb_build_object(
            'type', 'task.' || t.status::text,
            'timestamp', {iso("now()")},
            'data', jsonb_build_object(
                'task_id', t.id, 'status', t.status::text, 'result', t.result, 'error', t.error,
                'progress', t.progress, 'attempts', t.attempts, 'max_attempts', t.max_attempts,
                'task_type', t.task_type, 'queue', t.queue, 'priority', t.priority,
                'timeout_seconds', t.timeout_seconds, 'created_at', {iso("t.created_at")},
                'run_at', {iso("t.run_at")}, 'started_at', {iso("t.started_at")},
                'finished_at', {iso("t.finished_at")}))
    END AS hook_payload"""


def outbox(changed: str) -> str:
    """A CTE `outboxed` writing a webhook delivery for each row of CTE `changed` (returning
    HOOK_COLUMNS) that has a payload: in the statement that made its task final (the transactional
    outbox). The same statement tells the webhook senders (NOTIFY skiplock_webhook_due, sent at
    commit) when, and only when, it wrote a delivery: the notification is the RETURNING of the
    INSERT, evaluated per row written, and Postgres sends one per transaction for identical
    payloads. A data-modifying CTE runs to completion, RETURNING included, whether or not the
    statement references it."""
    return f"""outboxed AS (
        INSERT INTO webhook_deliveries (task_id, owner_key_id, url, event, payload)
        SELECT c.id, c.owner_key_id, c.callback_url, c.hook_payload->>'type', c.hook_payload
        FROM {changed} c WHERE c.hook_payload IS NOT NULL
        RETURNING pg_notify('{WEBHOOK_CHANNEL}', '') AS sent
    )"""


# Appended to a statement's final WHERE: makes it run `announced` (see announce).
ANNOUNCED = "(SELECT count(*) FROM announced) >= 0"


# Columns a client sees (task-status); input is fetched only when asked for.
TASK_FIELDS = (
    "id", "task_type", "queue", "priority", "status", "result", "error", "progress", "attempts",
    "max_attempts", "timeout_seconds", "created_at", "run_at", "started_at", "finished_at",
)  # fmt: skip


def task_columns(alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(
        f"{prefix}status::text AS status" if name == "status" else prefix + name for name in TASK_FIELDS
    )


TASK_COLUMNS = task_columns()


def storable_text(text: str | None) -> str | None:
    """Text Postgres accepts: no NUL, no lone surrogates (exception messages may carry both)."""
    if text is None:
        return None
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


# A client key sees its own tasks only (owner given); an admin, or auth off, sees all (None).
OWNED = "(%(owner)s::bigint IS NULL OR owner_key_id = %(owner)s)"


# A backoff's jitter: a factor spread evenly over ±25%, so retries of tasks (or webhooks) that
# failed together do not come back together.
JITTER = "(0.75 + 0.5 * random())"


# A retry's jitter, fixed by the task and attempt (deterministic, so one statement can compare the
# retry's time with the task's expiry and then store the same time): spread evenly over ±25%.
_RETRY_JITTER = "(0.75 + 0.5 * ((hashint8(t.id * 1009 + t.attempts) & 65535) / 65535.0))"

# When a failed attempt is retried: after the backoff, on the database clock.
BACKOFF_RETRY_AT = f"""now() + make_interval(secs =>
        least(%(backoff_max)s, %(backoff_base)s * power(2, t.attempts - 1)) * {_RETRY_JITTER})"""


def retry_or_fail(retry_at: str = BACKOFF_RETRY_AT, give_up: str = "t.attempts >= t.max_attempts") -> str:
    """SQL SET items: retry at `retry_at`, or fail for good when `give_up` holds, or expire instead
    of a retry that would come after the task's expires_at (see RETRY_OR_FAIL)."""
    stops = f"({give_up}) OR t.expires_at <= {retry_at}"
    return f"""
    status = CASE WHEN {give_up} THEN 'failed'
                  WHEN t.expires_at <= {retry_at} THEN 'expired'
                  ELSE 'pending' END::task_status,
    run_at = CASE WHEN {stops} THEN t.run_at ELSE {retry_at} END,
    finished_at = CASE WHEN {stops} THEN now() END,
    lease_expires_at = NULL, turn = NULL, limited = false, waiting_on = NULL
"""


# Shared by failures and rescues: retry after exponential backoff with jitter, computed on the
# database clock; fail for good once max_attempts is used up; expire instead of a retry that
# would come after the task's expires_at. A retry leaves the claim's index (no turn) until
# admission gives it one when it falls due; a slot of a limit it held is free at once.
RETRY_OR_FAIL = retry_or_fail()


# The error a task that expired by RETRY_OR_FAIL keeps: the failure's, and why it stopped.
def retry_error(
    error: str, retry_at: str = BACKOFF_RETRY_AT, give_up: str = "t.attempts >= t.max_attempts"
) -> str:
    """SQL: the task's error after retry_or_fail(retry_at, give_up), given the attempt's error."""
    return f"""CASE WHEN NOT ({give_up}) AND t.expires_at <= {retry_at}
                THEN 'expired: its retry would come after expires_at; last error: ' || {error}
                ELSE {error} END"""
