"""Behind PgBouncer in transaction mode (Debian's pgbouncer, started here on a free port): with
SKIPLOCK_DATABASE_POOLER=transaction the API's submit, status and result paths keep nothing in
their sessions, while its LISTEN (SKIPLOCK_LISTEN_DATABASE_URL) and the workers connect directly;
without the setting, the failure is plain.

The pooler is given fewer server connections than the API opens client connections, so every
server session serves transactions of many clients in turn."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from skiplock import keys as key_admin
from skiplock.db import connect, connection_kwargs, create_pool
from skiplock.settings import Settings
from tests.helpers import free_port, start_gunicorn, wait_until

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
# Server connections per database and user: fewer than the API's clients (2 processes, up to 4
# pooled connections each, under 8 concurrent HTTP clients).
SERVER_POOL_SIZE = 2
# What the DBA gives the API's role (README "Behind PgBouncer"): what `options` would have sent.
ROLE_DEFAULTS = {
    "lock_timeout": "2s",
    "statement_timeout": "10s",
    "idle_in_transaction_session_timeout": "10s",
}


def require_pgbouncer() -> None:
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.skip("pgbouncer is not installed (Debian package pgbouncer: `make test` installs it as root)")


class Bouncer:
    """pgbouncer in the foreground, in front of the server of `target_url`, on 127.0.0.1:port.

    As root it drops to another user (pgbouncer refuses to run as root): the owner of the
    server's socket folder if that is how it is reached (it may be the only one who can), else
    nobody; its folder is readable by that user."""

    def __init__(self, target_url: str, **settings: str | int):
        with psycopg.connect(target_url) as probe:  # where the server really is (host or socket)
            self.host, self.port_pg, self.user = probe.info.host, probe.info.port, probe.info.user
            self.dbname = probe.info.dbname
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="skiplock-pgbouncer-"))
        self.dir.chmod(0o755)
        ini = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": self.dir / "users.txt",
            "admin_users": self.user,
            "pool_mode": "transaction",
            "default_pool_size": SERVER_POOL_SIZE,
            "max_client_conn": 200,
            **settings,
        }
        (self.dir / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n{self.dbname} = host={self.host} port={self.port_pg}\n\n[pgbouncer]\n"
            + "".join(f"{name} = {value}\n" for name, value in ini.items())
        )
        for path in self.dir.iterdir():
            path.chmod(0o644)
        self.log_path = self.dir / "pgbouncer.log"
        command = [PGBOUNCER, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command[1:1] = ["-u", self.unprivileged_user()]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._answers, timeout=10, message=f"pgbouncer to answer ({self.log()})")
        except BaseException:
            self.stop()
            raise

    def unprivileged_user(self) -> str:
        if self.host.startswith("/"):
            owner = pwd.getpwuid(os.stat(self.host).st_uid).pw_name
            if owner != "root":
                return owner
        return "nobody"

    @property
    def url(self) -> str:
        """The test database, through the pooler."""
        return make_conninfo(host="127.0.0.1", port=self.port, dbname=self.dbname, user=self.user)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"pgbouncer exited with {self.proc.returncode}: {self.log()}")
        try:
            self.console("SHOW VERSION")
        except psycopg.OperationalError:
            return False
        return True

    def console(self, command: str) -> list[dict]:
        """A command of the admin console (SHOW ..., RECONNECT): its rows."""
        admin = make_conninfo(self.url, dbname="pgbouncer")
        with psycopg.connect(admin, autocommit=True, prepare_threshold=None) as conn:
            cur = conn.execute(command)
            if cur.description is None:
                return []
            names = [column.name for column in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def log(self) -> str:
        return self.log_path.read_text()

    def logins_done(self) -> bool:
        """No server connection to the test database is still logging in."""
        pools = [p for p in self.console("SHOW POOLS") if p["database"] == self.dbname]
        return all(p["sv_login"] == 0 for p in pools)

    def reconnect(self) -> None:
        """RECONNECT (new server sessions, e.g. to take up new role defaults), once no server
        login is under way: PgBouncer (1.18) counts a server connection that RECONNECT closes in
        the middle of its login as a failed login, and then opens no server connection for
        server_login_retry (15 s), so every client waits past its connect timeout."""
        wait_until(self.logins_done, timeout=10, message=f"pgbouncer's server logins to end ({self.log()})")
        self.console("RECONNECT")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def start_bouncer(database_url):
    """start_bouncer(**pgbouncer.ini settings) -> a running Bouncer for the test database."""
    require_pgbouncer()
    started: list[Bouncer] = []

    def start(**settings) -> Bouncer:
        bouncer = Bouncer(database_url, **settings)
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


def set_role_defaults(conn: psycopg.Connection, **settings: str) -> None:
    """ALTER ROLE ... IN DATABASE ... SET: new sessions of this role start with these (the test
    database goes, and its role settings with it, at teardown)."""
    for name, value in settings.items():
        conn.execute(
            sql.SQL("ALTER ROLE CURRENT_USER IN DATABASE {} SET {} = {}").format(
                sql.Identifier(conn.info.dbname), sql.Identifier(name), sql.Literal(value)
            )
        )


# --- the setting -----------------------------------------------------------------------------


def test_the_pooler_setting_is_checked_and_needs_a_direct_listen_url():
    env = {"DATABASE_URL": "postgresql://pgbouncer:6432/skiplock", "SKIPLOCK_DATABASE_POOLER": "session"}
    with pytest.raises(ValueError, match="SKIPLOCK_DATABASE_POOLER: 'session'"):
        Settings.from_env(env)
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
    pooled = [psycopg.connect(bouncer.url, **connection_kwargs("api", 2.0, pooled=True)) for _ in range(2)]
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
    looks = [psycopg.connect(bouncer.url, **connection_kwargs("test", 2.0, pooled=True)) for _ in servers]
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
