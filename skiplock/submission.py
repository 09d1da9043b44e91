"""The submit rules, once: how queues and task types may be named, the statuses a task can be
in, the bounds of a submit (priority, delay, timeout, attempts, batch size, input depth), what
Postgres can store, and the check of an input against its task type, which is looked up once.

Both edges call this: the API (api/schemas.py declares the OpenAPI shapes with these numbers and
turns a refusal into a 422) and the CLI (skiplock/cli/tasks.py: click's ranges, and a refusal as
one line on stderr). Each says a refusal in its own words; the rule is decided here. The
database's CHECK constraints (schema.sql) stand behind it. No Flask: `skiplock submit` must
start quickly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import marshmallow

from skiplock.registry import TaskRegistry, TaskType, UnknownTaskType

# Queues and task types (tasks_queue_valid, tasks_task_type_valid in schema.sql).
NAME_PATTERN = r"[A-Za-z0-9_.:-]{1,100}"
NAME_RULE = "1-100 letters, digits or _.:-"
_NAME = re.compile(NAME_PATTERN)

# Ids (of tasks, of keys) are Postgres bigints.
BIGINT_MAX = 2**63 - 1

# The task_status enum of schema.sql, in the order a task goes through them.
STATUSES = ("pending", "processing", "completed", "failed", "cancelled", "expired")

# Priorities run from -PRIORITY_LIMIT to PRIORITY_LIMIT; higher runs first.
PRIORITY_LIMIT = 1_000_000
# A task may be scheduled up to a year ahead (a leap year's worth).
MAX_DELAY_SECONDS = 366 * 24 * 3600
# A task may be given until twice that to start (expires_in_seconds).
MAX_EXPIRES_IN_SECONDS = 2 * MAX_DELAY_SECONDS
# An attempt may be given up to a week.
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
# Attempts a submit may ask for. The table allows more (tasks_max_attempts_in_range): each retry
# of a task that used them all grants one more.
MAX_ATTEMPTS = 100
# Deeper input is refused: Python's json and recursive code (ours, the task's) cannot take
# arbitrary depth, and no real input needs more.
MAX_INPUT_DEPTH = 100
# Tasks in one batch submit (one statement, one transaction).
MAX_BATCH = 1000
# fairness_key, concurrency_key and unique_key (tasks_scheduling_keys_valid in schema.sql).
MAX_KEY_LENGTH = 200


def is_name(value: str) -> bool:
    """A valid queue or task type name."""
    return _NAME.fullmatch(value) is not None


class StorageProblem(Enum):
    """Why Postgres could not store a JSON value and read it back; the value is the API's
    sentence for it."""

    NUL = "Text may not contain NUL (\\u0000) characters."
    NOT_FINITE = "Numbers must be finite (NaN and Infinity are not JSON)."
    TOO_DEEP = f"Nested deeper than {MAX_INPUT_DEPTH} levels."


def storage_problem(value: Any) -> StorageProblem | None:
    """What keeps this JSON from being stored and read back, if anything: jsonb cannot hold
    U+0000, NaN or Infinity, and nesting is bounded. Iterative, so any depth is safe to inspect."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return StorageProblem.NUL
        if isinstance(item, float) and not math.isfinite(item):
            return StorageProblem.NOT_FINITE
        if isinstance(item, (dict, list)):
            if depth > MAX_INPUT_DEPTH:
                return StorageProblem.TOO_DEEP
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


class SubmitRefused(Exception):
    """A submit the rules refuse; `field` names the part of it at fault."""

    field = "task_input"


class UnknownType(SubmitRefused):
    field = "task_type"

    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(name)
        self.name = name
        self.known = list(known)


class InputRefused(SubmitRefused):
    """The task type's input schema refused the input; `messages` are marshmallow's."""

    def __init__(self, task_type: str, messages: Any):
        super().__init__(task_type)
        self.task_type = task_type
        self.messages = messages


class InputNotStorable(SubmitRefused):
    def __init__(self, problem: StorageProblem):
        super().__init__(problem.value)
        self.problem = problem


class ExpiryRefused(SubmitRefused):
    """An expiry that leaves the task no time to run (in the past, or before its run_at), or
    given twice (expires_at and expires_in_seconds)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class BoundRefused(SubmitRefused):
    """A field outside its bounds (the API's schema and the CLI's options check the same ones as
    they parse; check_bounds is the check for callers that build a submit in code)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_bounds(
    *,
    queue: str,
    priority: int,
    max_attempts: int | None,
    timeout_seconds: int | None,
    delay_seconds: float | None,
    expires_in_seconds: float | None,
    fairness_key: str | None,
    concurrency_key: str | None,
    unique_key: str | None,
) -> None:
    """Raises BoundRefused naming the first field outside the bounds above."""
    ranges = (
        ("priority", priority, -PRIORITY_LIMIT, PRIORITY_LIMIT),
        ("max_attempts", max_attempts, 1, MAX_ATTEMPTS),
        ("timeout_seconds", timeout_seconds, 1, MAX_TIMEOUT_SECONDS),
        ("delay_seconds", delay_seconds, 0, MAX_DELAY_SECONDS),
        ("expires_in_seconds", expires_in_seconds, 0, MAX_EXPIRES_IN_SECONDS),
    )
    if not is_name(queue):
        raise BoundRefused("queue", f"Must be {NAME_RULE}.")
    for field, value, low, high in ranges:
        if value is not None and not (isinstance(value, int | float) and low <= value <= high):
            raise BoundRefused(field, f"Must be between {low} and {high}.")
    for field, key in (
        ("fairness_key", fairness_key),
        ("concurrency_key", concurrency_key),
        ("unique_key", unique_key),
    ):
        if key is not None and not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise BoundRefused(field, f"Must be 1 to {MAX_KEY_LENGTH} characters.")


@dataclass(frozen=True)
class Submission:
    """A task ready to insert: checked against its type, with the type's defaults filled in."""

    task_type: str
    input: Any
    queue: str
    priority: int
    max_attempts: int
    timeout_seconds: int
    run_at: datetime | None = None
    delay_seconds: float | None = None
    callback_url: str | None = None
    callback_secret: str | None = None
    fairness_key: str | None = None
    concurrency_key: str | None = None
    unique_key: str | None = None
    expires_at: datetime | None = None
    expires_in_seconds: float | None = None

    def columns(self) -> dict[str, Any]:
        """Everything but the input, as task_insert and NewTask take it."""
        return {
            "task_type": self.task_type,
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "timeout_seconds": self.timeout_seconds,
            "run_at": self.run_at,
            "delay_seconds": self.delay_seconds,
            "callback_url": self.callback_url,
            "callback_secret": self.callback_secret,
            "fairness_key": self.fairness_key,
            "concurrency_key": self.concurrency_key,
            "unique_key": self.unique_key,
            "expires_at": self.expires_at,
            "expires_in_seconds": self.expires_in_seconds,
        }


def checked_type(registry: TaskRegistry, task_type: str, value: Any) -> TaskType:
    """The task type (looked up once) once its input schema has accepted `value` and Postgres
    can store it. Raises UnknownType, InputRefused or InputNotStorable, in that order."""
    try:
        task = registry.get(task_type)
    except UnknownTaskType:
        raise UnknownType(task_type, registry.names()) from None
    try:
        task.load_input(value)
    except marshmallow.ValidationError as exc:
        raise InputRefused(task_type, exc.messages) from None
    problem = storage_problem(value)
    if problem is not None:
        raise InputNotStorable(problem)
    return task


def prepare(
    registry: TaskRegistry,
    *,
    task_type: str,
    task_input: Any,
    queue: str = "default",
    priority: int = 0,
    max_attempts: int | None = None,
    timeout_seconds: int | None = None,
    run_at: datetime | None = None,
    delay_seconds: float | None = None,
    callback_url: str | None = None,
    callback_secret: str | None = None,
    fairness_key: str | None = None,
    concurrency_key: str | None = None,
    unique_key: str | None = None,
    expires_at: datetime | None = None,
    expires_in_seconds: float | None = None,
) -> Submission:
    """A submit whose fields are within their bounds (each edge checks those as it parses),
    checked against its task type (checked_type), with the type's max_attempts and
    timeout_seconds where the submit gives none."""
    task = checked_type(registry, task_type, task_input)
    check_expiry(
        run_at=run_at,
        delay_seconds=delay_seconds,
        expires_at=expires_at,
        expires_in_seconds=expires_in_seconds,
    )
    return Submission(
        task_type=task_type,
        input=task_input,
        queue=queue,
        priority=priority,
        max_attempts=task.max_attempts if max_attempts is None else max_attempts,
        timeout_seconds=task.timeout_seconds if timeout_seconds is None else timeout_seconds,
        run_at=run_at,
        delay_seconds=delay_seconds,
        callback_url=callback_url,
        callback_secret=callback_secret,
        fairness_key=fairness_key,
        concurrency_key=concurrency_key,
        unique_key=unique_key,
        expires_at=expires_at,
        expires_in_seconds=expires_in_seconds,
    )


def check_expiry(
    *,
    run_at: datetime | None,
    delay_seconds: float | None,
    expires_at: datetime | None,
    expires_in_seconds: float | None,
) -> None:
    """An expiry must leave the task time to run: after now and after its run_at (or delay).
    Raises ExpiryRefused. Checked on this host's clock; the task expires on the database's."""
    if expires_at is not None and expires_in_seconds is not None:
        raise ExpiryRefused("Give expires_at or expires_in_seconds, not both.", "expires_in_seconds")
    if expires_at is None and expires_in_seconds is None:
        return
    field = "expires_at" if expires_at is not None else "expires_in_seconds"
    now = datetime.now(UTC)
    deadline = expires_at if expires_at is not None else now + timedelta(seconds=expires_in_seconds or 0)
    if deadline <= now:
        raise ExpiryRefused(
            "The task would expire before it could run: the expiry must be in the future.", field
        )
    start = run_at if run_at is not None else now + timedelta(seconds=delay_seconds or 0)
    if deadline <= start:
        raise ExpiryRefused(
            "The task would expire before it is due: the expiry must come after run_at or the delay.", field
        )
