"""The dashboard (/dashboard) in a real headless Chromium: Debian's `chromium`, driven by
Playwright, against the real app (auth on, as in production) served on a thread, and a real
Postgres. Tasks are moved through their states with the queue's own functions, as a worker would.

SKIPLOCK_SCREENSHOTS=1 also writes docs/dashboard.png and docs/dashboard-task.png.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from flask import Flask
from playwright.sync_api import Page, expect
from werkzeug.serving import make_server

from api import create_app
from api.dashboard import views as dashboard
from skiplock import keys
from skiplock.schedules import Rule
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_hand_back_many,
    task_progress_many,
)
from skiplock.sql.inserts import NewTask
from skiplock.sql.limits import limit_put
from skiplock.sql.operations import Throughput, task_queue_set_paused, task_throughput_add
from skiplock.sql.schedules import schedule_create
from skiplock.sql.tasks import task_cancel
from skiplock.sql.workflow_store import workflow_insert
from skiplock.sql.workflows import workflow_tasks_ended
from skiplock.workflows import Step, checked
from tests.helpers import ROOT, UNREACHABLE_DB, WORKER, admit, history, insert_task, run_attempt, task_row
from tests.system.conftest import CHROMIUM  # Chromium's path (conftest: the session's `browser`)

SCREENSHOTS = os.environ.get("SKIPLOCK_SCREENSHOTS") == "1"
# The page refreshes every 2 s: anything it should show appears well within this.
SHOWN_WITHIN_MS = 6_000
CSRF_INPUT = 'input[name="csrf_token"]'

pytestmark = [
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (`apt-get install chromium`)"
    ),
    pytest.mark.pg_agnostic,  # the browser's side: the same on every Postgres version (.ci/run)
]


# --- fixtures ----------------------------------------------------------------------------------


def serve(app: Flask):
    """Serve `app` on a free port of 127.0.0.1 from a thread; returns (base URL, stop())."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        thread.join(10)
        server.server_close()

    return f"http://127.0.0.1:{server.server_port}", stop


@dataclass
class Dashboard:
    app: Flask
    url: str


@pytest.fixture
def served(settings, monkeypatch):
    """The real app with authentication on and the dashboard registered, on a live port. Keys
    are read again every 0.3 s (2 s in production) and pages refresh every 0.5 s (2 s), so that
    changes show quickly."""
    monkeypatch.setattr(dashboard, "REFRESH_SECONDS", 0.5)
    app = create_app(replace(settings, auth="on", key_cache_seconds=0.3))
    url, stop = serve(app)
    yield Dashboard(app, url)
    stop()
    app.extensions["skiplock"].close()


# Chromium logs every 4xx answer as a console error; the tests ask for those on purpose.
REFUSAL_LOGGED = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d")


@pytest.fixture
def page(browser, served):
    """A fresh browser context on the served app. page.problems collects what went wrong inside
    the page: script errors, console errors (CSP violations among them), 5xx answers."""
    context = browser.new_context(base_url=served.url, viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(SHOWN_WITHIN_MS)
    page = context.new_page()
    page.problems = []

    def console(message):
        if message.type == "error" and not REFUSAL_LOGGED.match(message.text):
            page.problems.append(f"console: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda error: page.problems.append(f"script error: {error}"))
    page.on("response", lambda r: r.status >= 500 and page.problems.append(f"{r.status} {r.url}"))
    yield page
    context.close()


@pytest.fixture
def admin(conn) -> dict:
    return keys.create_key(conn, name="ops", role="admin")


def log_in(page: Page, token: str) -> None:
    page.goto("/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next=/dashboard$"))
    page.get_by_label("Admin API key").fill(token)
    page.get_by_role("button", name="Log in").click()


def logged_in(page: Page, token: str) -> None:
    log_in(page, token)
    expect(page).to_have_url(re.compile(r"/dashboard$"))
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()


def fail_attempt(conn, task_id: int, attempt: int, error: str = "boom") -> str:
    traceback = f'Traceback (most recent call last):\n  File "tasks.py", line 7, in run\n{error}'
    ended = task_fail_many(
        conn,
        worker_id=WORKER,
        failures=[AttemptFailure(task_id, attempt, "failed", error, traceback)],
        backoff_base=0.01,
        backoff_max=0.01,
    )
    return ended[task_id]


def failed_task(conn, queue: str, error: str = "boom") -> int:
    """A task that failed its only attempt."""
    task_id = insert_task(conn, "noop", queue=queue, max_attempts=1)
    assert fail_attempt(conn, task_id, run_attempt(conn, task_id, queue), error) == "failed"
    return task_id


def running_task(conn, queue: str, progress: float) -> tuple[int, AttemptRef]:
    task_id = insert_task(conn, "sleep", {"seconds": 60}, queue=queue)
    ref = AttemptRef(task_id, run_attempt(conn, task_id, queue))
    task_progress_many(conn, worker_id=WORKER, progress=[(ref, progress)])
    return task_id, ref


def session_content(cookie: str) -> dict:
    """What a session cookie holds: itsdangerous' payload (base64 JSON, zlib'd if it starts with a dot)."""
    payload = base64.urlsafe_b64decode(cookie.lstrip(".").split(".")[0] + "==")
    return json.loads(zlib.decompress(payload) if cookie.startswith(".") else payload)


def queue_paused(conn, queue: str) -> bool | None:
    row = conn.execute("SELECT paused FROM task_queues WHERE queue = %s", (queue,)).fetchone()
    return None if row is None else row["paused"]


def queue_row(page: Page, queue: str):
    return page.locator(f'tr[data-queue="{queue}"]')


# --- login ---------------------------------------------------------------------------------------


def test_the_dashboard_needs_an_admin_key(page, conn, admin):
    client = keys.create_key(conn, name="billing")
    page.goto("/dashboard/tasks/1")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next=/dashboard/tasks/1$"))
    expect(page.get_by_role("heading", name="Queues")).to_have_count(0)

    log_in(page, client["token"])
    expect(page.locator("#login-error")).to_contain_text("client key")
    expect(page).to_have_url(re.compile(r"/dashboard/login$"))
    log_in(page, "skl_" + "x" * 32)
    expect(page.locator("#login-error")).to_have_text("Unknown key.")
    page.goto("/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))  # still not logged in

    logged_in(page, admin["token"])
    expect(page.locator("header")).to_contain_text(f"Logged in with ops ({admin['prefix']}, admin)")
    (cookie,) = page.context.cookies()
    assert (cookie["name"], cookie["path"], cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (
        "skiplock_dashboard", "/dashboard", True, "Strict", False,
    )  # fmt: skip
    content = session_content(cookie["value"])  # signed, not encrypted: anyone holding it can read it
    assert set(content) == {"key_id", "key_fp", "csrf"} and content["key_id"] == admin["id"]

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/dashboard/login$"))
    expect(page.get_by_role("status")).to_contain_text("Logged out.")
    page.goto("/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    assert page.problems == []


def test_a_revoked_key_is_logged_out(page, conn, admin):
    logged_in(page, admin["token"])
    page.evaluate("window.notReloaded = true")
    keys.revoke_key(conn, key_id=admin["id"])
    # The next refresh finds the key revoked and sends the page to the login, by itself.
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next=/dashboard$"))
    expect(page.get_by_role("status")).to_contain_text("revoked")
    page.goto("/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    log_in(page, admin["token"])
    expect(page.locator("#login-error")).to_contain_text("was revoked")


# --- the overview, live, and its buttons ---------------------------------------------------------


def test_the_overview_refreshes_itself_and_its_buttons_work(page, conn, admin):
    failed = failed_task(conn, "reports", error="OSError: disk full")
    running, ref = running_task(conn, "default", progress=0.4)
    task_throughput_add(
        conn, worker_id=WORKER, rows=[Throughput("reports", "noop", completed=5, failed=1, run_seconds=2.0)]
    )
    logged_in(page, admin["token"])
    page.evaluate("window.notReloaded = true")

    # What is there: depth, running with progress, the failure with its traceback, charts, health.
    expect(queue_row(page, "default").locator("td").nth(4)).to_have_text("1")  # running
    bar = page.get_by_role("progressbar", name=f"Progress of task {running}")
    expect(bar).to_have_attribute("value", "0.4")
    failure = page.locator(f'table.failures tr[data-task="{failed}"]')
    expect(failure).to_contain_text("disk full")
    failure.locator("summary").click()
    expect(failure.locator("pre")).to_contain_text("line 7, in run\nOSError: disk full")
    chart = page.locator('#charts figure[data-queue="reports"]')
    expect(chart).to_have_attribute("aria-label", "reports, last hour: 5 completed, 1 failed")
    expect(chart.locator("canvas")).to_have_count(1)
    chart.locator("canvas").evaluate("canvas => { canvas.drawnOnce = true }")
    expect(page.locator(".health")).to_contain_text("Workers alive")

    # Changes made elsewhere show up by themselves, without a reload: a task submitted through
    # the API, progress, a worker's report of what it finished.
    submitted = page.request.post(
        "/api/tasks",
        headers={"Authorization": f"Bearer {admin['token']}"},
        data={"task_type": "noop", "task_input": None, "queue": "emails"},
    )
    assert submitted.status == 202, submitted.text()
    task_progress_many(conn, worker_id=WORKER, progress=[(ref, 0.8)])
    task_throughput_add(
        conn, worker_id=WORKER, rows=[Throughput("emails", "noop", completed=3, failed=0, run_seconds=1.0)]
    )
    expect(queue_row(page, "emails").locator("td").nth(1)).to_have_text("1")  # due
    expect(bar).to_have_attribute("value", "0.8")
    expect(page.locator('#charts figure[data-queue="emails"]')).to_have_attribute(
        "aria-label", "emails, last hour: 3 completed, 0 failed"
    )
    assert chart.locator("canvas").evaluate("canvas => canvas.drawnOnce") is True  # updated, not redrawn
    expect(failure.locator("details")).to_have_attribute("open", "")  # kept open across refreshes

    # Retry the failed task.
    failure.get_by_role("button", name=f"Retry task {failed}").click()
    expect(page.locator("#notice")).to_have_text(f"Task {failed} is pending again.")
    expect(failure.locator(".status")).to_have_text("pending")
    assert task_row(conn, failed)["status"] == "pending"

    # Pause and resume a queue.
    queue_row(page, "emails").get_by_role("button", name="Pause queue emails").click()
    expect(queue_row(page, "emails").locator(".badge")).to_have_text("paused")
    assert queue_paused(conn, "emails") is True
    queue_row(page, "emails").get_by_role("button", name="Resume queue emails").click()
    expect(queue_row(page, "emails").locator(".badge")).to_have_text("active")
    assert queue_paused(conn, "emails") is False
    assert page.evaluate("window.notReloaded") is True

    # The retried task runs again and completes; its page shows both attempts on a timeline.
    attempt = run_attempt(conn, failed, "reports")
    done = task_complete_many(conn, worker_id=WORKER, results=[(AttemptRef(failed, attempt), "{}")])
    assert done == {failed}
    failure.get_by_role("link", name=f"#{failed}").click()
    expect(page).to_have_url(re.compile(rf"/dashboard/tasks/{failed}$"))
    expect(page.get_by_role("heading", name=f"Task #{failed}")).to_contain_text("completed")
    timeline = page.get_by_role("img", name=re.compile("Timeline of 2 attempts"))
    expect(timeline.locator('g[data-outcome="failed"]')).to_have_attribute("data-attempt", "1")
    expect(timeline.locator('g[data-outcome="completed"]')).to_have_attribute("data-attempt", "2")
    expect(page.locator("table.attempts")).to_contain_text("disk full")
    assert page.problems == []


def test_a_button_that_no_longer_applies_says_why(page, conn, admin):
    task_id = insert_task(conn, "noop", queue="default")
    logged_in(page, admin["token"])
    page.goto(f"/dashboard/tasks/{task_id}")
    cancel = page.get_by_role("button", name=f"Cancel task {task_id}")
    expect(cancel).to_be_visible()
    # Someone else is quicker, before this page refreshes (its refreshes answer "no change").
    refresh = re.compile(r"/live$")
    page.route(refresh, lambda route: route.fulfill(status=204))
    task_cancel(conn, task_id)
    page.once("dialog", lambda dialog: dialog.accept())
    cancel.click()
    expect(page.locator("#notice")).to_have_text(f"Task {task_id} is cancelled; it cannot be cancelled.")
    expect(page.locator("#notice .notice")).to_have_class(re.compile("bad"))
    page.unroute(refresh)
    expect(page.get_by_role("button", name=f"Retry task {task_id}")).to_be_visible()
    page.goto("/dashboard/tasks/999999")
    expect(page.get_by_role("heading", name="404")).to_be_visible()
    expect(page.locator("main")).to_contain_text("Task 999999 does not exist.")


def test_the_overview_lists_limits_and_a_pause_holds_at_once(page, conn, admin):
    """The Limits section lists every limit with what runs and waits under it (the busiest
    first), a queue's row what waits on a limit; a pause from the dashboard releases the tasks a
    worker had claimed but not started before it answers."""
    tenant = keys.create_key(conn, name="tenant")
    for _ in range(3):
        insert_task(conn, "noop", queue="gpu", concurrency_key="render", owner_key_id=tenant["id"])
    limit_put(conn, scope="queue", owner=0, name="idle", max_running=2, by="test")
    limit_put(conn, scope="key", owner=tenant["id"], name="render", max_running=1, by="test")
    logged_in(page, admin["token"])

    limits = page.locator("table.limits tbody tr")
    expect(limits).to_have_count(2)
    expect(limits.first).to_have_attribute("data-limit", f"key:{tenant['id']}:render")  # 2 waiting
    expect(limits.first.locator("td")).to_have_text(["key", str(tenant["id"]), "1", "-", "1", "2"])
    expect(limits.nth(1).locator("td")).to_have_text(["queue", "", "2", "-", "0", "0"])
    expect(queue_row(page, "gpu").locator("td").nth(5)).to_have_text("2")  # on a limit
    expect(queue_row(page, "idle").locator("td").nth(5)).to_have_text("0 (max 2)")  # only a limit

    # A worker claims the one the limit admits, ahead; the pause takes it back before it answers.
    admit(conn)
    [claimed] = task_claim(conn, worker_id=WORKER, limit=10, lease_seconds=60)
    queue_row(page, "gpu").get_by_role("button", name="Pause queue gpu").click()
    expect(page.locator("#notice")).to_have_text("Queue gpu paused.")
    assert task_row(conn, claimed.id)["status"] == "pending"
    assert history(conn, claimed.id) == [(claimed.attempt, WORKER, "released")]
    expect(queue_row(page, "gpu").locator(".badge")).to_have_text("paused")
    assert page.problems == []


# --- cross-site requests ------------------------------------------------------------------------


def test_schedules_are_listed_and_paused_resumed_and_run_from_the_overview(page, conn, admin):
    """The schedules' section: each with its owner (code: none), rule, next run and last fire;
    Pause, Resume and Run now change the schedule (read back from the table) without a reload."""
    task = {
        "task_type": "noop",
        "task_input": None,
        "queue": "reports",
        "max_attempts": 1,
        "timeout_seconds": 5,
    }
    nightly = schedule_create(
        conn, name="nightly", rule=Rule(cron="0 2 * * *", timezone="Europe/Paris"), task=task
    )
    single = schedule_create(conn, name="single", rule=Rule(every_seconds=3600), task=task, overlap="skip")
    logged_in(page, admin["token"])
    page.evaluate("window.notReloaded = true")
    row = page.locator(f'tr[data-schedule="{nightly["id"]}"]')
    expect(row).to_contain_text("0 2 * * *")
    expect(row).to_contain_text("Europe/Paris")
    expect(row.locator(".badge")).to_have_text("active")
    expect(row).to_contain_text("never")

    row.get_by_role("button", name="Pause schedule nightly").click()
    expect(row.locator(".badge")).to_have_text("paused")
    assert conn.execute("SELECT paused FROM task_schedules WHERE id = %s", (nightly["id"],)).fetchone()[
        "paused"
    ]
    row.get_by_role("button", name="Resume schedule nightly").click()
    expect(row.locator(".badge")).to_have_text("active")
    assert not conn.execute("SELECT paused FROM task_schedules WHERE id = %s", (nightly["id"],)).fetchone()[
        "paused"
    ]

    other = page.locator(f'tr[data-schedule="{single["id"]}"]')
    other.get_by_role("button", name="Run schedule single now").click()
    expect(page.locator("#notice")).to_contain_text(f"Schedule {single['id']} ran now: task ")
    (made,) = conn.execute("SELECT id FROM tasks WHERE schedule_id = %s", (single["id"],)).fetchall()
    expect(page.locator("#notice")).to_have_text(f"Schedule {single['id']} ran now: task {made['id']}.")
    expect(other.locator(".fire")).to_have_text("created")
    expect(other.get_by_role("link", name=f"task {made['id']}")).to_be_visible()
    # overlap skip: the first run is unfinished, so the second says why and makes nothing
    other.get_by_role("button", name="Run schedule single now").click()
    expect(page.locator("#notice")).to_contain_text(f"overlap skip: task {made['id']}")
    expect(page.locator("#notice .notice")).to_have_class(re.compile("bad"))
    expect(other.locator(".fire")).to_have_text("skipped")
    assert (
        conn.execute("SELECT count(*) AS n FROM tasks WHERE schedule_id = %s", (single["id"],)).fetchone()[
            "n"
        ]
        == 1
    )
    assert page.evaluate("window.notReloaded") is True
    assert page.problems == []


def test_a_workflow_is_drawn_as_a_graph_coloured_by_status_and_can_be_cancelled(page, conn, admin):
    """The overview lists the latest workflows; a workflow's page draws its tasks as nodes
    coloured by status with an edge per dependency, and its Cancel button cancels every
    unfinished task (read back from the table) without a reload."""

    def noop(_):
        return NewTask("noop", json.dumps(None), "default", 0, 1, 5)

    steps = [Step("a", None), Step("b", None), Step("join", None, ("a", "b")), Step("mail", None, ("join",))]
    workflow_id, ids = workflow_insert(conn, checked(steps), noop, name="thumbnails")
    ref = AttemptRef(ids["a"], run_attempt(conn, ids["a"]))
    with conn.transaction():
        task_complete_many(conn, worker_id=WORKER, results=[(ref, "null")])
        workflow_tasks_ended(conn, [ids["a"]])
    logged_in(page, admin["token"])
    row = page.locator(f'tr[data-workflow="{workflow_id}"]')
    expect(row).to_contain_text("thumbnails")
    expect(row.locator(".status")).to_have_text("running")
    row.get_by_role("link", name=re.compile(f"#{workflow_id}")).click()
    expect(page).to_have_url(re.compile(rf"/dashboard/workflows/{workflow_id}$"))
    graph = page.get_by_role("img", name="Graph of 4 tasks and 3 dependencies")
    expect(graph.locator("g.node")).to_have_count(4)
    expect(graph.locator("line.edge")).to_have_count(3)
    expect(graph.locator('g.node[data-ref="a"]')).to_have_attribute("data-status", "completed")
    expect(graph.locator('g.node[data-ref="join"]')).to_have_attribute("data-status", "pending")
    colour = graph.locator('g.node[data-ref="a"]').evaluate("g => getComputedStyle(g).color")
    pending = graph.locator('g.node[data-ref="join"]').evaluate("g => getComputedStyle(g).color")
    assert colour != pending  # coloured by status
    expect(graph.locator('line.edge[data-from="a"][data-to="join"]')).to_have_count(1)
    page.evaluate("window.notReloaded = true")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Cancel workflow {workflow_id}").click()
    expect(page.locator("#notice")).to_have_text(f"Workflow {workflow_id} is cancelled.")
    expect(graph.locator('g.node[data-ref="mail"]')).to_have_attribute("data-status", "cancelled")
    statuses = {
        r["workflow_ref"]: r["status"]
        for r in conn.execute(
            "SELECT workflow_ref, status::text AS status FROM tasks WHERE workflow_id = %s", (workflow_id,)
        )
    }
    assert statuses == {"a": "completed", "b": "cancelled", "join": "cancelled", "mail": "cancelled"}
    assert page.evaluate("window.notReloaded") is True
    assert page.problems == []


def test_posts_without_the_csrf_token_or_from_another_origin_are_refused(page, browser, conn, admin, served):
    logged_in(page, admin["token"])
    token = page.locator(CSRF_INPUT).first.input_value()
    pause = "/dashboard/queues/emails/pause"
    origin = {"Origin": served.url}

    refusals = {
        "no token": page.request.post(pause, headers=origin),
        "a wrong token": page.request.post(pause, form={"csrf_token": "not-" + token}, headers=origin),
        "another Origin": page.request.post(pause, form={"csrf_token": token}, headers={"Origin": "http://evil.test"}),
        "cross-site fetch": page.request.post(pause, headers={**origin, "X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"}),
        "log out without a token": page.request.post("/dashboard/logout", headers=origin),
    }  # fmt: skip
    assert {why: r.status for why, r in refusals.items()} == dict.fromkeys(refusals, 403)
    assert queue_paused(conn, "emails") is None  # nothing changed
    page.reload()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()  # still logged in

    # A page of another origin (same site: another port) that knows the token is refused too.
    evil = Flask("evil")
    evil.get("/")(
        lambda: (
            f'<form method="post" action="{served.url}{pause}"><input type="hidden" name="csrf_token"'
            f' value="{token}"><button>Win a prize</button></form>'
        )
    )
    evil_url, stop_evil = serve(evil)
    try:
        other = page.context.new_page()
        other.goto(evil_url)
        with other.expect_response(re.compile(re.escape(pause))) as answer:
            other.get_by_role("button", name="Win a prize").click()
        assert answer.value.status == 403
        expect(other.locator("main")).to_contain_text("another site")
        other.close()
    finally:
        stop_evil()
    assert queue_paused(conn, "emails") is None

    # The same request from the dashboard's own origin with its token is accepted.
    accepted = page.request.post(pause, form={"csrf_token": token}, headers=origin)
    assert accepted.status == 200 and queue_paused(conn, "emails") is True


def test_a_link_from_another_site_opens_the_dashboard(page, admin, served):
    """A SameSite=Strict cookie is not sent on a navigation from another site (a chat, a pager):
    the dashboard has the page load itself again, from its own site, which sends it."""
    logged_in(page, admin["token"])
    chat = Flask("chat")
    chat.get("/")(lambda: f'<a href="{served.url}/dashboard/tasks/1">task 1</a>')
    chat_url, stop_chat = serve(chat)
    try:
        page.goto(chat_url.replace("127.0.0.1", "localhost"))  # another site
        page.get_by_role("link", name="task 1").click()
        expect(page).to_have_url(f"{served.url}/dashboard/tasks/1")
        expect(page.get_by_role("heading", name="404")).to_be_visible()  # no task 1, but logged in
    finally:
        stop_chat()


def test_the_login_form_is_protected_too(page, admin):
    page.goto("/dashboard/login")
    refused = page.request.post("/dashboard/login", form={"token": admin["token"]})
    assert refused.status == 403
    page.goto("/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))


# --- without a browser: sessions across processes, cookies, auth off ----------------------------


def test_a_session_is_valid_in_every_process_and_only_on_the_dashboard(settings, conn, admin):
    apps = [create_app(replace(settings, auth="on")) for _ in range(2)]
    try:
        first, second = (app.test_client() for app in apps)
        assert first.get("/api/tasks").headers.get("Set-Cookie") is None
        login = apps[0].test_client().get("/dashboard/login", base_url="https://localhost")
        assert "Secure" in login.headers["Set-Cookie"]
        login = first.get("/dashboard/login")
        assert "Secure" not in login.headers["Set-Cookie"]
        token = re.search(r'name="csrf_token" value="([^"]+)"', login.text).group(1)
        answer = first.post("/dashboard/login", data={"csrf_token": token, "token": admin["token"]})
        assert answer.status_code == 303 and answer.headers["Location"] == "/dashboard"
        assert first.get("/dashboard").status_code == 200
        # Another process (or host) of the same database signs with the same secret.
        second.set_cookie(
            "skiplock_dashboard", first.get_cookie("skiplock_dashboard", path="/dashboard").value
        )
        assert second.get("/dashboard").status_code == 200
        second.set_cookie("skiplock_dashboard", "forged")
        assert second.get("/dashboard").status_code == 303
    finally:
        for app in apps:
            app.extensions["skiplock"].close()


def test_without_auth_the_dashboard_is_open_but_still_needs_its_token(settings, conn):
    app = create_app(settings)  # auth off
    try:
        client = app.test_client()
        page = client.get("/dashboard")
        assert page.status_code == 200 and "Authentication is off" in page.text
        assert client.post("/dashboard/queues/emails/pause").status_code == 403
        assert queue_paused(conn, "emails") is None
        insert_task(conn, "noop", queue="emails")  # a queue, so a page with buttons (and the token)
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/dashboard").text).group(1)
        # Without JavaScript, a button's form posts and the page comes back with the message.
        answer = client.post("/dashboard/queues/emails/pause", data={"csrf_token": token})
        assert answer.status_code == 303 and answer.headers["Location"] == "/dashboard"
        assert queue_paused(conn, "emails") is True
        assert "Queue emails paused." in client.get("/dashboard").text
    finally:
        app.extensions["skiplock"].close()


def test_with_the_database_down_the_dashboard_says_so(settings):
    app = create_app(replace(settings, auth="on", database_url=UNREACHABLE_DB, db_timeout_seconds=0.5))
    try:
        client = app.test_client()
        with client.get("/dashboard/static/dashboard.css") as stylesheet:
            assert stylesheet.status_code == 200  # needs no database
        for url in ("/dashboard", "/dashboard/login"):
            page = client.get(url)
            assert page.status_code == 503 and page.headers["Retry-After"] == "2", url
            assert "The database is unavailable" in page.text and page.mimetype == "text/html"
    finally:
        app.extensions["skiplock"].close()


# --- screenshots (SKIPLOCK_SCREENSHOTS=1) -------------------------------------------------------


@pytest.mark.skipif(not SCREENSHOTS, reason="SKIPLOCK_SCREENSHOTS=1 writes docs/dashboard*.png")
def test_screenshots(page, conn, admin):
    # An hour of history, as workers would have written it minute by minute.
    conn.execute(
        """
        INSERT INTO task_throughput (minute, queue, task_type, worker_id, completed, failed, run_seconds)
        SELECT date_trunc('minute', now()) - make_interval(mins => m), q.queue, 'noop', 'w1',
               (q.scale * (3 + sin(m / 7.0) + random()))::int, (m % q.every = 0)::int * (1 + (random() * 2)::int), 1
        FROM generate_series(0, 60) m, (VALUES ('default', 40, 13), ('emails', 12, 29), ('reports', 3, 5)) q(queue, scale, every)
        """
    )
    for n, progress in enumerate((0.15, 0.62, 0.9)):
        running_task(conn, "default" if n else "reports", progress)
    failed_task(conn, "reports", error="ValueError: invoice 4711 has no customer")
    for n in range(25):
        insert_task(conn, "noop", queue="emails" if n % 3 else "default")
    task_queue_set_paused(conn, queue="reports", paused=True, by=admin["prefix"])
    report = {
        "task_type": "noop",
        "task_input": None,
        "queue": "reports",
        "max_attempts": 1,
        "timeout_seconds": 5,
    }
    schedule_create(
        conn, name="nightly-report", rule=Rule(cron="0 2 * * *", timezone="Europe/Paris"), task=report
    )
    schedule_create(conn, name="heartbeat", rule=Rule(every_seconds=30), task=report, overlap="skip")
    steps = [Step("a", None), Step("b", None), Step("join", None, ("a", "b")), Step("mail", None, ("join",))]
    _, ids = workflow_insert(
        conn, checked(steps), lambda _: NewTask("noop", "null", "thumbs", 0, 1, 5), name="thumbnails"
    )
    with conn.transaction():
        task_complete_many(
            conn,
            worker_id=WORKER,
            results=[(AttemptRef(ids["a"], run_attempt(conn, ids["a"], "thumbs")), "null")],
        )
        workflow_tasks_ended(conn, [ids["a"]])

    # A task with a history: a failure, a hand-back before it started, then running.
    task_id = insert_task(conn, "primes", {"limit": 10**9}, queue="bulk", max_attempts=3)
    fail_attempt(
        conn, task_id, run_attempt(conn, task_id, "bulk"), "MemoryError: cannot allocate the sieve's segment"
    )
    time.sleep(0.6)
    admit(conn)  # its retry fell due: admission gives it its turn, as a worker's would
    claimed = task_claim(conn, worker_id=WORKER, limit=1, lease_seconds=60, queues=["bulk"])
    task_hand_back_many(conn, worker_id=WORKER, refs=[AttemptRef(task_id, claimed[0].attempt)])
    time.sleep(0.4)
    ref = AttemptRef(task_id, run_attempt(conn, task_id, "bulk"))
    task_progress_many(conn, worker_id=WORKER, progress=[(ref, 0.35)])
    time.sleep(0.8)

    logged_in(page, admin["token"])
    page.locator(f"table.failures {CSRF_INPUT}").first.wait_for(state="attached")
    page.locator("table.failures details").first.locator("summary").click()
    expect(page.locator("#charts canvas")).to_have_count(3)
    docs = Path(ROOT) / "docs"
    page.screenshot(path=str(docs / "dashboard.png"), full_page=True)
    page.goto(f"/dashboard/tasks/{task_id}")
    expect(page.get_by_role("img", name=re.compile("Timeline of 3 attempts"))).to_be_visible()
    page.screenshot(path=str(docs / "dashboard-task.png"), full_page=True)
    assert page.problems == []
