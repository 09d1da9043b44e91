"""What a call raises: one tree under SkiplockError. An answer of the API that is not a success is
an ApiError (a subclass per status) carrying the API's JSON error body, {code, status, message,
errors}; a network failure that outlived the retries is a TransportError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from .retries import retry_after_seconds

if TYPE_CHECKING:
    from .models import Task


class SkiplockError(Exception):
    """Every error of this client."""


class TransportError(SkiplockError):
    """The API could not be reached, or the connection broke, on every try. `__cause__` is the
    httpx exception of the last try."""

    def __init__(self, message: str, *, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class ApiError(SkiplockError):
    """The API answered with an error. `body` is its JSON error body ({code, status, message,
    errors}, and for a 409 about a task its `status`, `task_id` and `error`)."""

    def __init__(self, status_code: int, body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None,
                 attempts: int = 1):  # fmt: skip
        self.status_code = status_code
        self.body = dict(body)
        self.headers = dict(headers or {})
        self.attempts = attempts
        super().__init__(f"{status_code}: {self.message}")

    @property
    def message(self) -> str:
        return str(self.body.get("message") or self.body.get("status") or "")

    @property
    def errors(self) -> dict[str, Any]:
        """The fields at fault, by location: {"json": {"task_input": ["..."]}} (empty if none)."""
        errors = self.body.get("errors")
        return errors if isinstance(errors, dict) else {}

    @property
    def retry_after(self) -> float | None:
        """The answer's Retry-After, in seconds (429, 503; a 409 task-result asked too early)."""
        return retry_after_seconds(self.headers.get("retry-after"))


class BadRequest(ApiError):
    """400: the request cannot be read (a bad Idempotency-Key, JSON that does not parse)."""


class ValidationError(BadRequest):
    """422: the input was refused; `errors` names each field and why."""


class Unauthorized(ApiError):
    """401: no API key, or one the API does not know (or revoked)."""


class Forbidden(ApiError):
    """403: the key's role may not do this."""


class NotFound(ApiError):
    """404: no such task, workflow or schedule (or another key's: the same answer)."""


class Conflict(ApiError):
    """409: not in a state for this (cancel of a finished task, result of a failed one, a
    schedule name taken, a run-now that created nothing)."""


class Gone(ApiError):
    """410: the task was pruned (retention)."""


class PayloadTooLarge(ApiError):
    """413: the request body is over the API's limit."""


class RateLimited(ApiError):
    """429: the key's rate limit or its quota of unfinished tasks (still so after the retries)."""


class ServerError(ApiError):
    """5xx."""


class Unavailable(ServerError):
    """503: the database is unavailable (still so after the retries)."""


class TaskFailed(SkiplockError):
    """wait(raise_on_failure=True): the task ended without a result (failed, cancelled or
    expired). `task` is the task as it ended; its `error` says why."""

    def __init__(self, task: Task):
        super().__init__(f"Task {task.id} {task.status}: {task.error or 'no error recorded'}")
        self.task = task


class WaitTimeout(SkiplockError, TimeoutError):
    """wait(timeout=...): the task was not final by the deadline. `task` is its latest state."""

    def __init__(self, task: Task, timeout: float):
        super().__init__(f"Task {task.id} is still {task.status} after {timeout:g} s")
        self.task = task


BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
}


def error_for(response: httpx.Response, *, attempts: int = 1) -> ApiError:
    """The exception for an error answer (read in full). A body that is not the API's JSON (a
    proxy's page) still gives {code, status, message}."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {
            "code": response.status_code,
            "status": response.reason_phrase,
            "message": response.text[:500].strip() or response.reason_phrase,
        }
    kind = BY_STATUS.get(response.status_code, ServerError if response.status_code >= 500 else ApiError)
    return kind(response.status_code, body, headers=response.headers, attempts=attempts)
