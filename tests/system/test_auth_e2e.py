"""API keys as deployed: real gunicorn processes (tests.chaos.faults.start_gunicorn) over real HTTP,
one Postgres. Rate limits shared by every process and every API host, concurrent idempotent
submits, chunked bodies, revocation seen by every process, and the auth modes at start-up.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import pytest
from werkzeug.http import HTTP_STATUS_CODES

from skiplock import keys as key_admin
from tests.helpers import (
    ROOT,
    Http,
    free_port,
    row_count,
    settings_env,
    start_gunicorn,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.slow


class KeyHttp(Http):
    """tests.helpers.Http (one connection per request, no keep-alive) that sends a key's token and
    any other headers."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 10):
        super().__init__(base, timeout)
        self.token = token

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), json.loads(err.read() or b"null")


@pytest.fixture
def gunicorn(auth_settings):
    """gunicorn(workers=2, env=None, **settings_overrides) -> (process, base URL); stopped after."""
    started: list[subprocess.Popen] = []

    def start(workers: int = 2, env: dict | None = None, **overrides) -> tuple[subprocess.Popen, str]:
        proc, http = start_gunicorn(replace(auth_settings, **overrides), workers=workers, quiet=True, env=env)
        started.append(proc)
        return proc, http.base

    yield start
    for proc in started:
        stop_process(proc)


# --- rate limits across processes and hosts ----------------------------------------------------


@dataclass
class Hammered:
    codes: Counter = field(default_factory=Counter)
    per_target: dict[str, Counter] = field(default_factory=dict)
    errors: int = 0
    first_sent: float = float("inf")
    last_answered: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def duration(self) -> float:
        return self.last_answered - self.first_sent


def hammer(targets: list[KeyHttp], threads: int, seconds: float) -> Hammered:
    """`threads` clients (split evenly over the targets) submitting as fast as they can for
    `seconds`, all starting together."""
    seen = Hammered(per_target={t.base: Counter() for t in targets})
    barrier = threading.Barrier(threads)

    def client(http: KeyHttp):
        barrier.wait()
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            sent = time.monotonic()
            try:
                code = http.request("POST", "/api/submit-task", {"task_input": "hammer"})[0]
            except OSError:
                code = None
            answered = time.monotonic()
            with seen.lock:
                seen.first_sent = min(seen.first_sent, sent)
                seen.last_answered = max(seen.last_answered, answered)
                if code is None:
                    seen.errors += 1
                else:
                    seen.codes[code] += 1
                    seen.per_target[http.base][code] += 1

    workers = [threading.Thread(target=client, args=(targets[n % len(targets)],)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60)
    return seen


def assert_rate_held(seen: Hammered, conn, rate: float, burst: int) -> None:
    expected = burst + rate * seen.duration
    accepted = seen.codes[202]
    # The same window on the database's clock (the bucket's), for the diagnosis of a failure.
    stored = conn.execute(
        "SELECT count(*) AS n, extract(epoch FROM max(created_at) - min(created_at)) AS s FROM tasks"
    ).fetchone()
    print(
        f"accepted {accepted} in {seen.duration:.2f} s (expected {expected:.1f}); answers {dict(seen.codes)}; "
        f"{stored['n']} stored, created over {stored['s'] or 0:.2f} s (database clock)"
    )
    assert seen.errors == 0
    assert set(seen.codes) == {202, 429}, seen.codes
    assert seen.codes[429] > 2 * accepted  # the clients really asked for more than the limit
    assert abs(accepted - expected) <= 0.10 * expected, (accepted, expected)
    assert row_count(conn) == accepted  # the refused ones stored nothing


def test_a_rate_limit_holds_across_the_processes_of_one_api(gunicorn, conn):
    rate, burst = 20, 20
    key = key_admin.create_key(conn, name="hammer", rate_per_second=rate, burst=burst)
    _, base = gunicorn(workers=4)
    seen = hammer([KeyHttp(base, key["token"])], threads=8, seconds=6)
    assert_rate_held(seen, conn, rate, burst)


def test_a_rate_limit_is_shared_by_two_api_hosts(gunicorn, conn):
    rate, burst = 20, 20
    key = key_admin.create_key(conn, name="hammer", rate_per_second=rate, burst=burst)
    bases = [gunicorn(workers=2)[1], gunicorn(workers=2)[1]]
    seen = hammer([KeyHttp(base, key["token"]) for base in bases], threads=8, seconds=6)
    assert_rate_held(seen, conn, rate, burst)
    for base in bases:  # both hosts served the key, and neither had a limit of its own
        assert seen.per_target[base][202] >= 0.25 * seen.codes[202], seen.per_target


# --- idempotency under concurrency -------------------------------------------------------------


def test_concurrent_submits_with_one_idempotency_key_make_one_task(gunicorn, conn):
    key = key_admin.create_key(conn, name="retrier")
    _, base = gunicorn(workers=4)
    http = KeyHttp(base, key["token"])
    barrier = threading.Barrier(10)
    answers = []
    lock = threading.Lock()

    def submit():
        barrier.wait()
        answer = http.request(
            "POST",
            "/api/tasks",
            {"task_type": "noop", "task_input": {"order": 42}},
            headers={"Idempotency-Key": "order-42"},
        )
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 10
    assert [code for code, _, _ in answers] == [202] * 10, answers
    assert len({body["task_id"] for _, _, body in answers}) == 1
    assert len({json.dumps(body, sort_keys=True) for _, _, body in answers}) == 1
    replayed = sorted(headers.get("Idempotent-Replayed", "-") for _, headers, _ in answers)
    assert replayed == ["-"] + ["true"] * 9
    assert row_count(conn) == 1
    assert conn.execute("SELECT count(*) AS n FROM task_idempotency_keys").fetchone()["n"] == 1


# --- chunked bodies ----------------------------------------------------------------------------


def chunked_post(base: str, path: str, token: str, body: bytes, chunk: int = 1000) -> tuple[int, dict]:
    """POST `body` with Transfer-Encoding: chunked (no Content-Length) over a raw socket; the
    answer's status and JSON body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        data = head.encode()
        for start in range(0, len(body), chunk):
            piece = body[start : start + chunk]
            data += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        data += b"0\r\n\r\n"
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # the server may answer before reading it all
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk_read := sock.recv(65536):
                answer += chunk_read
    head, _, payload = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), answer[:200]
    return int(status_line.split()[1]), json.loads(payload)


def test_a_chunked_body_over_the_limit_is_413_and_a_small_one_is_accepted(gunicorn, conn):
    key = key_admin.create_key(conn, name="chunky")
    limit = 4000
    _, base = gunicorn(workers=1, max_body_bytes=limit)
    big = json.dumps({"task_input": "x" * (3 * limit)}).encode()
    code, body = chunked_post(base, "/api/submit-task", key["token"], big)
    assert code == 413, body
    assert body["code"] == 413 and body["status"] == HTTP_STATUS_CODES[413] and body["message"]
    assert row_count(conn) == 0

    small = json.dumps({"task_input": {"text": "y" * 1500}}).encode()
    code, body = chunked_post(base, "/api/submit-task", key["token"], small, chunk=100)
    assert code == 202, body
    stored = conn.execute(
        "SELECT input, owner_key_id FROM tasks WHERE id = %s", (body["task_id"],)
    ).fetchone()
    assert stored == {"input": {"text": "y" * 1500}, "owner_key_id": key["id"]}


# --- revocation, seen by every process --------------------------------------------------------


def access_log(path) -> list[tuple[int, int, str]]:
    """(pid, status, probe) of every request gunicorn logged so far."""
    out = []
    for line in path.read_text().splitlines():
        match = re.match(r"^<(\d+)> (\d+) (\S+)$", line)
        if match:
            out.append((int(match.group(1)), int(match.group(2)), match.group(3)))
    return out


def test_a_revoked_key_is_refused_by_every_process_within_5_s(gunicorn, conn, tmp_path):
    log = tmp_path / "access.log"
    key = key_admin.create_key(conn, name="soon revoked")
    proc, base = gunicorn(
        workers=2,
        env={
            "SKIPLOCK_ACCESS_LOG": str(log),
            "GUNICORN_CMD_ARGS": "--access-logformat '%(p)s %(s)s %({x-probe}i)s'",
        },
    )
    worker_pids = {p.pid for p in psutil.Process(proc.pid).children()}
    assert len(worker_pids) == 2
    http = KeyHttp(base, key["token"])

    # Warm every process's cache: requests until both have answered the key.
    def both_served() -> bool:
        for _ in range(5):
            assert http.request("GET", "/api/tasks?limit=1", headers={"x-probe": "warm"})[0] == 200
        return {pid for pid, code, _ in access_log(log) if code == 200} == worker_pids

    wait_until(both_served, timeout=20, interval=0, message="both gunicorn workers to serve the key")

    key_admin.revoke_key(conn, key_id=key["id"])
    revoked = time.monotonic()
    sent: dict[str, float] = {}

    def both_refuse() -> bool:
        probe = f"r{len(sent)}"
        sent[probe] = time.monotonic() - revoked
        http.request("GET", "/api/tasks?limit=1", headers={"x-probe": probe})
        return {pid for pid, code, p in access_log(log) if code == 401 and p in sent} == worker_pids

    wait_until(both_refuse, timeout=10, interval=0.01, message="every process to refuse the revoked key")
    answered = [(pid, code, sent[p]) for pid, code, p in access_log(log) if p in sent]
    first_refusal = {pid: min(t for p, c, t in answered if p == pid and c == 401) for pid in worker_pids}
    print(f"{len(answered)} requests after the revocation; first refusal per process: {first_refusal}")
    assert max(first_refusal.values()) <= 5.0
    for pid, code, at in answered:
        assert code in (200, 401)
        if code == 200:  # still cached: only before this process's first refusal, and within 5 s
            assert at < first_refusal[pid] and at <= 5.0
    assert proc.poll() is None and {p.pid for p in psutil.Process(proc.pid).children()} == worker_pids


# --- modes at start-up -------------------------------------------------------------------------


@dataclass
class Launched:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def launch(settings, tmp_path):
    """launch(binds, env=..., drop=...) -> `gunicorn -c gunicorn.conf.py wsgi:app` with one
    worker, these -b binds and the settings' environment changed by env (drop: names removed);
    its output in a file; stopped after."""
    started: list[subprocess.Popen] = []

    def start(binds: list[str], env: dict | None = None, drop: tuple[str, ...] = ()) -> Launched:
        environment = {**settings_env(settings), **(env or {})}
        for name in drop:
            environment.pop(name, None)
        log = tmp_path / f"gunicorn-{len(started)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "1"]
                + [arg for bind in binds for arg in ("-b", bind)]
                + ["wsgi:app"],
                cwd=ROOT,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        return Launched(proc, log)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_up(launched: Launched, port: int) -> KeyHttp:
    http = KeyHttp(f"http://127.0.0.1:{port}")

    def up():
        assert launched.proc.poll() is None, launched.output()
        try:
            return http.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    wait_until(up, timeout=30, message="gunicorn to answer")
    return http


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("how", ["-b 0.0.0.0", "SKIPLOCK_BIND=0.0.0.0", "loopback and public"])
def test_auth_off_on_a_public_address_refuses_to_start(launch, how):
    port, other = free_port(), free_port()
    env = {"SKIPLOCK_AUTH": "off", "SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND": "0"}
    binds = {
        "-b 0.0.0.0": [f"0.0.0.0:{port}"],
        "SKIPLOCK_BIND=0.0.0.0": [],
        "loopback and public": [f"127.0.0.1:{other}", f"0.0.0.0:{port}"],
    }[how]
    if not binds:
        env["SKIPLOCK_BIND"] = f"0.0.0.0:{port}"
    launched = launch(binds, env=env)
    code = launched.proc.wait(30)
    output = launched.output()
    assert code != 0, output
    assert "SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND" in output
    assert "refusing to start" in output and f"0.0.0.0:{port}" in output
    assert "Traceback" not in output
    assert not listening(port) and not listening(other)


def test_auth_off_on_a_public_address_starts_when_insisted_on(launch):
    port = free_port()
    launched = launch(
        [f"0.0.0.0:{port}"], env={"SKIPLOCK_AUTH": "off", "SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND": "1"}
    )
    http = wait_up(launched, port)
    code, _, body = http.request("POST", "/api/submit-task", {"task_input": "anyone"})
    assert code == 202, body
    assert http.request("GET", "/api/tasks")[0] == 200
    assert f"authentication is OFF on 0.0.0.0:{port}" in launched.output()
    launched.proc.send_signal(signal.SIGTERM)
    assert launched.proc.wait(20) == 0


def test_auth_off_on_loopback_starts_and_says_so(launch):
    port = free_port()
    launched = launch([f"127.0.0.1:{port}"], env={"SKIPLOCK_AUTH": "off"})
    http = wait_up(launched, port)
    assert http.request("GET", "/api/tasks")[0] == 200
    assert http.request("GET", "/api/keys")[0] == 200  # with auth off, everyone is the admin
    output = launched.output()
    assert "authentication is OFF" in output
    assert "refusing" not in output


def test_without_skiplock_auth_set_keys_are_required(launch, conn):
    port = free_port()
    launched = launch([f"127.0.0.1:{port}"], drop=("SKIPLOCK_AUTH", "SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND"))
    http = wait_up(launched, port)
    code, headers, body = http.request("GET", "/api/tasks")
    assert code == 401, body
    assert headers["WWW-Authenticate"] == 'Bearer realm="skiplock"'
    assert http.request("POST", "/api/submit-task", {"task_input": 1})[0] == 401
    assert row_count(conn) == 0
    http.token = key_admin.create_key(conn, name="default mode")["token"]
    assert http.request("GET", "/api/tasks")[0] == 200
    assert "authentication is OFF" not in launched.output()
