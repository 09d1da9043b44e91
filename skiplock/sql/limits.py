"""Concurrency and start-rate limits (task_limits): set, read, list, remove, and the barrier that
makes a new or lowered limit (or a queue's pause) hold from the moment its request answers.

Setting a limit: (1) the row is written and committed under the admission lock; (2) every
transaction older than that commit is waited for: a submit or admission that could not see the
limit has then committed what it made runnable, a claim what it claimed; (3) under the admission
lock again, the group's runnable tasks go back to waiting on it, the ones claimed but not started
are released (uncounted, the worker told: NOTIFY skiplock_task_cancelled) and admission admits
what the limit allows. What had started keeps running (it holds a slot until it ends)."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import TypedDict

from skiplock.sql.admission import admission_lock, group_name, task_admit
from skiplock.sql.fragments import ANNOUNCED, CANCEL_CHANNEL, WAITING_ON, announce
from skiplock.sql.rows import Connection

log = logging.getLogger("skiplock")

SCOPES = ("key", "type", "queue")

# How long a limit's barrier waits for older transactions (a DBA's open transaction, say)
# before it goes on without them, and how often it looks.
BARRIER_TIMEOUT_SECONDS = 5.0
BARRIER_POLL_SECONDS = 0.002
# Ids per NOTIFY skiplock_task_cancelled of released tasks (20 digits and a comma each, < 8,000).
NOTIFY_IDS = 300


class LimitRow(TypedDict):
    scope: str
    owner_key_id: int
    name: str
    max_running: int | None
    max_starts_per_second: float | None
    burst: int | None
    running: int
    waiting: int
    updated_at: datetime
    updated_by: str | None


_USAGE = "SELECT scope, owner_key_id, name, max_running, max_starts_per_second, burst, running, waiting, updated_at, updated_by FROM task_limit_usage"


def limit_get(conn: Connection, *, scope: str, owner: int, name: str) -> LimitRow | None:
    """limit_get: one limit with what runs and waits under it; None if there is none."""
    row: LimitRow | None = conn.execute(
        f"{_USAGE} WHERE scope = %(scope)s AND owner_key_id = %(owner)s AND name = %(name)s",
        {"scope": scope, "owner": owner, "name": name},
    ).fetchone()
    return row


def limit_list(conn: Connection, *, scope: str | None = None, owner: int | None = None) -> list[LimitRow]:
    """limit_list: the limits of a scope (None: all), of one owner (None: every owner)."""
    rows: list[LimitRow] = conn.execute(
        f"""{_USAGE}
        WHERE (%(scope)s::text IS NULL OR scope = %(scope)s)
          AND (%(owner)s::bigint IS NULL OR owner_key_id = %(owner)s)
        ORDER BY scope, owner_key_id, name""",
        {"scope": scope, "owner": owner},
    ).fetchall()
    return rows


def limit_put(
    conn: Connection,
    *,
    scope: str,
    owner: int,
    name: str,
    max_running: int | None,
    max_starts_per_second: float | None = None,
    burst: int | None = None,
    by: str | None = None,
) -> LimitRow:
    """limit_put: create or change a limit; it holds when this returns (see the module). A new
    rate starts with a full bucket; a changed one keeps what it has left, up to the new burst.
    `conn` must be in autocommit mode (this commits in steps)."""
    with conn.transaction():
        admission_lock(conn)
        conn.execute(
            """
            INSERT INTO task_limits (scope, owner_key_id, name, max_running, max_starts_per_second, burst, updated_by)
            VALUES (%(scope)s, %(owner)s, %(name)s, %(max_running)s, %(rate)s, %(burst)s, %(by)s)
            ON CONFLICT (scope, owner_key_id, name) DO UPDATE
            SET max_running = excluded.max_running, max_starts_per_second = excluded.max_starts_per_second,
                burst = excluded.burst, updated_at = now(), updated_by = excluded.updated_by,
                tokens = CASE WHEN excluded.max_starts_per_second IS NULL THEN NULL
                              ELSE least(task_limits.tokens,
                                         coalesce(excluded.burst, greatest(1, ceil(excluded.max_starts_per_second)))) END
            """,
            {
                "scope": scope, "owner": owner, "name": name, "max_running": max_running,
                "rate": max_starts_per_second, "burst": burst, "by": by,
            },
        )  # fmt: skip
    wait_for_older_transactions(conn)
    with conn.transaction():
        admission_lock(conn)
        take_back(conn, group=group_name(scope, owner, name), scope=scope, owner=owner, name=name)
        task_admit(conn)
    row = limit_get(conn, scope=scope, owner=owner, name=name)
    assert row is not None
    return row


def limit_delete(conn: Connection, *, scope: str, owner: int, name: str) -> bool:
    """limit_delete: remove a limit; what waited on it is admitted at once. False if there was
    none."""
    with conn.transaction():
        admission_lock(conn)
        deleted = conn.execute(
            "DELETE FROM task_limits WHERE scope = %(scope)s AND owner_key_id = %(owner)s AND name = %(name)s",
            {"scope": scope, "owner": owner, "name": name},
        ).rowcount
        if deleted:
            # What waited on it waits on nothing now: runnable (it kept its turn), or held by
            # another of its limits, which admission finds out.

            conn.execute(
                f"""UPDATE tasks t SET waiting_on = {WAITING_ON}
                FROM (SELECT id, coalesce(owner_key_id, 0) AS owner0, concurrency_key, task_type, queue
                      FROM tasks WHERE status = 'pending' AND waiting_on = %(g)s) s
                WHERE t.id = s.id""",
                {"g": group_name(scope, owner, name)},
            )
            task_admit(conn)
    return bool(deleted)


def limit_declare_types(conn: Connection, limits: dict[str, int | None], *, by: str) -> None:
    """limit_declare_types: the max_running of task types, as declared in code (a worker at
    start: the declared ones are set, the others left as they are)."""
    for task_type, max_running in limits.items():
        if max_running is None:
            continue
        row = conn.execute(
            "SELECT max_running FROM task_limits WHERE scope = 'type' AND owner_key_id = 0 AND name = %s",
            (task_type,),
        ).fetchone()
        if row is None or row["max_running"] != max_running:
            limit_put(conn, scope="type", owner=0, name=task_type, max_running=max_running, by=by)


def wait_for_older_transactions(conn: Connection, *, timeout: float = BARRIER_TIMEOUT_SECONDS) -> bool:
    """Wait until every transaction running now has ended (it committed or rolled back): what
    they wrote without seeing a change committed before this call is then visible. False if
    some were still running after `timeout` (logged). The snapshot lists the transactions of
    every database on the server: those of sessions seen in another database are left out
    (they cannot write here; a role that cannot see them waits for them, as before)."""
    snapshot = conn.execute("SELECT pg_current_snapshot()::text AS s").fetchone()["s"]  # type: ignore[index]
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            """
            SELECT count(*) AS running FROM pg_snapshot_xip(%(s)s::pg_snapshot) AS x(xid)
            WHERE pg_xact_status(x.xid) = 'in progress'
              AND (x.xid::text::numeric %% 4294967296)::text::xid NOT IN (
                  SELECT backend_xid FROM pg_stat_activity
                  WHERE datname IS DISTINCT FROM current_database() AND backend_xid IS NOT NULL)
            """,
            {"s": snapshot},
        ).fetchone()
        if row is None or row["running"] == 0:
            return True
        if time.monotonic() > deadline:
            log.warning("a limit or pause goes on while %d older transaction(s) still run", row["running"])
            return False
        time.sleep(BARRIER_POLL_SECONDS)


def _group_match(scope: str) -> str:
    if scope == "key":
        return "t.concurrency_key = %(name)s AND coalesce(t.owner_key_id, 0) = %(owner)s"
    return "t.task_type = %(name)s" if scope == "type" else "t.queue = %(name)s"


def take_back(conn: Connection, *, group: str, scope: str, owner: int, name: str) -> None:
    """Under the admission lock: the group's runnable tasks wait on it again (admission then
    admits what the limit allows), and its tasks claimed but not started are released, their
    workers told."""
    match = _group_match(scope)
    params = {"group": group, "owner": owner, "name": name, "channel": CANCEL_CHANNEL}
    conn.execute(
        f"""
        UPDATE tasks t SET limited = false, waiting_on = %(group)s
        WHERE t.status = 'pending' AND t.turn IS NOT NULL AND t.waiting_on IS NULL AND {match}
        """,
        params,
    )
    release_unstarted(conn, match=match, params=params)


def release_unstarted(conn: Connection, *, match: str, params: dict[str, object]) -> int:
    """Tasks matching `match` (an SQL condition on t) that a worker claimed but has not started
    go back to pending uncounted (a released attempt) with their turn, waiting on
    params["group"] (None: runnable); their workers are told (NOTIFY skiplock_task_cancelled with
    their ids) and drop them. Returns how many. A task its worker has handed to a process
    (task_workers.in_hand) may have started: it is left to run."""
    # Lock first; choose in the next statement, whose snapshot sees a hand-over to a process
    # that committed while this waited for the locks (task_hand_over).
    conn.execute(
        f"SELECT t.id FROM tasks t WHERE t.status = 'processing' AND t.started_at IS NULL AND {match} FOR UPDATE",
        params,
    )
    rows = conn.execute(
        f"""
        WITH doomed AS (
            SELECT t.id FROM tasks t
            WHERE t.status = 'processing' AND t.started_at IS NULL AND {match}
              AND skiplock_handed_at(t.worker_id, t.id, t.attempts) IS NULL
            FOR UPDATE
        ), released AS (
            UPDATE tasks t
            SET status = 'pending', attempts = t.attempts - 1, lease_expires_at = NULL, progress = NULL,
                -- a pause (no group) keeps the slot the task held: it is runnable again at once
                limited = CASE WHEN %(group)s::text IS NULL THEN t.limited ELSE false END,
                waiting_on = %(group)s
            FROM doomed d WHERE t.id = d.id AND t.started_at IS NULL
            RETURNING t.id, t.attempts + 1 AS attempt, t.worker_id
        ), logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
            SELECT id, attempt, worker_id, 'released', NULL, 'released before it started: its queue was paused or a limit holds it'
            FROM released
        ), told AS (  -- in payloads of at most NOTIFY_IDS ids (a payload is at most 8,000 bytes)
            SELECT pg_notify(%(channel)s, string_agg(id::text, ','))
            FROM (SELECT id, (row_number() OVER ()) / {NOTIFY_IDS} AS chunk FROM released) r GROUP BY chunk
        ), {announce("released", "false")}
        SELECT id FROM released WHERE {ANNOUNCED} AND (SELECT count(*) FROM told) >= 0
        """,
        params,
    ).fetchall()
    return len(rows)


def queue_pause_take_effect(conn: Connection, *, queue: str) -> int:
    """After a queue's pause committed: wait for the claims that could not see it, then release
    what they claimed and no worker has started (the workers are told). From then on no task of
    the queue starts (the claim reads the pause in its own snapshot). Returns how many were
    released."""
    wait_for_older_transactions(conn)
    with conn.transaction():
        return release_unstarted(
            conn, match="t.queue = %(name)s", params={"name": queue, "channel": CANCEL_CHANNEL, "group": None}
        )
