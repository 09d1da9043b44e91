"""Rate limits and quotas per API key, held across every API process and host.

Rate: each key with rate_per_second has a token bucket in Postgres (api_key_buckets). A process
takes tokens from it in chunks of about 1/20 s worth and spends them locally, so the bucket's
row is written a few times a second per process, whatever the request rate, and a key out of
tokens is refused without a query until its next token is due. Unused tokens go back when a
chunk expires, so the limit holds within a few percent over seconds.

Quota: a key with max_unfinished may have at most that many tasks pending or processing, with
any number of API processes and hosts. Each unfinished task of such a key holds a slot, a number
in 1..max_unfinished that no other unfinished task of the key holds: the unique index
tasks_quota_slot_idx decides between concurrent submits, without a lock (a submit waits only for
another that took the same number, and then takes other numbers), and a task frees its slot by
finishing. Nothing is counted or locked per key, so submits of one key do not queue behind each
other's commits (a per-key lock held to the commit did: a third of the throughput at 16
connections). A batch counts whole (its tasks' slots are taken in one statement, all or none); a
task deduplicated by its unique_key, or a replay of an Idempotency-Key, takes none.

Slots are picked in two ways. A key whose cap is small (up to EXACT_SLOTS_UP_TO) reads its held
slots and picks free ones each time: a range of the index, as long as what the key has
unfinished, which also tells exactly how many more it may submit. A key with a larger cap, far
from it as far as this process knows, takes random numbers, and reads the free ones only when
one of them was taken (or when it may be near its cap). Keys without a cap pay nothing.

Refusals are 429 with Retry-After and the IETF RateLimit / RateLimit-Policy fields
(draft-ietf-httpapi-ratelimit-headers), and change nothing.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from flask import Flask, Response, g
from webargs.flaskparser import abort  # flask_smorest.abort, typed (NoReturn)

from skiplock.sql.keys import api_key_return_tokens, api_key_take_tokens, task_quota_free_slots
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
# Keys with a cap up to this read their free quota slots at each submit (an index range of at
# most this many entries); above it, they take random slots while far from their cap.
EXACT_SLOTS_UP_TO = 1_000
# "Far": what the key held at the last read, plus what this process took since, is under this
# share of the cap (a random slot is then taken with at most this chance).
RANDOM_SLOTS_UP_TO_SHARE = 0.1
# Free slots are picked among this many more than needed.
SLOT_SPREAD = 16
# A submit whose slots were taken by concurrent ones picks again, this many times at most.
QUOTA_ATTEMPTS = 5
RATE_POLICY = "rate"
QUOTA_POLICY = "unfinished"


@dataclass
class _Stash:
    tokens: int = 0
    expires: float = 0.0
    denied_until: float = 0.0
    bucket_left: float = 0.0  # what the shared bucket held when last read


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
    """Quota slots for the submits of this process (see the module's docstring)."""

    def __init__(self):
        # Per capped key: its held slots at the last read, plus what this process took since
        # (finished tasks are not subtracted: it only grows until the next read).
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def slots(self, conn: Connection, key_id: int, cap: int, n: int, *, read: bool) -> tuple[list[int], int]:
        """n free slots of the key (of at most `cap` unfinished tasks), and how many more it may
        have after them (exact when read from the database); no slots if fewer than n are free.
        `read`: read the free slots (after a random one was taken)."""
        if not read:
            picked = self.random_slots(key_id, cap, n)
            if picked:
                return picked, cap - self._held.get(key_id, 0) - n
        held, free = task_quota_free_slots(conn, owner=key_id, cap=cap, want=n + SLOT_SPREAD)
        with self._lock:
            self._held[key_id] = held
        room = max(0, cap - held)  # (free numbers in 1..cap are at least as many)
        if room < n:
            return [], room
        # Not always the lowest: concurrent submits of the key would all pick the same. In order:
        # two batches that want the same slots wait for each other in one order, not in a cycle.
        return sorted(random.sample(free[: n + SLOT_SPREAD], n)), room - n

    def random_slots(self, key_id: int, cap: int, n: int) -> list[int]:
        """n random slots if the key's cap is large and it is far from it (as far as this process
        knows), else none. Near a cap slots are read, and a submit whose read slots were taken
        meanwhile starts over rather than take others while it holds some: two submits waiting
        for each other's slots would deadlock."""
        with self._lock:
            held = self._held.get(key_id, 0)
        if cap <= EXACT_SLOTS_UP_TO or held + n > cap * RANDOM_SLOTS_UP_TO_SHARE:
            return []
        return sorted(random.sample(range(1, cap + 1), n))

    def took(self, key_id: int, n: int) -> None:
        with self._lock:
            self._held[key_id] = self._held.get(key_id, 0) + n


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


def quota_slots(conn: Connection, n: int, *, read: bool) -> list[int] | None:
    """Slots for n new tasks of the request's key (see QuotaKeeper.slots), [] if it may not have
    n more; None if it has no cap."""
    who: Principal = g.principal
    if who.key_id is None or who.max_unfinished is None:
        return None
    slots, room = store().quotas.slots(conn, who.key_id, who.max_unfinished, n, read=read)
    g.quota_state = room
    return slots


def quota_more_slots(n: int) -> list[int]:
    """Slots for n tasks of a submit whose slots were taken meanwhile: random ones while the
    request's key is far from its cap, else none (see QuotaKeeper.random_slots)."""
    who: Principal = g.principal
    if who.key_id is None or who.max_unfinished is None:
        return []
    return store().quotas.random_slots(who.key_id, who.max_unfinished, n)


def quota_took(n: int) -> None:
    """The request's key took n slots (its submit committed n new tasks)."""
    who: Principal = g.principal
    if who.key_id is not None and n:
        store().quotas.took(who.key_id, n)


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
