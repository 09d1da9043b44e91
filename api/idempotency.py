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


def submit(
    key: str,
    schema,
    insert: Callable[[psycopg.Connection], tuple[dict, int, str | None, list[int]]],
    *,
    admit: Callable[[], None],
) -> Response:
    """Run `insert` (which returns the result, status, Location and the new task ids) under the
    key, or replay the answer of its first use; `schema` dumps the result as the answer. `admit`
    (the key's quota; it refuses by raising) is asked only before a first use: a replay
    creates nothing."""
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
        admit()  # a refusal rolls back the claim of the key: the retry is still a first use
        result, status, location, task_ids = insert(conn)
        body = schema.dump(result)
        idempotency_key_record(
            conn,
            owner=owner,
            key=key,
            status_code=status,
            response=body,
            location=location,
            task_ids=task_ids,
        )
    return _answer(body, status, location, replayed=False)


def _answer(body, status: int, location: str | None, *, replayed: bool) -> Response:
    response = jsonify(body)
    response.status_code = status
    if location:
        response.headers["Location"] = location
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response
