"""Structured logs (SKIPLOCK_LOG_FORMAT): the real worker.py and gunicorn write one JSON object
per line with json, and today's text without it."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import datetime

import pytest

from skiplock import logs
from skiplock.keys import create_key
from tests.helpers import ROOT, insert_task, settings_env, spawn_worker, start_gunicorn, task_row, wait_until

# The same on every Postgres version: CI runs it against one Postgres only (.ci/run).
pytestmark = pytest.mark.pg_agnostic

# Today's text: worker.py (logging's asctime) and gunicorn (its error log; its access log).
WORKER_TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
)
GUNICORN_TEXT_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] ")
ACCESS_TEXT_LINE = re.compile(r'^127\.0\.0\.1 - - \[[^\]]+\] "GET /api/tasks\?limit=1 HTTP/1\.1" 200 ')


def json_lines(text: str) -> list[dict]:
    """Every line parsed as a JSON object (fails the test on the first that is not one)."""
    lines = text.splitlines()
    assert lines, "no log lines"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- all output ---\n{text}")
        assert isinstance(parsed[-1], dict), line
    for record in parsed:
        assert {"timestamp", "level", "logger", "message"} <= record.keys(), record
        stamp = datetime.fromisoformat(record["timestamp"])
        assert stamp.utcoffset().total_seconds() == 0, record["timestamp"]  # UTC
    return parsed


def run_worker_until(settings, task_ids: list[int], conn) -> str:
    """worker.py until these tasks are final, then SIGTERM; its stderr."""
    proc = spawn_worker(settings, "--concurrency", "1", stderr=subprocess.PIPE, text=True)
    try:
        wait_until(
            lambda: all(task_row(conn, t)["status"] in ("completed", "failed") for t in task_ids),
            timeout=20,
            message="the tasks to finish",
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    return err


# --- the worker -------------------------------------------------------------------------------


def test_worker_json_lines_name_the_task_and_carry_its_traceback(settings, conn):
    done = insert_task(conn, "noop")
    failed = insert_task(conn, "fail", input={"times": 5, "message": "boom\nsecond line"}, max_attempts=1)
    records = json_lines(run_worker_until(replace(settings, log_format="json"), [done, failed], conn))

    started = next(r for r in records if "starting" in r["message"])
    worker_id = started["worker_id"]
    assert worker_id in started["message"]
    assert all(r["worker_id"] == worker_id for r in records)  # every line of the process

    failure = next(r for r in records if r.get("task_id") == failed)
    assert failure["level"] == "WARNING"
    assert failure["logger"] == "skiplock.worker"
    assert failure["message"] == f"task {failed} attempt 1: TaskFailed: boom\nsecond line"
    assert (failure["attempt"], failure["task_type"], failure["queue"]) == (1, "fail", "default")
    trace = failure["exc_info"]
    assert trace.startswith("Traceback (most recent call last):") and "TaskFailed: boom" in trace
    assert "traceback" not in failure
    assert not any(r.get("task_id") == done for r in records)  # a success is not logged


def test_worker_text_format_is_unchanged(settings, conn):
    failed = insert_task(conn, "fail", input={"times": 5}, max_attempts=1)
    lines = run_worker_until(settings, [failed], conn).splitlines()
    assert settings.log_format == "text"
    assert all(WORKER_TEXT_LINE.match(line) for line in lines), lines
    assert any(re.search(r" INFO skiplock\.worker: worker \S+ starting: 1 processes", line) for line in lines)
    # A failed attempt: one line; its traceback stays with the attempt (task_attempts).
    [failure] = [line for line in lines if f"task {failed} attempt 1" in line]
    assert failure.endswith(f"WARNING skiplock.worker: task {failed} attempt 1: TaskFailed: planned failure")


def test_an_invalid_log_format_stops_worker_py_with_one_line(settings):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "worker.py")],
        cwd=ROOT,
        env=settings_env(replace(settings, log_format="xml")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr == "worker.py: invalid value for SKIPLOCK_LOG_FORMAT: 'xml' (text or json)\n"
    assert proc.stdout == ""


def test_skiplock_worker_writes_json_lines(settings):
    proc = subprocess.Popen(
        [sys.executable, "-m", "skiplock.cli", "worker", "--concurrency", "1"],
        cwd=ROOT,
        env=settings_env(replace(settings, log_format="json")),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    records = json_lines(first + rest)
    assert "starting" in records[0]["message"] and records[0]["worker_id"] in records[0]["message"]
    assert "stopped" in records[-1]["message"]


# --- gunicorn -----------------------------------------------------------------------------------


def call(base: str, method: str, path: str, token: str | None = None, **headers) -> int:
    request = urllib.request.Request(base + path, method=method, headers=headers)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if method == "POST":
        request.add_header("Content-Type", "application/json")
        request.data = json.dumps({"task_type": "noop", "task_input": None}).encode()
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(20)


def test_gunicorn_json_error_access_and_app_lines(settings, conn, capfd):
    key = create_key(conn, name="logs", role="admin")
    capfd.readouterr()  # from here on: gunicorn's output only
    proc, http = start_gunicorn(
        replace(settings, auth="on", log_format="json", db_timeout_seconds=0.5),
        workers=1,
        env={"SKIPLOCK_ACCESS_LOG": "-"},
    )
    try:
        assert call(http.base, "POST", "/api/tasks", key["token"], **{"X-Request-ID": "req-42"}) == 202
        assert call(http.base, "GET", "/api/tasks?limit=1", key["token"]) == 200
        assert call(http.base, "GET", "/api/tasks", "skl_" + "x" * 32) == 401
        # A DBA's lock outlasts the API's lock_timeout: it logs (skiplock.api) and answers 503.
        with conn.transaction():
            conn.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            assert (
                call(http.base, "GET", "/api/tasks?limit=2", key["token"], **{"X-Request-ID": "r-43"}) == 503
            )
    finally:
        stop(proc)
    out, err = capfd.readouterr()
    access = [r for r in json_lines(out) if r["path"] != "/healthz"]  # start_gunicorn's probes
    errors = json_lines(err)

    assert any(r["logger"] == "gunicorn.error" and "Booting worker" in r["message"] for r in errors)
    submit, listed, refused, unavailable = access
    assert submit["logger"] == "gunicorn.access" and submit["level"] == "INFO"
    assert submit["message"] == "POST /api/tasks 202"
    assert (submit["method"], submit["path"], submit["status"]) == ("POST", "/api/tasks", 202)
    assert 0 < submit["duration_seconds"] < 10
    assert submit["remote_addr"] == "127.0.0.1"
    assert submit["request_id"] == "req-42"
    assert (submit["key_id"], submit["key_prefix"]) == (key["id"], key["prefix"])
    assert (listed["path"], listed["query"], listed["status"]) == ("/api/tasks", "limit=1", 200)
    assert "request_id" not in listed
    assert refused["status"] == 401 and "key_id" not in refused
    assert (unavailable["status"], unavailable["request_id"]) == (503, "r-43")
    # The app's line about that request names it.
    [app_line] = [r for r in errors if r["logger"] == "skiplock.api"]
    assert app_line["level"] == "WARNING" and app_line["message"].startswith("database unavailable")
    assert (app_line["method"], app_line["path"], app_line["request_id"]) == ("GET", "/api/tasks", "r-43")
    assert (app_line["key_id"], app_line["key_prefix"]) == (key["id"], key["prefix"])
    # No token, no Authorization header, anywhere.
    assert key["token"] not in out + err and "x" * 32 not in out + err
    assert "authorization" not in (out + err).lower()


def test_gunicorn_text_format_is_unchanged(settings, capfd):
    capfd.readouterr()
    proc, http = start_gunicorn(settings, workers=1, env={"SKIPLOCK_ACCESS_LOG": "-"})
    try:
        assert call(http.base, "GET", "/api/tasks?limit=1") == 200
    finally:
        stop(proc)
    out, err = capfd.readouterr()
    assert any(ACCESS_TEXT_LINE.match(line) for line in out.splitlines()), out
    starting = [line for line in err.splitlines() if "Starting gunicorn" in line]
    assert starting and GUNICORN_TEXT_LINE.match(starting[0]), err
    assert not any(line.startswith("{") for line in (out + err).splitlines())


# --- the pieces ---------------------------------------------------------------------------------


def test_an_exception_is_one_line_with_its_traceback_in_exc_info():
    record = logging.LogRecord("skiplock.api", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "failed here" and data["level"] == "ERROR" and data["logger"] == "skiplock.api"
    assert data["exc_info"].startswith("Traceback") and "ValueError: line one\nline two" in data["exc_info"]
    assert data["timestamp"].endswith("Z")


def test_app_lines_during_a_request_name_it(app):
    from api.request_log import add_request_fields

    record = logging.LogRecord("skiplock.api", logging.WARNING, __file__, 1, "database unavailable", (), None)
    with app.test_request_context("/api/tasks/7", method="DELETE", headers={"X-Request-ID": "r-1"}):
        assert add_request_fields(record)
    assert (record.method, record.path, record.request_id) == ("DELETE", "/api/tasks/7", "r-1")
    outside = logging.LogRecord("skiplock.api", logging.WARNING, __file__, 1, "x", (), None)
    assert add_request_fields(outside) and not hasattr(outside, "method")


def test_log_format_is_checked_like_the_other_settings():
    assert logs.format_from_env({}) == "text"
    assert logs.format_from_env({"SKIPLOCK_LOG_FORMAT": "json"}) == "json"
    with pytest.raises(ValueError, match="SKIPLOCK_LOG_FORMAT"):
        logs.format_from_env({"SKIPLOCK_LOG_FORMAT": "JSON"})


def test_an_access_line_never_carries_a_stream_token():
    from datetime import timedelta
    from types import SimpleNamespace

    from api.serving.logger import request_fields

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/tasks/7/events",
        "QUERY_STRING": "after=3&token=task.7.2.1800000000.c2VjcmV0&x=1",
    }
    fields = request_fields(SimpleNamespace(status="200 OK", sent=10), environ, timedelta(seconds=0.01))

    assert fields["query"] == "after=3&token=[redacted]&x=1"
    environ["QUERY_STRING"] = "token=abc"
    assert request_fields(SimpleNamespace(status=200), environ, timedelta(0))["query"] == "token=[redacted]"
