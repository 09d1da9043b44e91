"""Rate limits and quotas per API key, held across every API process and host.

Rate: each key with rate_per_second has a token bucket in Postgres (api_key_buckets). A process
takes tokens from it in chunks of about 1/20 s worth and spends them locally, so the bucket's
row is written a few times a second per process, whatever the request rate, and a key out of
tokens is refused without a query until its next token is due. Unused tokens go back when a
chunk expires, so the limit holds within a few percent over seconds.

Quota: a key with max_unfinished may have at most that many tasks pending or processing, with
any number of API processes and hosts. A submit of such a key runs in one transaction that first
takes the key's quota lock (a transaction-level advisory lock), then decides from rows it can
see (a new statement: every earlier submit of the key has committed), then inserts and commits:
two submits of the key never decide on the same count. A batch counts whole; a task deduplicated
by its unique_key, or a replay of an Idempotency-Key, is no new task. The decision is cheap:
each process keeps an upper bound of the key's unfinished tasks (an exact count, bounded by the
cap, plus every task the key submitted since, from any process: a range of tasks_owner_idx as
long as what is new). Finished tasks are not subtracted, so the bound only grows; when it would
pass the cap, the count is made exactly again (bounded by the cap) before refusing. Keys
without a cap take no lock and run no query.

Refusals are 429 with Retry-After and the IETF RateLimit / RateLimit-Policy fields
(draft-ietf-httpapi-ratelimit-headers), and change nothing.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from flask import Flask, Response, g
from webargs.flaskparser import abort  # flask_smorest.abort, typed (NoReturn)

from skiplock.sql.keys import (
    api_key_return_tokens,
    api_key_take_tokens,
    task_owned_since,
    task_quota_lock,
    task_unfinished_count,
)
from skiplock.sql.rows import Connection
from skiplock.tokens import token_digest

from .auth import Principal
from .extensions import TaskStore, db, store

# A chunk of tokens is this fraction of a second's rate (at least 1, at most MAX_CHUNK).
CHUNK_FRACTION = 0.05
MAX_CHUNK = 100
# Tokens a process holds but has not spent are given back after this long.
CHUNK_TTL_SECONDS = 1.0
# A key refused for its quota may try again this soon.
QUOTA_RETRY_AFTER_SECONDS = 1
# A key out of tokens is refused without a query for at least this long.
MIN_DENIAL_SECONDS = 0.001
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
    counted: int = 0  # unfinished at the last exact count
    max_id: int = 0  # the key's highest task id at the last look
    added: int = 0  # tasks of the key with higher ids, found since the exact count
    exact: bool = False  # counted at least once

    @property
    def bound(self) -> int:
        return self.counted + self.added


def burst_of(rate: float, burst: int | None) -> float:
    """The bucket's size: the key's burst, else one second's worth (at least one token)."""
    return float(burst) if burst is not None else max(1.0, rate)


class RateLimiter:
    def __init__(self):
        self._stashes: dict[int, _Stash] = {}
        self._lock = threading.Lock()

    def refusing(self, key_id: int) -> float | None:
        """Seconds until this key's next token, if this process knows it has none now."""
        stash = self._stashes.get(key_id)
        if stash is None or stash.tokens > 0:
            return None
        wait = stash.denied_until - time.monotonic()
        return wait if wait > 0 else None

    def take(self, key_id: int, rate: float, burst: float) -> tuple[bool, int, float]:
        """Spend one token of the key (whose bucket refills at `rate` per second up to `burst`):
        (allowed, tokens it may still count on, seconds until the next one if refused)."""
        now = time.monotonic()
        with self._lock:
            stash = self._stashes.setdefault(key_id, _Stash())
            if stash.tokens > 0 and now < stash.expires:
                stash.tokens -= 1
                return True, stash.tokens + int(stash.bucket_left), 0.0
            if now < stash.denied_until:
                return False, 0, stash.denied_until - now
            leftover, stash.tokens = (stash.tokens if now >= stash.expires else 0), 0
        chunk = max(1, min(MAX_CHUNK, int(rate * CHUNK_FRACTION), int(burst)))
        with db() as conn:
            if leftover:
                api_key_return_tokens(conn, key_id=key_id, burst=burst, tokens=leftover)
            granted, left, _ = api_key_take_tokens(conn, key_id=key_id, rate=rate, burst=burst, want=chunk)
        with self._lock:
            stash.bucket_left = left
            if granted == 0:
                # The next token is due when the bucket holds one again.
                stash.denied_until = now + max(MIN_DENIAL_SECONDS, (1 - left) / rate)
                return False, 0, stash.denied_until - now
            stash.tokens, stash.expires = granted - 1, now + CHUNK_TTL_SECONDS
            return True, stash.tokens + int(left), 0.0


class QuotaKeeper:
    def __init__(self):
        self._counts: dict[int, _Count] = {}
        self._lock = threading.Lock()

    def room(self, conn: Connection, key_id: int, cap: int, n: int) -> int:
        """How many more unfinished tasks the key (of at most `cap`) may have: at most the
        truth (cap minus an upper bound of its unfinished tasks), and exact when less than n.
        Call it in the transaction that inserts them: it takes the key's quota lock, held until
        that transaction ends, and reads after it (every earlier submit of the key committed)."""
        task_quota_lock(conn, owner=key_id)
        # The key's submits (of every process) now take turns: what this process knows of the
        # key is as its last submit left it. What follows are statements of their own, after
        # the lock: their snapshots see every submit that held it before.
        with self._lock:
            count = self._counts.setdefault(key_id, _Count())
            after_id, bound_holds = count.max_id, count.exact
        if bound_holds:
            added, max_id = task_owned_since(conn, owner=key_id, after_id=after_id)
            with self._lock:
                count.added, count.max_id = count.added + added, max(count.max_id, max_id)
                bound_holds = count.bound + n <= cap
        if not bound_holds:
            counted, max_id = task_unfinished_count(conn, owner=key_id, up_to=cap)
            with self._lock:
                count.counted, count.max_id, count.added, count.exact = counted, max_id, 0, True
        with self._lock:
            return max(0, cap - count.bound)

    def reopened(self, key_id: int) -> None:
        """One of the key's finished tasks is unfinished again (retried): in the bound until
        the next exact count."""
        with self._lock:
            count = self._counts.get(key_id)
            if count is not None:
                count.added += 1


def register(app: Flask) -> None:
    app.before_request(limit_requests)
    app.after_request(rate_limit_headers)
    # Flask's documented way to wrap its WSGI app in a middleware; mypy sees a method replaced.
    app.wsgi_app = EarlyRefusal(app.wsgi_app, app.extensions["skiplock"])  # type: ignore[method-assign]


class EarlyRefusal:
    """WSGI middleware: a request of a key this process already knows to be out of tokens is
    refused before Flask parses it, from what is in memory (no query). A key flooding the API
    then costs a few microseconds of Python per request, not a whole request's worth, and the
    other keys' requests keep their latency. Everything else goes through to Flask, where
    limit_requests decides with the shared bucket."""

    def __init__(self, wsgi_app: Callable, task_store: TaskStore):
        self.wsgi_app = wsgi_app
        self.store = task_store

    def __call__(self, environ, start_response):
        refusal = self._refusal(environ) if environ.get("PATH_INFO", "").startswith("/api/") else None
        if refusal is None:
            return self.wsgi_app(environ, start_response)
        who, rate, burst, wait = refusal
        if self.store.count_early_refusal is not None:  # metrics on: counted like any answer
            self.store.count_early_refusal(environ.get("REQUEST_METHOD", ""))
        retry_after = max(1, math.ceil(wait))
        body = json.dumps(
            {
                "code": 429,
                "status": "Too Many Requests",
                "message": _rate_message(who, rate, burst, retry_after),
            }
        ).encode()
        start_response(
            "429 TOO MANY REQUESTS",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Retry-After", str(retry_after)),
                *_rate_fields(who, 0, wait).items(),
            ],
        )
        return [body]

    def _refusal(self, environ) -> tuple[Principal, float, float, float] | None:
        """(the key, its rate and burst, seconds until its next token) if this process knows
        the request's key to be out of tokens."""
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not self.store.settings.auth_on or not header.startswith(("Bearer ", "bearer ")):
            return None
        key = self.store.keys.peek(token_digest(header[7:].strip()))
        if key is None or key["revoked_at"] is not None:
            return None
        rate = key["rate_per_second"]
        if rate is None:
            return None
        wait = self.store.limiter.refusing(key["id"])
        return None if wait is None else (Principal.of_key(key), rate, burst_of(rate, key["burst"]), wait)


def _rate_message(who: Principal, rate: float, burst: float, retry_after: int) -> str:
    return (
        f"Rate limit of key {who.prefix} exceeded ({rate:g} requests/s, "
        f"burst {burst:g}); retry after {retry_after} s."
    )


def limit_requests() -> None:
    """Every /api request of a key with a rate spends a token (after authentication)."""
    who: Principal | None = g.get("principal")
    if who is None or who.key_id is None or who.rate_per_second is None:
        return
    rate, burst = who.rate_per_second, burst_of(who.rate_per_second, who.burst)
    allowed, remaining, wait = store().limiter.take(who.key_id, rate, burst)
    g.rate_state = (remaining, wait)
    if not allowed:
        retry_after = max(1, math.ceil(wait))
        abort(
            429,
            message=_rate_message(who, rate, burst, retry_after),
            headers={"Retry-After": str(retry_after), **_rate_fields(who, 0, wait)},
        )


def quota_applies() -> bool:
    """Whether the request's key has a cap on unfinished tasks."""
    who: Principal = g.principal
    return who.key_id is not None and who.max_unfinished is not None


def quota_room(conn: Connection, n: int) -> int | None:
    """How many more unfinished tasks the request's key may have (exact if fewer than n), for a
    submit of n; None if it has no cap (then nothing is asked). `conn` is in the transaction
    that inserts them, which now holds the key's quota lock (see QuotaKeeper.room)."""
    who: Principal = g.principal
    if who.key_id is None or who.max_unfinished is None:
        return None
    room = store().quotas.room(conn, who.key_id, who.max_unfinished, n)
    g.quota_state = room
    return room


def quota_spent(room: int, created: int) -> None:
    """A submit made `created` new tasks with `room` left: refuse it (429; raised inside its
    transaction, which rolls back) if they are too many, else answer the room left."""
    if created > room:
        refuse_quota(room)
    g.quota_state = room - created


def quota_reopened(room: int) -> None:
    """A finished task of the request's key was made unfinished again (a retry, with `room`
    left): no new id tells task_owned_since, so this process counts it in its bound itself."""
    who: Principal = g.principal
    if who.key_id is not None:
        store().quotas.reopened(who.key_id)
    g.quota_state = room - 1


def refuse_quota(room: int) -> NoReturn:
    """429: the key's submit would take it past its cap on unfinished tasks."""
    who: Principal = g.principal
    abort(
        429,
        message=f"Key {who.prefix} may have at most {who.max_unfinished} unfinished tasks; "
        f"{room} more can be submitted now. Retry when some have finished.",
        headers={"Retry-After": str(QUOTA_RETRY_AFTER_SECONDS), **_quota_fields(who, room)},
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
        burst = burst_of(who.rate_per_second, who.burst)
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
