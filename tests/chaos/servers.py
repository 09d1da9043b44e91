"""Postgres servers of a test's own (pgserver's binaries, so a fresh machine has them): one the
test may stop, restart and expose on other addresses, and a streaming standby of it that the test
may cut off and promote. Nothing here touches a server it did not start."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from skiplock import embedded


class PrivatePostgres:
    """A Postgres of our own (pgserver's binaries) that the test may stop, restart and expose on
    other addresses, without touching any server it did not start."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="skiplock-chaos-pg-"))
        self.pgdata = self.root / "pgdata"
        self.url = embedded.start(self.pgdata, database="skiplock")
        self.socket_dir = conninfo_to_dict(self.url)["host"]
        self.user = "pgserver" if os.geteuid() == 0 else None
        self.listen = ""

    def pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.user, timeout=30)

    def start(self) -> None:
        self.pg_ctl(
            "-w",
            "-o",
            f'-h "{self.listen}"',
            "-o",
            f"-k {self.socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )

    def stop(self) -> None:
        self.pg_ctl("-w", "stop", "-m", "fast")

    def listen_on(self, address: str, network: str) -> None:
        with open(self.pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {network} trust\n")
        self.listen = address
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.pg_ctl("-w", "stop", "-m", "immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def kill_9(self) -> None:
        """SIGKILL the postmaster: the host gone, nothing flushed or handed over that was not."""
        pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

    def current_lsn(self) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


# The name the standby streams under (its cluster_name), which synchronous_standby_names names.
STANDBY_NAME = "skiplock_standby"


class Standby:
    """A streaming standby of `primary` (pg_basebackup -R) on a socket folder of its own:
    asynchronous, or synchronous (the primary's commits wait for it to have flushed their WAL).
    The test cuts it off (stop), brings it back (start) and promotes it."""

    def __init__(self, primary: PrivatePostgres, *, synchronous: bool = False):
        self.primary = primary
        self.user = primary.user
        self.pgdata = primary.root / "standby"
        self.socket_dir = primary.root / "standby-socket"
        self.socket_dir.mkdir(mode=0o777)
        os.chmod(self.socket_dir, 0o777)
        os.chmod(primary.root, 0o755)  # its user makes the data folder in here
        if self.user is not None:
            shutil.chown(primary.root, user=self.user)
        source = conninfo_to_dict(primary.url)
        from pgserver._commands import pg_basebackup

        pg_basebackup(
            ["-D", str(self.pgdata), "-R", "-X", "stream", "-c", "fast",
             "-d", make_conninfo(host=source["host"], user=source.get("user", "postgres"))],
            user=self.user, timeout=60,
        )  # fmt: skip
        with open(self.pgdata / "postgresql.auto.conf", "a") as conf:
            conf.write(f"cluster_name = '{STANDBY_NAME}'\n")  # its walreceiver's application_name
        self.url = make_conninfo(primary.url, host=str(self.socket_dir))
        self.start()
        if synchronous:
            with psycopg.connect(primary.url, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
                conn.execute("SELECT pg_reload_conf()")
                deadline = time.monotonic() + 30
                while (
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                    ).fetchone()[0]
                    == 0
                ):
                    if time.monotonic() > deadline:
                        raise AssertionError("the standby never became synchronous")
                    time.sleep(0.05)

    def pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.user, timeout=60)

    def start(self) -> None:
        self.pg_ctl(
            "-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"), "start"
        )

    def stop(self) -> None:
        """Cut off: from now on it receives nothing, as a standby far behind."""
        self.pg_ctl("-w", "stop", "-m", "fast")

    def promote(self) -> None:
        self.pg_ctl("-w", "promote")

    def replayed(self, lsn: str) -> bool:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]

    def close(self) -> None:
        try:
            self.pg_ctl("-w", "stop", "-m", "immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass


def multi_host_url(*servers: PrivatePostgres | Standby) -> str:
    """One URL for the whole set: libpq tries each host in turn and keeps the one that accepts
    writes (target_session_attrs=read-write), as clients of Patroni or RDS do."""
    url = make_conninfo(servers[0].url, target_session_attrs="read-write", connect_timeout=2)
    return make_conninfo(url, host=",".join(str(s.socket_dir) for s in servers))
