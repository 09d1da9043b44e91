"""Test fixtures: a real Postgres (TEST_DATABASE_URL, else an embedded one), a template database
loaded with schema.sql once per session, and a fresh database cloned from it per test.

Every database a test uses is created here and dropped after; nothing else on the server is
touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from skiplock import embedded
from skiplock.db import apply_schema, connect
from skiplock.settings import Settings
from skiplock.worker.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
# Prefix of every database the tests create (and the only ones they drop).
TEST_DB_PREFIX = "skiplock_test_"


def _admin(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def server_url():
    """URL of a Postgres server's maintenance database that the tests may create databases on."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    data_root = Path(tempfile.mkdtemp(prefix="skiplock-pg-"))
    try:
        yield embedded.start(data_root / "pgdata", keep_data=False, database=None)
    finally:
        shutil.rmtree(data_root, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(server_url):
    name = f"{TEST_DB_PREFIX}tpl_{uuid.uuid4().hex[:10]}"
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        apply_schema(make_conninfo(server_url, dbname=name))
        yield name
    finally:
        with _admin(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(server_url, template_db):
    """A fresh database with the schema applied, dropped after the test."""
    name = f"{TEST_DB_PREFIX}{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with _admin(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(database_url):
    """A direct connection to the test database (autocommit, dict rows), as a DBA would have."""
    with connect(database_url, role="test") as c:
        yield c


# Fast clocks so that leases, polls and backoffs play out in seconds.
FAST = dict(
    lease_seconds=2.0,
    poll_interval_seconds=0.2,
    rescue_interval_seconds=0.5,
    retry_backoff_base_seconds=0.05,
    retry_backoff_max_seconds=0.5,
    shutdown_grace_seconds=5.0,
    concurrency=2,
    allow_crash=True,
    task_modules=("tests.sample_tasks",),
    # The queue's own tests act as the one client (tests/test_auth.py and others turn it on).
    auth="off",
)


@pytest.fixture
def settings(database_url) -> Settings:
    return Settings(database_url=database_url, **FAST)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess (worker.py, gunicorn) these settings."""
    env = dict(os.environ)
    env["DATABASE_URL"] = settings.database_url
    env["PYTHONPATH"] = str(ROOT)
    for field, value in vars(settings).items():
        if field == "database_url":
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        env[f"SKIPLOCK_{field.upper()}"] = str(value)
    return env


@pytest.fixture
def app(settings):
    from api import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    app.extensions["skiplock"].close()


@pytest.fixture
def client(app):
    return app.test_client()


class WorkerThread:
    """A Supervisor running in a thread of the test process (its task processes are real)."""

    def __init__(self, settings: Settings, worker_id: str | None = None):
        self.supervisor = Supervisor(settings, worker_id=worker_id)
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.exit_code = self.supervisor.run(handle_signals=False)

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> int | None:
        self.supervisor.stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "worker did not stop"
        return self.exit_code


@pytest.fixture
def start_worker(settings):
    """start_worker(**overrides) -> a running WorkerThread, stopped at teardown."""
    started: list[WorkerThread] = []

    def start(worker_id: str | None = None, **overrides) -> WorkerThread:
        worker = WorkerThread(replace(settings, **overrides), worker_id=worker_id).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker._thread.is_alive():
            worker.stop()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = "condition"):
    """Poll predicate() until it returns something truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def task_row(conn: psycopg.Connection, task_id: int) -> dict:
    return conn.execute("SELECT *, status::text AS status FROM tasks WHERE id = %s", (task_id,)).fetchone()


def insert_task(conn: psycopg.Connection, task_type: str = "noop", input=None, **columns) -> int:
    """Insert a task directly, as a DBA (or the API) would."""
    from skiplock.sql.tasks import task_insert

    row = task_insert(
        conn,
        task_type=task_type,
        input=input,
        queue=columns.pop("queue", "default"),
        priority=columns.pop("priority", 0),
        max_attempts=columns.pop("max_attempts", 3),
        timeout_seconds=columns.pop("timeout_seconds", 30),
        **columns,
    )
    return row["id"]


def spawn_worker(settings: Settings, *args: str, **popen) -> subprocess.Popen:
    """`python worker.py` as operators run it, with these settings in its environment."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py"), *args],
        cwd=ROOT,
        env=settings_env(settings),
        **popen,
    )


@pytest.fixture
def worker_process(settings):
    """worker_process(*args, **settings_overrides) -> a running worker.py, killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, **overrides) -> subprocess.Popen:
        proc = spawn_worker(replace(settings, **overrides), *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def pytest_addoption(parser):
    parser.addoption("--chaos-report", default=None, help="write the fault-injection table (markdown) here")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.chaos.faults import FULL, REPORTS, render_table

    if not REPORTS:
        return
    table = render_table(REPORTS)
    terminalreporter.write_sep("=", f"fault injection ({'full' if FULL else 'reduced'} sizes)")
    terminalreporter.write_line(table)
    path = config.getoption("--chaos-report")
    if path:
        Path(path).write_text(table + "\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's outcome to fixtures (request.node.rep_call), e.g. to keep logs."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
