"""GET /api/tasks/{id}/events: server-sent events read by a real HTTP client (http.client) from
real gunicorn (gunicorn.conf.py's worker class), while a real worker.py runs the task."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from dataclasses import replace

import pytest

from tests.helpers import start_gunicorn, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def api(settings):
    """gunicorn, with heartbeats every 0.3 s (a client gone is noticed at the next one)."""
    proc, http_ = start_gunicorn(replace(settings, stream_heartbeat_seconds=0.3), workers=1)
    try:
        yield http_
    finally:
        proc.terminate()
        proc.wait(20)


class Stream:
    """An event stream as a client reads it."""

    def __init__(self, base: str, path: str, last_event_id: str | None = None):
        parts = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.retry: int | None = None

    def lines(self):
        """Yields ("event", (id, name, data)) per event and ("comment", text) per comment line,
        until the server ends the stream."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if line == "":
                if "data" in fields or "event" in fields:
                    data = json.loads(fields.get("data", "null"))
                    yield "event", (fields.get("id"), fields.get("event", "message"), data)
                fields = {}
            elif line.startswith(":"):
                yield "comment", line[1:].strip()
            else:
                name, _, value = line.partition(":")
                if name == "retry":
                    self.retry = int(value.strip())
                else:
                    fields[name] = value.removeprefix(" ")

    def events(self):
        """Yields (id, name, data) per event until the server ends the stream."""
        return (item for kind, item in self.lines() if kind == "event")

    def close(self) -> None:
        self.conn.close()


def submit(http_, body) -> int:
    code, _, answer = http_.request("POST", "/api/tasks", body)
    assert code == 202, answer
    return answer["task_id"]


def test_a_stream_sends_each_change_until_the_task_is_final_then_ends(api, worker_process):
    task_id = submit(api, {"task_type": "sleep", "task_input": {"seconds": 1.5}})
    stream = Stream(api.base, f"/api/tasks/{task_id}/events")
    assert stream.response.status == 200
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    assert stream.response.getheader("Cache-Control") == "no-store"
    worker_process("--concurrency", "1")
    events = list(stream.events())  # returns only because the server ended the stream
    stream.close()
    assert stream.retry == 2000
    names = [name for _, name, _ in events]
    statuses = [data["status"] for _, name, data in events if name == "status"]
    assert statuses[0] == "pending" and statuses[-1] == "completed"
    assert "processing" in statuses
    progress = [data["progress"] for _, name, data in events if name == "progress"]
    assert len(progress) >= 3 and progress == sorted(progress), progress
    assert names[-1] == "status"
    final = events[-1][2]
    assert final["task_id"] == task_id and final["result"] == {"slept": 1.5} and final["progress"] == 1
    ids = [event_id for event_id, _, _ in events]
    assert len(set(ids)) == len(ids), "every event names a new state"


def test_a_client_that_reconnects_resumes_after_its_last_event(api, conn, worker_process):
    task_id = submit(api, {"task_type": "sleep", "task_input": {"seconds": 0.2}})
    first = Stream(api.base, f"/api/tasks/{task_id}/events")
    first_id, name, data = next(first.events())
    first.close()
    assert (name, data["status"]) == ("status", "pending")
    # Reconnecting with the id of the state it saw: nothing until the task changes.
    again = Stream(api.base, f"/api/tasks/{task_id}/events", last_event_id=first_id)
    worker_process("--concurrency", "1")
    resumed = list(again.events())
    again.close()
    assert resumed and all(event_id != first_id for event_id, _, _ in resumed)
    assert resumed[-1][2]["status"] == "completed"
    # With the final state's id: 204, which tells a browser's EventSource to stop reconnecting.
    done = Stream(api.base, f"/api/tasks/{task_id}/events", last_event_id=resumed[-1][0])
    assert done.response.status == 204
    done.close()
    # With an id from before the end: the final state, then the end.
    late = Stream(api.base, f"/api/tasks/{task_id}/events", last_event_id=first_id)
    assert [(n, d["status"]) for _, n, d in late.events()] == [("status", "completed")]
    late.close()


def test_an_idle_stream_sends_heartbeats_and_a_client_gone_is_forgotten(api, conn):
    task_id = submit(api, {"task_type": "sleep", "task_input": {"seconds": 1}})  # no worker: pending
    stream = Stream(api.base, f"/api/tasks/{task_id}/events")
    lines = stream.lines()
    kind, (_, _, data) = next(lines)
    assert (kind, data["status"]) == ("event", "pending")
    began = time.monotonic()
    assert [next(lines), next(lines)] == [("comment", "keep-alive")] * 2
    assert time.monotonic() - began < 5
    assert conn.execute("SELECT count(*) AS n FROM task_watchers").fetchone()["n"] == 1
    stream.close()
    wait_until(
        lambda: conn.execute("SELECT count(*) AS n FROM task_watchers").fetchone()["n"] == 0,
        timeout=10,
        message="the watch of a client gone to be dropped",
    )


def test_a_task_deleted_while_streaming_ends_the_stream_with_gone(api, conn):
    task_id = submit(api, {"task_type": "sleep", "task_input": {"seconds": 1}})
    stream = Stream(api.base, f"/api/tasks/{task_id}/events")
    events = stream.events()
    assert next(events)[2]["status"] == "pending"
    conn.execute("DELETE FROM tasks WHERE id = %s", (task_id,))  # a DBA's cleanup
    rest = list(events)
    stream.close()
    assert [(name, data["task_id"]) for _, name, data in rest] == [("gone", task_id)]


def test_an_unknown_task_is_a_json_404_not_a_stream(api):
    stream = Stream(api.base, "/api/tasks/999999/events")
    assert stream.response.status == 404
    assert stream.response.getheader("Content-Type") == "application/json"
    assert json.loads(stream.response.read())["code"] == 404
    stream.close()


def test_many_open_streams_hold_no_process_or_connection_each(api, conn):
    """200 clients stream from one gunicorn process with a pool of 4 connections."""
    ids = [submit(api, {"task_type": "sleep", "task_input": {"seconds": 1}}) for _ in range(200)]
    streams = [Stream(api.base, f"/api/tasks/{task_id}/events") for task_id in ids]
    firsts = [next(s.events()) for s in streams]
    assert all(data["status"] == "pending" for _, _, data in firsts)
    assert conn.execute("SELECT count(*) AS n FROM task_watchers").fetchone()["n"] == 200
    connections = conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'skiplock-api%%'"
    ).fetchone()["n"]
    assert connections <= 5  # the pool (4) and the listener
    conn.execute("UPDATE tasks SET status = 'cancelled', finished_at = now() WHERE id = ANY(%s)", (ids,))
    ends = [list(s.events()) for s in streams]  # the safety net finds the DBA's change
    for s in streams:
        s.close()
    assert all(rest and rest[-1][2]["status"] == "cancelled" for rest in ends)
