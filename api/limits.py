"""Rate limits and quotas per API key, held across every API process and host.

Rate: each key with rate_per_second has a token bucket in Postgres (api_key_buckets). A process
takes tokens from it in chunks of about 1/20 s worth and spends them locally, so the bucket's
row is written a few times a second per process, whatever the request rate, and a key out of
tokens is refused without a query until its next token is due. Unused tokens go back when a
chunk expires, so the limit holds within a few percent over seconds.

Quota: a key with max_unfinished may have at most that many tasks pending or processing. Each
process counts them (task_unfinished_count, bounded by the cap) at most once a second, adding
what it submitted since; near the cap it counts again before accepting more. With several
processes the cap may be passed by what the others accepted since their last count (a second's
worth at most, which the rate limit bounds).

Refusals are 429 with Retry-After and the IETF RateLimit / RateLimit-Policy fields
(draft-ietf-httpapi-ratelimit-headers), and change nothing.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from flask import Flask, Response, g
from flask_smorest import abort

from api.auth import Principal
from api.extensions import db, store
from skiplock import queries

# A chunk of tokens is this fraction of a second's rate (at least 1, at most MAX_CHUNK).
CHUNK_FRACTION = 0.05
MAX_CHUNK = 100
# Tokens a process holds but has not spent are given back after this long.
CHUNK_TTL_SECONDS = 1.0
# A key's unfinished tasks are counted again after this long, or this soon when near its cap.
QUOTA_RECOUNT_SECONDS = 1.0
QUOTA_RECOUNT_NEAR_CAP_SECONDS = 0.25
RATE_POLICY = "rate"
QUOTA_POLICY = "unfinished"


@dataclass
class _Stash:
    tokens: int = 0
    expires: float = 0.0
    denied_until: float = 0.0
    bucket_left: float = 0.0  # what the shared bucket held when last read


@dataclass
class _Count:
    counted: int = 0
    at: float = -math.inf
    since: int = 0  # submitted by this process since the count


def burst_of(who: Principal) -> float:
    return float(who.burst) if who.burst is not None else max(1.0, who.rate_per_second)


class RateLimiter:
    def __init__(self):
        self._stashes: dict[int, _Stash] = {}
        self._lock = threading.Lock()

    def take(self, who: Principal) -> tuple[bool, int, float]:
        """Spend one token of the key: (allowed, tokens it may still count on, seconds until the
        next one if refused)."""
        now = time.monotonic()
        with self._lock:
            stash = self._stashes.setdefault(who.key_id, _Stash())
            if stash.tokens > 0 and now < stash.expires:
                stash.tokens -= 1
                return True, stash.tokens + int(stash.bucket_left), 0.0
            if now < stash.denied_until:
                return False, 0, stash.denied_until - now
            leftover, stash.tokens = (stash.tokens if now >= stash.expires else 0), 0
        rate, burst = who.rate_per_second, burst_of(who)
        chunk = max(1, min(MAX_CHUNK, int(rate * CHUNK_FRACTION), int(burst)))
        with db() as conn:
            if leftover:
                queries.api_key_return_tokens(conn, key_id=who.key_id, burst=burst, tokens=leftover)
            granted, left, _ = queries.api_key_take_tokens(
                conn, key_id=who.key_id, rate=rate, burst=burst, want=chunk
            )
        with self._lock:
            stash.bucket_left = left
            if granted == 0:
                # The next token is due when the bucket holds one again.
                stash.denied_until = now + max(0.001, (1 - left) / rate)
                return False, 0, stash.denied_until - now
            stash.tokens, stash.expires = granted - 1, now + CHUNK_TTL_SECONDS
            return True, stash.tokens + int(left), 0.0


class QuotaKeeper:
    def __init__(self):
        self._counts: dict[int, _Count] = {}
        self._lock = threading.Lock()

    def admit(self, who: Principal, n: int) -> tuple[bool, int]:
        """Whether the key may add n unfinished tasks; (admitted, how many more it may add)."""
        cap = who.max_unfinished
        now = time.monotonic()
        with self._lock:
            count = self._counts.setdefault(who.key_id, _Count())
            near_cap = count.counted + count.since + n > cap
            stale = now - count.at >= (QUOTA_RECOUNT_NEAR_CAP_SECONDS if near_cap else QUOTA_RECOUNT_SECONDS)
        if stale:
            with db() as conn:
                counted = queries.task_unfinished_count(conn, owner=who.key_id, up_to=cap)
            with self._lock:
                count.counted, count.at, count.since = counted, now, 0
        with self._lock:
            if count.counted + count.since + n > cap:
                return False, max(0, cap - count.counted - count.since)
            count.since += n
            return True, cap - count.counted - count.since


def register(app: Flask) -> None:
    app.before_request(limit_requests)
    app.after_request(rate_limit_headers)


def limit_requests() -> None:
    """Every /api request of a key with a rate spends a token (after authentication)."""
    who: Principal | None = g.get("principal")
    if who is None or who.rate_per_second is None:
        return
    allowed, remaining, wait = store().limiter.take(who)
    g.rate_state = (remaining, wait)
    if not allowed:
        retry_after = max(1, math.ceil(wait))
        abort(
            429,
            message=f"Rate limit of key {who.prefix} exceeded ({who.rate_per_second:g} requests/s, "
            f"burst {burst_of(who):g}); retry after {retry_after} s.",
            headers={"Retry-After": str(retry_after), **_rate_fields(who, 0, wait)},
        )


def admit_tasks(n: int) -> None:
    """Refuse (429) a submit of n tasks that would take the key past its cap on unfinished ones."""
    who: Principal = g.principal
    if who.max_unfinished is None:
        return
    admitted, room = store().quotas.admit(who, n)
    g.quota_state = room
    if not admitted:
        abort(
            429,
            message=f"Key {who.prefix} may have at most {who.max_unfinished} unfinished tasks; "
            f"{room} more can be submitted now. Retry when some have finished.",
            headers={"Retry-After": "1", **_quota_fields(who, room)},
        )


def rate_limit_headers(response: Response) -> Response:
    """Where the key stands, on every answer to a key with limits (429s carry their own)."""
    who: Principal | None = g.get("principal")
    if who is None or response.status_code == 429:
        return response
    items = []
    if who.rate_per_second is not None and "rate_state" in g:
        items.append(_rate_item(*g.rate_state))
    if who.max_unfinished is not None and "quota_state" in g:
        items.append(_quota_item(g.quota_state))
    if items:
        response.headers["RateLimit-Policy"] = _policies(who)
        response.headers["RateLimit"] = ", ".join(items)
    return response


def _policies(who: Principal) -> str:
    policies = []
    if who.rate_per_second is not None:
        burst = burst_of(who)
        policies.append(f'"{RATE_POLICY}";q={int(burst)};w={max(1, math.ceil(burst / who.rate_per_second))}')
    if who.max_unfinished is not None:
        policies.append(f'"{QUOTA_POLICY}";q={who.max_unfinished};qu="concurrent-requests"')
    return ", ".join(policies)


def _rate_item(remaining: int, wait: float) -> str:
    reset = 0 if remaining > 0 else max(1, math.ceil(wait))
    return f'"{RATE_POLICY}";r={remaining};t={reset}'


def _quota_item(room: int) -> str:
    return f'"{QUOTA_POLICY}";r={room}'


def _rate_fields(who: Principal, remaining: int, wait: float) -> dict[str, str]:
    return {"RateLimit-Policy": _policies(who), "RateLimit": _rate_item(remaining, wait)}


def _quota_fields(who: Principal, room: int) -> dict[str, str]:
    return {"RateLimit-Policy": _policies(who), "RateLimit": _quota_item(room)}
