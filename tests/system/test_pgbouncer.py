"""Behind PgBouncer (Debian's pgbouncer, started here on a free port). In transaction mode, with
SKIPLOCK_DATABASE_POOLER=transaction, the API's submit, status and result paths keep nothing in
their sessions, while its LISTEN (SKIPLOCK_LISTEN_DATABASE_URL) connects directly. In session
mode, with SKIPLOCK_DATABASE_POOLER=session, workers run through it with their bounds and plans
SET rather than sent at startup. Without the setting, the failure is plain.

The pooler is given fewer server connections than the API opens client connections, so every
server session serves transactions of many clients in turn."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace

import psycopg
import pytest

from skiplock import keys as key_admin
from skiplock.db import connect, connect_worker, connection_kwargs, create_pool
from skiplock.settings import Settings
from tests.helpers import spawn_worker, start_gunicorn, wait_until
from tests.pgbouncer import ROLE_DEFAULTS, SERVER_POOL_SIZE, Bouncer, require_pgbouncer, set_role_defaults


@pytest.fixture
def start_bouncer(database_url):
    """start_bouncer(sessions=0, **pgbouncer.ini settings) -> a running Bouncer for the test
    database."""
    require_pgbouncer()
    started: list[Bouncer] = []

    def start(sessions: int = 0, **settings) -> Bouncer:
        bouncer = Bouncer(database_url, sessions=sessions, **settings)
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


# --- the setting -----------------------------------------------------------------------------


def test_the_pooler_setting_is_checked_and_needs_a_direct_listen_url():
    env = {"DATABASE_URL": "postgresql://pgbouncer:6432/skiplock", "SKIPLOCK_DATABASE_POOLER": "statement"}
    with pytest.raises(ValueError, match="SKIPLOCK_DATABASE_POOLER: 'statement'"):
        Settings.from_env(env)
    env["SKIPLOCK_DATABASE_POOLER"] = "session"  # LISTEN works through it: no second URL needed
    assert Settings.from_env(env).database_pooler == "session"
    env["SKIPLOCK_DATABASE_POOLER"] = "transaction"
    with pytest.raises(ValueError, match="needs SKIPLOCK_LISTEN_DATABASE_URL"):
        Settings.from_env(env)
    env["SKIPLOCK_LISTEN_DATABASE_URL"] = "postgresql://db:5432/skiplock"
    assert Settings.from_env(env).database_pooler == "transaction"
    assert Settings.from_env({"DATABASE_URL": "postgresql://db/skiplock"}).database_pooler == ""


# --- without the setting: the failures it prevents ------------------------------------------


def test_without_the_setting_pgbouncer_refuses_the_api_and_says_why(start_bouncer, settings, caplog):
    """PgBouncer 1.18 refuses the `options` startup parameter that carries the timeouts: the API
    answers 503 and its log names the cause."""
    from api import create_app

    bouncer = start_bouncer()
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        connect(bouncer.url, role="api")
    app = create_app(replace(settings, database_url=bouncer.url, db_timeout_seconds=1.0))
    try:
        response = app.test_client().get("/readyz")
        assert response.status_code == 503
        assert response.get_json()["message"] == "The database is unavailable; retry shortly."
    finally:
        app.extensions["skiplock"].close()
    assert "unsupported startup parameter: options" in caplog.text


def test_a_pgbouncer_that_ignores_options_drops_the_timeouts_and_mixes_up_prepared_statements(
    start_bouncer,
):
    """Told to ignore `options`, PgBouncer drops the timeouts unseen, and psycopg's prepared
    statements (after 5 runs of a statement) land on server sessions other clients share: the
    second client's clashes with the first's. The pooled connections prepare nothing."""
    bouncer = start_bouncer(ignore_startup_parameters="options", default_pool_size=1)

    def run_often(conn: psycopg.Connection) -> None:
        for i in range(8):
            assert conn.execute("SELECT %s::int AS i", (i,)).fetchone()["i"] == i

    unpooled = [psycopg.connect(bouncer.url, **connection_kwargs("api", 2.0)) for _ in range(2)]
    try:
        assert unpooled[0].execute("SELECT current_setting('lock_timeout') AS t").fetchone()["t"] == "0"
        run_often(unpooled[0])
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            run_often(unpooled[1])
    finally:
        for conn in unpooled:
            conn.close()
    pooled = [
        psycopg.connect(bouncer.url, **connection_kwargs("api", 2.0, pooler="transaction")) for _ in range(2)
    ]
    try:
        for conn in pooled + pooled:
            run_often(conn)
    finally:
        for conn in pooled:
            conn.close()


# --- with the setting ------------------------------------------------------------------------


def test_pooled_connections_are_bounded_by_the_roles_defaults(start_bouncer, conn, caplog):
    """The timeouts come from the role's defaults, which every server session starts with; a pool
    without them says so once."""
    bouncer = start_bouncer()
    pool = create_pool(bouncer.url, size=2, timeout_seconds=2.0, pooler="transaction")
    try:
        with pool.connection() as pooled:
            pooled.execute("SELECT 1")
    finally:
        pool.close()
    assert (
        "lock_timeout, statement_timeout and idle_in_transaction_session_timeout are unbounded" in caplog.text
    )

    caplog.clear()
    set_role_defaults(
        conn, lock_timeout="2s", statement_timeout="300ms", idle_in_transaction_session_timeout="10s"
    )
    bouncer.reconnect()
    pool = create_pool(bouncer.url, size=2, timeout_seconds=2.0, pooler="transaction")
    try:
        with pool.connection() as pooled:
            assert pooled.execute("SELECT current_setting('lock_timeout') AS t").fetchone()["t"] == "2s"
            with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
                pooled.execute("SELECT pg_sleep(2)")
    finally:
        pool.close()
    assert "unbounded" not in caplog.text


class KeyClient:
    """HTTP with an API key (one connection per request): (code, headers, JSON or bytes)."""

    def __init__(self, base: str, token: str, timeout: float = 20):
        self.base, self.token, self.timeout = base, token, timeout

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            resp = err
        with resp:
            raw = resp.read()
            is_json = resp.headers.get_content_type() == "application/json"
            return resp.status, resp.headers, json.loads(raw) if is_json else raw


@pytest.fixture
def pooled_api(start_bouncer, settings, database_url, conn):
    """gunicorn (2 gevent processes) with its pool through pgbouncer and its LISTEN direct, auth
    on; a client key with a rate limit and a quota (so those paths run) and an admin key."""
    set_role_defaults(conn, **ROLE_DEFAULTS)
    bouncer = start_bouncer()
    api_settings = replace(
        settings,
        database_url=bouncer.url,
        database_pooler="transaction",
        listen_database_url=database_url,
        auth="on",
        pool_size=4,
    )
    client = key_admin.create_key(
        conn, name="pooled", rate_per_second=10_000, burst=10_000, max_unfinished=10_000
    )
    admin = key_admin.create_key(conn, name="ops", role="admin")
    proc, http = start_gunicorn(api_settings, workers=2)
    try:
        yield bouncer, KeyClient(http.base, client["token"]), KeyClient(http.base, admin["token"])
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.slow
def test_submit_status_result_and_long_polls_through_pgbouncer(
    pooled_api, worker_process, conn, database_url
):
    bouncer, http, admin = pooled_api
    worker_process()  # straight to Postgres: it needs its session (LISTEN, advisory locks)

    # Every submit endpoint, with Idempotency-Key: the retry replays the first answer.
    submits = [
        ("/api/submit-task", {"task_input": "through the pooler"}),
        ("/api/tasks", {"task_type": "greet", "task_input": {"name": "pgbouncer"}}),
        ("/api/tasks/batch", {"tasks": [{"task_type": "noop", "task_input": i} for i in range(3)]}),
    ]
    ids = []
    for n, (path, body) in enumerate(submits):
        key = {"Idempotency-Key": f"pooled-{n}"}
        code, headers, first = http.request("POST", path, body, key)
        assert code == 202, first
        assert "RateLimit" in headers and headers["RateLimit-Policy"].count(";q=") == 2  # rate and quota
        code, headers, again = http.request("POST", path, body, key)
        assert (code, headers["Idempotent-Replayed"], again) == (202, "true", first)
        ids += first.get("task_ids") or [first["task_id"]]
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 5

    # Long-polls, answered when the worker finishes (it notifies the API's direct LISTEN).
    for task_id in ids:
        code, _, task = http.request("GET", f"/api/task-status/{task_id}?wait=10")
        assert (code, task["status"]) == (200, "completed"), task
    code, _, result = http.request("GET", f"/api/task-result/{ids[1]}")
    assert (code, result["result"]) == (200, {"greeting": "Hello, pgbouncer!", "attempt": 1})
    code, _, sleeper = http.request(
        "POST", "/api/tasks", {"task_type": "sleep", "task_input": {"seconds": 1}}
    )
    asked = time.monotonic()
    code, _, result = http.request("GET", f"/api/task-result/{sleeper['task_id']}?wait=10")
    assert (code, result["result"]) == (200, {"slept": 1.0}), result
    assert 0.9 < time.monotonic() - asked < 5

    # Hundreds of requests from 8 clients at once: submit, status, result (200, or 409 while
    # not done). The pooler's 2 server sessions serve every client's transactions in turn.
    codes: Counter = Counter()
    lock = threading.Lock()

    def client():
        for _ in range(20):
            seen = []
            code, _, body = http.request("POST", "/api/submit-task", {"task_input": {"n": 1}})
            seen.append(("submit", code))
            seen.append(("status", http.request("GET", f"/api/task-status/{body['task_id']}")[0]))
            seen.append(("result", http.request("GET", f"/api/task-result/{body['task_id']}")[0]))
            with lock:
                codes.update(seen)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert codes["submit", 202] == codes["status", 200] == 160, codes
    assert codes["result", 200] + codes["result", 409] == 160, codes
    wait_until(
        lambda: (
            conn.execute("SELECT count(*) AS n FROM tasks WHERE status <> 'completed'").fetchone()["n"] == 0
        ),
        message="every task completed",
    )

    # The other per-request paths: metrics read from the database, the dashboard's shared secret.
    code, _, metrics = admin.request("GET", "/metrics")
    assert code == 200 and b"skiplock_database_up 1" in metrics
    assert admin.request("GET", "/dashboard/login")[0] == 200

    # Server sessions were shared: more clients than server connections, hundreds of transactions.
    clients = [c for c in bouncer.console("SHOW CLIENTS") if c["database"] == bouncer.dbname]
    servers = [s for s in bouncer.console("SHOW SERVERS") if s["database"] == bouncer.dbname]
    assert {c["application_name"] for c in clients} == {"skiplock-api"}  # the LISTEN went direct
    assert 0 < len(servers) <= SERVER_POOL_SIZE < len(clients)
    (stats,) = [s for s in bouncer.console("SHOW STATS") if s["database"] == bouncer.dbname]
    assert stats["total_xact_count"] >= sum(codes.values())  # at least one per request
    listeners = conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'skiplock-api-listener' "
        "AND datname = current_database()"
    ).fetchone()["n"]
    assert listeners >= 1

    # Nothing was left in them: no prepared statement, no LISTEN, the role's bounds untouched.
    # (Each transaction held open takes a server session of its own: both are looked at.)
    looks = [
        psycopg.connect(bouncer.url, **connection_kwargs("test", 2.0, pooler="transaction")) for _ in servers
    ]
    try:
        for look in looks:
            look.execute("BEGIN")
            state = look.execute(
                "SELECT (SELECT count(*) FROM pg_prepared_statements) AS prepared,"
                " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
                " current_setting('lock_timeout') AS lock_timeout,"
                " current_setting('statement_timeout') AS statement_timeout,"
                " current_setting('idle_in_transaction_session_timeout') AS idle_in_transaction_session_timeout,"
                " pg_backend_pid() AS pid"
            ).fetchone()
            assert state.pop("pid") in {s["remote_pid"] for s in servers}
            assert state == {"prepared": 0, "listening": 0, **ROLE_DEFAULTS}
            look.execute("ROLLBACK")
    finally:
        for look in looks:
            look.close()
    assert "WARNING" not in bouncer.log() and "ERROR" not in bouncer.log()


# --- workers, in session mode ----------------------------------------------------------------


def test_in_session_mode_connections_set_what_pgbouncer_would_refuse_at_startup(start_bouncer):
    """PgBouncer refuses the `options` a worker's connection sends; with the pooler "session" the
    same bounds, plans and keepalives-free settings are SET once connected, on a server session
    that stays the client's."""
    bouncer = start_bouncer(sessions=4)
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        connect_worker(bouncer.session_url, 2.0)
    with connect_worker(bouncer.session_url, 2.0, pooler="session") as worker_conn:
        settings = worker_conn.execute(
            "SELECT current_setting('lock_timeout') AS lock_timeout,"
            " current_setting('plan_cache_mode') AS plan_cache_mode, current_setting('jit') AS jit,"
            " pg_backend_pid() AS pid"
        ).fetchone()
        assert settings["lock_timeout"] == "2s" and settings["plan_cache_mode"] == "force_custom_plan"
        assert settings["jit"] == "off"
        for _ in range(8):  # prepared after 5 runs, on its own server session
            assert worker_conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"] == settings["pid"]
    pool = create_pool(bouncer.session_url, size=2, timeout_seconds=3.0, pooler="session")
    try:
        with pool.connection() as pooled:
            # 5 times the timeout (STATEMENT_TIMEOUT_FACTOR), as `options` would have set it
            assert pooled.execute("SELECT current_setting('statement_timeout') AS t").fetchone()["t"] == "15s"
    finally:
        pool.close()


@pytest.mark.slow
def test_a_worker_runs_through_pgbouncer_in_session_mode(
    start_bouncer, worker_process, conn, database_url, settings
):
    """worker.py through the pooler in session mode: it claims, runs, stores and listens there
    (every one of its connections is the pooler's client), and is woken by a NOTIFY."""
    bouncer = start_bouncer(sessions=8)
    transaction = replace(
        settings, database_url=bouncer.url, database_pooler="transaction", listen_database_url=database_url
    )
    refused = spawn_worker(transaction, stderr=subprocess.PIPE, text=True)
    _, stderr = refused.communicate(timeout=30)
    assert refused.returncode != 0 and "SKIPLOCK_DATABASE_POOLER=session" in stderr, stderr
    worker = worker_process(
        database_url=bouncer.session_url, database_pooler="session", poll_interval_seconds=30.0
    )
    wait_until(  # idle, waiting for a NOTIFY (its first claims found nothing)
        lambda: conn.execute("SELECT count(*) AS n FROM task_waiters").fetchone()["n"] == 1,
        message="the worker to wait for work",
    )
    ids = [
        conn.execute(
            "INSERT INTO tasks (task_type, input) VALUES ('noop', %s) RETURNING id", (f'"{i}"',)
        ).fetchone()["id"]
        for i in range(20)
    ]
    wait_until(  # within seconds: the poll is 30 s, so it was the NOTIFY through the pooler
        lambda: (
            conn.execute(
                "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND status = 'completed'", (ids,)
            ).fetchone()["n"]
            == len(ids)
        ),
        timeout=15,
        message="the tasks to complete",
    )
    clients = {
        c["application_name"]
        for c in bouncer.console("SHOW CLIENTS")
        if c["database"] == bouncer.session_alias
    }
    assert {"skiplock-worker", "skiplock-listener", "skiplock-writer"} <= clients
    assert worker.poll() is None
