"""Exceptions a task's code raises to decide what happens to its task, beyond "retry on error".

    from skiplock import NonRetryableError, RetryAfter

    @task_type("thumbnail", input=ThumbnailInput)
    def thumbnail(data, ctx):
        if not data["url"].endswith((".png", ".jpg")):
            raise NonRetryableError("not an image: retrying will not help")  # failed, for good
        response = fetch(data["url"])
        if response.status_code == 429:  # the upstream asks us to come back later
            raise RetryAfter(int(response.headers["Retry-After"]), "upstream rate limit")
        ...

Any other exception fails the attempt and retries it after the backoff until max_attempts.
Both are recorded in the task's attempt history (task_attempts.outcome `failed_for_good`,
`retry_requested`), shown by the dashboard, and end up in webhooks like any failure (the final
`task.failed` of a NonRetryableError carries its message as `error`).

This module imports nothing: task modules import it without loading the engine.
"""

from __future__ import annotations

import math

# The longest delay a task may ask for: a day. Longer waits belong to a schedule or a new task
# submitted with run_at, not to a task kept pending with its input and attempt history.
MAX_RETRY_DELAY_SECONDS = 24 * 3600.0


class NonRetryableError(Exception):
    """Fail the task for good: no more attempts whatever max_attempts says; its status becomes
    `failed` and its error "<exception type>: <message>" (subclass it to name your reasons)."""


class RetryAfter(Exception):
    """Run the task again in `seconds` (0 to MAX_RETRY_DELAY_SECONDS) instead of after the
    backoff, e.g. when an upstream answered 429 with a Retry-After.

    charge_attempt=False (the default): the attempt does not count against max_attempts (the
    task's max_attempts is raised by one, as River's snooze does, so attempt numbers never repeat:
    a late write of the old attempt can never pass for the new one). The table caps max_attempts
    at 1,000, which bounds how often a task can put itself off. charge_attempt=True: it counts
    like a failure, and the task fails for good once max_attempts is used up.

    A retry that would come after the task's expires_at expires the task instead."""

    def __init__(self, seconds: float, reason: str = "", *, charge_attempt: bool = False):
        seconds = float(seconds)
        if math.isnan(seconds) or not 0 <= seconds <= MAX_RETRY_DELAY_SECONDS:
            raise ValueError(f"RetryAfter: seconds must be between 0 and {MAX_RETRY_DELAY_SECONDS:.0f}")
        super().__init__(reason)
        self.seconds = seconds
        self.reason = reason
        self.charge_attempt = charge_attempt

    def __str__(self) -> str:
        charged = "" if self.charge_attempt else ", not counted"
        return f"{self.reason or 'the task asked'} (retry in {self.seconds:g} s{charged})"
