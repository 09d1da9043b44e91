"""Fixtures of the API tier: other apps on the test database, and API keys with a caller per key
(tests/conftest.py has the database, the settings and the apps; tests/helpers.py what is not a
fixture)."""

from __future__ import annotations

import pytest

from skiplock import keys as key_admin
from tests.helpers import Caller, Key


@pytest.fixture
def make_client(make_app):
    """make_client(**settings_overrides) -> a test client of another app; its pool closed after."""
    return lambda **overrides: make_app(**overrides).test_client()


@pytest.fixture
def web(auth_client):
    """A test client of an app with auth on (no key of its own: see as_key)."""
    return auth_client


@pytest.fixture
def new_key(conn):
    """new_key(role="client", **limits) -> a key created in the database, with its token."""
    made = []

    def make(role: str = "client", name: str | None = None, **limits) -> Key:
        key = Key(key_admin.create_key(conn, name=name or f"{role}-{len(made)}", role=role, **limits))
        made.append(key)
        return key

    return make


@pytest.fixture
def as_key(web):
    """as_key(key or token or None) -> a Caller sending that token."""

    def make(key: Key | str | None, client=None) -> Caller:
        token = key.token if isinstance(key, Key) else key
        return Caller(client or web, token)

    return make


@pytest.fixture
def alice(new_key, as_key):
    return as_key(new_key(name="alice"))
