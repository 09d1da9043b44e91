"""Schedules (POST, GET, PATCH, DELETE /api/schedules; pause, resume, run now): tasks submitted on
a clock by whichever worker is up, exactly once per fire time (skiplock/sql/schedule_fires.py).
A client key sees and steers its own schedules only (another key's answers 404, as a missing
one), and their tasks are its own: they count against its quota. An admin sees every schedule,
those declared in code included (pause, resume and run now work on those; they are changed in
code). Missing, taken and refused schedules answer through api.errors' handlers."""

from __future__ import annotations

import dataclasses

from flask import url_for
from flask.views import MethodView
from webargs.flaskparser import abort  # flask_smorest.abort, typed (NoReturn)

from skiplock.schedules import Rule
from skiplock.sql.schedule_fires import schedule_run_now
from skiplock.sql.schedules import (
    schedule_create,
    schedule_delete,
    schedule_get,
    schedule_list,
    schedule_set_paused,
    schedule_update,
    schedule_view,
    schedules_announce,
)

from .auth import principal
from .extensions import Blueprint, db
from .schedule_schemas import (
    RunNowSchema,
    ScheduleCreateSchema,
    ScheduleListSchema,
    SchedulePatchSchema,
    ScheduleSchema,
)

blp = Blueprint(
    "schedules",
    __name__,
    url_prefix="/api",
    description="Tasks submitted on a clock: cron or every N seconds.",
)

SCHEDULE_ID = "<int:schedule_id>"


def by() -> str:
    """Who made or changed a schedule (task_schedules.updated_by, task_schedule_fires.fired_by)."""
    return principal().prefix or "auth off"


def not_found():
    return blp.alt_response(404, response="DEFAULT_ERROR", description="No such schedule (or not yours)")


@blp.route("/schedules")
class Schedules(MethodView):
    @blp.response(200, ScheduleListSchema)
    def get(self):
        """Your schedules (an admin: all, those declared in code too), each with its next run
        times and last fires."""
        with db() as conn:
            return {
                "schedules": [
                    schedule_view(conn, row) for row in schedule_list(conn, owner=principal().owner)
                ]
            }

    @blp.arguments(ScheduleCreateSchema)
    @blp.response(201, ScheduleSchema)
    @blp.alt_response(409, response="DEFAULT_ERROR", description="You have a schedule of that name")
    def post(self, data):
        """Make a schedule: the task it submits at each fire time of its rule (cron in a
        timezone, or every N seconds), from whichever worker is up, exactly once per time. Its
        tasks are yours. A fire that cannot create its task (your quota, overlap skip) is
        recorded with the reason (last_fires)."""
        rule = Rule(cron=data.pop("cron", None), every_seconds=data.pop("every_seconds", None),
                    timezone=data.pop("timezone", "UTC"))  # fmt: skip
        with db() as conn:
            row = schedule_create(conn, rule=rule, owner_key_id=principal().key_id, by=by(), **data)
            schedules_announce(conn)
            return (
                schedule_view(conn, row),
                201,
                {"Location": url_for("schedules.Schedule", schedule_id=row["id"])},
            )


@blp.route(f"/schedules/{SCHEDULE_ID}")
class Schedule(MethodView):
    @blp.response(200, ScheduleSchema)
    @not_found()
    def get(self, schedule_id):
        """A schedule with its next run times (and what daylight saving does to them) and its
        last fires: what each created, or why not."""
        with db() as conn:
            return schedule_view(conn, schedule_get(conn, schedule_id, owner=principal().owner))

    @blp.arguments(SchedulePatchSchema)
    @blp.response(200, ScheduleSchema)
    @not_found()
    @blp.alt_response(409, response="DEFAULT_ERROR", description="Declared in code")
    def patch(self, data, schedule_id):
        """Change a schedule: its rule (cron and every_seconds replace each other; a new rule
        fires from its first time after now), its task (replaced whole), its policies."""
        with db() as conn:
            row = schedule_update(conn, schedule_id, data, owner=principal().owner, by=by())
            schedules_announce(conn)
            return schedule_view(conn, row)

    @blp.response(204)
    @not_found()
    def delete(self, schedule_id):
        """Delete a schedule and its fires; the tasks it made stay (their schedule_id names it)."""
        with db() as conn:
            schedule_delete(conn, schedule_id, owner=principal().owner)


def _set_paused(schedule_id: int, paused: bool) -> dict:
    with db() as conn:
        row = schedule_set_paused(conn, schedule_id, paused=paused, owner=principal().owner, by=by())
        if not paused:
            schedules_announce(conn)
        return schedule_view(conn, row)


@blp.route(f"/schedules/{SCHEDULE_ID}/pause")
class SchedulePause(MethodView):
    @blp.response(200, ScheduleSchema)
    @not_found()
    def post(self, schedule_id):
        """Pause a schedule: it fires nothing until resumed (run now still works)."""
        return _set_paused(schedule_id, True)


@blp.route(f"/schedules/{SCHEDULE_ID}/resume")
class ScheduleResume(MethodView):
    @blp.response(200, ScheduleSchema)
    @not_found()
    def post(self, schedule_id):
        """Resume a schedule: it fires from its rule's next time after now (what fell due while
        it was paused is not run)."""
        return _set_paused(schedule_id, False)


@blp.route(f"/schedules/{SCHEDULE_ID}/run")
class ScheduleRun(MethodView):
    @blp.response(202, RunNowSchema)
    @blp.alt_response(
        200, schema=RunNowSchema, description="Deduplicated: its unique_key's task is unfinished"
    )
    @blp.alt_response(
        409, response="DEFAULT_ERROR", description="Not created: overlap skip, quota, revoked key"
    )
    @not_found()
    def post(self, schedule_id):
        """Fire a schedule now, paused or not (its next fire is unchanged): 202 with the task it
        created (Location: the task), 200 if deduplicated, 409 saying why if it created nothing.
        The fire is recorded as any other (kind manual)."""
        with db() as conn:
            fire = schedule_run_now(conn, schedule_id, owner=principal().owner, by=by())
        body = dataclasses.asdict(fire)
        if fire.outcome == "created":
            return body, 202, {"Location": url_for("tasks.Task", task_id=fire.task_id)}
        if fire.outcome == "deduplicated":
            return body, 200
        abort(409, message=f"Nothing was created: {fire.reason}.", extra=body)
