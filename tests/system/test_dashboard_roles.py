"""A viewer key on the dashboard, in real Chromium (as tests/system/test_dashboard.py drives it:
its fixtures are used here): every page and figure an admin sees, no button that changes
anything, and a POST forged from its own page (with the session's CSRF token) refused."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from skiplock import keys
from tests.system.conftest import HAVE_CHROMIUM, NO_CHROMIUM
from tests.system.test_dashboard import (  # noqa: F401  (fixtures: served, page; conftest: browser)
    failed_task,
    logged_in,
    page,
    queue_paused,
    queue_row,
    running_task,
    served,
)

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.pg_agnostic,
]
# Every button that changes something is named for what it does to what (_macros.html action).
ACTION_BUTTON = re.compile(r"^(Pause|Resume|Cancel|Retry|Run) ")


def test_a_viewer_sees_everything_and_no_action_button(page, conn):  # noqa: F811  (the fixture)
    failed = failed_task(conn, "reports", error="OSError: disk full")
    running, _ = running_task(conn, "default", progress=0.4)
    viewer = keys.create_key(conn, name="oncall", role="viewer")
    logged_in(page, viewer["token"])
    expect(page.locator("header")).to_contain_text(
        f"Logged in with oncall ({viewer['prefix']}, viewer: read-only)"
    )

    # What an admin sees: the queues, the running task with its progress, the failure.
    expect(queue_row(page, "default").locator("td").nth(4)).to_have_text("1")
    expect(page.get_by_role("progressbar", name=f"Progress of task {running}")).to_have_attribute(
        "value", "0.4"
    )
    expect(page.locator(f'table.failures tr[data-task="{failed}"]')).to_contain_text("disk full")
    # ... and no button but Log out.
    expect(page.get_by_role("button", name=ACTION_BUTTON)).to_have_count(0)
    expect(page.locator("form[hx-post]")).to_have_count(0)
    expect(page.get_by_role("button")).to_have_text(["Log out"])

    page.goto(f"/dashboard/tasks/{failed}")
    expect(page.get_by_role("heading", name=f"Task #{failed}")).to_be_visible()
    expect(page.get_by_role("button", name=ACTION_BUTTON)).to_have_count(0)

    # A POST made from its own page, CSRF token and all: refused, and nothing changes.
    status = page.evaluate(
        """async () => {
            const csrf = document.querySelector('input[name="csrf_token"]').value;
            const answer = await fetch('/dashboard/queues/reports/pause', {
                method: 'POST', headers: {'X-CSRF-Token': csrf, 'HX-Request': 'true'}});
            return [answer.status, await answer.text()];
        }"""
    )
    assert status[0] == 403 and "is a viewer key: it may look, not act" in status[1]
    assert not queue_paused(conn, "reports")
    assert page.problems == []


def test_an_admin_sees_the_buttons_on_the_same_pages(page, conn):  # noqa: F811
    failed = failed_task(conn, "reports")
    running_task(conn, "default", progress=0.4)
    admin = keys.create_key(conn, name="ops", role="admin")
    logged_in(page, admin["token"])
    expect(queue_row(page, "default").get_by_role("button", name="Pause queue default")).to_be_visible()
    page.goto(f"/dashboard/tasks/{failed}")
    expect(page.get_by_role("button", name=f"Retry task {failed}")).to_be_visible()
