"""A client generated from the live OpenAPI document by a real generator (openapi-python-client)
works against the real system: gunicorn with auth on, `python worker.py`, Postgres.

The document is fetched over HTTP from the running API, the client is generated into tmp_path and
imported from there; a typed task goes in through the generated per-type models, and its status
and result come back through the generated calls.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from http import HTTPStatus

import pytest

from skiplock import keys
from skiplock.tokens import new_token
from tests.helpers import start_gunicorn

pytestmark = [pytest.mark.slow, pytest.mark.pg_agnostic]  # pg_agnostic: CI runs it against one Postgres only

PACKAGE = "skiplock_client"
GENERATOR_CONFIG = f"""\
post_hooks: []
package_name_override: {PACKAGE}
project_name_override: skiplock-client
"""


@pytest.fixture
def live_api(settings):
    """gunicorn (auth on) on the test database; yields the base URL."""
    proc, http = start_gunicorn(replace(settings, auth="on"), workers=1, quiet=True)
    try:
        yield http.base
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(20)


def _forget_package() -> None:
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


@pytest.fixture
def generated_client(live_api, tmp_path):
    """The client package, generated from the live /openapi.json and imported from tmp_path."""
    with urllib.request.urlopen(f"{live_api}/openapi.json", timeout=10) as response:
        assert response.status == 200
        spec = json.loads(response.read())
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    config_path = tmp_path / "generator.yaml"
    config_path.write_text(GENERATOR_CONFIG)
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(spec_path),
            "--output-path",
            str(tmp_path / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(config_path),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert (tmp_path / PACKAGE / "__init__.py").exists()

    _forget_package()
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        _forget_package()


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def test_generated_client_submits_a_typed_task_and_reads_its_result(
    live_api, generated_client, worker_process, conn
):
    worker_process("--concurrency", "1")
    client_pkg = generated_client
    post_api_tasks = importlib.import_module(f"{PACKAGE}.api.tasks.post_api_tasks")
    get_status = importlib.import_module(f"{PACKAGE}.api.tasks.get_api_task_status_task_id")
    get_result = importlib.import_module(f"{PACKAGE}.api.tasks.get_api_task_result_task_id")
    get_task_types = importlib.import_module(f"{PACKAGE}.api.task_types.get_api_task_types")
    models = importlib.import_module(f"{PACKAGE}.models")

    key = keys.create_key(conn, name="generated client")
    with client_pkg.AuthenticatedClient(
        base_url=live_api, token=key["token"], raise_on_unexpected_status=True
    ) as client:
        # Every task type the API runs has its typed submit model.
        types = get_task_types.sync(client=client)
        assert {"primes", "default", "greet"} <= {t.name for t in types}
        for task_type in types:
            assert hasattr(models, f"SubmitTask{_camel(task_type.name)}"), task_type.name

        body = models.SubmitTaskPrimes(
            task_type=models.SubmitTaskPrimesTaskType.PRIMES,
            task_input=models.TaskInputPrimes(limit=100),
            priority=3,
        )
        submitted = post_api_tasks.sync_detailed(client=client, body=body)
        assert submitted.status_code == HTTPStatus.ACCEPTED, submitted.content
        task = submitted.parsed
        assert isinstance(task, models.SubmittedTask), task
        assert not task.deduplicated  # absent (Unset) or False on a fresh submit
        assert task.task_type == "primes" and task.priority == 3
        assert task.status in (
            models.SubmittedTaskStatus.PENDING,
            models.SubmittedTaskStatus.PROCESSING,
        )

        deadline = time.monotonic() + 30
        while True:
            status = get_status.sync(task.task_id, client=client)
            assert isinstance(status, models.Task), status
            if status.status == models.TaskStatus.COMPLETED:
                break
            assert status.status in (models.TaskStatus.PENDING, models.TaskStatus.PROCESSING), status
            assert time.monotonic() < deadline, f"task still {status.status} after 30 s"
            time.sleep(0.1)
        assert status.attempts == 1

        result = get_result.sync(task.task_id, client=client)
        assert isinstance(result, models.TaskResult), result
        assert result.task_id == task.task_id
        assert result.result["count"] == 25  # the primes below 100
        assert result.result["largest"] == 97
        assert result.result["limit"] == 100

    row = conn.execute("SELECT owner_key_id, input FROM tasks WHERE id = %s", (task.task_id,)).fetchone()
    assert row == {"owner_key_id": key["id"], "input": {"limit": 100}}


def test_generated_client_sees_a_deduplicated_submit(live_api, generated_client, conn):
    """A second submit with the same unique_key answers 200 and the first task, typed."""
    post_api_tasks = importlib.import_module(f"{PACKAGE}.api.tasks.post_api_tasks")
    models = importlib.import_module(f"{PACKAGE}.models")
    key = keys.create_key(conn, name="dedup client")
    with generated_client.AuthenticatedClient(base_url=live_api, token=key["token"]) as client:
        answers = [
            post_api_tasks.sync_detailed(
                client=client,
                body=models.SubmitTaskPrimes(
                    task_type=models.SubmitTaskPrimesTaskType.PRIMES,
                    task_input=models.TaskInputPrimes(limit=10),
                    unique_key="nightly-report",
                ),
            )
            for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [HTTPStatus.ACCEPTED, HTTPStatus.OK]
    first, second = (a.parsed for a in answers)
    assert isinstance(second, models.SubmittedTask) and second.deduplicated is True
    assert second.task_id == first.task_id
    count = conn.execute("SELECT count(*) AS n FROM tasks WHERE owner_key_id = %s", (key["id"],)).fetchone()
    assert count["n"] == 1


def test_generated_client_with_a_wrong_token_gets_401(live_api, generated_client, conn):
    client_pkg = generated_client
    get_tasks = importlib.import_module(f"{PACKAGE}.api.tasks.get_api_tasks")
    post_api_tasks = importlib.import_module(f"{PACKAGE}.api.tasks.post_api_tasks")
    models = importlib.import_module(f"{PACKAGE}.models")

    with client_pkg.AuthenticatedClient(base_url=live_api, token=new_token().token) as client:
        listed = get_tasks.sync_detailed(client=client)
        assert listed.status_code == HTTPStatus.UNAUTHORIZED
        assert isinstance(listed.parsed, models.Error)
        assert (listed.parsed.code, listed.parsed.status) == (401, "Unauthorized")
        assert listed.headers["WWW-Authenticate"].startswith('Bearer realm="skiplock"')

        body = models.SubmitTaskNoop(task_type=models.SubmitTaskNoopTaskType.NOOP, task_input=None)
        refused = post_api_tasks.sync_detailed(client=client, body=body)
        assert refused.status_code == HTTPStatus.UNAUTHORIZED
        assert isinstance(refused.parsed, models.Error) and refused.parsed.code == 401
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0
