"""A web page follows a task with `new EventSource(url)`, in real Chromium, against real gunicorn
(auth on) while a real worker.py runs the task. The page is another origin (a static file from
an http.server on another port), as a shop's page would be; it never holds the API key: the
test, as the shop's backend, mints the stream token and hands the page its URL."""

from __future__ import annotations

import functools
import json
import threading
import urllib.request
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from skiplock import keys
from tests.helpers import start_gunicorn
from tests.system.conftest import HAVE_CHROMIUM, NO_CHROMIUM

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.pg_agnostic,  # the browser's side: the same on every Postgres version (.ci/run)
]

# The page: opens the stream whose URL is in its fragment and keeps every event in
# window.received; `done` once the task is final, `refused` if the stream cannot be opened.
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>order status</title>
<p id="state">connecting</p>
<script>
  window.received = [];
  const source = new EventSource(decodeURIComponent(location.hash.slice(1)));
  for (const name of ["status", "progress"]) {
    source.addEventListener(name, (event) => {
      const task = JSON.parse(event.data);
      window.received.push({name, status: task.status, progress: task.progress, result: task.result});
      document.getElementById("state").textContent = task.status;
      if (["completed", "failed", "cancelled", "expired"].includes(task.status)) {
        source.close();
        document.title = "done";
      }
    });
  }
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) document.title = "refused";
  };
</script>
"""


@pytest.fixture
def api(settings):
    proc, http_ = start_gunicorn(replace(settings, auth="on"), workers=1)
    try:
        yield http_.base
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def shop(tmp_path):
    """The shop's page, served from another origin (another port)."""
    (tmp_path / "status.html").write_text(PAGE)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/status.html"
    server.shutdown()
    server.server_close()


@pytest.fixture
def tab(browser):
    """A fresh browser context (the session's Chromium: tests/system/conftest.py)."""
    context = browser.new_context()
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def call(base: str, token: str, method: str, path: str, body=None) -> dict:
    """The shop's backend calling the API with its key."""
    request = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_a_page_on_another_origin_follows_a_task_to_its_end(api, shop, tab, conn, worker_process):
    key = keys.create_key(conn, name="shop")["token"]
    task_id = call(api, key, "POST", "/api/tasks", {"task_type": "sleep", "task_input": {"seconds": 2}})[
        "task_id"
    ]
    minted = call(api, key, "POST", f"/api/tasks/{task_id}/stream-token")
    assert key not in minted["url"]

    tab.goto(f"{shop}#{quote(minted['url'], safe='')}")
    tab.wait_for_function("window.received.length >= 1")  # connected, and the task is pending
    worker_process("--concurrency", "1")
    tab.wait_for_function("document.title === 'done'")

    received = tab.evaluate("window.received")
    # Every state in order (a stream sends states: quick changes may arrive as the latest of them).
    statuses = [e["status"] for e in received]
    assert statuses[0] == "pending" and "processing" in statuses and statuses[-1] == "completed"
    progress = [e["progress"] for e in received if e["progress"] is not None]
    assert progress == sorted(progress) and progress[-1] == 1
    assert received[-1]["name"] == "status" and received[-1]["result"] == {"slept": 2}
    assert tab.locator("#state").text_content() == "completed"


def test_a_page_with_a_changed_token_is_refused(api, shop, tab, conn):
    key = keys.create_key(conn, name="shop")["token"]
    task_id = call(api, key, "POST", "/api/tasks", {"task_type": "sleep", "task_input": {"seconds": 1}})[
        "task_id"
    ]
    minted = call(api, key, "POST", f"/api/tasks/{task_id}/stream-token")
    other = call(api, key, "POST", "/api/tasks", {"task_type": "noop", "task_input": None})["task_id"]
    wrong = minted["url"].replace(f"/tasks/{task_id}/", f"/tasks/{other}/")
    tab.goto(f"{shop}#{quote(wrong, safe='')}")
    tab.wait_for_function("document.title === 'refused'")  # a 403: EventSource gives up
    assert tab.evaluate("window.received") == []
