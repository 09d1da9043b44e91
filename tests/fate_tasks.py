"""Task types that decide their own fate (skiplock.task_exceptions), loaded by the worker in
tests/worker/test_task_fate.py."""

from __future__ import annotations

from marshmallow import Schema, fields

from skiplock import NonRetryableError, RetryAfter
from skiplock.registry import task_type


class NotAnImage(NonRetryableError):
    """A reason of the task's own, named by its class."""


@task_type("give_up", max_attempts=5, timeout_seconds=10)
def give_up(value, ctx):
    """Fail for good at once: retrying cannot help."""
    raise NotAnImage(f"{value!r} is not an image")


class ComeBackInput(Schema):
    seconds = fields.Float(required=True)
    times = fields.Integer(required=True)  # ask this many times, then complete
    charge = fields.Boolean(load_default=False)


@task_type("come_back", input=ComeBackInput, max_attempts=1, timeout_seconds=10)
def come_back(data, ctx):
    """Ask to run again `seconds` later, `times` times, as an upstream's 429 would make it."""
    if ctx.attempt <= data["times"]:
        raise RetryAfter(data["seconds"], "upstream rate limit", charge_attempt=data["charge"])
    return {"attempt": ctx.attempt, "max_attempts": ctx.max_attempts}
