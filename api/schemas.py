"""Request and response schemas (marshmallow); they are also the OpenAPI documentation."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import current_app
from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from skiplock import keys, submission
from skiplock.sql import waiting_for
from skiplock.submission import (
    BIGINT_MAX,
    MAX_ATTEMPTS,
    MAX_BATCH,
    MAX_DELAY_SECONDS,
    MAX_EXPIRES_IN_SECONDS,
    MAX_KEY_LENGTH,
    MAX_TIMEOUT_SECONDS,
    NAME_PATTERN,
    NAME_RULE,
    PRIORITY_LIMIT,
    STATUSES,
    ExpiryRefused,
    InputNotStorable,
    InputRefused,
    Submission,
    SubmitRefused,
    UnknownType,
)
from skiplock.webhooks import targets as callbacks

NAME = validate.Regexp(rf"^{NAME_PATTERN}$", error=NAME_RULE)
KEY_LENGTH = validate.Length(min=1, max=MAX_KEY_LENGTH)
# GET /api/tasks: a page of this many tasks unless the client asks for more (up to the maximum).
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500
PRIORITY_RANGE = validate.Range(min=-PRIORITY_LIMIT, max=PRIORITY_LIMIT)
# Standard Webhooks secrets: whsec_ + base64 (24 to 64 bytes: 32 to 88 characters).
# Exactly the base64 of 24 to 64 bytes.
_B64 = "[A-Za-z0-9+/]"
SECRET_PATTERN = rf"^whsec_(?:(?:{_B64}{{4}}){{8,20}}(?:{_B64}{{2}}==|{_B64}{{3}}=)?|(?:{_B64}{{4}}){{21}}(?:{_B64}{{2}}==)?)$"


def _utc_representable(value: datetime) -> None:
    """Postgres would store a time Python cannot read back (before year 1 or after 9999 in UTC),
    and every later read of the row would fail."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValidationError("Must fall between years 1 and 9999 in UTC.") from None


class SubmitTaskSchema(Schema):
    task_input = fields.Raw(
        required=True,
        allow_none=True,
        metadata={"description": "Input of the task: any JSON the task type's schema accepts."},
    )
    task_type = fields.String(
        load_default="default", validate=NAME, metadata={"description": "See GET /api/task-types."}
    )
    queue = fields.String(load_default="default", validate=NAME)
    priority = fields.Integer(
        strict=True, load_default=0, validate=PRIORITY_RANGE, metadata={"description": "Higher runs first."}
    )
    delay_seconds = fields.Float(
        validate=validate.Range(min=0, max=MAX_DELAY_SECONDS),
        metadata={"description": "Run no earlier than this many seconds from now."},
    )
    run_at = fields.AwareDateTime(
        format="iso",
        validate=_utc_representable,
        metadata={"description": "Run no earlier than this time (ISO 8601 with a UTC offset)."},
    )
    max_attempts = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=MAX_ATTEMPTS),
        metadata={"description": "Attempts before the task fails for good (default: the type's)."},
    )
    timeout_seconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=MAX_TIMEOUT_SECONDS),
        metadata={"description": "An attempt running longer is killed (default: the type's)."},
    )
    callback_url = fields.String(
        validate=validate.Length(min=1, max=callbacks.MAX_URL_LENGTH),
        metadata={
            "format": "uri",
            "description": "When the task is final (completed, failed or cancelled), skiplock POSTs "
            "{type, timestamp, data: the task as task-status shows it} here, signed per Standard Webhooks "
            "(webhook-id, webhook-timestamp, webhook-signature), and retries for hours until a 2xx. "
            "http(s) only; loopback, private and link-local addresses are refused unless the operator "
            "allows them.",
        },
    )
    callback_secret = fields.String(
        validate=validate.Regexp(
            SECRET_PATTERN, error="whsec_ followed by the base64 of 24 to 64 random bytes."
        ),
        load_only=True,
        metadata={
            "description": "Signs this task's webhook (whsec_ + base64 of 24-64 random bytes). "
            "Default: the key's secret (GET /api/webhooks/secret)."
        },
    )
    fairness_key = fields.String(
        validate=KEY_LENGTH,
        metadata={
            "description": "Whom the task is for, within the key's fair share (say, your customer "
            "id): the key's fairness keys take turns."
        },
    )
    concurrency_key = fields.String(
        validate=KEY_LENGTH,
        metadata={
            "description": "Counts the task against the limit of this key "
            "(PUT /api/concurrency-limits/{key}): at most max_running run at once, at most "
            "max_starts_per_second start. Scoped to your API key."
        },
    )
    unique_key = fields.String(
        validate=KEY_LENGTH,
        metadata={
            "description": "While a task of yours with this key is unfinished, a submit with it "
            "creates nothing and answers that task (200, deduplicated: true). Unlike "
            "Idempotency-Key, which replays the answer to a repeated request, this is about the "
            "task: any request, until the task is final."
        },
    )
    expires_at = fields.AwareDateTime(
        format="iso",
        validate=_utc_representable,
        metadata={
            "description": "If the task has not started by then, it never starts: it ends expired "
            "(ISO 8601 with a UTC offset)."
        },
    )
    expires_in_seconds = fields.Float(
        validate=validate.Range(min=0.001, max=MAX_EXPIRES_IN_SECONDS),
        metadata={"description": "As expires_at, this many seconds from now (the database's clock)."},
    )

    @post_load
    def prepared(self, data: dict, **kwargs) -> Submission:
        """The submit checked against its task type (looked up once), its defaults filled in."""
        if "delay_seconds" in data and "run_at" in data:
            raise ValidationError("Give delay_seconds or run_at, not both.", "delay_seconds")
        check_callback(data)
        try:
            return submission.prepare(current_app.extensions["skiplock"].registry, **data)
        except SubmitRefused as exc:
            raise ValidationError(refusal_message(exc), exc.field) from None


def refusal_message(exc: SubmitRefused) -> str | dict | list:
    """A refused submit in the API's words (under the field at fault)."""
    if isinstance(exc, ExpiryRefused):
        return str(exc)
    if isinstance(exc, UnknownType):
        return f"Unknown task type {exc.name!r}; known types: {', '.join(exc.known)}."
    if isinstance(exc, InputRefused):
        return exc.messages
    if isinstance(exc, InputNotStorable):
        return exc.problem.value
    raise TypeError(f"no message for {type(exc).__name__}")


def check_callback(data: dict) -> None:
    """A callback URL this server may call (see skiplock.webhooks.targets); a secret only with one."""
    if "callback_secret" in data and "callback_url" not in data:
        raise ValidationError("A callback_secret signs a callback: give callback_url too.", "callback_secret")
    if "callback_url" in data:
        try:
            allow = current_app.extensions["skiplock"].settings.webhook_allow
            callbacks.check(data["callback_url"], allow, fresh=False)
        except callbacks.CallbackRefused as exc:
            raise ValidationError(str(exc), "callback_url") from None


class RestSubmitTaskSchema(SubmitTaskSchema):
    """POST /api/tasks and each task of a batch: task_type is required, and names the schema of
    task_input (documented per type as a oneOf, see api.typed_submit). The original
    /api/submit-task keeps its default type."""

    task_type = fields.String(
        required=True, validate=NAME, metadata={"description": "See GET /api/task-types."}
    )


class BatchSubmitSchema(Schema):
    tasks = fields.List(
        fields.Nested(RestSubmitTaskSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_BATCH),
        metadata={"description": f"1 to {MAX_BATCH} tasks, each as for POST /api/tasks."},
    )


class BatchSubmittedSchema(Schema):
    task_ids = fields.List(fields.Integer(), metadata={"description": "Ids in the order submitted."})
    status = fields.String()
    deduplicated = fields.List(
        fields.Boolean(),
        metadata={
            "description": "Per task, in order: true if it was not created because an unfinished "
            "task of yours (or an earlier one of the batch) has its unique_key; its id is that task's."
        },
    )


class SubmittedSchema(Schema):
    task_id = fields.Integer(attribute="id", required=True)
    status = fields.String(required=True)
    deduplicated = fields.Boolean(
        metadata={"description": "Present (true) when nothing was created: the task with this unique_key."}
    )


class TaskSchema(Schema):
    task_id = fields.Integer(attribute="id", required=True)
    status = fields.String(required=True, metadata={"enum": list(STATUSES)})
    result = fields.Raw(allow_none=True, metadata={"description": "null until completed"})
    error = fields.String(allow_none=True, metadata={"description": "latest failure, if any"})
    progress = fields.Float(allow_none=True, metadata={"description": "0..1, or null"})
    attempts = fields.Integer()
    max_attempts = fields.Integer()
    task_type = fields.String()
    queue = fields.String()
    priority = fields.Integer()
    timeout_seconds = fields.Integer()
    created_at = fields.DateTime()
    run_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)


class SubmittedTaskSchema(TaskSchema):
    """POST /api/tasks: the task as stored."""

    deduplicated = fields.Boolean(
        metadata={"description": "Present (true) when nothing was created: the task with this unique_key."}
    )


class LimitStateSchema(Schema):
    scope = fields.String(metadata={"enum": ["key", "type", "queue"]})
    name = fields.String()
    max_running = fields.Integer(allow_none=True)
    max_starts_per_second = fields.Float(allow_none=True)
    running = fields.Integer()
    waiting = fields.Integer()


class WaitingForSchema(Schema):
    reason = fields.String(required=True, metadata={"enum": list(waiting_for.REASONS)})
    detail = fields.String(required=True, metadata={"description": "The same, in words."})
    until = fields.DateTime(metadata={"description": "run_at, retry_backoff: when it falls due."})
    limit = fields.Nested(
        LimitStateSchema, metadata={"description": "*_limit, rate_limit: the limit it waits on."}
    )
    tasks_ahead = fields.Integer(
        metadata={
            "description": "fair_share, worker: runnable tasks of its queue that start before it "
            f"(counted up to {waiting_for.MAX_TASKS_AHEAD:,})."
        }
    )
    owners_ahead = fields.Integer(
        metadata={
            "description": "fair_share, worker: other owners (API keys) among them at its priority "
            f"(counted up to {waiting_for.MAX_OWNERS_AHEAD:,})."
        }
    )


class TaskDetailSchema(TaskSchema):
    task_input = fields.Raw(attribute="input", allow_none=True)
    fairness_key = fields.String(allow_none=True)
    concurrency_key = fields.String(allow_none=True)
    unique_key = fields.String(allow_none=True)
    expires_at = fields.DateTime(allow_none=True)
    schedule_id = fields.Integer(
        allow_none=True,
        metadata={"description": "The schedule whose fire made it (GET /api/schedules/{id})."},
    )
    scheduled_for = fields.DateTime(allow_none=True, metadata={"description": "That fire's time."})
    waiting_for = fields.Nested(
        WaitingForSchema,
        allow_none=True,
        metadata={"description": "Why a pending task has not started yet; null unless pending."},
    )


class TaskResultSchema(Schema):
    task_id = fields.Integer(attribute="id", required=True)
    result = fields.Raw(allow_none=True)


class TaskListArgsSchema(Schema):
    status = fields.String(validate=validate.OneOf(STATUSES))
    task_type = fields.String(validate=NAME)
    queue = fields.String(validate=NAME)
    before = fields.Integer(
        validate=validate.Range(min=1, max=BIGINT_MAX),
        metadata={"description": "Cursor: only tasks with a smaller id (pass next_before)."},
    )
    limit = fields.Integer(
        load_default=LIST_LIMIT_DEFAULT, validate=validate.Range(min=1, max=LIST_LIMIT_MAX)
    )


class TaskListSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema))
    next_before = fields.Integer(
        allow_none=True, metadata={"description": "Pass as `before` for the next page; null at the end."}
    )


class AttemptSchema(Schema):
    attempt = fields.Integer()
    worker_id = fields.String()
    outcome = fields.String(
        metadata={
            "description": "How it ended (task_attempt_outcome in schema.sql): completed, failed, timed_out, "
            "crashed, lost, cancelled, handed_back, released; failed_for_good (the task raised "
            "NonRetryableError) or retry_requested (it raised RetryAfter)."
        }
    )
    started_at = fields.DateTime()
    finished_at = fields.DateTime()
    error = fields.String(allow_none=True)


class TaskTypeSchema(Schema):
    name = fields.String()
    description = fields.String()
    timeout_seconds = fields.Integer()
    max_attempts = fields.Integer()
    input_schema = fields.Dict(metadata={"description": "JSON schema of task_input"})


class TaskConflictSchema(Schema):
    """409 from task-result, cancel and retry: `status` is the task's status here, not the HTTP
    reason; `error` its latest error, if any."""

    code = fields.Integer(required=True)
    status = fields.String(required=True, metadata={"enum": list(STATUSES)})
    message = fields.String(required=True)
    task_id = fields.Integer(required=True)
    error = fields.String(allow_none=True)


class ApiKeyCreateSchema(Schema):
    """A new key. `burst` needs `rate_per_second` (documented as anyOf, see api.typed_submit)."""

    name = fields.String(
        required=True,
        validate=[
            validate.Length(min=1, max=keys.MAX_NAME_LENGTH),
            validate.Regexp(r"^[^\x00-\x1f\x7f]*$", error="No control characters."),
        ],
    )
    role = fields.String(load_default="client", validate=validate.OneOf(keys.ROLES))
    rate_per_second = fields.Float(
        validate=validate.Range(min=keys.MIN_RATE_PER_SECOND, max=keys.MAX_RATE_PER_SECOND),
        metadata={"description": "Requests per second on average (token bucket); omit for no limit."},
    )
    burst = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=keys.MAX_BURST),
        metadata={
            "description": "Requests at once (the bucket's size); default one second's worth. Needs rate_per_second."
        },
    )
    max_unfinished = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=keys.MAX_UNFINISHED),
        metadata={"description": "Most tasks pending or processing at once; omit for no cap."},
    )

    @validates_schema(skip_on_field_errors=True)
    def burst_needs_rate(self, data, **kwargs):
        if data.get("burst") is not None and data.get("rate_per_second") is None:
            raise ValidationError("A burst needs a rate_per_second.", "burst")


class ApiKeySchema(Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    role = fields.String(required=True, metadata={"enum": list(keys.ROLES)})
    prefix = fields.String(
        required=True, metadata={"description": "Not secret: names the key in lists and logs."}
    )
    rate_per_second = fields.Float(allow_none=True)
    burst = fields.Integer(allow_none=True)
    max_unfinished = fields.Integer(allow_none=True)
    created_at = fields.DateTime(required=True)
    revoked_at = fields.DateTime(allow_none=True)
    last_used_at = fields.DateTime(allow_none=True)


class ApiKeyCreatedSchema(ApiKeySchema):
    token = fields.String(
        required=True, metadata={"description": "Shown this once; only its digest is stored."}
    )


class QueueSchema(Schema):
    queue = fields.String(required=True)
    due = fields.Integer(required=True, metadata={"description": "Pending tasks whose run_at has come."})
    scheduled = fields.Integer(required=True, metadata={"description": "Pending tasks due later."})
    reserved = fields.Integer(
        required=True, metadata={"description": "Claimed by a worker, not started yet."}
    )
    running = fields.Integer(required=True, metadata={"description": "Running now."})
    oldest_due_wait_seconds = fields.Float(
        allow_none=True,
        metadata={"description": "How long the oldest due task has waited; null if none is due."},
    )
    paused = fields.Boolean(required=True)


class QueueStateSchema(Schema):
    queue = fields.String(required=True)
    paused = fields.Boolean(required=True)
    changed_at = fields.DateTime(required=True)
    changed_by = fields.String(allow_none=True)
