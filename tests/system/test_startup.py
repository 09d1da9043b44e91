"""Starting without surprises, through the real entry points (`python worker.py`, the `skiplock`
script, gunicorn with wsgi:app, `make run`'s launcher): a malformed DATABASE_URL, an unknown host,
a server that refuses the login, a database without the schema or with an older one, a task module
that is not on the Python path or raises on import. Each ends the process with one line naming
the fix, no traceback, and a non-zero exit code. A newer schema is served with a warning."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from psycopg.conninfo import make_conninfo

from skiplock.db import SCHEMA_VERSION
from skiplock.settings import Settings
from tests.helpers import (
    ROOT,
    SCRIPT,
    UNREACHABLE_DB,
    free_port,
    settings_env,
    spawn_worker,
    wait_until,
)

# Every run here ends by itself in seconds; a process still running after this is a failure.
EXIT_TIMEOUT_SECONDS = 60
BAD_URL = "postgres//nowhere"  # no scheme separator: libpq reads it as "key=value" pairs
UNKNOWN_HOST = "postgresql://skiplock@no-such-host.invalid/skiplock"
FIX_SCHEMA = "skiplock schema apply"

# Processes starting and refusing: their lines do not depend on the Postgres version (.ci/run).
pytestmark = pytest.mark.pg_agnostic


@pytest.fixture
def broken_module(tmp_path) -> tuple[str, str]:
    """(module name, its folder): a task module that raises on import."""
    (tmp_path / "broken_tasks.py").write_text('raise RuntimeError("the model file is missing")\n')
    return "broken_tasks", str(tmp_path)


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT_SECONDS, check=False
    )


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The process exited non-zero with no traceback, and one line of its output names every
    needle: that line."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(n in line for n in needles)]
    assert len(lines) >= 1, (needles, output)
    return lines[0]


def worker(settings: Settings, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "worker.py", "--concurrency", "1"], {**settings_env(settings), **env})


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run([str(SCRIPT), *args], {**settings_env(settings), **env})


def gunicorn(settings: Settings, **env: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "2"]
    return run([*argv, "-b", f"127.0.0.1:{free_port()}", "wsgi:app"], {**settings_env(settings), **env})


ENTRY_POINTS = {
    "worker.py": worker,
    "skiplock": lambda s, **env: cli(s, "queues", **env),
    "gunicorn": gunicorn,
}


# --- the database's URL and login ------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_malformed_database_url_is_one_line(entry, settings):
    line = refused(ENTRY_POINTS[entry](replace(settings, database_url=BAD_URL)), "DATABASE_URL")
    assert "is not a PostgreSQL URL" in line and "postgresql://USER:PASSWORD@HOST:5432/DATABASE" in line


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_unknown_host_is_one_line(entry, settings):
    refused(ENTRY_POINTS[entry](replace(settings, database_url=UNKNOWN_HOST)), "no-such-host.invalid", "host")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_refused_login_is_one_line(entry, settings, server_url):
    nobody = make_conninfo(settings.database_url, user="skiplock_no_such_role")
    line = refused(ENTRY_POINTS[entry](replace(settings, database_url=nobody)), "refused the login")
    assert "skiplock_no_such_role" in line and "DATABASE_URL" in line


def test_the_cli_names_a_server_that_does_not_answer(settings):
    result = cli(replace(settings, database_url=UNREACHABLE_DB), "queues")
    line = refused(result, "cannot reach the database at 127.0.0.1:1")
    assert result.returncode == 3
    assert "is PostgreSQL running there" in line


# --- the schema's version --------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_database_without_the_schema_is_refused(entry, settings, empty_database_url):
    line = refused(
        ENTRY_POINTS[entry](replace(settings, database_url=empty_database_url)), "no skiplock schema"
    )
    assert FIX_SCHEMA in line


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_schema_from_before_versions_is_refused(entry, settings, conn):
    conn.execute("DROP TABLE skiplock_schema")
    line = refused(ENTRY_POINTS[entry](settings), "from before schema versions")
    assert f"needs version {SCHEMA_VERSION}" in line and FIX_SCHEMA in line


def test_applying_the_schema_again_ends_the_refusal(settings, conn):
    conn.execute("DROP TABLE skiplock_schema")
    refused(cli(settings, "queues"), "from before schema versions")
    assert cli(settings, "schema", "apply").returncode == 0
    assert conn.execute("SELECT version FROM skiplock_schema").fetchone() == {"version": SCHEMA_VERSION}
    assert cli(settings, "queues").returncode == 0


def test_a_newer_schema_is_served_with_a_warning(settings, conn):
    """A rolling deploy applies the next schema while this code still runs: it carries on."""
    conn.execute("UPDATE skiplock_schema SET version = %s", (SCHEMA_VERSION + 1,))
    result = cli(settings, "queues")
    assert result.returncode == 0, result.stderr
    assert f"schema is version {SCHEMA_VERSION + 1}, newer than this code's {SCHEMA_VERSION}" in result.stderr
    # Applying this code's schema.sql again never lowers the version.
    assert cli(settings, "schema", "apply").returncode == 0
    assert conn.execute("SELECT version FROM skiplock_schema").fetchone() == {"version": SCHEMA_VERSION + 1}


def test_a_worker_refuses_a_schema_it_finds_older_when_it_reconnects(settings, conn):
    """The database was swapped (restored from an old dump) under a running worker: on its next
    connection it stops with the line, instead of retrying forever."""
    proc = spawn_worker(
        settings, "--concurrency", "1", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(lambda: conn.execute("SELECT count(*) AS n FROM task_workers").fetchone()["n"] == 1)
        conn.execute("DROP TABLE skiplock_schema")
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'skiplock-%%' "
            "AND pid <> pg_backend_pid()"
        )
        output, _ = proc.communicate(timeout=EXIT_TIMEOUT_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert any(
        line.startswith("worker.py: ") and "from before schema versions" in line and FIX_SCHEMA in line
        for line in output.splitlines()
    ), output


# --- task modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_task_module_not_on_the_python_path_names_pythonpath(entry, settings):
    if entry == "skiplock":  # `queues` imports no task code: submit does
        result = cli(replace(settings, task_modules=("nowhere_tasks",)), "submit", "noop", "null")
    else:
        result = ENTRY_POINTS[entry](replace(settings, task_modules=("nowhere_tasks",)))
    line = refused(result, "'nowhere_tasks'", "SKIPLOCK_TASK_MODULES")
    assert "not found" in line and "PYTHONPATH=" in line


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_task_module_that_raises_on_import_is_one_line(entry, settings, broken_module):
    module, folder = broken_module
    broken = replace(settings, task_modules=(module,))
    path = {"PYTHONPATH": f"{ROOT}:{folder}"}
    if entry == "skiplock":
        result = cli(broken, "submit", "noop", "null", **path)
    else:
        result = ENTRY_POINTS[entry](broken, **path)
    line = refused(result, f"task module {module!r}")
    assert "RuntimeError: the model file is missing" in line


def test_a_task_module_missing_a_dependency_names_the_dependency(settings, tmp_path):
    (tmp_path / "needy_tasks.py").write_text("import no_such_package_for_skiplock  # noqa\n")
    result = worker(replace(settings, task_modules=("needy_tasks",)), PYTHONPATH=f"{ROOT}:{tmp_path}")
    line = refused(result, "'needy_tasks'", "'no_such_package_for_skiplock'")
    assert "not installed here" in line


# --- make run ---------------------------------------------------------------------------------------


def test_make_run_names_a_malformed_database_url(settings):
    result = run(
        [sys.executable, "-m", "skiplock.launcher"], {**settings_env(settings), "DATABASE_URL": BAD_URL}
    )
    line = refused(result, "make run: DATABASE_URL is not a PostgreSQL URL")
    assert result.returncode == 2, line
