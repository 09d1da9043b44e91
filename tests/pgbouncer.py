"""Debian's pgbouncer, started by a test on a free port in front of a server it did not start:
tests/system/test_pgbouncer.py (the API in transaction mode, workers in session mode) and
tests/chaos/test_hosts.py (hosts of their own behind it, and its restart)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.helpers import free_port, wait_until

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
# The alias of the test database in session mode (Bouncer(sessions=...)): for workers.
SESSION_ALIAS_SUFFIX = "_session"


def require_pgbouncer() -> None:
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.skip("pgbouncer is not installed (Debian package pgbouncer: `make test` installs it as root)")


def set_role_defaults(conn: psycopg.Connection, **settings: str) -> None:
    """ALTER ROLE ... IN DATABASE ... SET: new sessions of this role start with these (the test
    database goes, and its role settings with it, at teardown)."""
    for name, value in settings.items():
        conn.execute(
            sql.SQL("ALTER ROLE CURRENT_USER IN DATABASE {} SET {} = {}").format(
                sql.Identifier(conn.info.dbname), sql.Identifier(name), sql.Literal(value)
            )
        )


class Bouncer:
    """pgbouncer in the foreground, in front of the server of `target_url`, on listen_addr:port
    (127.0.0.1 unless told; a comma-separated list is allowed). The test database is served in
    transaction mode under its own name and, with sessions=N, also in session mode with N server
    connections under its name + SESSION_ALIAS_SUFFIX (session_url).

    As root it drops to another user (pgbouncer refuses to run as root): the owner of the
    server's socket folder if that is how it is reached (it may be the only one who can), else
    nobody; its folder is readable by that user. kill() and start() restart it on the same port."""

    def __init__(self, target_url: str, *, sessions: int = 0, **settings: str | int):
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
        self.listen_addr = str(ini["listen_addr"]).split(",")[0].strip()
        server = f"host={self.host} port={self.port_pg} dbname={self.dbname}"
        databases = f"{self.dbname} = {server}\n"
        if sessions:
            databases += f"{self.session_alias} = {server} pool_mode=session pool_size={sessions}\n"
        (self.dir / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n{databases}\n[pgbouncer]\n"
            + "".join(f"{name} = {value}\n" for name, value in ini.items())
        )
        for path in self.dir.iterdir():
            path.chmod(0o644)
        self.log_path = self.dir / "pgbouncer.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = [PGBOUNCER, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command[1:1] = ["-u", self.unprivileged_user()]
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._answers, timeout=10, message=f"pgbouncer to answer ({self.log()})")
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL: every client and server connection drops at once (the kernel resets them)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def unprivileged_user(self) -> str:
        if self.host.startswith("/"):
            owner = pwd.getpwuid(os.stat(self.host).st_uid).pw_name
            if owner != "root":
                return owner
        return "nobody"

    @property
    def session_alias(self) -> str:
        return self.dbname + SESSION_ALIAS_SUFFIX

    @property
    def url(self) -> str:
        """The test database in transaction mode."""
        return make_conninfo(host=self.listen_addr, port=self.port, dbname=self.dbname, user=self.user)

    @property
    def session_url(self) -> str:
        """The test database in session mode (sessions=N)."""
        return make_conninfo(self.url, dbname=self.session_alias)

    def _answers(self) -> bool:
        assert self.proc is not None
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
