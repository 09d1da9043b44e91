"""The other side of heavy tasks: the API validates a type declared with run="module:function"
without importing that module (in the app factory and in real gunicorn); the task process settings
refuse bad values in one line; and the body size limit's 413 names the limit and the setting
(docs/heavy-tasks.md)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from skiplock.registry import LazyFunction
from skiplock.settings import Settings
from tests.helpers import ROOT, assert_error, row_count, start_gunicorn

HEAVY = ("tests.heavy_declared_tasks",)
IMPLEMENTATION = "tests.heavy_impl_tasks"


def test_the_app_factory_serves_a_lazily_declared_type_without_importing_its_code(make_app, conn):
    client = make_app(task_modules=HEAVY).test_client()

    assert IMPLEMENTATION not in sys.modules
    catalogue = {t["name"]: t for t in client.get("/api/task-types").get_json()}
    assert catalogue["heavy_embed"]["input_schema"]["required"] == ["text"]
    refused = client.post("/api/submit-task", json={"task_type": "heavy_embed", "task_input": {"text": ""}})
    assert assert_error(refused, 422)["errors"]["json"]["task_input"]["text"]
    assert row_count(conn) == 0
    accepted = client.post(
        "/api/submit-task", json={"task_type": "heavy_embed", "task_input": {"text": "hi"}}
    )
    assert accepted.status_code == 202, accepted.get_json()
    assert IMPLEMENTATION not in sys.modules


def test_gunicorn_serves_a_lazily_declared_type_without_importing_its_code(settings, conn):
    # The implementation module raises when imported outside a task process: a gunicorn that
    # imported it would not boot, or would answer 500.
    proc, http = start_gunicorn(replace(settings, task_modules=HEAVY), workers=1, quiet=True)
    try:
        status, _, catalogue = http.request("GET", "/api/task-types")
        assert status == 200
        assert "heavy_embed" in {t["name"] for t in catalogue}
        status, _, body = http.request(
            "POST", "/api/submit-task", {"task_type": "heavy_embed", "task_input": {"text": "hi"}}
        )
        assert status == 202, body
        status, _, body = http.request(
            "POST", "/api/submit-task", {"task_type": "heavy_embed", "task_input": {}}
        )
        assert status == 422 and body["errors"]["json"]["task_input"]["text"]
        assert row_count(conn) == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_lazy_function_imports_its_module_only_when_called():
    lazy = LazyFunction(f"{IMPLEMENTATION}:embed")
    assert IMPLEMENTATION not in sys.modules
    # Called outside a task process, the module refuses to load: the call is where it is imported.
    with pytest.raises(RuntimeError, match="imported outside a task process"):
        lazy({"text": "x"}, None)  # type: ignore[arg-type]
    sys.modules.pop(IMPLEMENTATION, None)


@pytest.mark.parametrize(
    "target", ["embed", "tests.heavy_impl_tasks", ":embed", "tests.heavy_impl_tasks:", "a b:c"]
)
def test_a_run_target_that_is_not_module_colon_function_is_refused(target):
    with pytest.raises(ValueError, match="expected 'module:function'"):
        LazyFunction(target)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.pg_agnostic
@pytest.mark.parametrize(
    "env, says",
    [
        (
            {"SKIPLOCK_START_METHOD": "fork"},
            "invalid value for SKIPLOCK_START_METHOD: 'fork' (forkserver or spawn",
        ),
        ({"SKIPLOCK_MAX_TASKS_PER_PROCESS": "-1"}, "invalid value for SKIPLOCK_MAX_TASKS_PER_PROCESS: -1"),
        (
            {"SKIPLOCK_MAX_MEMORY_PER_PROCESS_MB": "-5"},
            "invalid value for SKIPLOCK_MAX_MEMORY_PER_PROCESS_MB: -5",
        ),
        (
            {"SKIPLOCK_MAX_RESULT_BYTES": "0"},
            "invalid value for SKIPLOCK_MAX_RESULT_BYTES: 0 (1 to 16,777,216",
        ),
        (
            {"SKIPLOCK_MAX_RESULT_BYTES": "999999999"},
            "invalid value for SKIPLOCK_MAX_RESULT_BYTES: 999999999",
        ),
    ],
)
def test_bad_task_process_settings_are_refused_in_one_line(env, says):
    with pytest.raises(ValueError) as refused:
        Settings.from_env(env)
    assert says in str(refused.value)

    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("SKIPLOCK_")}
    worker = subprocess.run(
        [sys.executable, str(ROOT / "worker.py")],
        cwd=ROOT,
        env={**clean, "DATABASE_URL": "postgresql://nowhere.invalid/x", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2
    assert says in worker.stderr
    assert "Traceback" not in worker.stderr


@pytest.mark.pg_agnostic
def test_the_task_process_settings_read_from_the_environment():
    settings = Settings.from_env(
        {
            "SKIPLOCK_START_METHOD": "spawn",
            "SKIPLOCK_MAX_TASKS_PER_PROCESS": "100",
            "SKIPLOCK_MAX_MEMORY_PER_PROCESS_MB": "2048",
            "SKIPLOCK_MAX_RESULT_BYTES": "1000",
        }
    )
    assert (settings.start_method, settings.max_tasks_per_process) == ("spawn", 100)
    assert (settings.max_memory_per_process_mb, settings.max_result_bytes) == (2048, 1000)
    defaults = Settings.from_env({})
    assert (defaults.start_method, defaults.max_tasks_per_process, defaults.max_memory_per_process_mb) == (
        "forkserver",
        0,
        0,
    )
    assert defaults.max_result_bytes == 8 * 1024 * 1024


# --- the body size limit ----------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_naming_its_size_the_limit_and_the_setting(make_app, conn):
    client = make_app(max_body_bytes=1000).test_client()
    body = json.dumps({"task_input": "x" * 1000})
    for url in ("/api/submit-task", "/api/tasks"):
        error = assert_error(client.post(url, data=body, content_type="application/json"), 413)
        assert error["message"].startswith(
            f"The body of {len(body):,} bytes is over SKIPLOCK_MAX_BODY_BYTES (1,000 bytes)"
        )
        assert "by reference" in error["message"]
    assert row_count(conn) == 0


def test_the_default_body_limit_is_named_too(client, conn):
    body = json.dumps({"task_input": "x" * (1024 * 1024)})
    error = assert_error(client.post("/api/submit-task", data=body, content_type="application/json"), 413)
    assert "is over SKIPLOCK_MAX_BODY_BYTES (1,048,576 bytes)" in error["message"]
    assert row_count(conn) == 0


def test_a_chunked_body_over_the_limit_is_413_naming_the_limit_through_gunicorn(settings, conn):
    proc, http_ = start_gunicorn(replace(settings, max_body_bytes=4000), workers=1, quiet=True)
    try:
        host, port = http_.base.removeprefix("http://").split(":")
        body = json.dumps({"task_input": "x" * 12000}).encode()
        with contextlib.closing(http.client.HTTPConnection(host, int(port), timeout=10)) as client:
            # An iterable body without Content-Length goes chunked: its size is not known up front.
            client.request(
                "POST", "/api/submit-task", body=iter([body]), headers={"Content-Type": "application/json"}
            )
            response = client.getresponse()
            error = json.loads(response.read())
        assert response.status == 413
        assert error["message"].startswith("The body is over SKIPLOCK_MAX_BODY_BYTES (4,000 bytes)")
        assert row_count(conn) == 0
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_body_under_the_limit_is_accepted(make_app, conn):
    client = make_app(max_body_bytes=1000).test_client()
    accepted = client.post("/api/submit-task", json={"task_input": "x" * 900})
    assert accepted.status_code == 202, accepted.get_json()
    assert row_count(conn) == 1
