"""The child side of a worker: a process that runs one task at a time and never touches the database.

The supervisor owns every database write (so they can be batched and fenced) and the child only
talks to it through a pipe. A child that hangs, crashes or is no longer wanted is simply killed.

Pipe protocol (pickled by multiprocessing):
    supervisor -> child: [RunTask, ...] (run in order) | None (exit)
    child -> supervisor: ("progress", task_id, attempt, fraction)
                         ("done", task_id, attempt, result_json, seconds)
                         ("error", task_id, attempt, message, traceback, seconds)
Each outcome is sent as soon as its task ends, so a short task's result never waits for the
next task in its batch.
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from skiplock.registry import TaskRegistry, UnknownTaskType, load_registry

# A child sends at most one progress message per interval: each becomes a row update.
PROGRESS_MIN_INTERVAL_SECONDS = 0.25
# Results are stored in a jsonb column; refuse what would bloat the table (or break its CHECK).
MAX_RESULT_BYTES = 8 * 1024 * 1024

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RunTask:
    task_id: int
    attempt: int
    max_attempts: int
    task_type: str
    input: Any


class _Context:
    """The TaskContext handed to task functions."""

    def __init__(self, conn: Connection, run: RunTask):
        self._conn = conn
        self.task_id = run.task_id
        self.attempt = run.attempt
        self.max_attempts = run.max_attempts
        self._last_sent = 0.0

    def report_progress(self, fraction: float) -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        now = time.monotonic()
        if now - self._last_sent >= PROGRESS_MIN_INTERVAL_SECONDS:
            self._last_sent = now
            self._conn.send(("progress", self.task_id, self.attempt, fraction))


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent (the forkserver, which exits with the supervisor) dies,
    so a SIGKILLed supervisor leaves no orphan running tasks nobody will record."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends the child
        pass


def encode_result(value: Any) -> str:
    """JSON text for the jsonb column, or ValueError saying why it cannot be stored."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    if "\\u0000" in text:
        raise ValueError("result contains a NUL character (\\u0000), which jsonb cannot store")
    if len(text.encode()) > MAX_RESULT_BYTES:
        raise ValueError(f"result is larger than {MAX_RESULT_BYTES} bytes")
    return text


def run_one(registry: TaskRegistry, conn: Connection, run: RunTask) -> tuple:
    """Run one task and return the message that reports its outcome (and how long it took)."""
    started = time.perf_counter()
    return (*_outcome(registry, conn, run), time.perf_counter() - started)


def _outcome(registry: TaskRegistry, conn: Connection, run: RunTask) -> tuple:
    try:
        task = registry.get(run.task_type)
        data = task.load_input(run.input)
        value = task.run(data, _Context(conn, run))
        return ("done", run.task_id, run.attempt, encode_result(value))
    except UnknownTaskType:
        message = f"unknown task type {run.task_type!r} in this worker"
        return ("error", run.task_id, run.attempt, message, None)
    except Exception as exc:  # a task's failure is data, not a crash of the child
        message = f"{type(exc).__name__}: {exc}"
        return ("error", run.task_id, run.attempt, message, traceback.format_exc())


def child_main(conn: Connection, task_modules: tuple[str, ...], allow_crash: bool) -> None:
    """Entry point of a child process."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group; only the supervisor decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    registry = load_registry(task_modules, allow_crash=allow_crash)
    try:
        conn.send(("ready",))  # the supervisor claims for this process only from now on
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for run in batch:
            outcome = run_one(registry, conn, run)
            try:
                conn.send(outcome)
            except (BrokenPipeError, OSError):
                return
        sys.stdout.flush()
