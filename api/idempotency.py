"""Idempotent submits: a client that sends Idempotency-Key and retries (after a timeout, a lost
connection) gets the first answer again, marked Idempotent-Replayed: true, instead of a second
task (draft-ietf-httpapi-idempotency-key-header).

The key is taken in the submit's own transaction through a unique index on (owner, key): a
concurrent request with the same key waits for the first one to commit, then replays its answer;
no check-then-insert race. The same key with another request (endpoint or body) is refused with
422. Keys are remembered for idempotency_ttl_seconds (24 h).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import psycopg
from flask import Response, jsonify, request
from webargs.flaskparser import abort  # flask_smorest.abort, typed (NoReturn)

from skiplock.sql.keys import idempotency_key_claim, idempotency_key_record

from .auth import principal
from .extensions import db, store

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# The draft sends the key as a structured-field string ("..."); clients often send it bare:
# 1-255 visible ASCII characters but the double quote.
KEY_PATTERN = '^"?[!#-~]{1,255}"?$'
_KEY = re.compile(r'^"?([!#-~]{1,255})"?$')


class Stored(NamedTuple):
    """What a submit's insert answers with: the result (the endpoint's schema dumps it), the
    status code, the Location, the ids answered, and how many of them are new tasks (the others
    were deduplicated by their unique_key)."""

    result: Any
    status: int
    location: str | None
    task_ids: list[int]
    created: int


def requested_key() -> str | None:
    """The request's Idempotency-Key, or None; 400 if it is not 1-255 visible ASCII characters."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    match = _KEY.match(raw.strip())
    if not match:
        abort(400, message=f"{HEADER} must be 1 to 255 visible ASCII characters (no quotes inside).")
    return match.group(1)


def request_fingerprint() -> bytes:
    """What a retry must repeat exactly: the endpoint and the JSON body (key order aside)."""
    body = json.dumps(request.get_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).digest()


def submit(key: str, schema, insert: Callable[[psycopg.Connection], Stored]) -> Response:
    """Run `insert` under the key, or replay the answer of its first use; `schema` dumps the
    result as the answer. `insert` runs (and may refuse, by raising: the claim of the key is
    then rolled back, and a retry is still a first use) only for a first use: a replay creates
    nothing, and is not counted against the key's quota.

    Not to be confused with a task's unique_key: Idempotency-Key is about a request (the same
    request again gets the same answer, whatever became of its tasks since), unique_key about
    a task (any submit with the key, while a task with it is unfinished, is answered with it)."""
    owner = principal().key_id
    fingerprint = request_fingerprint()
    with db() as conn, conn.transaction():
        earlier = idempotency_key_claim(
            conn,
            owner=owner,
            key=key,
            request_sha256=fingerprint,
            ttl_seconds=store().settings.idempotency_ttl_seconds,
        )
        if earlier is not None:
            if bytes(earlier["request_sha256"]) != fingerprint:
                abort(
                    422,
                    message=f"{HEADER} {key!r} was already used with a different request; "
                    "use a new key for a new request.",
                    errors={"headers": {HEADER: ["already used with a different request"]}},
                )
            return _answer(earlier["response"], earlier["status_code"], earlier["location"], replayed=True)
        stored = insert(conn)
        body = schema.dump(stored.result)
        idempotency_key_record(
            conn,
            owner=owner,
            key=key,
            status_code=stored.status,
            response=body,
            location=stored.location,
            task_ids=stored.task_ids,
        )
    return _answer(body, stored.status, stored.location, replayed=False)


def _answer(body, status: int, location: str | None, *, replayed: bool) -> Response:
    response = jsonify(body)
    response.status_code = status
    if location:
        response.headers["Location"] = location
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response
