"""Schemas of the limits (concurrency, start rate: api.concurrency_limits, api.queues), of key
weights (api.keys) and of what GET /api/queues and a pause add for them."""

from __future__ import annotations

from apispec import BasePlugin
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from skiplock import keys
from skiplock.sql.keys import MAX_WEIGHT, MIN_WEIGHT
from skiplock.submission import BIGINT_MAX

from .schemas import ApiKeyCreatedSchema, ApiKeyCreateSchema, ApiKeySchema, QueueSchema, QueueStateSchema
from .typed_submit import RULES as SUBMIT_AND_KEY_RULES

# Bounds of a limit, as of a key's own rate limit (skiplock.keys): the same "most" everywhere.
MAX_RUNNING = keys.MAX_UNFINISHED
MIN_STARTS_PER_SECOND = keys.MIN_RATE_PER_SECOND
MAX_STARTS_PER_SECOND = keys.MAX_RATE_PER_SECOND
MAX_BURST = keys.MAX_BURST

WEIGHT_RANGE = validate.Range(min=MIN_WEIGHT, max=MAX_WEIGHT)
WEIGHT_DESCRIPTION = (
    "Its fair share of the workers (default 1): while several keys have tasks due in one queue "
    "and priority, each starts tasks in proportion to its weight."
)


class LimitSetSchema(Schema):
    """A limit: max_running, max_starts_per_second or both (burst needs the rate)."""

    max_running = fields.Integer(
        strict=True,
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=0, max=MAX_RUNNING),
        metadata={
            "description": "Most of its tasks running at once across every worker (0 holds them "
            "all: a pause); null: no cap."
        },
    )
    max_starts_per_second = fields.Float(
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=MIN_STARTS_PER_SECOND, max=MAX_STARTS_PER_SECOND),
        metadata={
            "description": "Most starts per second on average across every worker; null: none.",
        },
    )
    burst = fields.Integer(
        strict=True,
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=1, max=MAX_BURST),
        metadata={
            "description": "Starts allowed at once (default one second's worth). Needs max_starts_per_second."
        },
    )

    @validates_schema(skip_on_field_errors=True)
    def something_to_limit(self, data, **kwargs):
        if data["burst"] is not None and data["max_starts_per_second"] is None:
            raise ValidationError("burst needs max_starts_per_second.", "burst")
        if data["max_running"] is None and data["max_starts_per_second"] is None:
            raise ValidationError(
                "Give max_running, max_starts_per_second or both (DELETE removes a limit).", "_schema"
            )


class LimitSchema(Schema):
    """A limit and what runs and waits under it now (the task_limit_usage view)."""

    scope = fields.String(
        required=True,
        metadata={
            "enum": ["key", "type", "queue"],
            "description": "key: an API key's concurrency_key; type: a task type; queue: a queue.",
        },
    )
    owner_key_id = fields.Integer(
        required=True, metadata={"description": "Scope key: the API key whose tasks it limits (0: auth off)."}
    )
    name = fields.String(required=True, metadata={"description": "The concurrency key, task type or queue."})
    max_running = fields.Integer(allow_none=True)
    max_starts_per_second = fields.Float(allow_none=True)
    burst = fields.Integer(allow_none=True)
    running = fields.Integer(
        required=True,
        metadata={"description": "Its tasks holding a slot: running, or admitted and about to start."},
    )
    waiting = fields.Integer(
        required=True, metadata={"description": "Its due tasks waiting for a slot or a start."}
    )
    updated_at = fields.DateTime(required=True)
    updated_by = fields.String(allow_none=True, metadata={"description": "Who set it (a key's prefix)."})


class OwnerArgsSchema(Schema):
    owner_key_id = fields.Integer(
        validate=validate.Range(min=0, max=BIGINT_MAX),
        metadata={
            "description": "Admin keys only: the limits of this API key (0: tasks submitted with "
            "auth off) instead of the caller's."
        },
    )


class QueueLimitSchema(Schema):
    max_running = fields.Integer(allow_none=True)
    max_starts_per_second = fields.Float(allow_none=True)
    burst = fields.Integer(allow_none=True)
    running = fields.Integer()
    waiting = fields.Integer()


class QueueSummarySchema(QueueSchema):
    waiting_on_limit = fields.Integer(
        required=True,
        metadata={
            "description": "Of the due tasks, those waiting for a concurrency, type, queue or rate limit."
        },
    )
    expired_last_hour = fields.Integer(
        required=True, metadata={"description": "Tasks that expired before they started, in the last hour."}
    )
    limit = fields.Nested(
        QueueLimitSchema,
        allow_none=True,
        metadata={"description": "The queue's limit (PUT /api/queues/{queue}/limit); null: none."},
    )


class QueueChangedSchema(QueueStateSchema):
    released = fields.Integer(
        metadata={
            "description": "A pause: tasks workers had claimed but not started, pending again (they "
            "start after the resume)."
        }
    )


class WeightedApiKeySchema(ApiKeySchema):
    weight = fields.Float(
        required=True, metadata={"description": "Its fair share of the workers (default 1)."}
    )


class WeightedApiKeyCreatedSchema(ApiKeyCreatedSchema):
    weight = fields.Float(
        required=True, metadata={"description": "Its fair share of the workers (default 1)."}
    )


class WeightedApiKeyCreateSchema(ApiKeyCreateSchema):
    weight = fields.Float(validate=WEIGHT_RANGE, metadata={"description": WEIGHT_DESCRIPTION})


class ApiKeyUpdateSchema(Schema):
    weight = fields.Float(
        required=True,
        validate=WEIGHT_RANGE,
        metadata={
            "description": f"{WEIGHT_DESCRIPTION} A change applies to its tasks that fall due from "
            "now on (those already queued keep their place).",
        },
    )


# The rules between fields LimitSetSchema (and a key's creation) check in code, written into their
# JSON schemas, as api.typed_submit does for the submits: a number in max_running or
# max_starts_per_second (or both), and a burst only with a rate.
_A_RATE = {"required": ["max_starts_per_second"], "properties": {"max_starts_per_second": {"type": "number"}}}
RULES = {
    "LimitSet": {
        "allOf": [
            {
                "anyOf": [
                    {"required": ["max_running"], "properties": {"max_running": {"type": "integer"}}},
                    _A_RATE,
                ]
            },
            {
                "anyOf": [
                    {"not": {"required": ["burst"]}},
                    {"properties": {"burst": {"not": {"type": "integer"}}}},  # null
                    _A_RATE,
                ]
            },
        ]
    },
    "WeightedApiKeyCreate": SUBMIT_AND_KEY_RULES["ApiKeyCreate"],
}


class LimitRulesPlugin(BasePlugin):
    """An apispec plugin: RULES into the OpenAPI document's components."""

    def schema_helper(self, name, definition, **kwargs) -> dict | None:
        return RULES.get(name)
