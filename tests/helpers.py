"""What the test tiers share, one definition each: waiting, the database as a DBA sees it, acting
as a worker (attempt by attempt, or a task at a time), notifications, the API's error shape, the
CLI's exits, and real processes (worker.py, gunicorn on a free port).

Fixtures live in tests/conftest.py (databases, settings, apps, workers) and in a tier's own
conftest.py (tests/api/conftest.py: keys and callers)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from werkzeug.http import HTTP_STATUS_CODES

from skiplock.db import connect
from skiplock.settings import Settings
from skiplock.sql.admission import Admitted, admission_try_lock, task_admit
from skiplock.sql.claim import ClaimedTask, task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_start_many,
)
from skiplock.sql.inserts import task_insert
from skiplock.sql.keys import api_key_insert
from skiplock.sql.tasks import task_attempts_list
from skiplock.sql.workers import task_rescue

ROOT = Path(__file__).resolve().parent.parent
# Prefix of every database the tests create (and the only ones they drop).
TEST_DB_PREFIX = "skiplock_test_"
# Under pytest-xdist (pytest -n): the worker this process is (gw0, gw1...).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
# A server nobody listens on: what a command or an app sees when the database is down.
UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/nowhere"


def new_database_name(kind: str = "") -> str:
    """A name for a database a test creates: the prefix, the xdist worker (so that a leftover
    database tells whose it was), what it is for, and a random part (never the same twice, even
    across concurrent sessions on one server)."""
    worker = f"{XDIST_WORKER}_" if XDIST_WORKER else ""
    kind = f"{kind}_" if kind else ""
    return f"{TEST_DB_PREFIX}{worker}{kind}{uuid.uuid4().hex[:12]}"


@contextmanager
def cloned_database(server_url: str, template_db: str, kind: str = "") -> Iterator[str]:
    """A database cloned from the schema template (as tests/conftest.py's, for a wider scope),
    dropped after; yields its URL."""
    name = new_database_name(kind)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- waiting -------------------------------------------------------------------------------------


def run_async(coroutine):
    """asyncio.run(coroutine) in a thread of its own: this thread may already have an event loop
    running (Playwright's sync API leaves one in each process that drove a browser)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # raised again in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> int:
    """SIGTERM (a gunicorn master or a worker stops its own children), SIGKILL if it lingers
    past `grace` seconds; its exit status."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


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


def wait_running(conn: psycopg.Connection, task_id: int, timeout: float = 20.0) -> dict:
    """Until a process runs the task and its start is recorded (claimed is not enough: a claimed
    task may wait in its worker's backlog); returns its row."""
    return wait_until(
        lambda: (row := task_row(conn, task_id))["status"] == "processing" and row["started_at"] and row,
        timeout=timeout,
        message=f"task {task_id} to run",
    )


# --- the database, as a DBA sees it ------------------------------------------------------------


def task_row(conn: psycopg.Connection, task_id: int) -> dict:
    return conn.execute("SELECT *, status::text AS status FROM tasks WHERE id = %s", (task_id,)).fetchone()


def raw_row(conn: psycopg.Connection, task_id: int) -> dict:
    """The row as stored (status as the enum psycopg reads)."""
    return conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,)).fetchone()


def row_count(conn: psycopg.Connection, table: str = "tasks") -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def insert_task(conn: psycopg.Connection, task_type: str = "noop", input=None, **columns) -> int:
    """Insert a task directly, as a DBA (or the API) would."""
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


def insert_many(conn: psycopg.Connection, n: int, **columns) -> list[int]:
    """n pending tasks in one INSERT statement (default columns unless given), as a DBA would
    insert them: due, but without a turn, so not runnable until an admission gives them one
    (admit(); claim() runs one first)."""
    task_type = columns.pop("task_type", "noop")
    queue = columns.pop("queue", "default")
    assert not columns, f"unsupported columns {columns}"
    rows = conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input)
        SELECT %s, %s, to_jsonb(g) FROM generate_series(1, %s) g
        RETURNING id
        """,
        (task_type, queue, n),
    ).fetchall()
    return sorted(r["id"] for r in rows)


def db_now(conn: psycopg.Connection):
    return conn.execute("SELECT clock_timestamp() AS now").fetchone()["now"]


def history(conn: psycopg.Connection, task_id: int) -> list[tuple[int, str, str]]:
    """(attempt, worker_id, outcome) of every ended attempt, oldest first."""
    return [(a["attempt"], a["worker_id"], a["outcome"]) for a in task_attempts_list(conn, task_id)]


def expire_lease(conn: psycopg.Connection, task_id: int) -> None:
    conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (task_id,))


def make_due(conn: psycopg.Connection, task_id: int) -> None:
    conn.execute("UPDATE tasks SET run_at = now() - interval '1 second' WHERE id = %s", (task_id,))


# --- acting as a worker, attempt by attempt (the queue tier) -----------------------------------

LEASE_SECONDS = 30.0
# Large enough that a task failed or rescued in a test is never due again before the test ends.
BACKOFF = {"backoff_base": 10.0, "backoff_max": 25.0}


def admit(conn: psycopg.Connection) -> Admitted:
    """One admission, as a worker runs before it claims: due tasks inserted or set back to
    pending by hand get their turn, tasks under a limit are admitted as far as it allows. Fails
    the test if another session holds the admission lock."""
    done = try_admit(conn)
    assert done is not None, "another session holds the admission lock"
    return done


def try_admit(conn: psycopg.Connection) -> Admitted | None:
    """One admission unless another session holds the lock (then None), as a worker does: it
    skips admission while another worker admits. Inside an open transaction of `conn` the lock
    is held until that transaction ends."""
    with conn.transaction():
        if not admission_try_lock(conn):
            return None
        return task_admit(conn)


def claim(conn: psycopg.Connection, worker_id: str = "w1", limit: int = 10, **kwargs) -> list[ClaimedTask]:
    """An admission (skipped while another session admits), then a claim: what a worker's turn
    does."""
    kwargs.setdefault("lease_seconds", LEASE_SECONDS)
    try_admit(conn)
    return task_claim(conn, worker_id=worker_id, limit=limit, **kwargs)


def add_key(conn: psycopg.Connection, name: str = "client", weight: float = 1.0, **columns) -> int:
    """An API key row (a client of the queue, an owner of tasks) with a random token digest;
    returns its id. The engine tiers need no token."""
    digest = os.urandom(32)
    row = api_key_insert(
        conn, name=name, role=columns.pop("role", "client"), prefix=f"skl_{digest.hex()[:8]}",
        token_sha256=digest, weight=weight, **columns,
    )  # fmt: skip
    return row["id"]


def ids(tasks: list[ClaimedTask]) -> list[int]:
    return [t.id for t in tasks]


def rescue(conn: psycopg.Connection, limit: int = 100, grace_seconds: float = 0.5) -> dict[int, str]:
    """{task id: new status} of what a rescue took back."""
    rows = task_rescue(conn, limit=limit, grace_seconds=grace_seconds, **BACKOFF)
    return {r["id"]: r["status"] for r in rows}


def start(conn: psycopg.Connection, worker_id: str, ref: AttemptRef, ago: float = 0.0) -> set[int]:
    """Mark an attempt started (a process began running it `ago` seconds ago)."""
    return task_start_many(conn, worker_id=worker_id, started_ago={ref: ago})


def complete(
    conn: psycopg.Connection, worker_id: str, ref: AttemptRef, result: str = '{"ok": true}'
) -> set[int]:
    return task_complete_many(conn, worker_id=worker_id, results=[(ref, result)])


def fail(
    conn: psycopg.Connection, worker_id: str, ref: AttemptRef, outcome: str = "failed", error: str = "boom"
) -> dict:
    failure = AttemptFailure(
        ref.task_id, ref.attempt, outcome, error, "Traceback (most recent call last): ..."
    )
    return task_fail_many(conn, worker_id=worker_id, failures=[failure], **BACKOFF)


def backoff_seconds(conn: psycopg.Connection, task_id: int) -> float:
    """How far the last failure pushed run_at, measured from that failure on the database clock."""
    row = task_row(conn, task_id)
    ended = task_attempts_list(conn, task_id)[-1]
    return (row["run_at"] - ended["finished_at"]).total_seconds()


def claim_only(conn: psycopg.Connection, task_id: int, worker_id: str = "w1") -> AttemptRef:
    """Claim the only due task, which must be task_id."""
    [task] = claim(conn, worker_id=worker_id)
    assert task.id == task_id
    return AttemptRef(task.id, task.attempt)


def claim_and_start(conn: psycopg.Connection, task_id: int, worker_id: str = "w1") -> AttemptRef:
    """Claim the only due task, which must be task_id, and start it."""
    ref = claim_only(conn, task_id, worker_id=worker_id)
    assert start(conn, worker_id, ref) == {task_id}
    return ref


# --- acting as a worker, a task at a time (the API, dashboard and metrics tiers) ---------------

# The worker id these helpers act as.
WORKER = "test-worker:1"


def run_attempt(
    conn: psycopg.Connection, task_id: int, queue: str | None = None, started_ago: float = 0
) -> int:
    """Claim the next due task (of `queue`, else of any) and start it, as a worker would; it must
    be `task_id`. Returns the attempt number."""
    admit(conn)
    claimed = task_claim(conn, worker_id=WORKER, limit=1, lease_seconds=60, queues=[queue] if queue else None)
    assert [t.id for t in claimed] == [task_id]
    ref = AttemptRef(task_id, claimed[0].attempt)
    assert task_start_many(conn, worker_id=WORKER, started_ago={ref: started_ago}) == {task_id}
    return claimed[0].attempt


def complete_task(conn: psycopg.Connection, task_id: int, result) -> None:
    """Run one attempt that completes with `result` (JSON)."""
    attempt = run_attempt(conn, task_id)
    done = task_complete_many(
        conn, worker_id=WORKER, results=[(AttemptRef(task_id, attempt), json.dumps(result))]
    )
    assert done == {task_id}


def fail_task(conn: psycopg.Connection, task_id: int, error: str = "boom") -> str:
    """Run one attempt that fails; returns the task's new status (pending if attempts are left)."""
    attempt = run_attempt(conn, task_id)
    ended = task_fail_many(
        conn,
        worker_id=WORKER,
        failures=[AttemptFailure(task_id, attempt, "failed", error, "Traceback: secret")],
        backoff_base=0.01,
        backoff_max=0.01,
    )
    assert set(ended) == {task_id}, ended
    return ended[task_id]


def claim_refs(
    conn: psycopg.Connection, n: int, queue: str | None = None, lease_seconds: float = 60
) -> list[AttemptRef]:
    """Claim exactly the next n due tasks (of `queue`, else of any), not started."""
    admit(conn)
    claimed = task_claim(
        conn, worker_id=WORKER, limit=n, lease_seconds=lease_seconds, queues=[queue] if queue else None
    )
    assert len(claimed) == n
    return [AttemptRef(t.id, t.attempt) for t in claimed]


def start_all(conn: psycopg.Connection, refs: list[AttemptRef]) -> None:
    assert task_start_many(conn, worker_id=WORKER, started_ago=dict.fromkeys(refs, 0)) == {
        r.task_id for r in refs
    }


def run_and_end(conn: psycopg.Connection, n: int, outcome: str = "completed") -> list[int]:
    """Claim the next n due tasks, start them and complete (or fail for good) each, as a worker
    would; returns their ids."""
    refs = claim_refs(conn, n)
    start_all(conn, refs)
    if outcome == "completed":
        done = task_complete_many(conn, worker_id=WORKER, results=[(r, "null") for r in refs])
        assert done == {r.task_id for r in refs}
    else:
        ended = task_fail_many(
            conn,
            worker_id=WORKER,
            failures=[AttemptFailure(r.task_id, r.attempt, "failed", "boom") for r in refs],
            backoff_base=0.01,
            backoff_max=0.01,
        )
        assert set(ended) == {r.task_id for r in refs}
    return [r.task_id for r in refs]


# --- notifications -------------------------------------------------------------------------------

# Sent after the statements under test; notifications arrive in commit order, so every
# notification those statements sent has arrived once this one has.
MARKER_CHANNEL = "skiplock_test_marker"


@contextmanager
def listening(database_url: str, *channels: str) -> Iterator[psycopg.Connection]:
    with connect(database_url, role="test-listener") as listener:
        for channel in (*channels, MARKER_CHANNEL):
            listener.execute(f"LISTEN {channel}")
        yield listener


def received(conn: psycopg.Connection, listener: psycopg.Connection) -> list[tuple[str, str]]:
    """(channel, payload) of every notification sent before now, in order."""
    conn.execute(f"NOTIFY {MARKER_CHANNEL}")
    got = []
    for notify in listener.notifies(timeout=10):
        if notify.channel == MARKER_CHANNEL:
            return got
        got.append((notify.channel, notify.payload))
    pytest.fail("the marker notification never arrived")


# --- the API through its test client -----------------------------------------------------------

BIGINT_MAX = 2**63 - 1
# The start of every WWW-Authenticate challenge.
REALM = 'Bearer realm="skiplock"'
# The fields of a task's status (GET /api/task-status/{id}, `skiplock status --json`).
STATUS_FIELDS = {
    "task_id", "status", "result", "error", "progress", "attempts", "max_attempts", "task_type",
    "queue", "priority", "timeout_seconds", "created_at", "run_at", "started_at", "finished_at",
}  # fmt: skip
# GET /api/tasks/{id} adds these to a task's status (and task_input).
SCHEDULING_FIELDS = {"fairness_key", "concurrency_key", "unique_key", "expires_at", "waiting_for"}
# What made a task besides a submit (GET /api/tasks/{id}): a schedule's fire.
ORIGIN_FIELDS = {"schedule_id", "scheduled_for"}
# 409 from task-result, cancel and retry: `status` is the task's status.
CONFLICT_FIELDS = {"code", "status", "message", "task_id", "error"}
# A body for each submit endpoint, and how many tasks it makes.
SUBMITS = {
    "/api/submit-task": ({"task_input": {"n": 1}}, 1),
    "/api/tasks": ({"task_type": "noop", "task_input": {"n": 1}}, 1),
    "/api/tasks/batch": ({"tasks": [{"task_type": "noop", "task_input": i} for i in range(3)]}, 3),
}
# Every route that names a task by id: (method, template).
TASK_ROUTES = [
    ("get", "/api/task-status/{}"),
    ("get", "/api/task-result/{}"),
    ("get", "/api/tasks/{}"),
    ("get", "/api/tasks/{}/attempts"),
    ("post", "/api/tasks/{}/cancel"),
    ("post", "/api/tasks/{}/retry"),
]


def assert_error(response, code: int, status: str | None = None) -> dict:
    """The one error shape: JSON {code, status, message[, errors]}; never HTML, never a traceback."""
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code
    assert body["status"] == (status or HTTP_STATUS_CODES[code])
    assert isinstance(body["message"], str) and body["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "<html" not in text.lower()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body_for(url: str, body: dict) -> dict:
    """The REST submits name their task type; the original /api/submit-task defaults it."""
    if url != "/api/submit-task" and "task_type" not in body:
        return {"task_type": "default", **body}
    return body


def raw_for(url: str, raw):
    """The same, for a raw JSON body that starts with task_input."""
    if url != "/api/submit-task" and isinstance(raw, str) and raw.startswith('{"task_input"'):
        return '{"task_type": "default", ' + raw[1:]
    return raw


def submit(client, task_input=None, url="/api/submit-task", **fields):
    """Submit through the test client (auth off); the 202 answer."""
    response = client.post(url, json=body_for(url, {"task_input": task_input, **fields}))
    assert response.status_code == 202, response.get_json()
    return response


def submit_id(client, task_input=None, **fields) -> int:
    return submit(client, task_input, **fields).get_json()["task_id"]


def dig(errors: dict, path: tuple[str, ...]):
    for key in path:
        assert isinstance(errors, dict) and key in errors, f"{path}: {errors}"
        errors = errors[key]
    return errors


def pick(mapping: dict, *keys: str) -> dict:
    return {key: mapping[key] for key in keys}


def nested(levels: int):
    """A JSON array nested `levels` deep."""
    value = 1
    for _ in range(levels):
        value = [value]
    return value


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed


def task_types(client) -> dict[str, dict]:
    """GET /api/task-types, by name."""
    response = client.get("/api/task-types")
    assert response.status_code == 200
    return {t["name"]: t for t in response.get_json()}


def task_owners(conn: psycopg.Connection) -> dict[int, int | None]:
    """Task id -> the id of the key that submitted it."""
    return {r["id"]: r["owner_key_id"] for r in conn.execute("SELECT id, owner_key_id FROM tasks").fetchall()}


@dataclass
class Key:
    """An API key row as created (with its token)."""

    row: dict

    @property
    def id(self) -> int:
        return self.row["id"]

    @property
    def token(self) -> str:
        return self.row["token"]


class Caller:
    """A test client that sends one key's token (or none) with every request."""

    def __init__(self, client, token: str | None):
        self.client = client
        self.token = token

    def _headers(self, headers: dict | None) -> dict:
        out = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        out.update(headers or {})
        return out

    def get(self, url: str, headers: dict | None = None, **kwargs):
        return self.client.get(url, headers=self._headers(headers), **kwargs)

    def post(self, url: str, headers: dict | None = None, **kwargs):
        return self.client.post(url, headers=self._headers(headers), **kwargs)

    def patch(self, url: str, headers: dict | None = None, **kwargs):
        return self.client.patch(url, headers=self._headers(headers), **kwargs)

    def delete(self, url: str, headers: dict | None = None, **kwargs):
        return self.client.delete(url, headers=self._headers(headers), **kwargs)

    def open(self, method: str, url: str, **kwargs):
        return getattr(self, method)(url, **kwargs)

    def submit(self, url: str = "/api/submit-task", body: dict | None = None, headers: dict | None = None):
        return self.post(url, json=SUBMITS[url][0] if body is None else body, headers=headers)

    def submit_id(self, task_input=None, **fields) -> int:
        response = self.post("/api/submit-task", json={"task_input": task_input, **fields})
        assert response.status_code == 202, response.get_json()
        return response.get_json()["task_id"]


# --- the `skiplock` command ------------------------------------------------------------------------

# The console script installed next to this Python.
SCRIPT = Path(sys.executable).parent / "skiplock"


def ok(result) -> str:
    """click's Result of a command that must have succeeded: its stdout."""
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def assert_clean_exit(result, code: int) -> None:
    """The command ended with `code` on purpose (sys.exit or a usage error), with no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def table_rows(output: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the command's table (columns split on runs of 2+ spaces)."""
    lines = [line for line in output.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return header, [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]


# --- processes: worker.py and gunicorn -----------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess (worker.py, gunicorn) these settings."""
    env = dict(os.environ)
    env["DATABASE_URL"] = settings.database_url
    env["PYTHONPATH"] = str(ROOT)
    for name, value in vars(settings).items():
        if name == "database_url":
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        env[f"SKIPLOCK_{name.upper()}"] = str(value)
    return env


def spawn_worker(settings: Settings, *args: str, **popen) -> subprocess.Popen:
    """`python worker.py` as operators run it, with these settings in its environment."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py"), *args],
        cwd=ROOT,
        env=settings_env(settings),
        **popen,
    )


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
    settings: Settings, workers: int = 2, quiet: bool = False, env: dict | None = None
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
        env={**settings_env(settings), **(env or {})},
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


# --- a webhook receiver ---------------------------------------------------------------------------

# The addresses the tests allow webhooks to (SKIPLOCK_WEBHOOK_ALLOW): the receiver's.
LOOPBACK = ("127.0.0.1",)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An HTTP server that records every POST and answers as told: `script` is consumed one
    entry per request ("ok", "500", "slow" (answers after `slow_seconds`), "hang" (never
    answers while the test runs)); once empty, it answers 200."""

    script: list[str] = field(default_factory=list)
    slow_seconds: float = 3.0
    port: int = 0  # 0: any free port
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append(Received(dict(self.headers), body, time.monotonic()))
                    action = receiver.script.pop(0) if receiver.script else "ok"
                if action == "slow":
                    time.sleep(receiver.slow_seconds)
                elif action == "hang":
                    receiver.release.wait(60)
                code = 500 if action == "500" else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if code == 500 else b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/skiplock?source=test"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def copies(self, count: int, timeout: float = 20) -> list[Received]:
        wait_until(lambda: len(self.received) >= count, timeout=timeout, message=f"{count} webhook(s)")
        return list(self.received)


# --- query plans and the self-audit ----------------------------------------------------------------


def plan_nodes(plan: dict) -> Iterator[dict]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, the root first."""
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def indexes_used(plan: dict, relation: str = "tasks") -> set[str]:
    """The indexes through which the plan reads `relation`: index (and index-only) scans, and the
    bitmap index scans under each bitmap heap scan of it."""
    used = set()
    for node in plan_nodes(plan):
        if node.get("Relation Name") != relation:
            continue
        if "Index Name" in node:
            used.add(node["Index Name"])
        elif node["Node Type"] == "Bitmap Heap Scan":
            used |= {n["Index Name"] for n in plan_nodes(node) if n["Node Type"] == "Bitmap Index Scan"}
    return used


def seq_scanned(plan: dict) -> set[str]:
    """The relations the plan reads whole (Seq Scan)."""
    return {
        n["Relation Name"] for n in plan_nodes(plan) if n["Node Type"] == "Seq Scan" and "Relation Name" in n
    }


class Explain:
    """Stands in for a connection: EXPLAINs each statement a query function sends, with its
    parameters, and keeps the plans. analyze: EXPLAIN (ANALYZE, BUFFERS), which runs it: with
    rows, in a transaction (or savepoint) rolled back, so that what it writes is written once.
    rows: then run the statement and answer with its rows, for the functions that need them
    (one_row, a sequence of statements that each read what the last wrote); else the answer has
    none and nothing is written (unless analyze alone)."""

    def __init__(self, conn: psycopg.Connection, analyze: bool = False, rows: bool = False):
        self.conn, self.analyze, self.rows = conn, analyze, rows
        self.plans: list[dict] = []
        self.statements: list[str] = []

    def execute(self, query, params=None, **kwargs):
        options = "ANALYZE, BUFFERS, FORMAT JSON" if self.analyze else "FORMAT JSON"
        with self.conn.transaction(force_rollback=True) if self.analyze and self.rows else nullcontext():
            [row] = self.conn.execute(f"EXPLAIN ({options}) " + query, params).fetchall()
        self.plans.append(row["QUERY PLAN"][0]["Plan"])
        self.statements.append(str(query))
        if self.rows:
            return self.conn.execute(query, params, **kwargs)
        return self.conn.execute("SELECT 1 AS id WHERE false")


def invariant_violations(conn: psycopg.Connection) -> set[tuple[int, str]]:
    """(task id, invariant) of every row of the self-audit view task_invariant_violations."""
    return {(v["task_id"], v["invariant"]) for v in conn.execute("SELECT * FROM task_invariant_violations")}
