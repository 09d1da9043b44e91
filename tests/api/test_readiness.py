"""GET /readyz is ready only on a database whose schema this code can use: without the schema, or
with an older one, it answers 503 in the one error shape, naming the fix; a newer schema is
served with a warning (a rolling deploy applies the next schema before the code)."""

from __future__ import annotations

import pytest

from skiplock.db import SCHEMA_VERSION, apply_schema
from tests.helpers import assert_error

pytestmark = pytest.mark.pg_agnostic


def test_ready_names_the_schema_version(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "schema_version": SCHEMA_VERSION}


def test_a_database_without_the_schema_is_not_ready_until_it_is_applied(make_app, empty_database_url):
    web = make_app(database_url=empty_database_url).test_client()
    body = assert_error(web.get("/readyz"), 503)
    assert "no skiplock schema" in body["message"] and "skiplock schema apply" in body["message"]
    # Submits would fail the same way: the probe keeps the load balancer away until then.
    apply_schema(empty_database_url)
    assert web.get("/readyz").get_json() == {"status": "ready", "schema_version": SCHEMA_VERSION}


def test_an_older_schema_is_not_ready(client, conn):
    conn.execute("DROP TABLE skiplock_schema")  # as a database from before versions has it
    body = assert_error(client.get("/readyz"), 503)
    assert "from before schema versions" in body["message"]
    assert f"needs version {SCHEMA_VERSION}" in body["message"]


def test_a_newer_schema_is_ready_with_a_warning(client, conn):
    conn.execute("UPDATE skiplock_schema SET version = version + 1")
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["schema_version"]) == ("ready", SCHEMA_VERSION + 1)
    assert f"newer than this code's {SCHEMA_VERSION}" in body["warning"]
