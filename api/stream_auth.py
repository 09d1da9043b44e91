"""Event streams a browser can open: `GET /api/tasks/{id}/events?token=...` (and a workflow's)
with a stream token (skiplock/stream_tokens.py) instead of an Authorization header, which a
browser's EventSource cannot send. The token stands for the key that minted it, on that one
stream, until it expires; api/auth.py asks here when a stream request carries one.

The signing secret is a row of api_secrets (stream_token), made by the first process that needs
it: every API process and host shares it without configuration, as the dashboard's session key.

Any origin may read a token-authenticated stream (Access-Control-Allow-Origin: *): the token is
the credential, not a cookie, so a page elsewhere learns nothing it was not handed. Requests
with an Authorization header get no CORS headers: a key stays a server's secret.
"""

from __future__ import annotations

import secrets
import threading
import time
from datetime import UTC, datetime

from flask import Flask, Response, current_app, request, url_for

from skiplock.keys import KeyRows
from skiplock.sql.keys import ApiKeyDigestRow, api_key_get
from skiplock.sql.operations import api_secret
from skiplock.stream_tokens import InvalidStreamToken, StreamClaims, mint, verify

from .extensions import db

SECRET_NAME = "stream_token"  # its row in api_secrets
TOKEN_PARAM = "token"
# The streams a token opens: endpoint -> (the token's scope, the URL's id argument).
STREAM_ENDPOINTS = {
    "tasks.TaskEvents": ("task", "task_id"),
    "workflows.WorkflowEvents": ("workflow", "workflow_id"),
}
# What a cross-origin page may send and cache (an EventSource reconnects with Last-Event-ID).
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET",
    "Access-Control-Allow-Headers": "Last-Event-ID, Cache-Control",
    "Access-Control-Max-Age": "600",
}


class StreamTokenRefused(Exception):
    """A stream token that opens nothing here: the HTTP status (401, 403) and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class StreamTokenState:
    """Per app and process: the signing secret once read, and the minting keys read lately."""

    def __init__(self, key_ttl: float):
        self.secret: bytes | None = None
        self.lock = threading.Lock()
        self.keys: KeyRows[int, ApiKeyDigestRow] = KeyRows(key_ttl, _read_key)


def _read_key(key_id: int) -> ApiKeyDigestRow | None:
    with db() as conn:
        return api_key_get(conn, key_id)


def install(app: Flask) -> None:
    app.extensions["skiplock.stream_tokens"] = StreamTokenState(
        app.extensions["skiplock"].settings.key_cache_seconds
    )
    app.after_request(allow_any_origin)


def _state() -> StreamTokenState:
    return current_app.extensions["skiplock.stream_tokens"]


def signing_secret() -> bytes:
    """The shared secret, read (or made) once per process."""
    state = _state()
    if state.secret is None:
        with state.lock:
            if state.secret is None:
                with db() as conn:
                    state.secret = bytes(
                        api_secret(conn, name=SECRET_NAME, candidate=secrets.token_bytes(32))
                    )
    return state.secret


def carries_token() -> bool:
    """This request is a stream's, with a token in its URL."""
    return request.endpoint in STREAM_ENDPOINTS and TOKEN_PARAM in request.args


def key_of_token() -> ApiKeyDigestRow:
    """The key that minted this request's token, if the token opens this very stream now; else
    StreamTokenRefused."""
    scope, id_arg = STREAM_ENDPOINTS[str(request.endpoint)]
    try:
        claims = verify(signing_secret(), request.args[TOKEN_PARAM], now=time.time())
    except InvalidStreamToken as exc:
        raise StreamTokenRefused(401, str(exc)) from None
    wanted = (request.view_args or {}).get(id_arg)
    if (claims.scope, claims.subject_id) != (scope, wanted):
        raise StreamTokenRefused(
            403,
            f"This stream token opens {claims.scope} {claims.subject_id}'s events, not {scope} {wanted}'s.",
        )
    key = _state().keys.get(claims.key_id or 0)
    if key is None:
        raise StreamTokenRefused(401, "The key that made this stream token no longer exists.")
    if key["revoked_at"] is not None:
        raise StreamTokenRefused(401, f"The key that made this stream token ({key['prefix']}) was revoked.")
    return key


def new_token(scope: str, subject_id: int, key_id: int | None, lifetime_seconds: int) -> dict:
    """A token for this stream, minted for this key: {token, expires_at, url}."""
    claims = StreamClaims(scope, subject_id, key_id, int(time.time()) + lifetime_seconds)
    token = mint(signing_secret(), claims)
    endpoint = next(name for name, (s, _) in STREAM_ENDPOINTS.items() if s == scope)
    id_arg = STREAM_ENDPOINTS[endpoint][1]
    return {
        "token": token,
        "expires_at": datetime.fromtimestamp(claims.expires, UTC),
        "url": url_for(endpoint, _external=True, **{id_arg: str(subject_id), TOKEN_PARAM: token}),
    }


def allow_any_origin(response: Response) -> Response:
    """CORS for token-authenticated streams only (their answers and errors, and preflights)."""
    if carries_token() and "Authorization" not in request.headers:
        response.headers.update(CORS_HEADERS)
    return response
