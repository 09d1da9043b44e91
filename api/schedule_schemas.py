"""Schemas of schedules (api.schedules): what a client sends to make or change one, and what it
reads back: the rule, the task each fire submits, the policies, the next run times and the last
fires."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from skiplock import schedules
from skiplock.submission import Submission

from .schemas import NAME, RestSubmitTaskSchema

GRACE_RANGE = validate.Range(min=1, max=schedules.MAX_EVERY_SECONDS)
OPTIONAL_TASK_FIELDS = (
    "delay_seconds", "callback_url", "fairness_key", "concurrency_key", "unique_key", "expires_in_seconds",
)  # fmt: skip


def task_spec(task: Submission) -> dict[str, Any]:
    """A checked submit as task_schedules.task stores it (the type's defaults filled in)."""
    spec = {
        "task_type": task.task_type, "task_input": task.input, "queue": task.queue, "priority": task.priority,
        "max_attempts": task.max_attempts, "timeout_seconds": task.timeout_seconds,
    }  # fmt: skip
    spec.update({k: getattr(task, k) for k in OPTIONAL_TASK_FIELDS if getattr(task, k) is not None})
    return spec


class ScheduledTaskSchema(RestSubmitTaskSchema):
    """The task each fire submits: the fields of POST /api/tasks, checked the same way, except
    run_at and expires_at (a fire's task runs when it fires: use delay_seconds and
    expires_in_seconds) and callback_secret (the key's webhook secret signs them)."""

    class Meta:
        exclude = ("run_at", "expires_at", "callback_secret")

    @post_load
    def prepared(self, data: dict, **kwargs) -> dict[str, Any]:
        """The submit checked as POST /api/tasks checks it, as the schedule stores it."""
        return task_spec(super().prepared(data, **kwargs))


class _RuleFields(Schema):
    cron = fields.String(
        allow_none=True,
        validate=validate.Length(min=1, max=200),
        metadata={
            "description": "5 fields (minute hour day month weekday), or 6 with seconds first; names, "
            "ranges, steps, L and # (first Monday: 0 9 * * 1#1). Read in `timezone`."
        },
    )
    every_seconds = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(min=1, max=schedules.MAX_EVERY_SECONDS),
        metadata={"description": "Instead of cron: at every multiple of this since the Unix epoch (UTC)."},
    )
    timezone = fields.String(
        validate=validate.Length(min=1, max=100),
        metadata={
            "description": "IANA timezone of cron (default UTC). A time daylight saving skips runs at the "
            "end of the gap; a repeated one runs once when the hour is fixed."
        },
    )
    task = fields.Nested(ScheduledTaskSchema, metadata={"description": "The task each fire submits."})
    missed = fields.String(
        validate=validate.OneOf(schedules.MISSED_POLICIES),
        metadata={
            "description": "Fire times no worker made within grace_seconds (all workers down): skip "
            "(recorded as missed), run_once (the latest runs once), run_all (each of the latest missed_limit)."
        },
    )
    missed_limit = fields.Integer(
        strict=True, validate=validate.Range(min=1, max=schedules.MAX_MISSED_LIMIT),
        metadata={"description": "run_all: at most this many missed times run (default 100)."},
    )  # fmt: skip
    overlap = fields.String(
        validate=validate.OneOf(schedules.OVERLAP_POLICIES),
        metadata={
            "description": "skip: no new task while one of this schedule's is unfinished (default allow)."
        },
    )
    grace_seconds = fields.Integer(
        strict=True, allow_none=True, validate=GRACE_RANGE,
        metadata={
            "description": "A fire made this late is on time; later, it is missed (default: 60 s, or the "
            "gap between two fire times when shorter)."
        },
    )  # fmt: skip


class ScheduleCreateSchema(_RuleFields):
    name = fields.String(
        required=True, validate=NAME, metadata={"description": "Unique among your schedules."}
    )
    task = fields.Nested(
        ScheduledTaskSchema, required=True, metadata={"description": "The task each fire submits."}
    )
    paused = fields.Boolean(load_default=False, metadata={"description": "Made paused (resume to start it)."})

    @validates_schema(skip_on_field_errors=True)
    def one_rule(self, data: dict, **kwargs) -> None:
        try:
            schedules.Rule(
                cron=data.get("cron"),
                every_seconds=data.get("every_seconds"),
                timezone=data.get("timezone", "UTC"),
            )
        except schedules.ScheduleRefused as exc:
            raise ValidationError(str(exc), exc.field) from None


class SchedulePatchSchema(_RuleFields):
    """Any of the fields (task replaces the whole task); cron and every_seconds replace each other."""


class NextRunSchema(Schema):
    at = fields.DateTime()
    note = fields.String(allow_none=True, metadata={"description": "What daylight saving does to this run."})


class FireSchema(Schema):
    scheduled_for = fields.DateTime()
    kind = fields.String(metadata={"enum": ["on_time", "catch_up", "manual", "missed"]})
    outcome = fields.String(metadata={"enum": ["created", "deduplicated", "skipped", "refused", "missed"]})
    task_id = fields.Integer(allow_none=True)
    reason = fields.String(allow_none=True)
    missed_count = fields.Integer(allow_none=True)
    missed_until = fields.DateTime(allow_none=True)
    fired_at = fields.DateTime()
    fired_by = fields.String(allow_none=True)


class ScheduleSchema(Schema):
    schedule_id = fields.Integer(attribute="id", required=True)
    name = fields.String()
    declared_in_code = fields.Boolean(
        metadata={"description": "Declared next to the task types: owned by no key."}
    )
    owner_key_id = fields.Integer(allow_none=True)
    cron = fields.String(allow_none=True)
    every_seconds = fields.Integer(allow_none=True)
    timezone = fields.String()
    task = fields.Dict()
    missed = fields.String()
    missed_limit = fields.Integer()
    overlap = fields.String()
    grace_seconds = fields.Integer(allow_none=True)
    paused = fields.Boolean()
    next_fire_at = fields.DateTime()
    next_runs = fields.List(fields.Nested(NextRunSchema))
    last_fires = fields.List(fields.Nested(FireSchema))
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    updated_by = fields.String(allow_none=True)


class ScheduleListSchema(Schema):
    schedules = fields.List(fields.Nested(ScheduleSchema))


class RunNowSchema(Schema):
    schedule_id = fields.Integer()
    scheduled_for = fields.DateTime()
    kind = fields.String()
    outcome = fields.String()
    task_id = fields.Integer(allow_none=True)
    reason = fields.String(allow_none=True)
