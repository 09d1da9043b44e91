"""Test fixtures: a real Postgres (TEST_DATABASE_URL, else an embedded one), a template database
loaded with schema.sql once per session, and a fresh database cloned from it per test; settings,
apps and workers on it. What is not a fixture is in tests/helpers.py.

Every database a test uses is created here and dropped after; nothing else on the server is
touched. Under pytest-xdist (`make test`) each process is a session of its own: its own embedded
Postgres, or its own template and databases on TEST_DATABASE_URL (tests.helpers.new_database_name)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, replace
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from skiplock import embedded, registry
from skiplock.db import apply_schema, connect
from skiplock.settings import Settings
from skiplock.worker.supervisor import Supervisor

# Defined here before tests/helpers.py was, and still importable from here (prefer tests.helpers).
from tests.helpers import (  # noqa: F401
    ROOT,
    TEST_DB_PREFIX,
    insert_task,
    new_database_name,
    settings_env,
    spawn_worker,
    task_row,
    wait_until,
)


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
        embedded.stop(data_root / "pgdata")  # now: an xdist worker skips its exit handlers
        shutil.rmtree(data_root, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(server_url):
    name = new_database_name("tpl")
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        apply_schema(make_conninfo(server_url, dbname=name))
        yield name
    finally:
        with _admin(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _declarations_as_they_were():
    """Task types, schedules and process hooks are declared once per process, as modules are
    imported (skiplock.registry): a test that loads task modules of its own (an app or a registry
    with other SKIPLOCK_TASK_MODULES) would leave them declared for every later test of this
    xdist process, whose order varies. Put back what was declared, and forget the modules that
    declared more, so a later test that asks for them imports them again."""
    importlib.import_module(registry.BUILTIN_MODULE)  # declared once for all: never forgotten
    tables = (registry._DECLARED._types, registry._DECLARED_SCHEDULES, registry._SETUPS, registry._TEARDOWNS)
    before = [dict(table) for table in tables]
    modules = set(sys.modules)
    yield
    if [dict(table) for table in tables] == before:
        return
    for table, was in zip(tables, before, strict=True):
        table.clear()
        table.update(was)
    for name in set(sys.modules) - modules:
        if name.startswith("tests."):
            del sys.modules[name]


@pytest.fixture
def empty_database_url(server_url):
    """A fresh database without skiplock's schema, dropped after the test."""
    name = new_database_name("empty")
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with _admin(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(server_url, template_db):
    """A fresh database with the schema applied, dropped after the test."""
    name = new_database_name()
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
    # The queue's own tests act as the one client (tests/api/test_auth.py and others turn it on).
    auth="off",
)


@pytest.fixture
def settings(database_url) -> Settings:
    return Settings(database_url=database_url, **FAST)


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


@pytest.fixture
def make_app(settings):
    """make_app(**settings_overrides) -> another Flask app on the test database; its pool closed after."""
    from api import create_app

    apps = []

    def make(**overrides):
        app = create_app(replace(settings, **overrides))
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["skiplock"].close()


@pytest.fixture
def auth_settings(settings) -> Settings:
    """The test settings with authentication on (as in production)."""
    return replace(settings, auth="on")


@pytest.fixture
def auth_client(make_app):
    """A test client of the API with auth on, against the test database."""
    return make_app(auth="on").test_client()


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


def pytest_sessionfinish(session, exitstatus):
    """Under pytest-xdist, a worker hands its fault-injection reports to the controlling process,
    which prints the table (pytest_testnodedown)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from tests.chaos.faults import REPORTS

        workeroutput["chaos_reports"] = [asdict(report) for report in REPORTS]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from tests.chaos.faults import REPORTS, Report

    REPORTS.extend(Report(**fields) for fields in getattr(node, "workeroutput", {}).get("chaos_reports", ()))


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


def pytest_collection_modifyitems(config, items):
    """A test that uses no database (no server_url among its fixtures) is marked pg_agnostic: it
    cannot depend on the Postgres version. Modules that use one but do not depend on its version
    say so themselves (pytestmark)."""
    for item in items:
        if "server_url" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.pg_agnostic)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's outcome to fixtures (request.node.rep_call), e.g. to keep logs."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
