"""The bench's shared harness: fresh databases, starting and stopping gunicorn and worker.py,
HTTP load (wrk, one POST), and the rows, facts and plots the report is made of."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from skiplock import embedded  # noqa: E402
from skiplock.db import apply_schema  # noqa: E402

DOCS = ROOT / "docs"
BENCH = ROOT / "bench"


@dataclass
class Row:
    measure: str
    skiplock: str
    baseline: str
    ratio: float | None
    target: str
    ok: bool | None

    @property
    def verdict(self) -> str:
        return "-" if self.ok is None else ("PASS" if self.ok else "FAIL")


ROWS: list[Row] = []
FACTS: dict[str, str] = {}
PLOTS: dict[str, object] = {}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- infrastructure ---------------------------------------------------------------------------


def server(url_variable: str, purpose: str) -> tuple[str, Path | None]:
    """The server to measure on: the one `url_variable` names (its admin URL), else an embedded
    one of our own in a temporary folder. Returns (admin URL, that folder or None)."""
    admin_url = os.environ.get(url_variable)
    if admin_url:
        return admin_url, None
    data_root = Path(tempfile.mkdtemp(prefix=f"skiplock-{purpose}-pg-"))
    return embedded.start(data_root / "pgdata", keep_data=False, database=None), data_root


class Databases:
    """Fresh databases on one server, each dropped at the end."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.created: list[str] = []

    def fresh(self, purpose: str) -> str:
        self.settle()
        name = f"skiplock_bench_{purpose}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        url = make_conninfo(self.admin_url, dbname=name)
        apply_schema(url)
        return url

    def drop(self, url: str) -> None:
        """Drop a measure's database as soon as it is done: its autovacuum must not take CPU
        from the next measure."""
        name = conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    def settle(self) -> None:
        """Between measures: write out what the last one left dirty (a CHECKPOINT), so that its
        disk traffic does not stall the next one's commits."""
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.Error as exc:  # not allowed for this role: measure anyway
            log(f"  (no CHECKPOINT between measures: {str(exc).strip()})")

    def drop_all(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(url: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py"), "--log-level", "WARNING", *args],
        cwd=ROOT,
        env=env,
    )


def start_gunicorn(
    app: str, url: str | None, *options: str, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """`app` under gunicorn.conf.py; `options` override its settings (as on the command line).
    Authentication is off unless `env` turns it on: most measures are of the engine."""
    port = free_port()
    env = {"SKIPLOCK_AUTH": "off", **os.environ, "PYTHONPATH": f"{ROOT}:{BENCH}", **(env or {})}
    if url:
        env["DATABASE_URL"] = url
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(ROOT / "gunicorn.conf.py"),
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            *options,
            app,
        ],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            post(base + "/api/submit-task", {"task_type": "noop", "task_input": None})
            return proc, base
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gunicorn {app} did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post(url: str, body, headers: dict | None = None) -> tuple[int, object]:
    """One JSON POST on a fresh connection (gunicorn's sync workers close it after the answer),
    with http.client: urllib's extra layers would be timed as part of skiplock's latency."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(
            "POST",
            parts.path,
            body=json.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class KeptConnection:
    """JSON POSTs on one kept-alive connection, as a client with a session (requests.Session,
    httpx.Client, skiplock's generated client) sends them; opened again if the server closed it."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body) -> tuple[int, object]:
        for tries_left in (1, 0):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.conn.request(
                    "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
                )
                response = self.conn.getresponse()
                return response.status, json.loads(response.read())
            except (http.client.RemoteDisconnected, ConnectionError):
                self.close()
                if not tries_left:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def family_peak_rss(pid: int) -> dict[str, float]:
    import psutil

    parent = psutil.Process(pid)
    children = parent.children(recursive=True)
    return {
        "parent": peak_rss_mib(pid),
        "children_max": max((peak_rss_mib(c.pid) for c in children), default=0.0),
        "children": len(children),
    }


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


# --- measures ---------------------------------------------------------------------------------


def embedded_bin(name: str) -> Path:
    from pgserver._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH / name


def wrk(
    url: str,
    seconds: int,
    connections: int = 16,
    *,
    token: str | None = None,
    script: str = "post.lua",
    script_args: tuple[str, ...] = (),
) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) for one-task POSTs (with an API key if `token`); `script_args`
    go to the script's init()."""
    headers = ["-H", f"Authorization: Bearer {token}"] if token else []
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            *headers,
            "-s",
            str(BENCH / script),
            url,
            *(["--", *script_args] if script_args else []),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def ms(pct: str) -> float:
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses:\n{out}")
    return rps, ms("50"), ms("99")


WARM_UP_SECONDS = 2


def serve_and_load(
    app: str,
    url: str | None,
    seconds: int,
    *options: str,
    record_rss: bool = False,
    env: dict | None = None,
    token: str | None = None,
    script: str = "post.lua",
    script_args: tuple[str, ...] = (),
):
    """(requests/s, p50 ms, p99 ms) of wrk (`script`, default one noop task per POST) against
    `app` under gunicorn.conf.py (+ options)."""
    server, base = start_gunicorn(app, url, *options, env=env)
    load = {"token": token, "script": script, "script_args": script_args}
    try:
        # Warm-up, not counted: start_gunicorn returns once one worker answers, while the others
        # may still be importing the app on the same 2 cores; the target is the steady state.
        wrk(base + "/api/submit-task", WARM_UP_SECONDS, **load)
        result = wrk(base + "/api/submit-task", seconds, **load)
        if record_rss:
            FACTS["gunicorn workers peak RSS"] = f"{family_peak_rss(server.pid)['children_max']:.0f} MiB each"
        return result
    finally:
        stop(server)


def median_and_spread(values: list[float]) -> tuple[float, str]:
    """The median of a repeated measure, and its range for the facts (how noisy the run was)."""
    return statistics.median(values), f"{min(values):,.0f}-{max(values):,.0f}"


def cost_row(
    name: str, measured: list[float], baseline: list[float], unit: str, baseline_is: str, minimum: float
) -> tuple[float, float]:
    """A row for a feature's cost: the medians of rounds with it and without (`baseline_is` says
    what the baseline lacks), their ranges, and the ratio against `minimum`. Returns the medians."""
    value, value_spread = median_and_spread(measured)
    base, base_spread = median_and_spread(baseline)
    ratio = value / base
    ROWS.append(
        Row(
            name,
            f"{value:,.0f} {unit} ({value_spread})",
            f"{base:,.0f} {unit} ({base_spread}, {baseline_is})",
            ratio,
            f">= {minimum:.0%}",
            ratio >= minimum,
        )
    )
    return value, base


# The design skiplock does not use, measured for reference: threads, and one commit per group.
