"""Fault injection harness: runs the real system (gunicorn, worker.py, Postgres), breaks it, and
judges the outcome from the database and from what actually ran.

Real executions are counted by the `tally` task type (tests/sample_tasks.py), which appends a
line to a file when it starts and when it ends; the database alone cannot tell an execution that
a crash cut short, or an attempt it charged without a start.

Sizes come from SKIPLOCK_CHAOS: "reduced" (default, inside `make test`) or "full" (`make chaos`).
Every scenario appends a Report; the session prints them as one table (tests/conftest.py) and
`make chaos` also writes it to a file.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import psutil
import psycopg
from psycopg.rows import dict_row

from skiplock.settings import Settings
from tests.helpers import ROOT, Http, settings_env, start_gunicorn, wait_until
from tests.sample_tasks import TALLY_ENV

FULL = os.environ.get("SKIPLOCK_CHAOS", "reduced") == "full"
FINAL_STATUSES = ("completed", "failed", "cancelled", "expired")


# How late a rescue may come after its rescue interval (see judge).
RESCUE_SLACK_SECONDS = 1.0


def size(reduced, full):
    return full if FULL else reduced


@dataclass
class Report:
    scenario: str
    tasks: int = 0
    faults: int = 0
    lost: int = 0
    duplicated: int = 0
    charged_without_start: int = 0  # attempts charged that never ran (tally tasks)
    audit_violations: int = 0  # rows of task_invariant_violations afterwards
    max_until_rescued: float | None = None  # seconds from a worker's death to its tasks' rescue
    rescue_bound: float | None = None  # what that may be (depends on how the worker went)
    extra_executions: int = 0
    in_flight_at_faults: int = 0  # started and not yet stored when the faults struck
    notes: str = ""
    verdict: str = "FAIL"


REPORTS: list[Report] = []


def render_table(reports: list[Report]) -> str:
    header = (
        "| scenario | tasks | faults | lost | duplicated results | charged, never ran | audit violations "
        "| max s until rescued (bound) | extra runs / in flight at faults | verdict | notes |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    )
    rows = []
    for r in reports:
        rescued = "-" if r.max_until_rescued is None else f"{r.max_until_rescued:.2f} ({r.rescue_bound:.1f})"
        rows.append(
            f"| {r.scenario} | {r.tasks} | {r.faults} | {r.lost} | {r.duplicated} | {r.charged_without_start} "
            f"| {r.audit_violations} | {rescued} | {r.extra_executions} / {r.in_flight_at_faults} "
            f"| {r.verdict} | {r.notes} |"
        )
    return "\n".join([header, *rows])


# --- what ran -------------------------------------------------------------------------------------


class Tally:
    """The executions `tally` tasks recorded: (kind S/E, task id, attempt, pid) per line."""

    def __init__(self, path: Path):
        self.path = path
        path.touch()

    def lines(self) -> list[tuple[str, int, int, int]]:
        out = []
        for line in self.path.read_text().splitlines():
            kind, task_id, attempt, pid = line.split()
            out.append((kind, int(task_id), int(attempt), int(pid)))
        return out

    def executions(self) -> Counter:
        """Task id -> how many times it started running."""
        return Counter(task_id for kind, task_id, _, _ in self.lines() if kind == "S")

    def started(self, pids: set[int] | None = None) -> set[tuple[int, int]]:
        """(task id, attempt) of every execution that started (in these processes)."""
        return {(t, a) for kind, t, a, pid in self.lines() if kind == "S" and (pids is None or pid in pids)}


def tally_body(seconds: float = 0.0, **fields) -> dict:
    return {"task_type": "tally", "task_input": {"seconds": seconds}, "max_attempts": 20, **fields}


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
    in_flight: int  # executions started and not yet stored at that moment
    # The worker's sessions ended with it (its process died): its tasks are due back within a
    # rescue interval. Otherwise (frozen, cut off) only its leases tell.
    session_ended: bool = False
    # A task process killed with no tally start open in it may have been between the worker's
    # mark of the start (it sets the shared `running` flag on entering the task's function) and
    # the tally's first line: one crashed attempt of this worker may then be charged that the
    # tally never saw start. Only a task-process kill can have this; at most one per kill.
    unseen_start: bool = False
    # What the worker had handed to its processes when it died (task_workers.in_hand): those
    # attempts count as started, the tasks a process had not reached in its batch included (the
    # price of never hiding a run), so a charged one of them the tally never saw is no defect.
    in_hand: frozenset[tuple[int, int]] = frozenset()


class Cluster:
    """gunicorn + worker.py processes against one database, with ways to break them. Each
    worker.py runs in a process group of its own, as a service manager would start it."""

    def __init__(self, settings: Settings, conn: psycopg.Connection):
        self.settings = settings
        self.conn = conn
        self.workers: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.http: Http | None = None
        self.kills: list[Kill] = []
        self.worker_logs: dict[int, str] = {}  # pid -> log file, kept only when a test fails
        self._tmp = Path(tempfile.mkdtemp(prefix="skiplock-chaos-"))
        self.tally = Tally(self._tmp / "tally")

    # lifecycle
    def start_api(self, workers: int = 2) -> Http:
        self.api, self.http = start_gunicorn(self.settings, workers=workers, quiet=True)
        return self.http

    def start_worker(
        self, *args: str, env: dict | None = None, prefix: list[str] | None = None, **overrides
    ) -> subprocess.Popen:
        settings = replace(self.settings, **overrides)
        log_path = self._tmp / f"worker-{len(self.worker_logs)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [*(prefix or []), sys.executable, str(ROOT / "worker.py"), *args],
                cwd=ROOT,
                env={**settings_env(settings), TALLY_ENV: str(self.tally.path), **(env or {})},
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.worker_logs[proc.pid] = str(log_path)
        self.workers.append(proc)
        return proc

    def close(self, keep_logs: bool = False) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if self.api is not None and self.api.poll() is None:
            self.api.kill()
        if self.api is not None:
            self.api.wait(10)
        if keep_logs:
            print(f"worker logs kept in {self._tmp}")
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)

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

    def log_of(self, proc: subprocess.Popen) -> str:
        return Path(self.worker_logs[proc.pid]).read_text()

    def task_processes(self, proc: subprocess.Popen) -> list[psutil.Process]:
        """The worker's task processes: the children of its forkserver (they share its command
        line, being forks of it)."""
        try:
            forkservers = [
                p for p in psutil.Process(proc.pid).children() if "forkserver" in " ".join(p.cmdline())
            ]
            return [child for server in forkservers for child in server.children()]
        except psutil.NoSuchProcess:
            return []

    def db_now(self) -> datetime:
        return self.conn.execute("SELECT now() AS now").fetchone()["now"]

    def in_flight(self, worker_id: str | None = None, pids: set[int] | None = None) -> int:
        """Executions started (tally) whose attempt is still processing in the database (for this
        worker): what a fault at this moment can cut short or leave unstored."""
        rows = self.conn.execute(
            "SELECT id, attempts FROM tasks WHERE status = 'processing' AND (%(w)s::text IS NULL OR worker_id = %(w)s)",
            {"w": worker_id},
        ).fetchall()
        return len({(r["id"], r["attempts"]) for r in rows} & self.tally.started(pids))

    def held(self, worker_id: str) -> int:
        """Tasks the worker holds (claimed, started or not)."""
        return self.conn.execute(
            "SELECT count(*) AS n FROM tasks WHERE status = 'processing' AND worker_id = %s", (worker_id,)
        ).fetchone()["n"]

    def kill_supervisor(self, proc: subprocess.Popen) -> Kill:
        """Freeze the worker's whole process group, count what it was running, then SIGKILL the
        group: a host dying with everything on it."""
        worker_id = self.worker_id(proc)
        pids = {proc.pid, *(p.pid for p in self.task_processes(proc))}
        os.killpg(proc.pid, signal.SIGSTOP)
        kill = Kill(worker_id, self.db_now(), self.in_flight(worker_id, pids), session_ended=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kill.in_hand = self.in_hand(worker_id)  # read until its session ended
        self.kills.append(kill)
        return kill

    def in_hand(self, worker_id: str) -> frozenset[tuple[int, int]]:
        """The attempts the worker had recorded as handed to its processes (task_workers.in_hand),
        read until its session has ended and once more then: a hand-over it had sent may commit
        until then, and from then on the others' rescue may take its tasks back at any moment
        (in_hand_now reads what it still holds). Each read's attempts count."""
        seen = set(self.in_hand_now(worker_id))

        def session_ended() -> bool:
            seen.update(self.in_hand_now(worker_id))
            return (
                self.conn.execute(  # `is None`: a row without columns is an empty dict, falsy
                    "SELECT FROM pg_stat_activity a JOIN task_workers w ON w.session_pid = a.pid WHERE w.worker_id = %s",
                    (worker_id,),
                ).fetchone()
                is None
            )

        wait_until(session_ended, message=f"worker {worker_id}'s session to end")
        seen.update(self.in_hand_now(worker_id))
        return frozenset(seen)

    def in_hand_now(self, worker_id: str) -> frozenset[tuple[int, int]]:
        """The attempts the worker holds that its record lists as handed to its processes, as
        the database has them now (a statement of its may still be in flight)."""
        rows = self.conn.execute(  # its entries for attempts that ended since are stale
            """
            SELECT t.id, t.attempts FROM tasks t
            WHERE t.status = 'processing' AND t.worker_id = %s
              AND skiplock_handed_at(t.worker_id, t.id, t.attempts) IS NOT NULL
            """,
            (worker_id,),
        ).fetchall()
        return frozenset((r["id"], r["attempts"]) for r in rows)

    def kill_task_process(self, proc: subprocess.Popen) -> Kill | None:
        """SIGKILL one task process of a worker: at most the one task it runs is re-run."""
        children = self.task_processes(proc)
        if not children:
            return None
        victim = random.choice(children)
        try:
            victim.suspend()
            in_flight = self.in_flight(pids={victim.pid})
            kill = Kill(self.worker_id(proc), self.db_now(), in_flight, unseen_start=in_flight == 0)
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


# --- sampling limits --------------------------------------------------------------------------------


# One snapshot per sample: the most tasks of one (owner, concurrency_key) processing (claimed or
# running), and the most running of one key limit as task_limit_usage counts it (admitted and
# runnable, or processing).
_LIMIT_SAMPLE_SQL = """
SELECT
    (SELECT coalesce(max(n), 0) FROM (
        SELECT count(*) AS n FROM tasks
        WHERE status = 'processing' AND concurrency_key IS NOT NULL
        GROUP BY coalesce(owner_key_id, 0), concurrency_key) p) AS processing,
    (SELECT coalesce(max(running), 0) FROM task_limit_usage WHERE scope = 'key') AS running,
    (SELECT string_agg(format('%%s/%%s: processing %%s', coalesce(owner_key_id, 0), concurrency_key, n), ', ')
     FROM (SELECT owner_key_id, concurrency_key, count(*) AS n FROM tasks
           WHERE status = 'processing' AND concurrency_key IS NOT NULL
           GROUP BY 1, 2 HAVING count(*) > %(limit)s) o) AS over
"""


class LimitSampler:
    """Samples the running count of every concurrency key from the database every `interval`
    seconds, on a connection of its own, until stopped: the most seen, and every sample above
    `limit` (what it saw)."""

    def __init__(self, database_url: str, limit: int, interval: float = 0.01):
        self.limit = limit
        self.interval = interval
        self.samples = 0
        self.most_processing = 0
        self.most_running = 0
        self.over: list[str] = []
        self.seconds = 0.0
        self._conn = psycopg.connect(database_url, autocommit=True, row_factory=dict_row)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = next_at = time.monotonic()
        while not self._stop.is_set():
            row = self._conn.execute(_LIMIT_SAMPLE_SQL, {"limit": self.limit}).fetchone()
            self.samples += 1
            self.most_processing = max(self.most_processing, row["processing"])
            self.most_running = max(self.most_running, row["running"])
            if row["processing"] > self.limit or row["running"] > self.limit:
                self.over.append(f"processing {row['processing']}, running {row['running']}: {row['over']}")
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        self.seconds = time.monotonic() - started

    def __enter__(self) -> LimitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self._conn.close()

    def summary(self) -> str:
        every = 1000 * self.seconds / max(1, self.samples)
        return (
            f"{self.samples} samples (one per {every:.0f} ms); most of one key: processing "
            f"{self.most_processing}, task_limit_usage.running {self.most_running} (limit {self.limit})"
        )


# --- judging ------------------------------------------------------------------------------------


def wait_all_final(conn: psycopg.Connection, ids: list[int], timeout: float) -> int:
    """Wait until every task in ids is final; returns how many are not (0 on success)."""
    deadline = time.monotonic() + timeout
    while True:
        left = conn.execute(
            "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND NOT status::text = ANY(%s)",
            (ids, list(FINAL_STATUSES)),
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
    tally: Tally | None = None,
    timeout: float = 120,
    planned_executions: int | None = None,
) -> Report:
    """Check the invariants and fill in the report: every acknowledged task final and stored,
    at most one result each, no attempt charged without an execution, an empty self-audit, extra
    executions within what was in flight at the faults, and a dead worker's tasks rescued in time.

    Executions of `tally` tasks are counted from the tally (what really ran); other tasks count
    their attempts that ran (any outcome but released). planned_executions: executions expected
    without any fault (default: one per task)."""
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
    ran = tally.executions() if tally is not None else Counter()
    per_task = conn.execute(
        """
        SELECT t.id, t.task_type = 'tally' AS tallied,
               count(a.id) FILTER (WHERE a.outcome::text <> 'released') AS ran,
               count(a.id) FILTER (WHERE a.outcome::text NOT IN ('released', 'handed_back')) AS charged
        FROM tasks t LEFT JOIN task_attempts a ON a.task_id = t.id
        WHERE t.id = ANY(%s) GROUP BY t.id
        """,
        (acknowledged,),
    ).fetchall()
    executions = sum(ran[r["id"]] if r["tallied"] and tally is not None else r["ran"] for r in per_task)
    if tally is not None:
        report.charged_without_start, excused = charged_unseen(conn, acknowledged, tally, kills)
        if excused:
            report.notes = f"{excused} charged attempt(s) excused (in a dead worker's hands, or killed before the task's first line); "
    planned = len(acknowledged) if planned_executions is None else planned_executions
    report.extra_executions = max(0, executions - planned)
    report.audit_violations = conn.execute("SELECT count(*) AS n FROM task_invariant_violations").fetchone()[
        "n"
    ]
    outcomes = conn.execute(
        """
        SELECT outcome::text AS outcome, count(*) AS n FROM task_attempts
        WHERE task_id = ANY(%s) AND outcome <> 'completed' GROUP BY 1 ORDER BY 1
        """,
        (acknowledged,),
    ).fetchall()
    if outcomes:
        # How attempts ended early (for the diagnosis, not the verdict).
        report.notes += "early ends: " + ", ".join(f"{o['outcome']} {o['n']}" for o in outcomes)
    report.in_flight_at_faults = sum(k.in_flight for k in kills)
    report.faults = max(report.faults, len(kills))
    # How long each task a worker held stayed with it after the worker died or froze: from the
    # latest fault of that worker before the rescue to the rescue (database clock).
    rescued = conn.execute(
        """
        SELECT worker_id, finished_at FROM task_attempts
        WHERE outcome IN ('lost', 'released') AND task_id = ANY(%s) AND error NOT LIKE 'worker shut down%%'
        """,
        (acknowledged,),
    ).fetchall()
    # A rescue comes within a rescue interval of the fault, give or take a second of scheduling:
    # two at reduced size, where the scenario shares the CPU with the rest of the suite (`make
    # test` runs two test processes on two cores; `make chaos` judges it alone).
    slack = RESCUE_SLACK_SECONDS if FULL else 2 * RESCUE_SLACK_SECONDS
    lease_bound = settings.lease_seconds + settings.rescue_interval_seconds + slack
    session_bound = settings.rescue_interval_seconds + slack
    waits, in_time = [], True
    for attempt in rescued:
        faults = [k for k in kills if k.worker_id == attempt["worker_id"] and k.at <= attempt["finished_at"]]
        if faults:
            fault = max(faults, key=lambda k: k.at)
            wait = (attempt["finished_at"] - fault.at).total_seconds()
            bound = session_bound if fault.session_ended else lease_bound
            waits.append((wait, bound))
            in_time &= wait <= bound
    if waits:
        report.max_until_rescued, report.rescue_bound = max(waits)
    ok = (
        report.lost == 0
        and report.duplicated == 0
        and report.charged_without_start == 0
        and report.audit_violations == 0
        and report.extra_executions <= report.in_flight_at_faults
        and in_time
    )
    report.verdict = "PASS" if ok else "FAIL"
    REPORTS.append(report)
    return report


def charged_unseen(conn, acknowledged: list[int], tally: Tally, kills: list[Kill]) -> tuple[int, int]:
    """Attempts of tally tasks charged (any outcome but released and handed back) that the tally
    never saw start: (how many, how many of them a kill explains). A kill of a task process with
    no start open in it explains one crashed attempt of its worker ended after it (see
    Kill.unseen_start); a worker's death explains the lost attempts it had in hand (Kill.in_hand);
    every other one is a task charged that never ran."""
    started = tally.started()
    unseen = [
        a
        for a in conn.execute(
            """
            SELECT a.task_id, a.attempt, a.worker_id, a.finished_at, a.outcome::text AS outcome
            FROM task_attempts a JOIN tasks t ON t.id = a.task_id
            WHERE a.task_id = ANY(%s) AND t.task_type = 'tally'
              AND a.outcome::text NOT IN ('released', 'handed_back')
            ORDER BY a.finished_at
            """,
            (acknowledged,),
        ).fetchall()
        if (a["task_id"], a["attempt"]) not in started
    ]
    windows = sorted((k for k in kills if k.unseen_start), key=lambda k: k.at)
    excused = 0
    in_hand = {(k.worker_id, *ref) for k in kills for ref in k.in_hand}
    handed = [
        a
        for a in unseen
        if a["outcome"] == "lost" and (a["worker_id"], a["task_id"], a["attempt"]) in in_hand
    ]
    unseen = [a for a in unseen if a not in handed]
    for attempt in unseen:
        window = next(
            (
                k
                for k in windows
                if attempt["outcome"] == "crashed"
                and k.worker_id == attempt["worker_id"]
                and k.at <= attempt["finished_at"]
            ),
            None,
        )
        if window is not None:
            windows.remove(window)
            excused += 1
    return len(unseen) - excused, excused + len(handed)


def assert_passed(report: Report) -> None:
    assert report.lost == 0, report
    assert report.duplicated == 0, report
    assert report.charged_without_start == 0, report
    assert report.audit_violations == 0, report
    assert report.extra_executions <= report.in_flight_at_faults, report
    assert report.verdict == "PASS", report
