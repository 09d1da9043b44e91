"""Schedules (task_schedules): made, read, changed, paused and deleted through the API, the CLI
and code declarations. When each fires next is decided by skiplock.schedules' rules on the
database clock (now(), read in the same transaction); firing is skiplock/sql/schedule_fires.py.

A client key reads and changes its own schedules only (owner given); an admin, or auth off, all
of them (owner None). Schedules declared in code (source 'code') are owned by no key."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from skiplock.errors import ScheduleDeclaredInCode, ScheduleNameTaken, ScheduleNotFound
from skiplock.schedules import NEXT_RUNS_SHOWN, Policy, Rule
from skiplock.sql.fragments import OWNED, PENDING_CHANNEL, SCHEDULES_CHANGED
from skiplock.sql.rows import Connection, one_row

# The columns of a schedule as the API, the CLI and the dashboard show it.
SCHEDULE_COLUMNS = """id, source, owner_key_id, name, cron, every_seconds, timezone, task, missed,
    missed_limit, overlap, grace_seconds, paused, next_fire_at, created_at, updated_at, updated_by"""

# What a change may set (the rest is fixed: source, owner, name).
CHANGEABLE = (
    "cron", "every_seconds", "timezone", "task", "missed", "missed_limit", "overlap", "grace_seconds",
)  # fmt: skip

FIRES_SHOWN = 10


def rule_of(row: dict[str, Any]) -> Rule:
    return Rule(cron=row["cron"], every_seconds=row["every_seconds"], timezone=row["timezone"])


def policy_of(row: dict[str, Any]) -> Policy:
    return Policy(missed=row["missed"], missed_limit=row["missed_limit"], grace_seconds=row["grace_seconds"])


def _db_now(conn: Connection) -> datetime:
    now: datetime = one_row(conn.execute("SELECT now() AS now"))["now"]
    return now


def schedule_create(
    conn: Connection,
    *,
    name: str,
    rule: Rule,
    task: dict[str, Any],
    owner_key_id: int | None = None,
    missed: str = "skip",
    missed_limit: int = 100,
    overlap: str = "allow",
    grace_seconds: int | None = None,
    paused: bool = False,
    by: str | None = None,
) -> dict[str, Any]:
    """schedule_create: a schedule of the owner, due at its rule's first time after now.
    Raises ScheduleNameTaken if the owner has one of that name."""
    with conn.transaction():
        first = rule.next_after(_db_now(conn))
        try:
            with conn.transaction():
                return one_row(
                    conn.execute(
                        f"""
                        INSERT INTO task_schedules (owner_key_id, name, cron, every_seconds, timezone, task,
                            missed, missed_limit, overlap, grace_seconds, paused, next_fire_at, updated_by)
                        VALUES (%(owner)s, %(name)s, %(cron)s, %(every)s, %(tz)s, %(task)s, %(missed)s,
                                %(missed_limit)s, %(overlap)s, %(grace)s, %(paused)s, %(first)s, %(by)s)
                        RETURNING {SCHEDULE_COLUMNS}
                        """,
                        {
                            "owner": owner_key_id,
                            "name": name,
                            "cron": rule.cron,
                            "every": rule.every_seconds,
                            "tz": rule.timezone,
                            "task": Jsonb(task),
                            "missed": missed,
                            "missed_limit": missed_limit,
                            "overlap": overlap,
                            "grace": grace_seconds,
                            "paused": paused,
                            "first": first,
                            "by": by,
                        },
                    )
                )
        except psycopg.errors.UniqueViolation:
            raise ScheduleNameTaken(name) from None


def schedule_get(conn: Connection, schedule_id: int, *, owner: int | None = None) -> dict[str, Any]:
    """schedule_get: the schedule as `owner` may see it; raises ScheduleNotFound."""
    row = conn.execute(
        f"SELECT {SCHEDULE_COLUMNS} FROM task_schedules WHERE id = %(id)s AND {OWNED}",
        {"id": schedule_id, "owner": owner},
    ).fetchone()
    if row is None:
        raise ScheduleNotFound(schedule_id)
    return dict(row)


def schedule_list(conn: Connection, *, owner: int | None = None) -> list[dict[str, Any]]:
    """schedule_list: the schedules `owner` may see, by name (code ones after the API's)."""
    rows = conn.execute(
        f"SELECT {SCHEDULE_COLUMNS} FROM task_schedules WHERE {OWNED} ORDER BY source, name, id",
        {"owner": owner},
    ).fetchall()
    return [dict(r) for r in rows]


def schedule_fires(conn: Connection, schedule_id: int, *, limit: int = FIRES_SHOWN) -> list[dict[str, Any]]:
    """schedule_fires: its last fires, newest first (task_schedule_fires_pkey)."""
    rows = conn.execute(
        """
        SELECT scheduled_for, kind, outcome, task_id, reason, missed_count, missed_until, fired_at, fired_by
        FROM task_schedule_fires WHERE schedule_id = %s ORDER BY scheduled_for DESC LIMIT %s
        """,
        (schedule_id, limit),
    ).fetchall()
    return [dict(r) for r in rows]


def schedule_view(conn: Connection, row: dict[str, Any], *, fires: int = FIRES_SHOWN) -> dict[str, Any]:
    """The schedule with its next run times (from next_fire_at, with what daylight saving does to
    them) and its last fires."""
    rule = rule_of(row)
    at = row["next_fire_at"]
    upcoming = [at, *rule.upcoming(at, NEXT_RUNS_SHOWN - 1)]
    return {
        **row,
        "declared_in_code": row["source"] == "code",
        "next_runs": [{"at": t, "note": rule.note(t)} for t in upcoming],
        "last_fires": schedule_fires(conn, row["id"], limit=fires),
    }


def schedule_update(
    conn: Connection,
    schedule_id: int,
    changes: dict[str, Any],
    *,
    owner: int | None = None,
    by: str | None = None,
) -> dict[str, Any]:
    """schedule_update: set some CHANGEABLE fields (cron and every_seconds replace each other);
    a new rule fires from its first time after now. Raises ScheduleNotFound,
    ScheduleDeclaredInCode, ScheduleRefused (skiplock.schedules) for a rule that cannot be used."""
    with conn.transaction():
        row = _locked(conn, schedule_id, owner)
        if row["source"] == "code":
            raise ScheduleDeclaredInCode(schedule_id, "changed")
        merged = {**row, **{k: v for k, v in changes.items() if k in CHANGEABLE}}
        if "cron" in changes and changes["cron"] is not None:
            merged["every_seconds"] = None
        if "every_seconds" in changes and changes["every_seconds"] is not None:
            merged["cron"] = None
        rule = rule_of(merged)
        next_fire_at = row["next_fire_at"]
        if rule != rule_of(row):
            next_fire_at = rule.next_after(_db_now(conn))
        return dict(
            one_row(
                conn.execute(
                    f"""
                    UPDATE task_schedules SET cron = %(cron)s, every_seconds = %(every_seconds)s,
                        timezone = %(timezone)s, task = %(task)s, missed = %(missed)s,
                        missed_limit = %(missed_limit)s, overlap = %(overlap)s, grace_seconds = %(grace_seconds)s,
                        next_fire_at = %(next)s, updated_at = now(), updated_by = %(by)s
                    WHERE id = %(id)s
                    RETURNING {SCHEDULE_COLUMNS}
                    """,
                    {
                        **merged,
                        "task": Jsonb(merged["task"]),
                        "next": next_fire_at,
                        "by": by,
                        "id": schedule_id,
                    },
                )
            )
        )


def schedule_set_paused(
    conn: Connection, schedule_id: int, *, paused: bool, owner: int | None = None, by: str | None = None
) -> dict[str, Any]:
    """schedule_set_paused: pause, or resume (it fires from its rule's first time after now:
    what fell due while it was paused is not missed, it was not wanted)."""
    with conn.transaction():
        row = _locked(conn, schedule_id, owner)
        next_fire_at = row["next_fire_at"]
        if row["paused"] and not paused:
            next_fire_at = rule_of(row).next_after(_db_now(conn))
        return dict(
            one_row(
                conn.execute(
                    f"""
                    UPDATE task_schedules SET paused = %(paused)s, next_fire_at = %(next)s,
                        updated_at = now(), updated_by = %(by)s
                    WHERE id = %(id)s RETURNING {SCHEDULE_COLUMNS}
                    """,
                    {"paused": paused, "next": next_fire_at, "by": by, "id": schedule_id},
                )
            )
        )


def schedule_delete(conn: Connection, schedule_id: int, *, owner: int | None = None) -> None:
    """schedule_delete: the schedule and its fires; its tasks stay (tasks.schedule_id names it
    still). A schedule declared in code comes back when a worker starts with it declared."""
    deleted = conn.execute(
        f"DELETE FROM task_schedules WHERE id = %(id)s AND {OWNED}", {"id": schedule_id, "owner": owner}
    ).rowcount
    if not deleted:
        raise ScheduleNotFound(schedule_id)


def _locked(conn: Connection, schedule_id: int, owner: int | None) -> dict[str, Any]:
    row = conn.execute(
        f"SELECT {SCHEDULE_COLUMNS} FROM task_schedules WHERE id = %(id)s AND {OWNED} FOR UPDATE",
        {"id": schedule_id, "owner": owner},
    ).fetchone()
    if row is None:
        raise ScheduleNotFound(schedule_id)
    return dict(row)


def schedules_announce(conn: Connection) -> None:
    """schedules_announce: tell the workers (at commit) that a schedule was made, changed or
    resumed, so its first fire is not late by their RECHECK_SECONDS. Rare: always sent."""
    conn.execute("SELECT pg_notify(%s, %s)", (PENDING_CHANNEL, SCHEDULES_CHANGED))


def schedules_next_due_in(conn: Connection) -> float | None:
    """schedules_next_due_in: seconds until the earliest unpaused schedule is due (0 or less:
    due now); None if there is none. One probe of task_schedules_due_idx."""
    row = one_row(
        conn.execute(
            "SELECT extract(epoch FROM min(next_fire_at) - now())::float8 AS due_in FROM task_schedules WHERE NOT paused"
        )
    )
    due_in: float | None = row["due_in"]
    return due_in


def schedules_sync_declared(conn: Connection, declared: Iterable[Any], *, by: str) -> int:
    """schedules_sync_declared: write the schedules declared in code (skiplock.registry.schedule:
    source 'code', no owner), each made or updated; one whose rule changed fires from its new
    rule's first time after now, one whose rule is the same keeps its next fire (a restart
    neither skips nor repeats one). A pause set by an admin stays. Returns how many were written."""
    written = 0
    with conn.transaction():
        now = _db_now(conn)
        for d in declared:
            rule = Rule(cron=d.cron, every_seconds=d.every_seconds, timezone=d.timezone)
            conn.execute(
                """
                INSERT INTO task_schedules AS s (source, name, cron, every_seconds, timezone, task, missed,
                    missed_limit, overlap, grace_seconds, next_fire_at, updated_by)
                VALUES ('code', %(name)s, %(cron)s, %(every)s, %(tz)s, %(task)s, %(missed)s, %(missed_limit)s,
                        %(overlap)s, %(grace)s, %(first)s, %(by)s)
                ON CONFLICT (source, coalesce(owner_key_id, 0), name) DO UPDATE
                SET cron = excluded.cron, every_seconds = excluded.every_seconds, timezone = excluded.timezone,
                    task = excluded.task, missed = excluded.missed, missed_limit = excluded.missed_limit,
                    overlap = excluded.overlap, grace_seconds = excluded.grace_seconds,
                    next_fire_at = CASE
                        WHEN (s.cron, s.every_seconds, s.timezone)
                             IS NOT DISTINCT FROM (excluded.cron, excluded.every_seconds, excluded.timezone)
                        THEN s.next_fire_at ELSE excluded.next_fire_at END,
                    updated_at = now(), updated_by = excluded.updated_by
                WHERE (s.cron, s.every_seconds, s.timezone, s.task, s.missed, s.missed_limit, s.overlap,
                       s.grace_seconds)
                      IS DISTINCT FROM (excluded.cron, excluded.every_seconds, excluded.timezone, excluded.task,
                                        excluded.missed, excluded.missed_limit, excluded.overlap,
                                        excluded.grace_seconds)
                """,
                {
                    "name": d.name,
                    "cron": d.cron,
                    "every": d.every_seconds,
                    "tz": d.timezone,
                    "task": Jsonb(d.task_spec()),
                    "missed": d.missed,
                    "missed_limit": d.missed_limit,
                    "overlap": d.overlap,
                    "grace": d.grace_seconds,
                    "first": rule.next_after(now),
                    "by": by,
                },
            )
            written += 1
    return written


def schedule_metrics(conn: Connection) -> dict[str, Any]:
    """schedule_metrics: schedules active and paused, how overdue the most overdue one is (no
    worker firing), and the last hour's fire times per outcome (a missed row counts its times)."""
    row = one_row(
        conn.execute(
            """
            SELECT count(*) FILTER (WHERE NOT paused) AS active, count(*) FILTER (WHERE paused) AS paused,
                   coalesce(extract(epoch FROM greatest(now() - min(next_fire_at) FILTER (WHERE NOT paused),
                                                         interval '0')), 0)::float8 AS overdue_seconds
            FROM task_schedules
            """
        )
    )
    fires = conn.execute(
        """
        SELECT outcome, sum(coalesce(missed_count, 1))::int AS n FROM task_schedule_fires
        WHERE fired_at > now() - interval '1 hour' GROUP BY outcome
        """
    ).fetchall()
    return {**row, "fires_last_hour": {r["outcome"]: r["n"] for r in fires}}


def schedule_fires_prune(conn: Connection, *, older_than_seconds: float, limit: int) -> int:
    """schedule_fires_prune: delete up to `limit` fires older than the retention
    (task_schedule_fires_fired_at_idx). Exactly once does not depend on them."""
    return conn.execute(
        """
        DELETE FROM task_schedule_fires f USING (
            SELECT schedule_id, scheduled_for FROM task_schedule_fires
            WHERE fired_at < now() - make_interval(secs => %(age)s)
            ORDER BY fired_at LIMIT %(limit)s) old
        WHERE (f.schedule_id, f.scheduled_for) = (old.schedule_id, old.scheduled_for)
        """,
        {"age": older_than_seconds, "limit": limit},
    ).rowcount
