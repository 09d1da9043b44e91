"""What each key role may do, through the real app with auth on: a table of routes, each called
by a metrics, a viewer, a client (not the owner of what it names) and an admin key, in that order
(the admin last: it is the one that changes things). A refused call is a 403 naming the role and
changes nothing; /metrics takes metrics, viewer and admin keys. The dashboard's side for a viewer
(pages yes, buttons no) is here too, through the Flask client; tests/system/test_dashboard_roles.py
looks at it in Chromium."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from skiplock import keys as key_admin
from skiplock.cli import main
from skiplock.sql.limits import limit_get
from tests.helpers import assert_error, bearer, fail_task, ok

NOOP = {"task_type": "noop", "task_input": None}
SCHEDULE = {"name": "nightly", "cron": "0 2 * * *", "task": NOOP}
ROLES_IN_ORDER = ("metrics", "viewer", "client", "admin")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # {task}, {failed}, {workflow}, {schedule}, {key} name Alice's things
    want: dict[str, int]  # role -> status
    body: dict | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def reads(client: int = 200, viewer: int = 200) -> dict[str, int]:
    return {"metrics": 403, "viewer": viewer, "client": client, "admin": 200}


def changes(client: int, admin: int = 200) -> dict[str, int]:
    return {"metrics": 403, "viewer": 403, "client": client, "admin": admin}


ROUTES = [
    # reads: a viewer sees what an admin sees (another owner's things included)
    Route("GET", "/api/tasks", reads()),
    Route("GET", "/api/tasks/{task}", reads(client=404)),
    Route("GET", "/api/task-status/{task}", reads(client=404)),
    Route("GET", "/api/tasks/{task}/attempts", reads(client=404)),
    Route("GET", "/api/tasks/{task}/webhooks", reads(client=404)),
    Route("GET", "/api/workflows/{workflow}", reads(client=404)),
    Route("GET", "/api/schedules/{schedule}", reads(client=404)),
    Route("GET", "/api/queues", reads(client=403)),
    Route("GET", "/api/keys", reads(client=403)),
    Route("GET", "/api/concurrency-limits", reads()),
    Route("GET", "/api/task-types", reads()),
    # a viewer has no webhooks (it submits nothing), so no webhook secret either
    Route("GET", "/api/webhooks/secret", reads(viewer=403)),
    # a stream token changes nothing: a viewer may mint one
    Route("POST", "/api/tasks/{task}/stream-token", {**reads(client=404), "admin": 201, "viewer": 201}),
    # changes: a viewer makes none
    Route("POST", "/api/tasks", changes(client=202, admin=202), NOOP),
    Route("POST", "/api/submit-task", changes(client=202, admin=202), {"task_input": "x"}),
    Route("POST", "/api/workflows", changes(client=201, admin=201), {"chain": [NOOP]}),
    Route("POST", "/api/tasks/{task}/cancel", changes(client=404)),
    Route("POST", "/api/tasks/{failed}/retry", changes(client=404)),
    Route("POST", "/api/workflows/{workflow}/cancel", changes(client=404)),
    Route("POST", "/api/queues/default/pause", changes(client=403)),
    Route("PUT", "/api/queues/default/limit", changes(client=403), {"max_running": 1}),
    Route("POST", "/api/keys", changes(client=403, admin=201), {"name": "new"}),
    Route("PATCH", "/api/keys/{key}", changes(client=403), {"weight": 2}),
    Route("POST", "/api/keys/{key}/revoke", changes(client=403)),
    Route("POST", "/api/schedules", changes(client=201, admin=201), {**SCHEDULE, "name": "another"}),
    Route("PATCH", "/api/schedules/{schedule}", changes(client=404), {"cron": "0 3 * * *"}),
    Route("POST", "/api/schedules/{schedule}/pause", changes(client=404)),
    Route("POST", "/api/schedules/{schedule}/run", changes(client=404, admin=202)),
    Route("DELETE", "/api/schedules/{schedule}", changes(client=404, admin=204)),
]


def state(conn) -> dict:
    """Everything a refused request must leave as it was."""
    one = lambda sql: conn.execute(sql).fetchall()  # noqa: E731
    return {
        "tasks": one("SELECT id, status, attempts FROM tasks ORDER BY id"),
        "workflows": one("SELECT id, cancelled_at FROM workflows ORDER BY id"),
        "keys": one("SELECT id, revoked_at, weight FROM api_keys ORDER BY id"),
        "queues": one("SELECT queue, paused FROM task_queues ORDER BY queue"),
        "limit": limit_get(conn, scope="queue", owner=0, name="default"),
        "schedules": one("SELECT id, cron, paused FROM task_schedules ORDER BY id"),
        "webhook_secrets": one("SELECT owner_key_id FROM webhook_secrets ORDER BY 1"),
    }


@pytest.fixture
def callers(new_key, as_key):
    return {role: as_key(new_key(role)) for role in ROLES_IN_ORDER}


@pytest.fixture
def alices(new_key, as_key, conn) -> dict[str, object]:
    """Alice (a client key) and her things: a pending task, a failed one, a workflow, a schedule."""
    alice_key = new_key(name="alice")
    alice = as_key(alice_key)
    failed = alice.submit_id(None, max_attempts=1)
    assert fail_task(conn, failed) == "failed"
    made = {
        "task": alice.submit_id(None),
        "failed": failed,
        "workflow": alice.post("/api/workflows", json={"chain": [NOOP, NOOP]}).get_json()["workflow_id"],
        "schedule": alice.post("/api/schedules", json=SCHEDULE).get_json()["schedule_id"],
        "key": alice_key.id,
    }
    return made


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_each_role_may_call_what_it_may_and_a_refusal_changes_nothing(route, callers, alices, conn):
    path = route.path.format(**alices)
    for role in ROLES_IN_ORDER:
        before = state(conn)
        caller = callers[role]
        response = caller.client.open(
            path, method=route.method, headers=bearer(caller.token), json=route.body
        )
        want = route.want[role]
        assert response.status_code == want, (role, response.get_json())
        if want == 403:
            message = assert_error(response, 403)["message"]
            assert state(conn) == before, f"{role}: a refused {route} changed something"
            if role in ("metrics", "viewer"):
                assert f"is a {role} key" in message, message


def test_a_viewer_sees_every_owners_tasks_in_lists(callers, alices):
    listed = {t["task_id"] for t in callers["viewer"].get("/api/tasks").get_json()["tasks"]}
    assert {alices["task"], alices["failed"]} <= listed
    assert callers["client"].get("/api/tasks").get_json()["tasks"] == []


@pytest.mark.parametrize(
    ("role", "status"), [("metrics", 200), ("viewer", 200), ("admin", 200), ("client", 403), (None, 401)]
)
def test_metrics_take_a_metrics_viewer_or_admin_key(role, status, new_key, web):
    headers = bearer(new_key(role).token) if role else {}
    response = web.get("/metrics", headers=headers)
    if status == 200:
        assert response.status_code == 200
        assert b"skiplock_http_requests_total" in response.data
    else:
        message = assert_error(response, status)["message"]
        if role == "client":
            assert "needs a metrics, viewer or admin key" in message


def test_the_api_creates_keys_of_every_role_and_no_other(callers):
    admin = callers["admin"]
    for role in key_admin.ROLES:
        created = admin.post("/api/keys", json={"name": f"a {role}", "role": role})
        assert created.status_code == 201 and created.get_json()["role"] == role
    body = assert_error(admin.post("/api/keys", json={"name": "x", "role": "root"}), 422)
    assert "role" in str(body["errors"])


def test_the_cli_creates_a_metrics_key_that_reads_metrics_only(settings, conn, web):
    runner = CliRunner()
    env = {"DATABASE_URL": settings.database_url}
    out = ok(runner.invoke(main, ["keys", "create", "--role", "metrics", "--name", "prometheus"], env=env))
    token = re.search(r"token: (skl_\w+)", out)[1]
    row = conn.execute("SELECT role::text AS role FROM api_keys WHERE name = 'prometheus'").fetchone()
    assert row["role"] == "metrics"
    assert web.get("/metrics", headers=bearer(token)).status_code == 200
    assert_error(web.get("/api/tasks", headers=bearer(token)), 403)
    refused = runner.invoke(main, ["keys", "create", "--admin", "--role", "viewer", "--name", "x"], env=env)
    assert refused.exit_code == 2 and "pick one" in refused.output


# --- the dashboard ---------------------------------------------------------------------------------


def logged_in(web, token: str):
    """The dashboard's session for this key, as a browser gets it (a CSRF token from the form)."""
    page = web.get("/dashboard/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
    answer = web.post("/dashboard/login", data={"token": token, "csrf_token": csrf, "next": "/dashboard"})
    if answer.status_code == 303:  # a new session, with a CSRF token of its own
        page = web.get("/dashboard").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
    return answer, csrf


def test_a_viewer_sees_the_dashboard_without_buttons_and_its_posts_change_nothing(web, new_key, alices, conn):
    viewer = new_key("viewer", name="oncall")
    answer, csrf = logged_in(web, viewer.token)
    assert answer.status_code == 303
    overview = web.get("/dashboard").get_data(as_text=True)
    assert "Queues" in overview and "viewer: read-only" in overview
    task_page = web.get(f"/dashboard/tasks/{alices['task']}").get_data(as_text=True)
    assert f"Task #{alices['task']}" in task_page
    for page in (overview, task_page, web.get("/dashboard/live").get_data(as_text=True)):
        assert 'hx-post="/dashboard/' not in page  # no button but the logout form
    before = state(conn)
    for action in (
        f"/dashboard/tasks/{alices['task']}/cancel",
        f"/dashboard/tasks/{alices['failed']}/retry",
        "/dashboard/queues/default/pause",
        f"/dashboard/schedules/{alices['schedule']}/run",
        f"/dashboard/workflows/{alices['workflow']}/cancel",
    ):
        refused = web.post(action, data={"csrf_token": csrf})
        assert refused.status_code == 403, action
        assert "is a viewer key: it may look, not act" in refused.get_data(as_text=True)
    assert state(conn) == before
    assert web.post("/dashboard/logout", data={"csrf_token": csrf}).status_code == 303


def test_an_admin_still_sees_the_buttons(web, new_key, alices):
    logged_in(web, new_key("admin").token)
    page = web.get(f"/dashboard/tasks/{alices['task']}").get_data(as_text=True)
    assert f'hx-post="/dashboard/tasks/{alices["task"]}/cancel"' in page


@pytest.mark.parametrize("role", ["client", "metrics"])
def test_client_and_metrics_keys_cannot_log_in_to_the_dashboard(role, web, new_key):
    answer, _ = logged_in(web, new_key(role).token)
    assert answer.status_code == 403
    assert f"is a {role} key: the dashboard needs an admin or viewer key" in answer.get_data(as_text=True)
