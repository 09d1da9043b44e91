"""API keys, owners, rate limits, quotas, idempotent submits and the tightened bad-input answers,
through the real Flask app with authentication on and a real Postgres (a fresh database per
test). Tasks are moved through processing and completed with the queue's own functions
(skiplock.queries), as a worker would: no mocks anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import time
from dataclasses import dataclass, replace

import pytest
from werkzeug.http import HTTP_STATUS_CODES

from api import create_app
from skiplock import keys as key_admin
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_start_many,
)
from skiplock.tokens import new_token
from tests.conftest import wait_until

WORKER = "test-worker:auth"
BIGINT_MAX = 2**63 - 1
REALM = 'Bearer realm="skiplock"'
INVALID_TOKEN = 'Bearer realm="skiplock", error="invalid_token"'
TOKEN_RE = re.compile(r"^skl_[0-9A-Za-z]{32}$")
CONFLICT_FIELDS = {"code", "status", "message", "task_id", "error"}
# A body for each submit endpoint, and how many tasks it makes.
SUBMITS = {
    "/api/submit-task": ({"task_input": {"n": 1}}, 1),
    "/api/tasks": ({"task_type": "noop", "task_input": {"n": 1}}, 1),
    "/api/tasks/batch": ({"tasks": [{"task_type": "noop", "task_input": i} for i in range(3)]}, 3),
}
# Every route that names a task by id: (method, template).
TASK_ROUTES = [
    ("get", "/api/task-status/{}"),
    ("get", "/api/task-result/{}"),
    ("get", "/api/tasks/{}"),
    ("get", "/api/tasks/{}/attempts"),
    ("post", "/api/tasks/{}/cancel"),
    ("post", "/api/tasks/{}/retry"),
]
# A RateLimit-Policy / RateLimit list member (draft-ietf-httpapi-ratelimit-headers): a quoted
# policy name, then ;key=integer or ;key="string" parameters.
SF_MEMBER = re.compile(r'^"([a-z][a-z0-9_-]*)"((?:;[a-z]+=(?:\d+|"[^"]*"))+)$')


# --- helpers -----------------------------------------------------------------------------------


@dataclass
class Key:
    row: dict

    @property
    def id(self) -> int:
        return self.row["id"]

    @property
    def token(self) -> str:
        return self.row["token"]


class Caller:
    """A test client that sends one key's token (or none) with every request."""

    def __init__(self, client, token: str | None):
        self.client = client
        self.token = token

    def _headers(self, headers: dict | None) -> dict:
        out = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        out.update(headers or {})
        return out

    def get(self, url: str, headers: dict | None = None, **kwargs):
        return self.client.get(url, headers=self._headers(headers), **kwargs)

    def post(self, url: str, headers: dict | None = None, **kwargs):
        return self.client.post(url, headers=self._headers(headers), **kwargs)

    def open(self, method: str, url: str, **kwargs):
        return getattr(self, method)(url, **kwargs)

    def submit(self, url: str = "/api/submit-task", body: dict | None = None, headers: dict | None = None):
        return self.post(url, json=SUBMITS[url][0] if body is None else body, headers=headers)

    def submit_id(self, task_input=None, **fields) -> int:
        response = self.post("/api/submit-task", json={"task_input": task_input, **fields})
        assert response.status_code == 202, response.get_json()
        return response.get_json()["task_id"]


def assert_error(response, code: int, status: str | None = None) -> dict:
    """The one error shape: JSON {code, status, message[, errors]}; never HTML, never a traceback."""
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code
    assert body["status"] == (status or HTTP_STATUS_CODES[code])
    assert isinstance(body["message"], str) and body["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "<html" not in text.lower()
    return body


def count(conn, table: str = "tasks") -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def owners(conn) -> dict[int, int | None]:
    return {r["id"]: r["owner_key_id"] for r in conn.execute("SELECT id, owner_key_id FROM tasks").fetchall()}


def run_and_end(conn, n: int, outcome: str = "completed") -> list[int]:
    """Claim the next n due tasks, start them and complete (or fail for good) each, as a worker
    would; returns their ids."""
    claimed = task_claim(conn, worker_id=WORKER, limit=n, lease_seconds=60)
    assert len(claimed) == n
    refs = [AttemptRef(t.id, t.attempt) for t in claimed]
    assert task_start_many(conn, worker_id=WORKER, started_ago=dict.fromkeys(refs, 0)) == {
        r.task_id for r in refs
    }
    if outcome == "completed":
        done = task_complete_many(conn, worker_id=WORKER, results=[(r, "null") for r in refs])
        assert done == {r.task_id for r in refs}
    else:
        ended = task_fail_many(
            conn,
            worker_id=WORKER,
            failures=[AttemptFailure(r.task_id, r.attempt, "failed", "boom") for r in refs],
            backoff_base=0.01,
            backoff_max=0.01,
        )
        assert set(ended) == {r.task_id for r in refs}
    return [r.task_id for r in refs]


def sf_list(value: str) -> dict[str, dict[str, object]]:
    """Parse a RateLimit-Policy / RateLimit field: {policy name: {param: int or str}}."""
    out: dict[str, dict[str, object]] = {}
    for member in value.split(", "):
        match = SF_MEMBER.match(member)
        assert match, f"not a structured-field list member: {member!r} (in {value!r})"
        params = {}
        for param in match.group(2).split(";")[1:]:
            name, _, raw = param.partition("=")
            params[name] = raw.strip('"') if raw.startswith('"') else int(raw)
        out[match.group(1)] = params
    return out


def deep_json(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.fixture
def auth_settings(settings):
    return replace(settings, auth="on")


@pytest.fixture
def make_app(auth_settings):
    """make_app(**settings_overrides) -> an app with auth on; its pool closed after."""
    apps = []

    def make(**overrides):
        app = create_app(replace(auth_settings, **overrides))
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["skiplock"].close()


@pytest.fixture
def web(make_app):
    """A test client of an app with auth on (no key of its own: see as_key)."""
    return make_app().test_client()


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


# --- authentication ----------------------------------------------------------------------------


API_ROUTES = [
    ("get", "/api/tasks"),
    ("post", "/api/submit-task"),
    ("post", "/api/tasks"),
    ("post", "/api/tasks/batch"),
    ("get", "/api/task-status/1"),
    ("get", "/api/tasks/1/attempts"),
    ("post", "/api/tasks/1/cancel"),
    ("get", "/api/task-types"),
    ("get", "/api/keys"),
    ("post", "/api/keys"),
    ("post", "/api/keys/1/revoke"),
]


def test_a_request_without_a_key_is_401_with_a_bare_challenge(web, new_key, as_key, conn, subtests):
    owner = as_key(new_key())
    task_id = owner.submit_id("mine")
    anonymous = as_key(None)
    for method, url in API_ROUTES:
        with subtests.test(method=method, url=url):
            response = anonymous.open(method, url, json={"task_input": 1, "name": "x"})
            body = assert_error(response, 401)
            assert response.headers["WWW-Authenticate"] == REALM
            assert "Authorization: Bearer" in body["message"]
    assert count(conn) == 1
    assert count(conn, "api_keys") == 1
    assert conn.execute("SELECT status::text FROM tasks WHERE id = %s", (task_id,)).fetchone()["status"] == (
        "pending"
    )


def test_a_malformed_or_unknown_token_is_401_invalid_token(web, new_key, as_key, conn, subtests):
    good = new_key().token
    unknown = new_token().token
    cases = {
        "scheme only": "Bearer",
        "scheme and blank": "Bearer   ",
        "basic auth": "Basic dXNlcjpwYXNz",
        "token without a scheme": good,
        "wrong scheme": f"Token {good}",
        "not a skiplock token": "Bearer abcdef0123456789abcdef0123456789abcd",
        "prefix only": f"Bearer {good[:12]}",
        "one character short": f"Bearer {good[:-1]}",
        "one character long": f"Bearer {good}x",
        "a character outside base62": f"Bearer {good[:-1]}-",
        "wrong prefix": f"Bearer sk_{good[4:]}",
        "two tokens": f"Bearer {good} {good}",
        "unknown, well formed": f"Bearer {unknown}",
    }
    for case, header in cases.items():
        with subtests.test(case=case):
            response = web.post("/api/submit-task", json={"task_input": 1}, headers={"Authorization": header})
            assert_error(response, 401)
            assert response.headers["WWW-Authenticate"] == INVALID_TOKEN
    assert count(conn) == 0
    # The well-formed token itself is fine, whatever the case of the scheme.
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = web.get("/api/tasks", headers={"Authorization": f"{scheme} {good}"})
        assert response.status_code == 200, response.get_json()


def test_a_revoked_key_is_401_naming_its_prefix(new_key, as_key, conn):
    key = new_key()
    key_admin.revoke_key(conn, key_id=key.id)
    response = as_key(key).submit()
    body = assert_error(response, 401)
    assert response.headers["WWW-Authenticate"] == INVALID_TOKEN
    assert key.row["prefix"] in body["message"] and "revoked" in body["message"]
    assert key.token not in response.get_data(as_text=True)
    assert count(conn) == 0


def test_no_spelling_of_an_api_path_or_method_gets_past_authentication(web, conn, subtests):
    for method, url in [
        ("get", "//api/tasks"),
        ("get", "/api//tasks"),
        ("get", "/api/./tasks"),
        ("get", "/docs/../api/tasks"),
        ("get", "/api/tasks/"),
        ("get", "/api/tasks?status=pending"),
        ("head", "/api/tasks"),
        ("options", "/api/tasks"),
        ("post", "//api/submit-task"),
    ]:
        with subtests.test(method=method, url=url):
            response = getattr(web, method)(url, json={"task_input": 1} if method == "post" else None)
            assert response.status_code in (401, 404), response.status_code
    assert count(conn) == 0


def test_probes_and_docs_stay_public(web, subtests):
    for headers in ({}, {"Authorization": "Bearer nonsense"}):
        for url, mimetype in [
            ("/healthz", "application/json"),
            ("/readyz", "application/json"),
            ("/openapi.json", "application/json"),
            ("/docs", "text/html"),
        ]:
            with subtests.test(url=url, headers=headers):
                response = web.get(url, headers=headers)
                assert response.status_code == 200
                assert response.mimetype == mimetype
                assert "WWW-Authenticate" not in response.headers
    spec = web.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    assert spec["security"] == [{"ApiKey": []}]


def test_a_key_revoked_through_the_api_is_refused_within_the_cache_time(make_app, new_key, as_key, conn):
    cache = 1.0
    client = make_app(key_cache_seconds=cache).test_client()
    admin = as_key(new_key("admin"), client)
    victim_key = new_key()
    victim = as_key(victim_key, client)
    assert victim.get("/api/tasks").status_code == 200  # the key is in this app's cache now
    revoked = admin.post(f"/api/keys/{victim_key.id}/revoke")
    assert revoked.status_code == 200
    assert revoked.get_json()["revoked_at"] is not None
    since = time.monotonic()
    wait_until(lambda: victim.get("/api/tasks").status_code == 401, timeout=cache + 2, interval=0.02)
    assert time.monotonic() - since <= cache + 0.5
    assert_error(victim.submit(), 401)
    assert count(conn) == 0


def test_a_key_revoked_in_the_database_is_refused_within_the_cache_time(make_app, new_key, as_key, conn):
    cache = 1.0
    victim_key = new_key()
    victim = as_key(victim_key, make_app(key_cache_seconds=cache).test_client())
    assert victim.submit().status_code == 202
    assert key_admin.revoke_key(conn, key_id=victim_key.id)["revoked_at"] is not None
    since = time.monotonic()
    wait_until(lambda: victim.get("/api/tasks").status_code == 401, timeout=cache + 2, interval=0.02)
    assert time.monotonic() - since <= cache + 0.5
    # Once refused, always refused (the cache now holds the revoked row).
    for _ in range(5):
        assert_error(victim.submit(), 401)
    assert count(conn) == 1


def test_tokens_are_random_base62_and_only_their_digest_is_stored(conn, new_key):
    made = [new_key() for _ in range(5)]
    tokens = [k.token for k in made]
    assert len(set(tokens)) == len(tokens)
    for key in made:
        assert TOKEN_RE.match(key.token), key.token
        assert key.row["prefix"] == key.token[:12]
        row = conn.execute("SELECT * FROM api_keys WHERE id = %s", (key.id,)).fetchone()
        assert bytes(row["token_sha256"]) == hashlib.sha256(key.token.encode()).digest()
        # The secret part of the token is stored nowhere in the row.
        as_text = conn.execute(
            "SELECT row_to_json(k)::text AS t FROM api_keys k WHERE id = %s", (key.id,)
        ).fetchone()["t"]
        assert key.token[12:] not in as_text and key.token not in as_text
    # >= 128 random bits: 32 characters drawn from all 62 base62 symbols, at every position.
    sample = [new_token().token[4:] for _ in range(3000)]
    alphabet = set("".join(sample))
    assert alphabet == set(string.digits + string.ascii_letters)
    for position in range(32):
        assert len({t[position] for t in sample}) >= 55  # 3000 draws of 62 symbols: all but a few
    assert 32 * math.log2(len(alphabet)) >= 128


def test_use_of_a_key_is_noted_in_last_used_at(new_key, as_key, conn):
    key = new_key()
    assert key.row["last_used_at"] is None
    assert as_key(key).get("/api/tasks").status_code == 200
    row = conn.execute("SELECT last_used_at, created_at FROM api_keys WHERE id = %s", (key.id,)).fetchone()
    assert row["last_used_at"] is not None and row["last_used_at"] >= row["created_at"]


# --- owners ------------------------------------------------------------------------------------


def test_every_submit_records_its_key_as_the_owner(new_key, as_key, conn):
    alice_key, bob_key, admin_key = new_key(), new_key(), new_key("admin")
    made: dict[int, int] = {}
    for key in (alice_key, bob_key, admin_key):
        caller = as_key(key)
        for url in SUBMITS:
            response = caller.submit(url)
            assert response.status_code == 202, response.get_json()
            body = response.get_json()
            for task_id in body.get("task_ids", [body.get("task_id")]):
                made[task_id] = key.id
    assert owners(conn) == made
    assert len(made) == 3 * 5


def test_a_client_key_sees_only_its_own_tasks(new_key, as_key, conn):
    alice, bob = as_key(new_key()), as_key(new_key())
    alices = [alice.submit_id(i, task_type="noop") for i in range(3)]
    bobs = [bob.submit_id(i, task_type="noop", queue="bobs") for i in range(2)]

    listed = alice.get("/api/tasks").get_json()
    assert [t["task_id"] for t in listed["tasks"]] == alices[::-1]
    assert bob.get("/api/tasks?queue=bobs").get_json()["tasks"][0]["task_id"] == bobs[-1]
    assert [t["task_id"] for t in bob.get("/api/tasks").get_json()["tasks"]] == bobs[::-1]
    assert alice.get("/api/tasks?queue=bobs").get_json() == {"tasks": [], "next_before": None}
    # Pages of one: alice's cursor walks her tasks only, never bob's ids between them.
    seen, before = [], None
    while True:
        page = alice.get("/api/tasks?limit=1" + (f"&before={before}" if before else "")).get_json()
        seen += [t["task_id"] for t in page["tasks"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == alices[::-1]
    for task_id in alices:
        assert alice.get(f"/api/tasks/{task_id}").get_json()["task_input"] is not None
        assert alice.get(f"/api/tasks/{task_id}/attempts").get_json() == []


def test_another_keys_task_answers_exactly_like_an_id_never_issued(new_key, as_key, conn, subtests):
    alice, bob = as_key(new_key()), as_key(new_key())
    finished = alice.submit_id("finished", max_attempts=1)
    assert run_and_end(conn, 1, outcome="failed") == [finished]  # failed: alice could retry it
    pending = alice.submit_id("pending")  # alice could cancel it
    before = {r["id"]: (r["status"], r["max_attempts"]) for r in conn.execute(
        "SELECT id, status::text, max_attempts FROM tasks").fetchall()}  # fmt: skip
    never = BIGINT_MAX  # far beyond the sequence: never issued
    for theirs in (pending, finished):
        for method, template in TASK_ROUTES:
            with subtests.test(task=theirs, url=template):
                foreign = bob.open(method, template.format(theirs))
                unissued = bob.open(method, template.format(never))
                assert_error(foreign, 404)
                assert_error(unissued, 404)
                assert foreign.get_json()["message"].replace(str(theirs), "N") == unissued.get_json()[
                    "message"
                ].replace(str(never), "N")
                assert set(foreign.get_json()) == set(unissued.get_json())
                assert {k: v for k, v in foreign.get_json().items() if k != "message"} == {
                    k: v for k, v in unissued.get_json().items() if k != "message"
                }
                assert sorted(foreign.headers.keys()) == sorted(unissued.headers.keys())
    after = {r["id"]: (r["status"], r["max_attempts"]) for r in conn.execute(
        "SELECT id, status::text, max_attempts FROM tasks").fetchall()}  # fmt: skip
    assert after == before  # bob's cancel and retry changed nothing
    # Alice herself may cancel and retry them.
    assert alice.post(f"/api/tasks/{pending}/cancel").status_code == 200
    assert alice.post(f"/api/tasks/{finished}/retry").status_code == 200
    assert alice.get(f"/api/tasks/{finished}/attempts").get_json()[0]["outcome"] == "failed"


def test_an_admin_key_sees_and_manages_every_task(new_key, as_key, conn):
    alice_key, bob_key, admin_key = new_key(), new_key(), new_key("admin")
    alice, bob, admin = as_key(alice_key), as_key(bob_key), as_key(admin_key)
    a, b = alice.submit_id("a"), bob.submit_id("b")
    own = admin.submit_id("admin's")
    assert owners(conn) == {a: alice_key.id, b: bob_key.id, own: admin_key.id}
    assert [t["task_id"] for t in admin.get("/api/tasks").get_json()["tasks"]] == [own, b, a]
    for task_id in (a, b):
        assert admin.get(f"/api/task-status/{task_id}").status_code == 200
        assert admin.get(f"/api/tasks/{task_id}").status_code == 200
        assert admin.get(f"/api/tasks/{task_id}/attempts").status_code == 200
    assert admin.post(f"/api/tasks/{b}/cancel").get_json()["status"] == "cancelled"
    assert bob.get(f"/api/task-status/{b}").get_json()["status"] == "cancelled"
    assert admin.post(f"/api/tasks/{b}/retry").get_json()["status"] == "pending"
    assert bob.get(f"/api/task-status/{b}").get_json()["status"] == "pending"
    # The admin's own task is still not a client's.
    assert_error(alice.get(f"/api/tasks/{own}"), 404)


def test_a_client_key_may_not_manage_keys(new_key, as_key, conn, subtests):
    client_key = new_key()
    other = new_key()
    caller = as_key(client_key)
    for method, url, body in [
        ("get", "/api/keys", None),
        ("post", "/api/keys", {"name": "sneaky", "role": "admin"}),
        ("post", f"/api/keys/{other.id}/revoke", None),
        ("post", f"/api/keys/{client_key.id}/revoke", None),
        ("post", "/api/keys/999999/revoke", None),
    ]:
        with subtests.test(method=method, url=url):
            body = assert_error(caller.open(method, url, json=body), 403)
            assert "admin" in body["message"]
    assert count(conn, "api_keys") == 2
    assert (
        conn.execute("SELECT count(*) AS n FROM api_keys WHERE revoked_at IS NOT NULL").fetchone()["n"] == 0
    )


# --- /api/keys ---------------------------------------------------------------------------------


def test_an_admin_creates_a_key_whose_token_is_shown_once(new_key, as_key, conn):
    admin = as_key(new_key("admin"))
    response = admin.post(
        "/api/keys", json={"name": "batch jobs", "rate_per_second": 2.5, "burst": 7, "max_unfinished": 9}
    )
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert TOKEN_RE.match(created["token"])
    assert created["prefix"] == created["token"][:12]
    assert {k: created[k] for k in ("name", "role", "rate_per_second", "burst", "max_unfinished")} == {
        "name": "batch jobs",
        "role": "client",
        "rate_per_second": 2.5,
        "burst": 7,
        "max_unfinished": 9,
    }
    assert created["revoked_at"] is None and created["created_at"]
    assert "token_sha256" not in created
    row = conn.execute("SELECT * FROM api_keys WHERE id = %s", (created["id"],)).fetchone()
    assert bytes(row["token_sha256"]) == hashlib.sha256(created["token"].encode()).digest()
    # The token works, as a client key.
    fresh = as_key(created["token"])
    assert fresh.submit().status_code == 202
    assert_error(fresh.get("/api/keys"), 403)
    # No listing shows it again.
    listing = admin.get("/api/keys")
    assert listing.status_code == 200
    assert created["token"] not in listing.get_data(as_text=True)
    assert created["token"][12:] not in listing.get_data(as_text=True)
    for entry in listing.get_json():
        assert "token" not in entry and "token_sha256" not in entry
    # An admin key made by an admin can manage keys.
    made = admin.post("/api/keys", json={"name": "ops", "role": "admin"}).get_json()
    assert made["role"] == "admin"
    assert as_key(made["token"]).get("/api/keys").status_code == 200


def test_keys_are_listed_oldest_first_without_revoked_ones(new_key, as_key, conn):
    admin_key = new_key("admin")
    admin = as_key(admin_key)
    ids = [admin_key.id] + [
        admin.post("/api/keys", json={"name": f"k{i}"}).get_json()["id"] for i in range(3)
    ]
    assert [k["id"] for k in admin.get("/api/keys").get_json()] == ids
    assert admin.post(f"/api/keys/{ids[2]}/revoke").status_code == 200
    listed = admin.get("/api/keys").get_json()
    assert [k["id"] for k in listed] == [ids[0], ids[1], ids[3]]
    assert set(listed[0]) == {
        "id", "name", "role", "prefix", "rate_per_second", "burst", "max_unfinished", "created_at",
        "revoked_at", "last_used_at",
    }  # fmt: skip


def test_revoking_is_idempotent_and_an_unknown_key_is_404(new_key, as_key, conn, subtests):
    admin = as_key(new_key("admin"))
    victim = new_key()
    first = admin.post(f"/api/keys/{victim.id}/revoke")
    assert first.status_code == 200
    assert first.get_json()["id"] == victim.id and first.get_json()["revoked_at"]
    again = admin.post(f"/api/keys/{victim.id}/revoke")
    assert again.status_code == 200
    assert again.get_json()["revoked_at"] == first.get_json()["revoked_at"]
    for key_id in ("999999", str(BIGINT_MAX)):
        with subtests.test(key_id=key_id):
            body = assert_error(admin.post(f"/api/keys/{key_id}/revoke"), 404)
            assert key_id in body["message"]
    assert (
        conn.execute("SELECT count(*) AS n FROM api_keys WHERE revoked_at IS NOT NULL").fetchone()["n"] == 1
    )


def test_invalid_key_creations_are_422_and_create_nothing(new_key, as_key, conn, subtests):
    admin = as_key(new_key("admin"))
    cases = {
        "burst without rate": ({"name": "x", "burst": 5}, "burst"),
        "no name": ({}, "name"),
        "empty name": ({"name": ""}, "name"),
        "name too long": ({"name": "x" * 101}, "name"),
        "unknown role": ({"name": "x", "role": "root"}, "role"),
        "rate zero": ({"name": "x", "rate_per_second": 0}, "rate_per_second"),
        "rate negative": ({"name": "x", "rate_per_second": -1}, "rate_per_second"),
        "burst zero": ({"name": "x", "rate_per_second": 1, "burst": 0}, "burst"),
        "burst fractional": ({"name": "x", "rate_per_second": 1, "burst": 1.5}, "burst"),
        "max_unfinished zero": ({"name": "x", "max_unfinished": 0}, "max_unfinished"),
        "unknown field": ({"name": "x", "token": "skl_" + "a" * 32}, "token"),
    }
    for case, (body, field) in cases.items():
        with subtests.test(case=case):
            error = assert_error(admin.post("/api/keys", json=body), 422)
            assert field in error["errors"]["json"], error
    assert count(conn, "api_keys") == 1


# --- rate limits -------------------------------------------------------------------------------


def test_a_key_gets_its_burst_at_once_then_429(new_key, as_key, conn):
    caller = as_key(new_key(rate_per_second=1, burst=5))
    remaining = []
    for _ in range(5):
        response = caller.submit()
        assert response.status_code == 202, response.get_json()
        assert sf_list(response.headers["RateLimit-Policy"]) == {"rate": {"q": 5, "w": 5}}
        state = sf_list(response.headers["RateLimit"])
        assert set(state) == {"rate"}
        remaining.append((state["rate"]["r"], state["rate"]["t"]))
    # t: seconds until a token is due, 0 while some are left.
    assert remaining == [(4, 0), (3, 0), (2, 0), (1, 0), (0, 1)]

    refused = caller.submit()
    body = assert_error(refused, 429)
    assert "Rate limit" in body["message"]
    assert refused.headers["Retry-After"] == "1"  # a token per second: the next within a second
    assert sf_list(refused.headers["RateLimit-Policy"]) == {"rate": {"q": 5, "w": 5}}
    assert sf_list(refused.headers["RateLimit"]) == {"rate": {"r": 0, "t": 1}}
    # Refusals that follow (known to this process without a query) say the same.
    for _ in range(3):
        again = caller.submit()
        assert_error(again, 429)
        assert again.headers["Retry-After"] == "1"
        assert sf_list(again.headers["RateLimit-Policy"]) == {"rate": {"q": 5, "w": 5}}
        assert sf_list(again.headers["RateLimit"]) == {"rate": {"r": 0, "t": 1}}
    # A refused request changes nothing: five tasks, and GETs are refused too.
    assert count(conn) == 5
    assert_error(caller.get("/api/tasks"), 429)
    assert count(conn) == 5


def test_a_limited_key_gets_tokens_back_at_its_rate(new_key, as_key, conn):
    caller = as_key(new_key(rate_per_second=10, burst=2))
    assert [caller.get("/api/tasks").status_code for _ in range(2)] == [200, 200]
    assert_error(caller.get("/api/tasks"), 429)
    emptied = time.monotonic()
    wait_until(lambda: caller.get("/api/tasks").status_code == 200, timeout=2, interval=0.01)
    assert time.monotonic() - emptied < 0.5  # one token every 0.1 s
    # Every request spends a token: over a second, at most burst + rate succeed.
    started, ok = time.monotonic(), 0
    while time.monotonic() - started < 1.0:
        ok += caller.get("/api/tasks").status_code == 200
        time.sleep(0.01)
    assert 6 <= ok <= 2 + 10 * (time.monotonic() - started) + 1


def test_limits_are_per_key_and_unlimited_keys_have_no_ratelimit_fields(new_key, as_key, web):
    limited = as_key(new_key(rate_per_second=1, burst=1))
    free = as_key(new_key())
    assert limited.get("/api/tasks").status_code == 200
    assert_error(limited.get("/api/tasks"), 429)
    for _ in range(10):
        response = free.get("/api/tasks")
        assert response.status_code == 200
        assert "RateLimit" not in response.headers and "RateLimit-Policy" not in response.headers
    # The probes are not limited, nor counted.
    for _ in range(3):
        assert web.get("/healthz", headers={"Authorization": f"Bearer {limited.token}"}).status_code == 200


def test_a_refused_submit_with_an_idempotency_key_stores_nothing(new_key, as_key, conn):
    caller = as_key(new_key(rate_per_second=0.5, burst=1))
    assert caller.submit(headers={"Idempotency-Key": "first"}).status_code == 202
    refused = caller.submit(body={"task_input": 2}, headers={"Idempotency-Key": "second"})
    assert_error(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert count(conn) == 1
    assert [r["idempotency_key"] for r in conn.execute(
        "SELECT idempotency_key FROM task_idempotency_keys").fetchall()] == ["first"]  # fmt: skip


# --- quotas ------------------------------------------------------------------------------------


def test_the_n_plus_first_unfinished_task_is_refused_until_some_finish(new_key, as_key, conn):
    caller = as_key(new_key(max_unfinished=3))
    rooms = []
    for i in range(3):
        response = caller.submit(body={"task_input": i})
        assert response.status_code == 202, response.get_json()
        assert sf_list(response.headers["RateLimit-Policy"]) == {
            "unfinished": {"q": 3, "qu": "concurrent-requests"}
        }
        rooms.append(sf_list(response.headers["RateLimit"])["unfinished"]["r"])
    assert rooms == [2, 1, 0]
    for url in SUBMITS:
        refused = caller.submit(url)
        body = assert_error(refused, 429)
        assert "3 unfinished" in body["message"]
        assert refused.headers["Retry-After"] == "1"
        assert sf_list(refused.headers["RateLimit-Policy"]) == {
            "unfinished": {"q": 3, "qu": "concurrent-requests"}
        }
        assert sf_list(refused.headers["RateLimit"]) == {"unfinished": {"r": 0}}
    assert count(conn) == 3
    # Reading is not submitting: a key at its cap still reads.
    assert caller.get("/api/tasks").status_code == 200

    run_and_end(conn, 2)
    finished = time.monotonic()
    wait_until(lambda: caller.submit(body={"task_input": "again"}).status_code == 202, timeout=5)
    assert time.monotonic() - finished <= 1.5  # counts are cached for up to a second
    assert caller.submit(body={"task_input": "again 2"}).status_code == 202
    assert_error(caller.submit(body={"task_input": "one too many"}), 429)
    unfinished = conn.execute("SELECT count(*) AS n FROM tasks WHERE status IN ('pending', 'processing')")
    assert unfinished.fetchone()["n"] == 3
    assert count(conn) == 5


def test_a_cancelled_task_frees_its_place(new_key, as_key, conn):
    caller = as_key(new_key(max_unfinished=1))
    task_id = caller.submit_id("one")
    assert_error(caller.submit(), 429)
    assert caller.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    wait_until(lambda: caller.submit().status_code == 202, timeout=5)
    assert count(conn) == 2


def test_a_batch_counts_every_task_against_the_quota(new_key, as_key, conn):
    caller = as_key(new_key(max_unfinished=5))

    def batch(n: int):
        return caller.submit(
            "/api/tasks/batch", {"tasks": [{"task_type": "noop", "task_input": i} for i in range(n)]}
        )

    body = assert_error(batch(6), 429)
    assert "5 more" in body["message"]
    assert count(conn) == 0
    assert caller.submit_id("one") and caller.submit_id("two")
    assert_error(batch(4), 429)
    assert count(conn) == 2
    response = batch(3)
    assert response.status_code == 202
    assert sf_list(response.headers["RateLimit"]) == {"unfinished": {"r": 0}}
    assert_error(batch(1), 429)
    assert_error(caller.submit(), 429)
    assert count(conn) == 5


def test_quotas_are_per_key(new_key, as_key, conn):
    capped, other = as_key(new_key(max_unfinished=1)), as_key(new_key(max_unfinished=2))
    capped.submit_id("a")
    assert_error(capped.submit(), 429)
    assert other.submit_id("b") and other.submit_id("c")
    assert count(conn) == 3


def test_a_key_with_both_limits_reports_both_policies(new_key, as_key):
    caller = as_key(new_key(rate_per_second=4, burst=4, max_unfinished=10))
    response = caller.submit()
    assert response.status_code == 202
    assert sf_list(response.headers["RateLimit-Policy"]) == {
        "rate": {"q": 4, "w": 1},
        "unfinished": {"q": 10, "qu": "concurrent-requests"},
    }
    state = sf_list(response.headers["RateLimit"])
    assert state["unfinished"] == {"r": 9}
    assert state["rate"]["t"] == 0 and 0 <= state["rate"]["r"] <= 3
    # A read spends a token but no place: only the rate is reported.
    assert set(sf_list(caller.get("/api/tasks").headers["RateLimit"])) == {"rate"}


def test_a_retried_submit_is_replayed_even_at_the_cap(new_key, as_key, conn):
    """A retry that creates nothing is not an N+1th unfinished task: it gets the first answer."""
    caller = as_key(new_key(max_unfinished=1))
    first = caller.submit(headers={"Idempotency-Key": "only-once"})
    assert first.status_code == 202
    retried = caller.submit(headers={"Idempotency-Key": "only-once"})
    assert retried.status_code == 202, retried.get_json()
    assert retried.headers.get("Idempotent-Replayed") == "true"
    assert retried.get_json() == first.get_json()
    assert count(conn) == 1


def test_replays_do_not_use_up_the_quota(new_key, as_key, conn):
    """Replays create nothing, so they take no place: after five replays of one submit, a key
    with room for two unfinished tasks still has room for one more."""
    caller = as_key(new_key(max_unfinished=2))
    first = caller.submit(headers={"Idempotency-Key": "once"})
    assert first.status_code == 202
    for _ in range(5):
        again = caller.submit(headers={"Idempotency-Key": "once"})
        assert again.status_code == 202, again.get_json()
        assert again.get_json() == first.get_json()
    second = caller.submit(body={"task_input": "second"})
    assert second.status_code == 202, second.get_json()
    assert count(conn) == 2


# --- idempotency -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", list(SUBMITS))
def test_the_same_key_and_body_get_the_same_answer_and_one_submission(url, alice, conn):
    body, tasks = SUBMITS[url]
    first = alice.submit(url, body, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 202, first.get_json()
    assert "Idempotent-Replayed" not in first.headers
    for _ in range(3):
        again = alice.submit(url, body, headers={"Idempotency-Key": "order-42"})
        assert again.status_code == first.status_code
        assert again.get_json() == first.get_json()
        assert again.headers.get("Location") == first.headers.get("Location")
        assert again.headers["Idempotent-Replayed"] == "true"
    assert count(conn) == tasks
    # The first answer is what a submit without the header answers (same fields).
    plain = alice.submit(url, body)
    assert set(plain.get_json()) == set(first.get_json())
    assert count(conn) == 2 * tasks


def test_the_body_is_compared_as_json_and_a_quoted_key_is_the_same_key(alice, conn):
    first = alice.post(
        "/api/tasks",
        data='{"task_type": "noop", "task_input": {"a": 1, "b": 2}}',
        content_type="application/json",
        headers={"Idempotency-Key": "k-1"},
    )
    assert first.status_code == 202
    reordered = alice.post(
        "/api/tasks",
        data='{"task_input":{"b":2,"a":1},"task_type":"noop"}',
        content_type="application/json",
        headers={"Idempotency-Key": '"k-1"'},
    )
    assert reordered.status_code == 202
    assert reordered.headers["Idempotent-Replayed"] == "true"
    assert reordered.get_json()["task_id"] == first.get_json()["task_id"]
    assert count(conn) == 1


def test_the_same_key_with_another_body_or_endpoint_is_422(alice, conn, subtests):
    first = alice.submit(
        "/api/submit-task", {"task_input": 1, "task_type": "default"}, {"Idempotency-Key": "k"}
    )
    assert first.status_code == 202
    others = {
        "another input": ("/api/submit-task", {"task_input": 2, "task_type": "default"}),
        "another option": ("/api/submit-task", {"task_input": 1, "task_type": "default", "priority": 1}),
        "the same body at another endpoint": ("/api/tasks", {"task_input": 1, "task_type": "default"}),
        "a batch": ("/api/tasks/batch", {"tasks": [{"task_input": 1, "task_type": "default"}]}),
    }
    for case, (url, body) in others.items():
        with subtests.test(case=case):
            error = assert_error(alice.submit(url, body, {"Idempotency-Key": "k"}), 422)
            assert "'k'" in error["message"] and "different request" in error["message"]
            assert error["errors"] == {
                "headers": {"Idempotency-Key": ["already used with a different request"]}
            }
    assert count(conn) == 1
    assert count(conn, "task_idempotency_keys") == 1
    # The first use is still replayed.
    replay = alice.submit(
        "/api/submit-task", {"task_input": 1, "task_type": "default"}, {"Idempotency-Key": "k"}
    )
    assert replay.get_json() == first.get_json() and replay.headers["Idempotent-Replayed"] == "true"


def test_idempotency_keys_belong_to_their_owner(new_key, as_key, conn):
    alice_key, bob_key = new_key(), new_key()
    alice, bob = as_key(alice_key), as_key(bob_key)
    a = alice.submit(headers={"Idempotency-Key": "shared"})
    b = bob.submit(headers={"Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 202
    assert "Idempotent-Replayed" not in b.headers
    assert a.get_json()["task_id"] != b.get_json()["task_id"]
    # Bob may use the key for another body: it is his own key, unrelated to Alice's.
    c = bob.submit(body={"task_input": "other"}, headers={"Idempotency-Key": "also-alices"})
    alice_c = alice.submit(body={"task_input": "yet another"}, headers={"Idempotency-Key": "also-alices"})
    assert c.status_code == alice_c.status_code == 202
    assert owners(conn) == {
        a.get_json()["task_id"]: alice_key.id,
        b.get_json()["task_id"]: bob_key.id,
        c.get_json()["task_id"]: bob_key.id,
        alice_c.get_json()["task_id"]: alice_key.id,
    }
    # Each replays its own answer.
    assert alice.submit(headers={"Idempotency-Key": "shared"}).get_json() == a.get_json()
    assert bob.submit(headers={"Idempotency-Key": "shared"}).get_json() == b.get_json()


def test_an_expired_idempotency_key_is_a_fresh_request(alice, conn):
    first = alice.submit(headers={"Idempotency-Key": "daily"})
    # A day minus an hour later: still remembered (24 h).
    conn.execute("UPDATE task_idempotency_keys SET created_at = now() - interval '23 hours'")
    assert alice.submit(headers={"Idempotency-Key": "daily"}).headers["Idempotent-Replayed"] == "true"
    conn.execute("UPDATE task_idempotency_keys SET created_at = now() - interval '25 hours'")
    fresh = alice.submit(headers={"Idempotency-Key": "daily"})
    assert fresh.status_code == 202
    assert "Idempotent-Replayed" not in fresh.headers
    assert fresh.get_json()["task_id"] != first.get_json()["task_id"]
    assert count(conn) == 2
    # Forgotten means forgotten: another body is no conflict either once expired.
    conn.execute("UPDATE task_idempotency_keys SET created_at = now() - interval '25 hours'")
    other = alice.submit(body={"task_input": "new"}, headers={"Idempotency-Key": "daily"})
    assert other.status_code == 202 and "Idempotent-Replayed" not in other.headers
    assert count(conn) == 3 and count(conn, "task_idempotency_keys") == 1


def test_a_short_idempotency_ttl_is_honoured(make_app, new_key, as_key, conn):
    ttl = 0.3
    caller = as_key(new_key(), make_app(idempotency_ttl_seconds=ttl).test_client())
    first = caller.submit(headers={"Idempotency-Key": "brief"})
    time.sleep(ttl + 0.05)
    fresh = caller.submit(headers={"Idempotency-Key": "brief"})
    assert fresh.status_code == 202 and "Idempotent-Replayed" not in fresh.headers
    assert fresh.get_json()["task_id"] != first.get_json()["task_id"]


def test_a_malformed_idempotency_key_is_400_and_stores_nothing(alice, conn, subtests):
    cases = {
        "empty": "",
        "blank": "   ",
        "256 characters": "k" * 256,
        "non-ASCII": "clé",
        "a space inside": "two words",
        "a quote inside": 'a"b',
        "only quotes": '""',
        "a tab": "a\tb",
    }
    for case, value in cases.items():
        for url in SUBMITS:
            with subtests.test(case=case, url=url):
                body = assert_error(alice.submit(url, headers={"Idempotency-Key": value}), 400)
                assert "Idempotency-Key" in body["message"]
    assert count(conn) == 0
    assert count(conn, "task_idempotency_keys") == 0
    longest = alice.submit(headers={"Idempotency-Key": "k" * 255})
    assert longest.status_code == 202
    assert count(conn, "task_idempotency_keys") == 1


def test_a_submit_refused_under_a_key_leaves_the_key_free(alice, conn, subtests):
    """Validation (422 before the insert) and the database's refusal (422 inside the key's
    transaction) both leave nothing behind: the corrected request under the same key is new."""
    for case, raw, message in [
        ("invalid-field", '{"task_input": 1, "priority": "high"}', "semantic errors"),
        ("refused-by-postgres", '{"task_input": "\\ud800"}', "refused by the database"),
    ]:
        with subtests.test(case=case):
            key = f"fix-{case}"
            refused = alice.post(
                "/api/submit-task",
                data=raw,
                content_type="application/json",
                headers={"Idempotency-Key": key},
            )
            assert message in assert_error(refused, 422)["message"]
            assert count(conn, "task_idempotency_keys") == 0
            fixed = alice.submit(body={"task_input": case}, headers={"Idempotency-Key": key})
            assert fixed.status_code == 202 and "Idempotent-Replayed" not in fixed.headers
            conn.execute("DELETE FROM task_idempotency_keys")
    assert count(conn) == 2


# --- bad input, tightened ----------------------------------------------------------------------


def test_a_body_not_sent_as_json_is_415_and_stores_nothing(new_key, as_key, conn, subtests):
    admin = as_key(new_key("admin"))
    bodies = {**{url: body for url, (body, _) in SUBMITS.items()}, "/api/keys": {"name": "x"}}
    for url, body in bodies.items():
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            with subtests.test(url=url, content_type=content_type):
                response = admin.post(url, data=json.dumps(body), content_type=content_type)
                error = assert_error(response, 415)
                assert "Content-Type: application/json" in error["message"]
        with subtests.test(url=url, content_type="application/json; charset=utf-8"):
            response = admin.post(url, data=json.dumps(body), content_type="application/json; charset=utf-8")
            assert response.status_code in (201, 202), response.get_json()
    assert count(conn) == 1 + 1 + 3
    assert count(conn, "api_keys") == 2


def test_one_409_shape_for_result_cancel_and_retry(alice, conn, subtests):
    pending = alice.submit_id("p")
    done = alice.submit_id("d")
    failed = alice.submit_id("f", max_attempts=1)
    conn.execute("UPDATE tasks SET run_at = now() + interval '1 hour' WHERE id = %s", (pending,))
    assert run_and_end(conn, 1) == [done]
    assert run_and_end(conn, 1, outcome="failed") == [failed]
    cases = [
        ("get", f"/api/task-result/{pending}", pending, "pending", None),
        ("get", f"/api/task-result/{failed}", failed, "failed", "boom"),
        ("post", f"/api/tasks/{done}/cancel", done, "completed", None),
        ("post", f"/api/tasks/{failed}/cancel", failed, "failed", "boom"),
        ("post", f"/api/tasks/{pending}/retry", pending, "pending", None),
        ("post", f"/api/tasks/{done}/retry", done, "completed", None),
    ]
    for method, url, task_id, status, error in cases:
        with subtests.test(url=url):
            body = assert_error(alice.open(method, url), 409, status=status)
            assert set(body) == CONFLICT_FIELDS
            assert (body["task_id"], body["error"]) == (task_id, error)
            assert str(task_id) in body["message"] and status in body["message"]


def test_an_id_that_is_not_a_positive_64_bit_integer_is_404_saying_so(alice, subtests):
    alice.submit_id("task 1 exists")
    for method, template in TASK_ROUTES:
        for task_id in ["abc", "0", "-1", "1.5", str(2**63), "1e3", "%C3%A9"]:
            url = template.format(task_id)
            with subtests.test(url=url):
                body = assert_error(alice.open(method, url), 404)
                assert "task ids are positive 64-bit integers" in body["message"]
                assert "requested URL was not found" not in body["message"]


def test_a_body_nested_ten_thousand_deep_is_refused_within_a_second(new_key, as_key, conn, subtests):
    admin = as_key(new_key("admin"))
    deep = deep_json(10_000)
    bodies = {
        "/api/submit-task": b'{"task_input": ' + deep + b"}",
        "/api/tasks": b'{"task_type": "noop", "task_input": ' + deep + b"}",
        "/api/tasks/batch": b'{"tasks": [{"task_type": "noop", "task_input": ' + deep + b"}]}",
        "/api/keys": b'{"name": ' + deep + b"}",
    }
    for url, raw in bodies.items():
        with subtests.test(url=url):
            started = time.monotonic()
            response = admin.post(url, data=raw, content_type="application/json")
            elapsed = time.monotonic() - started
            assert 400 <= response.status_code < 500
            assert_error(response, response.status_code)
            assert elapsed < 1.0
    assert count(conn) == 0
    assert count(conn, "api_keys") == 1
