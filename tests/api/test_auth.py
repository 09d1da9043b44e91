"""API keys through the real Flask app with authentication on and a real Postgres (a fresh database
per test): who may call what (401, 403, the key cache), and managing keys through /api/keys."""

from __future__ import annotations

import hashlib
import math
import re
import string
import time

import pytest

from skiplock import keys as key_admin
from skiplock.tokens import new_token
from tests.helpers import BIGINT_MAX, REALM, assert_error, bearer, row_count, wait_until

TOKEN_RE = re.compile(r"^skl_[0-9A-Za-z]{32}$")
INVALID_TOKEN = 'Bearer realm="skiplock", error="invalid_token"'


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
    assert row_count(conn) == 1
    assert row_count(conn, "api_keys") == 1
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
    assert row_count(conn) == 0
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
    assert row_count(conn) == 0


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
    assert row_count(conn) == 0


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
    client = make_app(auth="on", key_cache_seconds=cache).test_client()
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
    assert row_count(conn) == 0


def test_a_key_revoked_in_the_database_is_refused_within_the_cache_time(make_app, new_key, as_key, conn):
    cache = 1.0
    victim_key = new_key()
    victim = as_key(victim_key, make_app(auth="on", key_cache_seconds=cache).test_client())
    assert victim.submit().status_code == 202
    assert key_admin.revoke_key(conn, key_id=victim_key.id)["revoked_at"] is not None
    since = time.monotonic()
    wait_until(lambda: victim.get("/api/tasks").status_code == 401, timeout=cache + 2, interval=0.02)
    assert time.monotonic() - since <= cache + 0.5
    # Once refused, always refused (the cache now holds the revoked row).
    for _ in range(5):
        assert_error(victim.submit(), 401)
    assert row_count(conn) == 1


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
        "id", "name", "role", "prefix", "rate_per_second", "burst", "max_unfinished", "weight",
        "created_at", "revoked_at", "last_used_at",
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
        "weight zero": ({"name": "x", "weight": 0}, "weight"),
        "weight negative": ({"name": "x", "weight": -1}, "weight"),
        "weight too big": ({"name": "x", "weight": 1000.5}, "weight"),
        "weight a string": ({"name": "x", "weight": "heavy"}, "weight"),
    }
    for case, (body, field) in cases.items():
        with subtests.test(case=case):
            error = assert_error(admin.post("/api/keys", json=body), 422)
            assert field in error["errors"]["json"], error
    assert row_count(conn, "api_keys") == 1


# --- weights -----------------------------------------------------------------------------------


def test_a_keys_weight_is_set_at_creation_changed_by_an_admin_and_listed(new_key, as_key, web, conn):
    admin_key = new_key("admin")
    admin = as_key(admin_key)
    heavy = admin.post("/api/keys", json={"name": "heavy", "weight": 3}).get_json()
    light = admin.post("/api/keys", json={"name": "light"}).get_json()
    assert (heavy["weight"], light["weight"]) == (3.0, 1.0)
    assert {r["name"]: r["weight"] for r in conn.execute("SELECT name, weight FROM api_keys")} == {
        admin_key.row["name"]: 1.0,
        "heavy": 3.0,
        "light": 1.0,
    }

    changed = web.patch(f"/api/keys/{light['id']}", json={"weight": 0.1}, headers=bearer(admin_key.token))
    assert changed.status_code == 200, changed.get_json()
    assert (changed.get_json()["id"], changed.get_json()["weight"]) == (light["id"], 0.1)  # as set
    assert "token" not in changed.get_json()
    listed = {k["name"]: k["weight"] for k in admin.get("/api/keys").get_json()}
    assert listed == {admin_key.row["name"]: 1.0, "heavy": 3.0, "light": 0.1}
    # The fair share of new tasks reads it (task_turn_start).
    assert conn.execute(
        "SELECT spacing FROM task_turn_start(%s, 'default', 0, '')", (light["id"],)
    ).fetchone()["spacing"] == pytest.approx(10)


def test_only_admins_change_weights_and_bad_ones_change_nothing(new_key, as_key, web, conn, subtests):
    admin, client = new_key("admin"), new_key()
    url = f"/api/keys/{client.id}"
    assert_error(web.patch(url, json={"weight": 5}, headers=bearer(client.token)), 403)
    assert_error(web.patch(url, json={"weight": 5}), 401)
    for body in ({}, {"weight": 0}, {"weight": 1001}, {"weight": None}, {"weight": 2, "name": "renamed"}):
        with subtests.test(body=body):
            assert_error(web.patch(url, json=body, headers=bearer(admin.token)), 422)
    for key_id in ("999999", str(BIGINT_MAX)):
        with subtests.test(key_id=key_id):
            assert_error(
                web.patch(f"/api/keys/{key_id}", json={"weight": 2}, headers=bearer(admin.token)), 404
            )
    assert [r["weight"] for r in conn.execute("SELECT weight FROM api_keys ORDER BY id")] == [1.0, 1.0]
