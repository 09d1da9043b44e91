"""When a call is tried again, and after how long: capped exponential backoff with jitter, or the
answer's Retry-After. Pure decisions; the clients do the sleeping (time.sleep, asyncio.sleep).

Which failures are retried depends on what the call does if it runs twice:
- SAFE_TO_REPEAT calls (reads; submits, which carry an Idempotency-Key; cancel, pause, resume,
  patch and delete, whose second run changes nothing) are retried after any network failure
  (connect errors, timeouts, a connection dropped before the answer) and after 429 and 503.
- The others (a task's retry, a schedule's create and run-now) are retried only when the API
  surely did not act: the connection was never made, or it answered 429 or 503 (both refuse
  before changing anything). After a timeout or a dropped connection they raise TransportError:
  the caller looks before trying again.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

# Answers that refuse a request without acting on it, and say when to come back.
RETRY_STATUSES = frozenset({429, 503})
# Failures before the request left: nothing reached the API.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Repeat(enum.Enum):
    """What running a call twice does."""

    SAFE = "safe"  # the same as once
    UNSAFE = "unsafe"  # may act twice


@dataclass(frozen=True)
class Retry:
    """attempts: retries after the first try (0: none). A delay is backoff * 2**n (n the retry's
    number from 0) capped at max_backoff, with jitter (half of it random); an answer's Retry-After
    replaces it, unless longer than max_retry_after: then the error is raised at once."""

    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, retry: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number `retry` (0-based), None if it is not to be made."""
        if retry >= self.attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        ceiling = min(self.max_backoff, self.backoff * 2**retry)
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def delay_after_error(policy: Retry, retry: int, exc: httpx.TransportError, repeat: Repeat) -> float | None:
    """Seconds before trying a call again after this network failure; None: raise it."""
    if repeat is Repeat.SAFE or isinstance(exc, NOT_SENT):
        return policy.delay(retry)
    return None


def delay_after_answer(policy: Retry, retry: int, response: httpx.Response) -> float | None:
    """Seconds before trying a call again after this error answer; None: raise it."""
    if response.status_code not in RETRY_STATUSES:
        return None
    return policy.delay(retry, retry_after_seconds(response.headers.get("retry-after")))


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP-date (RFC 9110 10.2.3); None if
    absent or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
