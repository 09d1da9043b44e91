"""One webhook sender (`skiplock webhooks`, a process of its own) delivering a backlog of due
deliveries to a fast local receiver: nginx answering 204 (a Python receiver in a process of its
own when nginx is missing). The receiver's own ceiling, wrk against it, is the baseline: a
sender cannot deliver faster than its receiver answers."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from harness import ROOT, ROWS, Databases, Row, connect, free_port, log, stop, wrk

from skiplock.sql.fragments import HOOK_COLUMNS, outbox

# Deliveries/s one sender process must reach (issue 19).
TARGET = 3_000
# The backlog is delivered within this, or the measure fails.
DEADLINE_SECONDS = 120
# wrk's connections against the receiver: as many as the sender's threads (its default).
CEILING_CONNECTIONS = 8
CEILING_SECONDS = 3

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 204; }}
    }}
}}
"""

# The fallback: asyncio, one process, keep-alive; reads each request's body and answers 204.
PYTHON_RECEIVER = textwrap.dedent("""\
    import asyncio, sys

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\\r\\n\\r\\n")
                length = 0
                for line in head.split(b"\\r\\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 204 No Content\\r\\n\\r\\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
        await server.serve_forever()

    asyncio.run(main())
""")


def start_receiver(work: Path) -> tuple[subprocess.Popen, str, str]:
    """(process, URL, what it is): nginx when installed, else the Python receiver."""
    port = free_port()
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if nginx:
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=port))
        proc = subprocess.Popen([nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", "nginx.conf"])
        what = "nginx, 1 worker process"
    else:
        log("  nginx is missing (apt-get install nginx): the receiver is Python (asyncio), a slower ceiling")
        proc = subprocess.Popen([sys.executable, "-c", PYTHON_RECEIVER, str(port)])
        what = "Python asyncio receiver"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("POST", "/", body=b"{}")
            if conn.getresponse().status == 204:
                return proc, f"http://127.0.0.1:{port}/hooks/skiplock", what
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    stop(proc)
    raise RuntimeError(f"the receiver ({what}) did not answer")


def write_backlog(url: str, deliveries: int, callback_url: str) -> None:
    """Completed tasks with a callback and their deliveries, written as the worker's final write
    writes them (HOOK_COLUMNS, the outbox), all due now."""
    with connect(url) as conn:
        conn.execute(
            f"""
            WITH t AS (
                INSERT INTO tasks (task_type, input, status, result, attempts, worker_id, started_at,
                                   finished_at, callback_url)
                SELECT 'noop', 'null', 'completed', jsonb_build_object('n', g), 1, 'bench', now(),
                       now(), %s
                FROM generate_series(1, %s) g
                RETURNING *
            ), changed AS (SELECT t.id, {HOOK_COLUMNS} FROM t), {outbox("changed")}
            SELECT count(*) FROM outboxed
            """,
            (callback_url, deliveries),
        )
        conn.execute("VACUUM ANALYZE tasks, webhook_deliveries")


def delivered_rate(conn, deliveries: int) -> float:
    """Deliveries/s from the first try to the last delivery (database clock); asserts that every
    one was delivered on its first try, recorded."""
    delivered, tries, answered, first, last = conn.execute(
        """
        SELECT (SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'),
               count(*), count(*) FILTER (WHERE a.status_code = 204 AND a.error IS NULL),
               min(a.started_at), (SELECT max(delivered_at) FROM webhook_deliveries)
        FROM webhook_attempts a
        """
    ).fetchone()
    assert delivered == deliveries, f"only {delivered} of {deliveries} webhooks delivered"
    assert tries == answered == deliveries, f"{tries} tries recorded, {answered} answered 204"
    return deliveries / (last - first).total_seconds()


def send(dbs: Databases, deliveries: int, callback_url: str, env: dict | None = None) -> float:
    """Deliveries/s of one `skiplock webhooks` process draining a fresh backlog."""
    url = dbs.fresh("webhook_sender")
    write_backlog(url, deliveries, callback_url)
    dbs.settle()
    sender_env = {
        **os.environ,
        "DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
        "SKIPLOCK_WEBHOOK_ALLOW": "127.0.0.1",  # the receiver is on loopback
        **(env or {}),
    }
    sender = subprocess.Popen(
        [sys.executable, "-m", "skiplock.cli", "webhooks", "--log-level", "WARNING"], cwd=ROOT, env=sender_env
    )
    try:
        with connect(url) as conn:
            deadline = time.monotonic() + DEADLINE_SECONDS
            # EXISTS, not count(*): the poll must not take CPU from the sender it measures.
            while conn.execute(
                "SELECT EXISTS (SELECT FROM webhook_deliveries WHERE status = 'pending')"
            ).fetchone()[0]:
                assert sender.poll() is None, f"the sender exited with {sender.returncode}"
                assert time.monotonic() < deadline, f"not delivered within {DEADLINE_SECONDS} s"
                time.sleep(0.2)
            rate = delivered_rate(conn, deliveries)
    finally:
        stop(sender)
    dbs.drop(url)
    return rate


def sender_throughput(dbs: Databases, deliveries: int) -> None:
    with tempfile.TemporaryDirectory(prefix="skiplock-bench-receiver-") as work:
        receiver, callback_url, what = start_receiver(Path(work))
        try:
            ceiling = None
            if shutil.which("wrk"):
                ceiling = wrk(callback_url, CEILING_SECONDS, CEILING_CONNECTIONS, script="post.lua")[0]
                log(
                    f"  the receiver ({what}) answers {ceiling:,.0f} POSTs/s (wrk, {CEILING_CONNECTIONS} connections)"
                )
            rate = send(dbs, deliveries, callback_url)
            log(f"  {rate:,.0f} deliveries/s")
        finally:
            stop(receiver)
    ROWS.append(
        Row(
            f"one webhook sender process, {deliveries:,} due deliveries (signed POST, 204)",
            f"{rate:,.0f} deliveries/s",
            f"{ceiling:,.0f} POSTs/s ({what}, wrk)" if ceiling else f"- ({what}; no wrk)",
            rate / ceiling if ceiling else None,
            f">= {TARGET:,}/s",
            rate >= TARGET,
        )
    )
