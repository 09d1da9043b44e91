"""Error translation at the HTTP edge: every failure answers in one JSON shape,
{code, status, message, errors}, and never with a stack trace."""

from __future__ import annotations

import logging

from flask import Flask, request
from flask_smorest import abort
from psycopg_pool import PoolTimeout
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge

from skiplock.db import SESSION_ENDED
from skiplock.errors import (
    DatabaseUnavailable,
    InvalidTransition,
    ScheduleDeclaredInCode,
    ScheduleNameTaken,
    ScheduleNotFound,
    TaskGone,
    TaskNotFound,
    UniqueTaken,
    WorkflowNotFound,
)
from skiplock.schedules import ScheduleRefused

from .extensions import api

log = logging.getLogger("skiplock.api")

# Seconds a client should wait before retrying after a 503.
RETRY_AFTER_UNAVAILABLE = 1


def register(app: Flask) -> None:
    for missing in (TaskNotFound, ScheduleNotFound, WorkflowNotFound):
        app.register_error_handler(missing, _not_found)
    for taken in (ScheduleNameTaken, ScheduleDeclaredInCode):
        app.register_error_handler(taken, _taken)
    app.register_error_handler(ScheduleRefused, _rule_refused)
    app.register_error_handler(TaskGone, _gone)
    app.register_error_handler(InvalidTransition, _conflict)
    app.register_error_handler(UniqueTaken, _unique_taken)
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    for exc in (*SESSION_ENDED, PoolTimeout, DatabaseUnavailable):
        app.register_error_handler(exc, _unavailable)
    app.register_error_handler(Exception, _unexpected)


def _abort_response(code: int, **kwargs):
    """Build the response flask-smorest's handler would for abort(code, ...)."""
    try:
        abort(code, **kwargs)
    except HTTPException as error:
        return api().handle_http_exception(error)


def _gone(error: TaskGone):
    return _abort_response(410, message=str(error))


def _not_found(error: Exception):
    """A task, schedule or workflow that does not exist (or is another key's: the same answer)."""
    return _abort_response(404, message=str(error))


def _taken(error: Exception):
    """A schedule's name another of the owner's has; a change of a schedule declared in code."""
    return _abort_response(409, message=str(error))


def _rule_refused(error: ScheduleRefused):
    """A change that leaves a schedule with a rule that cannot be used."""
    return _abort_response(
        422, message="The schedule's rule cannot be used.", errors={"json": {error.field: [str(error)]}}
    )


def _conflict(error: InvalidTransition):
    """One 409 shape for task-result, cancel and retry: `status` is the task's status (as the
    original task-result answer has it), with its id and latest error."""
    return _abort_response(
        409,
        message=str(error),
        extra={"status": error.status, "task_id": error.task_id, "error": error.error},
    )


def _unique_taken(error: UniqueTaken):
    """A retry that would make a second unfinished task with the same unique_key."""
    return _abort_response(409, message=str(error), extra={"task_id": error.task_id})


def _too_large(error: RequestEntityTooLarge):
    """A body over SKIPLOCK_MAX_BODY_BYTES (Flask's MAX_CONTENT_LENGTH): the answer names the limit
    and the setting, and what to do instead."""
    limit = request.max_content_length
    size = request.content_length  # None for a chunked body, cut at the limit
    of_size = f" of {size:,} bytes" if size is not None else ""
    return _abort_response(
        413,
        message=f"The body{of_size} is over SKIPLOCK_MAX_BODY_BYTES ({limit:,} bytes): pass big inputs "
        "by reference (e.g. an object-storage URL), not inline.",
    )


def _unavailable(error: Exception):
    log.warning("database unavailable: %s", str(error).strip() or type(error).__name__)
    return _abort_response(
        503,
        message="The database is unavailable; retry shortly.",
        headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
    )


def _unexpected(error: Exception):
    # HTTPExceptions never get here: flask-smorest's more specific handler takes them.
    log.exception("unhandled error")
    return _abort_response(500, message=InternalServerError.description)
