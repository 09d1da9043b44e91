"""Request and response schemas (marshmallow); they are also the OpenAPI documentation."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from flask import current_app
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from skiplock.registry import UnknownTaskType
from skiplock.webhooks import targets as callbacks

NAME_PATTERN = r"[A-Za-z0-9_.:-]{1,100}"
NAME = validate.Regexp(rf"^{NAME_PATTERN}$", error="1-100 letters, digits or _.:-")
STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
MAX_DELAY_SECONDS = 366 * 24 * 3600
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
PRIORITY_RANGE = validate.Range(min=-1_000_000, max=1_000_000)
# Deeper task_input is refused: Python's json and recursive code (ours, the task's) cannot take
# arbitrary depth, and no real input needs more.
MAX_INPUT_DEPTH = 100
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
        validate=validate.Range(min=1, max=100),
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

    @validates_schema(skip_on_field_errors=True)
    def check_task(self, data, **kwargs):
        if "delay_seconds" in data and "run_at" in data:
            raise ValidationError("Give delay_seconds or run_at, not both.", "delay_seconds")
        check_callback(data)
        registry = current_app.extensions["skiplock"].registry
        try:
            task = registry.get(data["task_type"])
        except UnknownTaskType:
            known = ", ".join(registry.names())
            raise ValidationError(
                f"Unknown task type {data['task_type']!r}; known types: {known}.", "task_type"
            ) from None
        try:
            task.load_input(data["task_input"])
        except ValidationError as exc:
            raise ValidationError(exc.messages, "task_input") from None
        problem = _storage_problem(data["task_input"])
        if problem:
            raise ValidationError(problem, "task_input")


def check_callback(data: dict) -> None:
    """A callback URL this server may call (see skiplock.callbacks); a secret only with one."""
    if "callback_secret" in data and "callback_url" not in data:
        raise ValidationError("A callback_secret signs a callback: give callback_url too.", "callback_secret")
    if "callback_url" in data:
        try:
            allow = current_app.extensions["skiplock"].settings.webhook_allow
            callbacks.check(data["callback_url"], allow, fresh=False)
        except callbacks.CallbackRefused as exc:
            raise ValidationError(str(exc), "callback_url") from None


def _storage_problem(value) -> str | None:
    """Why this JSON cannot be stored and read back, if it cannot: Postgres jsonb cannot hold
    U+0000, NaN or Infinity, and nesting is bounded. Iterative, so any depth is safe to inspect."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return "Text may not contain NUL (\\u0000) characters."
        if isinstance(item, float) and not math.isfinite(item):
            return "Numbers must be finite (NaN and Infinity are not JSON)."
        if isinstance(item, (dict, list)):
            if depth > MAX_INPUT_DEPTH:
                return f"Nested deeper than {MAX_INPUT_DEPTH} levels."
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


class RestSubmitTaskSchema(SubmitTaskSchema):
    """POST /api/tasks and each task of a batch: task_type is required, and names the schema of
    task_input (documented per type as a oneOf, see api.typed_submit). The original
    /api/submit-task keeps its default type."""

    task_type = fields.String(
        required=True, validate=NAME, metadata={"description": "See GET /api/task-types."}
    )


MAX_BATCH = 1000


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


class SubmittedSchema(Schema):
    task_id = fields.Integer(attribute="id", required=True)
    status = fields.String(required=True)


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


class TaskDetailSchema(TaskSchema):
    task_input = fields.Raw(attribute="input", allow_none=True)


class TaskResultSchema(Schema):
    task_id = fields.Integer(attribute="id", required=True)
    result = fields.Raw(allow_none=True)


class TaskListArgsSchema(Schema):
    status = fields.String(validate=validate.OneOf(STATUSES))
    task_type = fields.String(validate=NAME)
    queue = fields.String(validate=NAME)
    before = fields.Integer(
        validate=validate.Range(min=1, max=2**63 - 1),
        metadata={"description": "Cursor: only tasks with a smaller id (pass next_before)."},
    )
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))


class TaskListSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema))
    next_before = fields.Integer(
        allow_none=True, metadata={"description": "Pass as `before` for the next page; null at the end."}
    )


class AttemptSchema(Schema):
    attempt = fields.Integer()
    worker_id = fields.String()
    outcome = fields.String()
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
            validate.Length(min=1, max=100),
            validate.Regexp(r"^[^\x00-\x1f\x7f]*$", error="No control characters."),
        ],
    )
    role = fields.String(load_default="client", validate=validate.OneOf(["client", "admin"]))
    rate_per_second = fields.Float(
        validate=validate.Range(min=0.001, max=1_000_000),
        metadata={"description": "Requests per second on average (token bucket); omit for no limit."},
    )
    burst = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=1_000_000),
        metadata={
            "description": "Requests at once (the bucket's size); default one second's worth. Needs rate_per_second."
        },
    )
    max_unfinished = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=100_000_000),
        metadata={"description": "Most tasks pending or processing at once; omit for no cap."},
    )

    @validates_schema(skip_on_field_errors=True)
    def burst_needs_rate(self, data, **kwargs):
        if data.get("burst") is not None and data.get("rate_per_second") is None:
            raise ValidationError("A burst needs a rate_per_second.", "burst")


class ApiKeySchema(Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    role = fields.String(required=True, metadata={"enum": ["client", "admin"]})
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
