"""Stream tokens: a short-lived credential for one task's (or one workflow's) event stream, made
for a browser's EventSource, which cannot send an Authorization header and so carries it in the
URL (`?token=`). A backend that holds an API key mints one per page view; the page never sees
the key.

A token reads `{scope}.{id}.{key id}.{expires}.{signature}`: what it opens (task 42), the key
that minted it (the stream sees what that key sees, and dies with it), when it stops opening
streams (Unix seconds), and an HMAC-SHA256 of all that under a secret every API process shares
(api_secrets, row stream_token). Nothing in it is secret but the whole: a changed character
breaks the signature. It is checked when a stream connects; a stream already open runs on to its
end, and a reconnect after the expiry needs a new token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

SCOPES = ("task", "workflow")
DEFAULT_LIFETIME_SECONDS = 300  # long enough to load a page and connect, short enough to leak little
MIN_LIFETIME_SECONDS = 10
MAX_LIFETIME_SECONDS = 3600
# Signed with the secret, after this (the secret is the stream tokens' own: this only names the use).
_CONTEXT = b"skiplock stream token\0"
_PAYLOAD = re.compile(rf"({'|'.join(SCOPES)})\.([0-9]{{1,19}})\.([0-9]{{1,19}})\.([0-9]{{1,12}})")


class InvalidStreamToken(Exception):
    """Not a token this server signed, or one past its expiry: the message says which."""


@dataclass(frozen=True)
class StreamClaims:
    scope: str  # task | workflow
    subject_id: int
    key_id: int | None  # None: minted with auth off
    expires: int  # Unix seconds

    def payload(self) -> str:
        return f"{self.scope}.{self.subject_id}.{self.key_id or 0}.{self.expires}"


def mint(secret: bytes, claims: StreamClaims) -> str:
    payload = claims.payload()
    return f"{payload}.{_signature(secret, payload)}"


def verify(secret: bytes, token: str, *, now: float) -> StreamClaims:
    """The claims of a token this secret signed that has not expired at `now`, else
    InvalidStreamToken."""
    payload, _, signature = token.rpartition(".")
    parts = _PAYLOAD.fullmatch(payload)
    if parts is None:
        raise InvalidStreamToken("Not a stream token (POST /api/tasks/{id}/stream-token makes one).")
    if not hmac.compare_digest(signature, _signature(secret, payload)):
        raise InvalidStreamToken(
            "This stream token's signature does not match: it was changed, or not made here."
        )
    claims = StreamClaims(parts[1], int(parts[2]), int(parts[3]) or None, int(parts[4]))
    if now >= claims.expires:
        raise InvalidStreamToken(
            f"This stream token expired {int(now - claims.expires)} s ago: mint another one "
            "(a stream may be opened until its token expires)."
        )
    return claims


def _signature(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, _CONTEXT + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
