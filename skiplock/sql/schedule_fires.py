"""Firing schedules: a worker's round over the due ones, and "run now". Exactly once on the
database clock, from any number of hosts: a round locks the due schedules it takes (FOR UPDATE
SKIP LOCKED: another host's round takes others, or none), records each fire in
task_schedule_fires (its primary key refuses a time fired before), creates the task and moves
next_fire_at past now, all in one transaction. A host that dies mid-round fired nothing; the
next round fires the same times (or counts them missed, by the schedule's policy).

A fire creates the task the schedule describes (task_schedules.task), owned by the schedule's
key and within its quota (max_unfinished); what it could not create is recorded with its reason
(refused), never dropped."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime
from typing import Any

import psycopg

from skiplock.errors import QuotaSlotTaken, ScheduleNotFound
from skiplock.schedules import ScheduleRefused, plan_round
from skiplock.sql.fragments import OWNED
from skiplock.sql.inserts import NewTask, task_insert_many
from skiplock.sql.keys import task_quota_free_slots
from skiplock.sql.rows import Connection
from skiplock.sql.schedules import SCHEDULE_COLUMNS, policy_of, rule_of

log = logging.getLogger("skiplock.schedules")

# Schedules one round fires at most (the rest in the next round, at once).
FIRE_BATCH = 50


@dataclasses.dataclass(frozen=True)
class Fire:
    schedule_id: int
    scheduled_for: datetime
    kind: str
    outcome: str
    task_id: int | None = None
    reason: str | None = None


def schedules_fire_due(conn: Connection, *, by: str, limit: int = FIRE_BATCH) -> list[Fire]:
    """schedules_fire_due: one round (one transaction): every due schedule this round could
    lock fires what its rule and missed policy say, and is due next at its next time after now.
    Returns the fires made (missed records included)."""
    fires: list[Fire] = []
    with conn.transaction():
        due = conn.execute(
            f"""
            SELECT {SCHEDULE_COLUMNS}, now() AS db_now FROM task_schedules
            WHERE NOT paused AND next_fire_at <= now()
            ORDER BY next_fire_at LIMIT %s
            FOR UPDATE SKIP LOCKED
            """,
            (limit,),
        ).fetchall()
        for schedule in due:
            fires.extend(_fire_round(conn, dict(schedule), by))
    return fires


def _fire_round(conn: Connection, schedule: dict[str, Any], by: str) -> list[Fire]:
    try:
        plan = plan_round(
            rule_of(schedule), policy_of(schedule), schedule["next_fire_at"], schedule["db_now"]
        )
    except ScheduleRefused as exc:  # a rule a DBA wrote by hand that cannot be read: stop it
        log.error("schedule %s (%s) paused: %s", schedule["id"], schedule["name"], exc)
        conn.execute(
            "UPDATE task_schedules SET paused = true, updated_at = now(), updated_by = %s WHERE id = %s",
            (f"{by}: its rule cannot be read ({exc})"[:200], schedule["id"]),
        )
        return []
    fires: list[Fire] = []
    if plan.missed:
        count = f"{plan.missed}" if plan.counted_all else f"at least {plan.missed}"
        reason = f"missed {count} fire time(s): no worker fired them within grace_seconds (missed={schedule['missed']})"
        fires.append(
            _record(
                conn,
                schedule["id"],
                schedule["next_fire_at"],  # the first missed time (plan.missed_from)
                "missed",
                "missed",
                by,
                reason=reason,
                missed_count=plan.missed,
                missed_until=plan.missed_until,
            )
        )
    for at, kind in plan.fire:
        fires.append(fire_once(conn, schedule, at, kind, by))
    conn.execute(
        "UPDATE task_schedules SET next_fire_at = %s WHERE id = %s", (plan.next_fire_at, schedule["id"])
    )
    return fires


def schedule_run_now(conn: Connection, schedule_id: int, *, owner: int | None = None, by: str) -> Fire:
    """schedule_run_now: fire the schedule now (kind manual; its next fire is unchanged), paused
    or not, by its overlap policy and its owner's quota like any fire. Raises ScheduleNotFound."""
    with conn.transaction():
        schedule = conn.execute(
            f"SELECT {SCHEDULE_COLUMNS}, now() AS db_now FROM task_schedules WHERE id = %(id)s AND {OWNED} FOR UPDATE",
            {"id": schedule_id, "owner": owner},
        ).fetchone()
        if schedule is None:
            raise ScheduleNotFound(schedule_id)
        return fire_once(conn, dict(schedule), schedule["db_now"], "manual", by)


def fire_once(conn: Connection, schedule: dict[str, Any], at: datetime, kind: str, by: str) -> Fire:
    """One fire, in a savepoint: recorded first (a time fired before is left alone), then its
    task created, or the reason it was not. An error creating it is recorded too."""
    try:
        with conn.transaction():
            taken = conn.execute(
                """
                INSERT INTO task_schedule_fires (schedule_id, scheduled_for, kind, outcome, fired_by)
                VALUES (%s, %s, %s, 'created', %s) ON CONFLICT DO NOTHING RETURNING 1
                """,
                (schedule["id"], at, kind, by),
            ).fetchone()
            if taken is None:
                return Fire(schedule["id"], at, kind, "skipped", reason="fired before")
            fire = _create(conn, schedule, at, kind)
    except psycopg.Error as exc:  # the database refused the task: say so on the fire
        reason = f"the database refused the task: {exc.diag.message_primary or type(exc).__name__}"
        fire = Fire(schedule["id"], at, kind, "refused", reason=reason)
        _record(conn, schedule["id"], at, kind, "refused", by, reason=reason)
        return fire
    conn.execute(
        """
        UPDATE task_schedule_fires SET outcome = %s, task_id = %s, reason = %s
        WHERE schedule_id = %s AND scheduled_for = %s
        """,
        (fire.outcome, fire.task_id, fire.reason, schedule["id"], at),
    )
    return fire


def _create(conn: Connection, schedule: dict[str, Any], at: datetime, kind: str) -> Fire:
    """The fire's task, or why not: overlap skip, the owner key revoked, its quota full."""
    sid, owner = schedule["id"], schedule["owner_key_id"]
    if schedule["overlap"] == "skip":
        running = conn.execute(
            "SELECT id, status::text AS status FROM tasks"
            " WHERE schedule_id = %s AND status IN ('pending', 'processing') ORDER BY id LIMIT 1",
            (sid,),
        ).fetchone()
        if running is not None:
            reason = f"overlap skip: task {running['id']} of this schedule is still {running['status']}"
            return Fire(sid, at, kind, "skipped", task_id=running["id"], reason=reason)
    cap = None
    if owner is not None:
        key = conn.execute(
            "SELECT revoked_at, max_unfinished FROM api_keys WHERE id = %s", (owner,)
        ).fetchone()
        if key is None or key["revoked_at"] is not None:
            return Fire(sid, at, kind, "refused", reason=f"its owner, API key {owner}, is revoked")
        cap = key["max_unfinished"]
    new = _new_task(schedule["task"])
    if cap is not None:
        held, free = task_quota_free_slots(conn, owner=owner, cap=cap, want=1)
        if not free:
            reason = f"quota: its owner has {held} unfinished tasks, its max_unfinished is {cap}"
            return Fire(sid, at, kind, "refused", reason=reason)
        new = dataclasses.replace(new, quota_slot=free[0])
    try:
        with conn.transaction():
            (inserted,) = task_insert_many(
                conn,
                [new],
                owner_key_id=owner,
                more_slots=(lambda n: task_quota_free_slots(conn, owner=owner, cap=cap, want=n)[1])
                if cap is not None
                else None,
            )
    except QuotaSlotTaken:
        return Fire(sid, at, kind, "refused", reason=f"quota: its owner's {cap} slots were taken meanwhile")
    if inserted.deduplicated:
        reason = f"unique_key {new.unique_key!r}: task {inserted.id} of its owner is unfinished"
        return Fire(sid, at, kind, "deduplicated", task_id=inserted.id, reason=reason)
    conn.execute(
        "UPDATE tasks SET schedule_id = %s, scheduled_for = %s WHERE id = %s", (sid, at, inserted.id)
    )
    return Fire(sid, at, kind, "created", task_id=inserted.id)


def _new_task(spec: dict[str, Any]) -> NewTask:
    """The task of a schedule's `task` (validated when the schedule was made or declared)."""
    return NewTask(
        task_type=spec["task_type"],
        input_json=json.dumps(spec.get("task_input")),
        queue=spec.get("queue", "default"),
        priority=spec.get("priority", 0),
        max_attempts=spec["max_attempts"],
        timeout_seconds=spec["timeout_seconds"],
        delay_seconds=spec.get("delay_seconds"),
        callback_url=spec.get("callback_url"),
        fairness_key=spec.get("fairness_key"),
        concurrency_key=spec.get("concurrency_key"),
        unique_key=spec.get("unique_key"),
        expires_in_seconds=spec.get("expires_in_seconds"),
    )


def _record(
    conn: Connection,
    schedule_id: int,
    at: datetime,
    kind: str,
    outcome: str,
    by: str,
    *,
    reason: str,
    missed_count: int | None = None,
    missed_until: datetime | None = None,
) -> Fire:
    """A fire that created nothing (missed, refused): its row, unless that time has one."""
    conn.execute(
        """
        INSERT INTO task_schedule_fires (schedule_id, scheduled_for, kind, outcome, reason, missed_count,
                                         missed_until, fired_by)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING
        """,
        (schedule_id, at, kind, outcome, reason, missed_count, missed_until, by),
    )
    return Fire(schedule_id, at, kind, outcome, reason=reason)
