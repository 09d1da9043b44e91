"""Fault injection harness: runs the real system (gunicorn, worker.py, Postgres), breaks it, and
judges the outcome from the database alone.

Sizes come from SKIPLOCK_CHAOS: "reduced" (default, inside `make test`) or "full" (`make chaos`).
Every scenario appends a Report; the session prints them as one table (tests/conftest.py) and
`make chaos` also writes it to a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import psutil
import psycopg

from skiplock.settings import Settings
from tests.conftest import ROOT, settings_env, wait_until

FULL = os.environ.get("SKIPLOCK_CHAOS", "reduced") == "full"
FINAL_STATUSES = ("completed", "failed", "cancelled")


def size(reduced, full):
    return full if FULL else reduced


@dataclass
class Report:
    scenario: str
    tasks: int = 0
    faults: int = 0
    lost: int = 0
    duplicated: int = 0
    max_processing_after_death: float | None = None  # seconds, database clock
    extra_executions: int = 0
    in_flight_at_kills: int = 0
    notes: str = ""
    verdict: str = "FAIL"


REPORTS: list[Report] = []


def render_table(reports: list[Report]) -> str:
    header = (
        "| scenario | tasks | faults | lost | duplicated results | max s in processing after death "
        "| extra runs / in flight at kills | verdict | notes |\n|---|---:|---:|---:|---:|---:|---:|---|---|"
    )
    rows = [
        f"| {r.scenario} | {r.tasks} | {r.faults} | {r.lost} | {r.duplicated} | "
        f"{'-' if r.max_processing_after_death is None else f'{r.max_processing_after_death:.2f}'} | "
        f"{r.extra_executions} / {r.in_flight_at_kills} | {r.verdict} | {r.notes} |"
        for r in reports
    ]
    return "\n".join([header, *rows])


# --- HTTP ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Http:
    def __init__(self, base: str, timeout: float = 10):
        self.base = base
        self.timeout = timeout

    def request(self, method: str, path: str, body=None) -> tuple[int, dict, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), json.loads(err.read() or b"null")


def start_gunicorn(
    settings: Settings, workers: int = 2, quiet: bool = False
) -> tuple[subprocess.Popen, Http]:
    """`gunicorn wsgi:app` on a free port with these settings, once it answers."""
    port = free_port()
    output = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{port}",
            "wsgi:app",
        ],
        cwd=ROOT,
        env=settings_env(settings),
        stdout=output,
        stderr=output,
    )
    http = Http(f"http://127.0.0.1:{port}")

    def up():
        try:
            return http.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    try:
        wait_until(up, timeout=30, message="gunicorn to answer")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, http


@dataclass
class SubmitLog:
    """What clients saw: acknowledged ids and every answer's code and latency."""

    acknowledged: list[int] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # connection-level failures (no HTTP answer)
    max_latency: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, code: int | None, latency: float, task_id: int | None) -> None:
        with self.lock:
            self.max_latency = max(self.max_latency, latency)
            if code is None:
                self.errors += 1
                return
            self.codes[code] = self.codes.get(code, 0) + 1
            if task_id is not None:
                self.acknowledged.append(task_id)


def submit_one(http: Http, log: SubmitLog, body: dict) -> None:
    started = time.monotonic()
    try:
        code, _, answer = http.request("POST", "/api/submit-task", body)
    except OSError:
        log.record(None, time.monotonic() - started, None)
        return
    ok = 200 <= code < 300
    log.record(code, time.monotonic() - started, answer["task_id"] if ok else None)


def submit_many(http: Http, bodies: list[dict], log: SubmitLog | None = None, threads: int = 8) -> SubmitLog:
    log = log or SubmitLog()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: submit_one(http, log, b), bodies))
    return log


class SubmitLoop:
    """Clients submitting steadily in the background until stopped."""

    def __init__(self, http: Http, body: dict, threads: int = 4, pause: float = 0.01):
        self.log = SubmitLog()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(http, body, pause), daemon=True) for _ in range(threads)
        ]

    def _run(self, http, body, pause):
        while not self._stop.is_set():
            submit_one(http, self.log, body)
            time.sleep(pause)

    def __enter__(self) -> SubmitLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(30)


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Kill:
    worker_id: str
    at: datetime  # database clock
    in_flight: int


class Cluster:
    """gunicorn + worker.py processes against one database, with ways to break them."""

    def __init__(self, settings: Settings, conn: psycopg.Connection):
        self.settings = settings
        self.conn = conn
        self.workers: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.http: Http | None = None
        self.kills: list[Kill] = []
        self.worker_logs: dict[int, str] = {}  # pid -> log file, kept only when a test fails

    # lifecycle
    def start_api(self, workers: int = 2) -> Http:
        self.api, self.http = start_gunicorn(self.settings, workers=workers, quiet=True)
        return self.http

    def start_worker(
        self, *args: str, env: dict | None = None, prefix: list[str] | None = None, **overrides
    ) -> subprocess.Popen:
        settings = replace(self.settings, **overrides)
        with tempfile.NamedTemporaryFile(prefix="skiplock-chaos-worker-", suffix=".log", delete=False) as log:
            proc = subprocess.Popen(
                [*(prefix or []), sys.executable, str(ROOT / "worker.py"), *args],
                cwd=ROOT,
                env={**settings_env(settings), **(env or {})},
                stdout=log,
                stderr=log,
            )
        self.worker_logs[proc.pid] = log.name
        self.workers.append(proc)
        return proc

    def close(self, keep_logs: bool = False) -> None:
        if not keep_logs:
            for path in self.worker_logs.values():
                with contextlib.suppress(OSError):
                    os.unlink(path)
        for proc in [*self.workers, self.api]:
            if proc is not None and proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.kill()
            if proc is not None:
                proc.wait(10)

    # faults
    def live_workers(self) -> list[subprocess.Popen]:
        return [w for w in self.workers if w.poll() is None]

    def worker_id(self, proc: subprocess.Popen) -> str:
        """The id the worker logged at start (host:pid:random)."""
        pattern = re.compile(rf"worker ({re.escape(os.uname().nodename)}:{proc.pid}:[0-9a-f]+) starting")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = pattern.search(Path(self.worker_logs[proc.pid]).read_text())
            if match:
                return match.group(1)
            time.sleep(0.05)
        raise AssertionError(f"worker {proc.pid} never logged its id")

    def task_processes(self, proc: subprocess.Popen) -> list[psutil.Process]:
        try:
            return [
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if "forkserver" not in " ".join(p.cmdline())
            ]
        except psutil.NoSuchProcess:
            return []

    def db_now(self) -> datetime:
        return self.conn.execute("SELECT now() AS now").fetchone()["now"]

    def in_flight(self, worker_id: str) -> int:
        return self.conn.execute(
            "SELECT count(*) AS n FROM tasks WHERE status = 'processing' AND worker_id = %s", (worker_id,)
        ).fetchone()["n"]

    def kill_supervisor(self, proc: subprocess.Popen) -> Kill:
        """Freeze it, count what it holds, then SIGKILL it (its task processes die with it)."""
        os.kill(proc.pid, signal.SIGSTOP)
        worker_id = self.worker_id(proc)
        kill = Kill(worker_id, self.db_now(), self.in_flight(worker_id))
        proc.kill()
        proc.wait(10)
        self.kills.append(kill)
        return kill

    def kill_task_process(self, proc: subprocess.Popen) -> Kill | None:
        """SIGKILL one task process of a worker: at most the one task it runs is re-run."""
        children = self.task_processes(proc)
        if not children:
            return None
        victim = random.choice(children)
        kill = Kill(self.worker_id(proc), self.db_now(), 1)
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            return None
        self.kills.append(kill)
        return kill

    def terminate_connections(self) -> int:
        """pg_terminate_backend on every skiplock connection but our own."""
        return self.conn.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'skiplock-%%' "
            "AND pid <> pg_backend_pid()"
        ).fetchone()["n"]


# --- judging ------------------------------------------------------------------------------------


def wait_all_final(conn: psycopg.Connection, ids: list[int], timeout: float) -> int:
    """Wait until every task in ids is final; returns how many are not (0 on success)."""
    deadline = time.monotonic() + timeout
    while True:
        left = conn.execute(
            "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND status NOT IN ('completed', 'failed', 'cancelled')",
            (ids,),
        ).fetchone()["n"]
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def judge(
    report: Report,
    conn: psycopg.Connection,
    acknowledged: list[int],
    kills: list[Kill],
    settings: Settings,
    *,
    timeout: float = 120,
    planned_executions: int | None = None,
) -> Report:
    """Check the four invariants from the database and fill in the report.

    planned_executions: executions expected without any fault (default: one per task)."""
    not_final = wait_all_final(conn, acknowledged, timeout)
    existing = conn.execute("SELECT count(*) AS n FROM tasks WHERE id = ANY(%s)", (acknowledged,)).fetchone()[
        "n"
    ]
    report.tasks = len(acknowledged)
    report.lost = (len(acknowledged) - existing) + not_final
    report.duplicated = conn.execute(
        """
        SELECT count(*) AS n FROM (
            SELECT task_id FROM task_attempts WHERE outcome = 'completed' AND task_id = ANY(%s)
            GROUP BY task_id HAVING count(*) > 1) d
        """,
        (acknowledged,),
    ).fetchone()["n"]
    executions = conn.execute(
        "SELECT count(*) AS n FROM task_attempts WHERE task_id = ANY(%s)", (acknowledged,)
    ).fetchone()["n"]
    planned = len(acknowledged) if planned_executions is None else planned_executions
    report.extra_executions = max(0, executions - planned)
    if report.extra_executions:
        # Which attempts ended early (for the diagnosis, not the verdict).
        outcomes = conn.execute(
            """
            SELECT outcome::text AS outcome, count(*) AS n FROM task_attempts
            WHERE task_id = ANY(%s) AND outcome <> 'completed' GROUP BY 1 ORDER BY 1
            """,
            (acknowledged,),
        ).fetchall()
        report.notes = "early ends: " + ", ".join(f"{o['outcome']} {o['n']}" for o in outcomes)
    report.in_flight_at_kills = sum(k.in_flight for k in kills)
    report.faults = max(report.faults, len(kills))
    # How long each lost attempt stayed in processing after its worker died: from the latest
    # kill of that worker before the rescue to the rescue (database clock).
    lost = conn.execute(
        "SELECT worker_id, finished_at FROM task_attempts WHERE outcome = 'lost' AND task_id = ANY(%s)",
        (acknowledged,),
    ).fetchall()
    waits = []
    for attempt in lost:
        deaths = [
            k.at for k in kills if k.worker_id == attempt["worker_id"] and k.at <= attempt["finished_at"]
        ]
        if deaths:
            waits.append((attempt["finished_at"] - max(deaths)).total_seconds())
    report.max_processing_after_death = max(waits) if waits else None
    bound = settings.lease_seconds + settings.rescue_interval_seconds + 1.0
    ok = (
        report.lost == 0
        and report.duplicated == 0
        and report.extra_executions <= report.in_flight_at_kills
        and (report.max_processing_after_death is None or report.max_processing_after_death <= bound)
    )
    report.verdict = "PASS" if ok else "FAIL"
    REPORTS.append(report)
    return report


def assert_passed(report: Report, settings: Settings) -> None:
    bound = settings.lease_seconds + settings.rescue_interval_seconds + 1.0
    assert report.lost == 0, report
    assert report.duplicated == 0, report
    assert report.extra_executions <= report.in_flight_at_kills, report
    if report.max_processing_after_death is not None:
        assert report.max_processing_after_death <= bound, report
    assert report.verdict == "PASS", report
