"""API key tokens: how they look, how they are made, and what of them is stored.

A token is `skl_` followed by 32 base62 characters: 190 random bits, shown once when the key is
created. Its first 12 characters (`skl_` + 8) are a non-secret prefix, stored and shown in lists
and logs to recognise a key; the rest never leaves the client. The database keeps only the
SHA-256 of the whole token: a token this random needs no slow hash (that is for guessable
passwords), and a lookup by digest costs one index probe per request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from dataclasses import dataclass

TOKEN_PREFIX = "skl_"
_ALPHABET = string.digits + string.ascii_letters
_BODY_LENGTH = 32  # 62**32 is about 2**190
# The stored, non-secret prefix: TOKEN_PREFIX and this many characters of the body.
PREFIX_BODY_LENGTH = 8
PREFIX_LENGTH = len(TOKEN_PREFIX) + PREFIX_BODY_LENGTH
TOKEN_PATTERN = re.compile(rf"^{TOKEN_PREFIX}[0-9A-Za-z]{{{_BODY_LENGTH}}}$")


@dataclass(frozen=True)
class NewToken:
    token: str  # shown once, never stored

    @property
    def prefix(self) -> str:
        return self.token[:PREFIX_LENGTH]

    @property
    def digest(self) -> bytes:
        return token_digest(self.token)


def new_token() -> NewToken:
    return NewToken(TOKEN_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_LENGTH)))


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def well_formed(token: str) -> bool:
    """Shaped like a skiplock token (a cheap check before any lookup)."""
    return bool(TOKEN_PATTERN.match(token))
