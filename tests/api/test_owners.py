"""Owners, through the real Flask app with authentication on and a real Postgres: a client key
sees and steers only its own tasks (another key's are 404, exactly as an id never issued),
an admin key all of them. Tasks are moved through processing and completed with the queue's own functions
(skiplock/sql), as a worker would: no mocks anywhere."""

from __future__ import annotations

from tests.helpers import BIGINT_MAX, SUBMITS, TASK_ROUTES, assert_error, row_count, run_and_end, task_owners

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
    assert task_owners(conn) == made
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
    assert task_owners(conn) == {a: alice_key.id, b: bob_key.id, own: admin_key.id}
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
    assert row_count(conn, "api_keys") == 2
    assert (
        conn.execute("SELECT count(*) AS n FROM api_keys WHERE revoked_at IS NOT NULL").fetchone()["n"] == 0
    )
