"""`make run`: everything in the foreground, one Ctrl-C stops it all.

Uses DATABASE_URL when set; otherwise starts the embedded Postgres in .skiplock/pgdata (kept
across runs, so tasks survive a restart), prints its DATABASE_URL and writes it to
.skiplock/database_url while it runs (the checkout's `skiplock` CLI reads it). Applies schema.sql, then runs gunicorn (the API on
127.0.0.1:8000 unless SKIPLOCK_BIND says otherwise) and `worker.py` side by side. Authentication
is off unless SKIPLOCK_AUTH=on (a local demo; gunicorn.conf.py refuses that on a public address).

A checkout's tool: it runs the checkout's gunicorn.conf.py, wsgi.py and worker.py. An installed
skiplock runs `skiplock worker` and gunicorn with skiplock.api (README).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from skiplock import embedded, logs
from skiplock.db import apply_schema
from skiplock.settings import Settings
from skiplock.startup import StartupError, check_url, connect_problem

ROOT = Path(__file__).resolve().parent.parent  # the checkout
EMBEDDED_DATA_DIR = ROOT / ".skiplock" / "pgdata"
# How long the API and the worker get to stop after Ctrl-C before they are killed.
STOP_TIMEOUT_SECONDS = 40

log = logging.getLogger("skiplock.launcher")


def database_url() -> tuple[str, bool]:
    """The database to run on, and whether it is the embedded one."""
    url = Settings.from_env().database_url
    if url:
        log.info("using DATABASE_URL")
        check_url(url)
        return url, False
    log.info("DATABASE_URL not set: starting the embedded Postgres in %s", EMBEDDED_DATA_DIR)
    url = embedded.start(EMBEDDED_DATA_DIR)
    embedded.publish_url(url)
    # One line to copy: psql, a script or a CLI outside this checkout can use the same database.
    print(f"make run: the embedded database: DATABASE_URL='{url}'", file=sys.stderr, flush=True)
    return url, True


def main() -> int:
    if not (ROOT / "wsgi.py").is_file():
        print(f"make run: {ROOT} is not a skiplock checkout (no wsgi.py)", file=sys.stderr)
        return 2
    try:
        log_format = Settings.from_env().log_format
    except ValueError as exc:  # a malformed SKIPLOCK_* value
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    logs.configure(logging.INFO, log_format)  # gunicorn and worker.py read it too (the environment)
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it narrates every pg_ctl call
    try:
        url, is_embedded = database_url()
    except StartupError as exc:  # a malformed DATABASE_URL
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(url)
    finally:
        if is_embedded:  # its server stops with us: the CLI must not find a dead URL
            embedded.unpublish_url(url)


def serve(url: str) -> int:
    try:
        apply_schema(url)
    except psycopg.Error as exc:
        print(f"make run: {connect_problem(url, exc).message}", file=sys.stderr)
        return 2
    log.info("schema applied")
    # The two-minute local demo: loopback only (gunicorn.conf.py's default), no keys to create.
    env = {"SKIPLOCK_AUTH": "off", **os.environ, "DATABASE_URL": url}
    if env["SKIPLOCK_AUTH"] == "off":
        log.warning(
            "authentication is OFF for this local demo (SKIPLOCK_AUTH=off): the API answers anyone on "
            "this machine. In production (`gunicorn wsgi:app`) it is on: create a key with "
            "`skiplock keys create --admin --name ops`."
        )
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env
        ),
        subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env),
    ]
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.2)
    if not stopping:
        log.error("a process exited unexpectedly; stopping the others")
    # Ctrl-C already reached the whole process group; SIGTERM also covers `kill <launcher>`.
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    codes = [c.wait() for c in children]
    log.info("stopped (exit codes: gunicorn %s, worker %s)", *codes)
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
