"""The security suite: what an attacker (or a careless client) can do to the API, checked against
the real app and a real Postgres.

- schemathesis fuzzes every operation of the live /openapi.json (positive and negative data, every
  check) with a valid admin key;
- every /api operation refuses a missing, malformed, unknown or revoked key with 401 and changes
  nothing;
- a client key cannot see, list, cancel or retry another key's tasks (404, exactly as an id never
  issued);
- a submit cannot set what only the queue may set (owner, status, result...);
- SQL injection strings anywhere a client can put text are data, never SQL;
- error answers show no stack trace and no version, through real gunicorn;
- no token is stored in plaintext anywhere in the database.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import socket
import string
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import gunicorn
import psycopg
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.generation import GenerationMode
from werkzeug.serving import make_server

from api import create_app
from skiplock import keys
from skiplock.cli import main as skiplock_cli
from skiplock.db import connect
from skiplock.settings import Settings
from skiplock.sql.inserts import task_insert
from skiplock.tokens import PREFIX_LENGTH, token_digest
from tests.helpers import (
    REALM,
    bearer,
    cloned_database,
    complete_task,
    fail_task,
    parse_time,
    start_gunicorn,
    task_row,
)

# The same on every Postgres version: CI runs it against one Postgres only (.ci/run).
pytestmark = pytest.mark.pg_agnostic

TASK_MODULES = ("tests.sample_tasks",)
ERROR_FIELDS = {"code", "status", "message", "errors"}
ALNUM = string.ascii_letters + string.digits


def random_token() -> str:
    """Shaped exactly like a skiplock token, but issued by nobody."""
    return "skl_" + "".join(secrets.choice(ALNUM) for _ in range(32))


# --- schemathesis --------------------------------------------------------------------------------
#
# The document is read once, at import, from an app whose database is never touched (building the
# app and serving /openapi.json need none): `@schema.parametrize()` needs it at collection time.
# Auth is on (the default), so the document names the bearer scheme, as production's does.


def _live_spec() -> dict:
    app = create_app(Settings(database_url="postgresql://unused@127.0.0.1:1/x", task_modules=TASK_MODULES))
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


SPEC = _live_spec()
# Hypothesis keeps caches (and, unless told otherwise, examples) in ./.hypothesis: not in the work tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "skiplock-hypothesis")
FUZZ_CONFIG = schemathesis.Config.from_dict(
    {
        # Reproducible: a failure in CI is the same failure on a laptop.
        "seed": 20_261_202,
        "generation": {
            "mode": "all",  # schema-valid and schema-violating requests
            "max-examples": 25,
            # Our headers carry a valid admin key on every request (the auth negatives are the
            # next tests'; the `ignored_auth` check still sends requests without it).
            "with-security-parameters": False,
            "database": "none",  # no .hypothesis/ left in the work tree
            # JSON strings may not carry NUL here (Postgres text and jsonb cannot store it; the
            # API refuses it with 422, which the README documents and tests/api/test_errors.py checks).
            "allow-x00": False,
        },
        "checks": {
            "enabled": True,
            # What the API documents for refused input: 400 bad JSON or header, 401, 404 (an
            # impossible id), 405, 413, 415, 422.
            "negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 413, 415, 422]},
            # Schema-valid requests the rules refuse beyond what a schema can say: an expiry in
            # the past, a workflow's cycle or unknown ref (422); a schedule's name taken, a run
            # now that overlap skips (409); a key's quota (429).
            "positive_data_acceptance": {"expected-statuses": ["2XX", 404, 409, 422, 429]},
        },
        # An event stream stays open until its task is final, and no worker runs here: the
        # first event is checked against the document, and the stream is closed after it.
        "max-stream-events": 1,
        "phases": {"stateful": {"enabled": False}},
        "cache": {"enabled": False},
    }
)
schema = schemathesis.openapi.from_dict(SPEC, config=FUZZ_CONFIG)


@pytest.fixture(scope="module")
def fuzz_target(server_url, template_db):
    """The real app (auth on, the document's task types) served over HTTP by a werkzeug thread,
    on a database of its own; yields (base URL, a direct connection)."""
    with cloned_database(server_url, template_db) as url:
        settings = Settings(
            database_url=url, task_modules=TASK_MODULES, auth="on", webhook_allow=(RECEIVER_HOST,)
        )
        app = create_app(settings)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with connect(url, role="test") as conn:
                yield f"http://127.0.0.1:{server.server_port}", conn
        finally:
            server.shutdown()
            thread.join(10)
            app.extensions["skiplock"].close()


def test_the_fuzzed_document_is_the_live_one(fuzz_target):
    base_url, _ = fuzz_target
    status, _, body = http_request(base_url, "GET", "/openapi.json")
    assert status == 200
    assert json.loads(body) == SPEC


# A callback_url must name a host that resolves to an address this server may call: the
# hostnames schemathesis makes up ("https://0.com") do not resolve here, and are refused with 422.
# Valid examples name an allowed receiver instead; test_webhooks.py tests the refusals.
RECEIVER_HOST = "127.0.0.1"
RECEIVER_URL = f"http://{RECEIVER_HOST}:9/fuzz"


def with_allowed_callbacks(value):
    """The body with every string callback_url replaced by one the server may call."""
    if isinstance(value, list):
        return [with_allowed_callbacks(item) for item in value]
    if isinstance(value, dict):
        return {
            key: RECEIVER_URL
            if key == "callback_url" and isinstance(item, str)
            else with_allowed_callbacks(item)
            for key, item in value.items()
        }
    return value


# An expiry must leave the task time to run (after now and after its run_at or delay; refused
# with 422 otherwise, as documented): valid examples get one a day after the task is due.
def with_possible_expiry(value):
    """The body with every expiry moved to a day after its task is due."""
    if isinstance(value, list):
        return [with_possible_expiry(item) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: with_possible_expiry(item) for key, item in value.items()}
    if isinstance(value.get("expires_at"), str):
        due = parse_time(value["run_at"]) if isinstance(value.get("run_at"), str) else datetime.now(UTC)
        value["expires_at"] = min(due + timedelta(days=1), datetime(9999, 1, 1, tzinfo=UTC)).isoformat()
    if isinstance(value.get("expires_in_seconds"), (int, float)) and not isinstance(
        value["expires_in_seconds"], bool
    ):
        delay = value.get("delay_seconds")
        value["expires_in_seconds"] = (delay if isinstance(delay, (int, float)) else 0) + 86400
    return value


@schema.parametrize()
def test_schemathesis_finds_no_failure(case, fuzz_target):
    base_url, conn = fuzz_target
    if case.meta.generation.mode == GenerationMode.POSITIVE:
        case.body = with_possible_expiry(with_allowed_callbacks(case.body))
    # A fresh admin key per example: Idempotency-Keys are remembered per key, and an example must
    # not be refused (422, as documented) for a key an earlier example used with another body.
    admin = keys.create_key(conn, name="fuzz", role="admin")
    case.call_and_validate(base_url=base_url, headers=bearer(admin["token"]))


# --- shared fixtures -----------------------------------------------------------------------------


@pytest.fixture
def auth_app(make_app):
    return make_app(auth="on")


@pytest.fixture
def api(auth_app):
    return auth_app.test_client()


def new_key(conn, name: str, role: str = "client", **limits) -> dict:
    return keys.create_key(conn, name=name, role=role, **limits)


def db_snapshot(conn) -> dict[str, list[str]]:
    """Every row of every table of the database, as text, sorted: what "nothing changed" means."""
    tables = [
        row["relname"]
        for row in conn.execute(
            """
            SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND n.nspname = 'public' ORDER BY c.relname
            """
        )
    ]
    assert "tasks" in tables and "api_keys" in tables
    return {
        table: sorted(r["row"] for r in conn.execute(f'SELECT t::text AS row FROM "{table}" t'))
        for table in tables
    }


def catalog_snapshot(conn) -> dict[str, list]:
    """The schema as the catalogs describe it: relations and their columns, indexes, constraints,
    views, functions, triggers and enum labels of every non-system schema."""
    user_schemas = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
    queries_ = {
        "columns": f"""
            SELECT n.nspname, c.relname, c.relkind::text, a.attnum, a.attname,
                   format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid) AS default_
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
            WHERE {user_schemas} AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
            ORDER BY 1, 2, 4
        """,
        "indexes": "SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3",
        "constraints": f"""
            SELECT n.nspname, conrelid::regclass::text, conname, pg_get_constraintdef(c.oid)
            FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
            WHERE {user_schemas} ORDER BY 1, 2, 3
        """,
        "views": "SELECT schemaname, viewname, definition FROM pg_views "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
        "functions": f"""
            SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), md5(p.prosrc)
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE {user_schemas} ORDER BY 1, 2, 3
        """,
        "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger "
        "WHERE NOT tgisinternal ORDER BY 1, 2",
        "enums": "SELECT t.typname, e.enumsortorder, e.enumlabel FROM pg_enum e "
        "JOIN pg_type t ON t.oid = e.enumtypid ORDER BY 1, 2",
        "schemas": f"SELECT n.nspname FROM pg_namespace n WHERE {user_schemas} ORDER BY 1",
    }
    snapshot = {name: [tuple(row.values()) for row in conn.execute(sql)] for name, sql in queries_.items()}
    assert any(row[1] == "tasks" for row in snapshot["columns"]), "the snapshot must see the tasks table"
    return snapshot


def assert_error_shape(response, code: int) -> dict:
    assert response.status_code == code, (response.status_code, response.get_data(as_text=True))
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert {"code", "status", "message"} <= set(body) <= ERROR_FIELDS, body
    assert body["code"] == code
    assert isinstance(body["status"], str) and body["status"]
    assert isinstance(body["message"], str) and body["message"]
    return body


def fail_for_good(conn, task_id: int) -> None:
    assert fail_task(conn, task_id) == "failed"


# --- 401 on every /api operation -------------------------------------------------------------------


def api_operations(app) -> list[tuple[str, str]]:
    """(method, URL rule) of every route under /api/, every method Werkzeug routes to it."""
    operations = [
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/")
        for method in sorted(rule.methods)
    ]
    assert len({rule for _, rule in operations}) >= 12, operations
    return operations


def valid_body(method: str, rule: str) -> dict | None:
    """A body the operation would accept from a valid key (so a skipped check would show)."""
    if method != "POST":
        return None
    return {
        "/api/submit-task": {"task_input": "intruder"},
        "/api/tasks": {"task_type": "noop", "task_input": None},
        "/api/tasks/batch": {"tasks": [{"task_type": "noop", "task_input": None}]},
        "/api/keys": {"name": "intruder", "role": "admin"},
    }.get(rule)


def test_every_api_operation_refuses_requests_without_a_valid_key(api, auth_app, conn, subtests):
    admin = new_key(conn, "admin", "admin")
    revoked = new_key(conn, "revoked", "admin")
    keys.revoke_key(conn, key_id=revoked["id"])
    good = admin["token"]
    # The victims: a pending task (cancel), a failed one (retry), a valid admin key (revoke).
    victim = dict(task_type="noop", input=None, queue="default", max_attempts=1, timeout_seconds=30)
    pending = task_insert(conn, priority=0, owner_key_id=admin["id"], **victim)["id"]
    failed = task_insert(conn, priority=5, owner_key_id=admin["id"], **victim)["id"]
    fail_for_good(conn, failed)

    credentials = {
        "no key": ({}, None),
        "empty Authorization": ({"Authorization": ""}, None),
        "Bearer and no token": ({"Authorization": "Bearer"}, "invalid_token"),
        "a valid token without a scheme": ({"Authorization": good}, "invalid_token"),
        "a valid token as Basic": ({"Authorization": f"Basic {good}"}, "invalid_token"),
        "a valid token and one more character": (bearer(good + "x"), "invalid_token"),
        "a valid token less its last character": (bearer(good[:-1]), "invalid_token"),
        "not alphanumeric": (bearer("skl_" + "!" * 32), "invalid_token"),
        "another prefix": (bearer("sk_live_" + good[4:]), "invalid_token"),
        "two tokens": ({"Authorization": f"Bearer {good} {good}"}, "invalid_token"),
        "an unknown well-formed key": (bearer(random_token()), "invalid_token"),
        "a revoked key": (bearer(revoked["token"]), "invalid_token"),
    }
    before = db_snapshot(conn)
    checked = 0
    for method, rule in api_operations(auth_app):
        task_id = failed if rule.endswith("/retry") else pending
        # Real ids: a request that got through would act on them. Any other part: a plain word.
        values = {"task_id": str(task_id), "key_id": str(admin["id"])}
        path = re.sub(
            r"<(?:[^:>]*:)?(\w+)>", lambda m, values=values: values.get(m.group(1), "default"), rule
        )
        body = valid_body(method, rule)
        for name, (headers, error) in credentials.items():
            with subtests.test(method=method, path=path, credentials=name):
                response = api.open(path, method=method, headers=headers, json=body)
                assert response.status_code == 401, response.get_data(as_text=True)
                challenge = response.headers.get("WWW-Authenticate", "")
                assert challenge.startswith(REALM), challenge
                # RFC 6750 3.1: no error code when no credentials came; invalid_token otherwise.
                if error is None:
                    assert "error=" not in challenge, challenge
                else:
                    assert f'error="{error}"' in challenge, challenge
                if method != "HEAD":
                    body_ = assert_error_shape(response, 401)
                    assert body_["status"] == "Unauthorized"
                    text = response.get_data(as_text=True)
                    assert good[PREFIX_LENGTH:] not in text and revoked["token"][PREFIX_LENGTH:] not in text
                checked += 1
    assert checked >= 12 * len(credentials)
    assert db_snapshot(conn) == before
    # The same requests with the valid key do go through (the setup above is a real target).
    assert api.get(f"/api/tasks/{pending}", headers=bearer(good)).status_code == 200
    assert api.post(f"/api/tasks/{pending}/cancel", headers=bearer(good)).status_code == 200


# --- another key's tasks ---------------------------------------------------------------------------

READS = ("/api/task-status/{}", "/api/task-result/{}", "/api/tasks/{}", "/api/tasks/{}/attempts")
WRITES = ("/api/tasks/{}/cancel", "/api/tasks/{}/retry")


def comparable(response, task_id: int) -> tuple:
    """A 404 answer with the id taken out: status, headers (less Content-Length), body."""
    body = response.get_json()
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        body = {**body, "message": re.sub(rf"\b{task_id}\b", "<id>", body["message"])}
    headers = sorted((k, v) for k, v in response.headers.items() if k.lower() != "content-length")
    return response.status_code, headers, body


def test_a_client_key_cannot_reach_another_keys_tasks(api, conn, subtests):
    alice = new_key(conn, "alice")
    bob = new_key(conn, "bob")
    admin = new_key(conn, "admin", "admin")
    as_alice, as_bob, as_admin = bearer(alice["token"]), bearer(bob["token"]), bearer(admin["token"])

    def submit(headers, **body) -> int:
        response = api.post("/api/tasks", headers=headers, json=body)
        assert response.status_code == 202, response.get_json()
        return response.get_json()["task_id"]

    # Alice's tasks in every state a read or a write could care about.
    done = submit(as_alice, task_type="greet", task_input={"name": "Alice"})
    complete_task(conn, done, {"greeting": "secret of alice"})
    failed = submit(as_alice, task_type="noop", task_input=None, max_attempts=1)
    fail_for_good(conn, failed)
    cancelled = submit(as_alice, task_type="noop", task_input=None, delay_seconds=3600)
    assert api.post(f"/api/tasks/{cancelled}/cancel", headers=as_alice).status_code == 200
    pending = submit(as_alice, task_type="noop", task_input={"private": "alice"}, delay_seconds=3600)
    alices = {"completed": done, "failed": failed, "cancelled": cancelled, "pending": pending}
    bobs = submit(as_bob, task_type="noop", task_input=None, delay_seconds=3600)
    never_issued = max(alices.values()) + bobs + 1000

    def state():
        return (
            conn.execute(
                "SELECT t::text FROM tasks t WHERE owner_key_id = %s ORDER BY id", (alice["id"],)
            ).fetchall(),
            conn.execute("SELECT a::text FROM task_attempts a ORDER BY id").fetchall(),
        )

    before = state()
    for status, task_id in alices.items():
        for template in READS + WRITES:
            method = "POST" if template in WRITES else "GET"
            with subtests.test(status=status, url=template, method=method):
                theirs = api.open(template.format(task_id), method=method, headers=as_bob)
                nobodys = api.open(template.format(never_issued), method=method, headers=as_bob)
                assert_error_shape(theirs, 404)
                assert comparable(theirs, task_id) == comparable(nobodys, never_issued)
                assert "alice" not in theirs.get_data(as_text=True).lower()

    with subtests.test("Bob's list holds only his task, whatever the filter"):
        filters = [{"status": s} for s in alices] + [{"task_type": "noop"}, {"task_type": "greet"}]
        for query in ({}, *filters, {"queue": "default"}, {"before": never_issued}, {"limit": 500}):
            listed = api.get("/api/tasks", headers=as_bob, query_string=query)
            assert listed.status_code == 200, listed.get_json()
            ids = {t["task_id"] for t in listed.get_json()["tasks"]}
            assert ids <= {bobs}, (query, ids)
    assert state() == before, "Bob's requests changed Alice's tasks"

    with subtests.test("Alice and an admin key do see them"):
        for headers in (as_alice, as_admin):
            for status, task_id in alices.items():
                got = api.get(f"/api/tasks/{task_id}", headers=headers)
                assert got.status_code == 200 and got.get_json()["status"] == status
            listed = {t["task_id"] for t in api.get("/api/tasks", headers=headers).get_json()["tasks"]}
            assert set(alices.values()) <= listed
        result = api.get(f"/api/task-result/{done}", headers=as_admin).get_json()
        assert result["result"] == {"greeting": "secret of alice"}
        assert api.post(f"/api/tasks/{failed}/retry", headers=as_admin).status_code == 200


# --- fields only the queue may set -----------------------------------------------------------------

FORBIDDEN_FIELDS = {
    "owner": 1,
    "owner_key_id": 1,
    "status": "completed",
    "result": {"forged": True},
    "attempts": 0,
    "worker_id": "forged:1",
}


def test_a_submit_cannot_set_owner_status_result_attempts_or_worker(api, conn, subtests):
    client = new_key(conn, "client")
    victim = new_key(conn, "victim")
    headers = bearer(client["token"])
    item = {"task_type": "noop", "task_input": None}
    bodies = {
        "/api/submit-task": lambda field, value: ({"task_input": None, field: value}, (field,)),
        "/api/tasks": lambda field, value: ({**item, field: value}, (field,)),
        "/api/tasks/batch": lambda field, value: (
            {"tasks": [item, {**item, field: value}]},
            ("tasks", "1", field),
        ),
        "/api/tasks/batch (top level)": lambda field, value: ({"tasks": [item], field: value}, (field,)),
    }
    assert api.get("/api/tasks", headers=headers).status_code == 200  # its first use is noted first
    before = db_snapshot(conn)
    for url, build in bodies.items():
        for field, value in FORBIDDEN_FIELDS.items():
            if field in ("owner", "owner_key_id"):
                value = victim["id"]
            with subtests.test(url=url, field=field):
                body, path = build(field, value)
                response = api.post(url.split()[0], headers=headers, json=body)
                error = assert_error_shape(response, 422)
                where = error["errors"]["json"]
                for key in path:
                    assert key in where, (path, error)
                    where = where[key]
                assert where, error
    assert db_snapshot(conn) == before, "a refused submit stored something"


# --- SQL injection ----------------------------------------------------------------------------------

INJECTIONS = (
    "'; DROP TABLE tasks; --",
    "1 OR 1=1",
    "1' OR '1'='1",
    '"); SELECT pg_sleep(5); --',
    "'); SELECT pg_sleep(5); --",
    "1; SELECT pg_sleep(5)",
    "1)) OR pg_sleep(5) IS NULL; --",
    "' UNION SELECT token_sha256::text FROM api_keys --",
    "$$; DROP TABLE api_keys; $$",
    "%s; DROP TABLE tasks; %(owner)s",
    "\\'; DELETE FROM tasks; --",
    "{}'::jsonb); TRUNCATE task_attempts; --",
)
# Idempotency-Keys are visible ASCII without quotes or spaces: injections of that shape.
HEADER_INJECTIONS = (
    "';DROP/**/TABLE/**/tasks;--",
    "1'OR'1'='1",
    "');SELECT/**/pg_sleep(5);--",
    "1;DELETE/**/FROM/**/task_idempotency_keys",
    "%s%s%(owner)s",
)
# A request that ran pg_sleep(5) would take this long at least.
SLOW = 2.5


def test_sql_injection_strings_are_data_never_sql(api, conn, subtests):
    client = new_key(conn, "client")
    admin = new_key(conn, "admin", "admin")
    as_client, as_admin = bearer(client["token"]), bearer(admin["token"])
    catalog = catalog_snapshot(conn)
    tasks_before = conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"]
    stored: dict[int, object] = {}  # task id -> the input it must hold

    def call(method, url, *, expect, headers=as_client, **kwargs):
        started = time.monotonic()
        response = api.open(url, method=method, headers=headers, **kwargs)
        took = time.monotonic() - started
        assert response.status_code < 500, response.get_data(as_text=True)
        assert response.status_code in expect, (response.status_code, response.get_data(as_text=True))
        assert took < SLOW, f"{method} {url} took {took:.1f} s"
        return response

    for s in INJECTIONS:
        with subtests.test("as task input: stored verbatim", injection=s):
            for url, body, task_input in (
                ("/api/submit-task", {"task_input": s}, s),
                ("/api/submit-task", {"task_input": {s: [s, {s: s}]}}, {s: [s, {s: s}]}),
                ("/api/tasks", {"task_type": "greet", "task_input": {"name": s[:50]}}, {"name": s[:50]}),
                (
                    "/api/tasks",
                    {"task_type": "hash_chain", "task_input": {"data": s, "rounds": 1}},
                    {"data": s, "rounds": 1},
                ),
            ):
                response = call("POST", url, json=body, expect={202})
                stored[response.get_json()["task_id"]] = task_input
            batch_body = {"tasks": [{"task_type": "default", "task_input": s}]}
            batch = call("POST", "/api/tasks/batch", json=batch_body, expect={202})
            stored[batch.get_json()["task_ids"][0]] = s

        with subtests.test("in a name, a time or a number: refused", injection=s):
            for url, body in (
                ("/api/submit-task", {"task_input": None, "task_type": s}),
                ("/api/submit-task", {"task_input": None, "queue": s}),
                ("/api/submit-task", {"task_input": None, "run_at": s}),
                ("/api/submit-task", {"task_input": None, "priority": s}),
                ("/api/submit-task", {"task_input": None, "delay_seconds": s}),
                ("/api/tasks", {"task_type": s, "task_input": None}),
                ("/api/tasks", {"task_type": "noop", "task_input": None, "queue": s}),
                ("/api/tasks", {"task_type": "noop", "task_input": None, "run_at": s}),
                ("/api/tasks", {"task_type": "primes", "task_input": {"limit": s}}),
                ("/api/tasks/batch", {"tasks": [{"task_type": "noop", "task_input": None, "queue": s}]}),
                ("/api/tasks/batch", {"tasks": [{"task_type": s, "task_input": None}]}),
            ):
                call("POST", url, json=body, expect={422})

        with subtests.test("in the query of GET /api/tasks: refused", injection=s):
            for param in ("status", "task_type", "queue", "before", "limit"):
                call("GET", "/api/tasks", query_string={param: s}, expect={422})

        with subtests.test("in a path segment: 404", injection=s):
            segment = quote(s, safe="")
            for method, url in (
                ("GET", "/api/task-status/{}"),
                ("GET", "/api/task-result/{}"),
                ("GET", "/api/tasks/{}"),
                ("GET", "/api/tasks/{}/attempts"),
                ("POST", "/api/tasks/{}/cancel"),
                ("POST", "/api/tasks/{}/retry"),
                ("POST", "/api/keys/{}/revoke"),
            ):
                call(method, url.format(segment), headers=as_admin, expect={404})

        with subtests.test("in an Idempotency-Key with spaces or quotes: 400", injection=s):
            headers = {**as_client, "Idempotency-Key": s}
            call("POST", "/api/submit-task", headers=headers, json={"task_input": None}, expect={400})

        with subtests.test("as an API key's name: stored verbatim", injection=s):
            created = call("POST", "/api/keys", headers=as_admin, json={"name": s}, expect={201}).get_json()
            row = conn.execute("SELECT name FROM api_keys WHERE id = %s", (created["id"],)).fetchone()
            assert row["name"] == s

    for s in HEADER_INJECTIONS:
        with subtests.test("as an Idempotency-Key: a key like any other", injection=s):
            headers = {**as_client, "Idempotency-Key": s}
            first = call("POST", "/api/submit-task", headers=headers, json={"task_input": s}, expect={202})
            again = call("POST", "/api/submit-task", headers=headers, json={"task_input": s}, expect={202})
            assert again.headers.get("Idempotent-Replayed") == "true"
            assert again.get_json() == first.get_json()
            stored[first.get_json()["task_id"]] = s
            row = conn.execute(
                "SELECT task_ids FROM task_idempotency_keys WHERE owner_key_id = %s AND idempotency_key = %s",
                (client["id"], s),
            ).fetchone()
            assert row is not None and row["task_ids"] == [first.get_json()["task_id"]]

    assert catalog_snapshot(conn) == catalog, "the schema changed"
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == tasks_before + len(stored)
    for task_id, task_input in stored.items():
        assert task_row(conn, task_id)["input"] == task_input
        assert api.get(f"/api/tasks/{task_id}", headers=as_client).get_json()["task_input"] == task_input


def test_an_api_key_name_postgres_cannot_store_is_422_not_500(api, conn):
    """Found by the fuzzer: text with NUL (U+0000) cannot be stored in Postgres; a task input
    with it is refused (422), and a key's name must be too, not end in a server error."""
    admin = new_key(conn, "admin", "admin")
    keys_before = conn.execute("SELECT count(*) AS n FROM api_keys").fetchone()["n"]
    response = api.post("/api/keys", headers=bearer(admin["token"]), json={"name": "ops\x00team"})
    error = assert_error_shape(response, 422)
    assert "name" in error["errors"]["json"], error
    assert conn.execute("SELECT count(*) AS n FROM api_keys").fetchone()["n"] == keys_before


# --- error answers leak nothing (real gunicorn) ---------------------------------------------------

LEAKS = (
    re.compile(r"Traceback"),
    re.compile(r'File "'),
    re.compile(r"Werkzeug/", re.IGNORECASE),
    re.compile(r"Python/", re.IGNORECASE),
    re.compile(r"gunicorn/\s*\d", re.IGNORECASE),
    re.compile(r"psycopg", re.IGNORECASE),
    re.compile(r"flask[/ ]\d", re.IGNORECASE),
    re.compile(re.escape(f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}")),
    re.compile(re.escape(gunicorn.__version__)),
    re.compile(re.escape(psycopg.__version__)),
    re.compile(r"/site-packages/|\.py\b"),
)


def http_request(base: str, method: str, path: str, headers=None, body: bytes | None = None):
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def raw_http(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def gunicorn_api(auth_settings):
    """Real gunicorn (one worker, auth on, bodies up to 4 KiB)."""
    proc, http_ = start_gunicorn(replace(auth_settings, max_body_bytes=4096), workers=1, quiet=True)
    try:
        yield http_.base
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(20)


def test_error_answers_show_no_stack_trace_and_no_version(gunicorn_api, conn, subtests):
    base = gunicorn_api
    admin = new_key(conn, "admin", "admin")
    client = new_key(conn, "client")
    limited = new_key(conn, "limited", rate_per_second=0.001, burst=1)
    capped = new_key(conn, "capped", max_unfinished=1)
    revoked = new_key(conn, "revoked")
    keys.revoke_key(conn, key_id=revoked["id"])
    json_ = {"Content-Type": "application/json"}
    as_admin = {**bearer(admin["token"]), **json_}
    as_client = {**bearer(client["token"]), **json_}
    task = json.loads(
        http_request(
            base, "POST", "/api/submit-task", as_client, b'{"task_input": 1, "delay_seconds": 3600}'
        )[2]
    )["task_id"]
    as_capped = {**bearer(capped["token"]), **json_}
    assert http_request(base, "POST", "/api/submit-task", as_capped, b'{"task_input": 1}')[0] == 202
    assert http_request(base, "GET", "/api/task-types", bearer(limited["token"]))[0] == 200

    cases = [
        ("401 no key", 401, "GET", "/api/tasks", {}, None),
        ("401 unknown key", 401, "GET", "/api/tasks", bearer(random_token()), None),
        ("401 revoked key", 401, "GET", "/api/tasks", bearer(revoked["token"]), None),
        ("403 client key on keys", 403, "GET", "/api/keys", as_client, None),
        ("404 unknown route", 404, "GET", "/api/no-such-thing", as_admin, None),
        ("404 unknown route outside /api", 404, "GET", "/no-such-thing", {}, None),
        ("404 unknown task", 404, "GET", "/api/tasks/987654321", as_admin, None),
        ("404 impossible task id", 404, "GET", "/api/tasks/1e3%27", as_admin, None),
        ("405 wrong method", 405, "PUT", "/api/tasks", as_admin, b"{}"),
        ("405 DELETE a task", 405, "DELETE", f"/api/tasks/{task}", as_admin, None),
        ("409 result not ready", 409, "GET", f"/api/task-result/{task}", as_client, None),
        ("413 body too large", 413, "POST", "/api/tasks", as_client, b'{"task_input": "' + b"x" * 8000 + b'"}'),
        ("415 not JSON", 415, "POST", "/api/tasks", {**bearer(client["token"]), "Content-Type": "text/plain"}, b"hi"),
        ("400 malformed JSON", 400, "POST", "/api/tasks", as_client, b'{"task_input": '),
        ("400 JSON nested too deep", 400, "POST", "/api/submit-task", as_client, b"[" * 1500 + b"]" * 1500),
        ("400 bad Idempotency-Key", 400, "POST", "/api/submit-task", {**as_client, "Idempotency-Key": "a b"},
         b'{"task_input": 1}'),
        ("422 invalid body", 422, "POST", "/api/tasks", as_client, b'{"task_type": "primes", "task_input": {"limit": -1}}'),
        ("422 unknown type", 422, "POST", "/api/tasks", as_client, b'{"task_type": "nope", "task_input": null}'),
        ("422 bad query", 422, "GET", "/api/tasks?limit=abc", as_client, None),
        ("429 rate limit", 429, "GET", "/api/task-types", bearer(limited["token"]), None),
        ("429 rate limit, again", 429, "GET", "/api/task-types", bearer(limited["token"]), None),
        ("429 quota", 429, "POST", "/api/submit-task", as_capped, b'{"task_input": 2}'),
        # A 500, if the API still answers one here (see test_an_api_key_name_postgres_cannot_store...).
        ("NUL in a key name", None, "POST", "/api/keys", as_admin, b'{"name": "a\\u0000b"}'),
    ]  # fmt: skip
    for name, code, method, path, headers, body in cases:
        with subtests.test(name):
            status, response_headers, content = http_request(base, method, path, headers, body)
            if code is not None:
                assert status == code, (status, content[:500])
            text = content.decode("utf-8", "replace")
            if method != "HEAD":
                error = json.loads(content)
                assert {"code", "status", "message"} <= set(error) <= ERROR_FIELDS | {"task_id", "error"}, (
                    error
                )
            header_text = "\n".join(f"{k}: {v}" for k, v in response_headers)
            for leak in LEAKS:
                assert not leak.search(text), (leak.pattern, text[:1000])
                assert not leak.search(header_text), (leak.pattern, header_text)

    # What gunicorn answers itself, before the app sees anything.
    for name, request in (
        ("a header without a colon", b"GET /api/tasks HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n"),
        ("an invalid request line", b"GET /\x00 HTTP/1.1 extra\r\nHost: x\r\n\r\n"),
        ("an unknown HTTP version", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n"),
        (
            "a header line too long",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        ),
    ):
        with subtests.test(f"gunicorn: {name}"):
            answer = raw_http(base, request).decode("latin-1")
            assert answer.startswith("HTTP/1."), answer[:200]
            assert int(answer.split()[1]) >= 400, answer[:200]
            for leak in LEAKS:
                assert not leak.search(answer), (leak.pattern, answer[:1000])


# --- no token stored in plaintext ------------------------------------------------------------------


def scan(conn, needles: dict[str, str]) -> dict[str, list[str]]:
    """Which needles occur where: every row of every table, every column in its text form (bytea
    as hex, jsonb as JSON), searched for each needle."""
    found: dict[str, list[str]] = {name: [] for name in needles}
    for table, rows in db_snapshot(conn).items():
        text = "\n".join(rows)
        for name, needle in needles.items():
            if needle in text:
                found[name].append(table)
    return found


def token_needles(label: str, token: str) -> dict[str, str]:
    secret = token[PREFIX_LENGTH:]
    return {
        f"{label} token": token,
        f"{label} secret": secret,
        f"{label} token, hex": token.encode().hex(),
        f"{label} secret, hex": secret.encode().hex(),
    }


def test_no_token_is_stored_in_plaintext_anywhere(api, auth_settings, conn):
    db_url = auth_settings.database_url
    cli = CliRunner()

    def cli_create(*args) -> dict:
        result = cli.invoke(skiplock_cli, ["--database-url", db_url, "--json", "keys", "create", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    # CLI-style (the command itself, and skiplock.keys as it calls it) and over HTTP.
    cli_admin = cli_create("--name", "cli admin", "--admin")
    cli_doomed = cli_create("--name", "cli doomed")
    lib_client = new_key(conn, "library client")

    def post_key(**body) -> dict:
        response = api.post("/api/keys", headers=bearer(cli_admin["token"]), json=body)
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    http_client = post_key(name="http client")
    http_limited = post_key(name="http limited", rate_per_second=0.001, burst=1)
    http_capped = post_key(name="http capped", max_unfinished=1)
    http_admin = post_key(name="http admin", role="admin")
    tokens = {
        "cli admin": cli_admin["token"],
        "cli doomed": cli_doomed["token"],
        "library client": lib_client["token"],
        "http client": http_client["token"],
        "http limited": http_limited["token"],
        "http capped": http_capped["token"],
        "http admin": http_admin["token"],
    }

    # Use them: answers that succeed and answers that fail.
    canary = f"canary-{uuid.uuid4().hex}"
    for label, token in tokens.items():
        headers = bearer(token)
        idem = {**headers, "Idempotency-Key": f"retry-{label.replace(' ', '-')}"}
        api.post("/api/submit-task", headers=idem, json={"task_input": {"canary": canary}})
        api.post("/api/submit-task", headers=idem, json={"task_input": {"canary": canary}})
        api.post("/api/submit-task", headers=idem, json={"task_input": "another body"})  # 422
        api.post(
            "/api/tasks", headers=headers, json={"task_type": "primes", "task_input": {"limit": 1}}
        )  # 422
        api.get("/api/tasks", headers=headers)
        api.get("/api/tasks/987654321", headers=headers)  # 404
        api.get("/api/keys", headers=headers)  # 403 for clients
        api.get("/api/task-types", headers=headers)  # 429 for the limited key, second time around
        api.get(f"/api/task-status/{token}", headers=headers)  # a token where an id goes
        api.get("/api/tasks", headers={"Authorization": f"Bearer {token}x"})  # malformed: 401
        api.get("/api/tasks", headers={"Authorization": token})  # no scheme: 401
    assert api.get("/api/task-types", headers=bearer(tokens["http limited"])).status_code == 429
    assert (
        api.post(
            "/api/submit-task", headers=bearer(tokens["http capped"]), json={"task_input": 3}
        ).status_code
        == 429
    )

    # Revoke over HTTP, and with the CLI naming the key by its whole token; then use both (in a
    # second app: this one would trust its cached reads of them for key_cache_seconds).
    assert (
        api.post(f"/api/keys/{http_client['id']}/revoke", headers=bearer(tokens["http admin"])).status_code
        == 200
    )
    revoked = cli.invoke(skiplock_cli, ["--database-url", db_url, "keys", "revoke", tokens["cli doomed"]])
    assert revoked.exit_code == 0, revoked.output
    fresh = create_app(auth_settings)
    try:
        for label in ("http client", "cli doomed"):
            assert fresh.test_client().get("/api/tasks", headers=bearer(tokens[label])).status_code == 401
    finally:
        fresh.extensions["skiplock"].close()

    # The scan sees text, bytea and jsonb columns: the prefixes, the digests and the canary.
    needles = {"canary": canary}
    for label, token in tokens.items():
        needles.update(token_needles(label, token))
        needles[f"{label} prefix"] = token[:PREFIX_LENGTH]
        needles[f"{label} digest, hex"] = token_digest(token).hex()
    found = scan(conn, needles)
    assert "tasks" in found["canary"], found["canary"]
    for label, token in tokens.items():
        assert found[f"{label} prefix"] == ["api_keys"], found[f"{label} prefix"]
        assert found[f"{label} digest, hex"] == ["api_keys"], found[f"{label} digest, hex"]
        for needle in token_needles(label, token):
            assert found[needle] == [], f"{needle} is stored in {found[needle]}"
