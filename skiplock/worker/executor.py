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

Besides the pipe, each child shares one integer with the supervisor (`running`): the id of the
task whose function it last entered. It costs a memory write per task, and tells the supervisor,
when a process dies or must be killed, whether the task at the head of its batch had really
started (charge the attempt) or was still waiting its turn (hand it on, uncounted).
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
from typing import Any, Protocol

from skiplock.registry import TaskRegistry, UnknownTaskType, load_registry

# A child sends at most one progress message per interval: each becomes a row update.
PROGRESS_MIN_INTERVAL_SECONDS = 0.25
# Results are stored in a jsonb column; refuse what would bloat the table (or break its CHECK).
MAX_RESULT_BYTES = 8 * 1024 * 1024

_PR_SET_PDEATHSIG = 1
# Raising one's own OOM score needs no privilege; 1000 is the most a process can ask for.
OOM_SCORE_ADJ = 1000


class SharedInt(Protocol):
    """A multiprocessing RawValue("q"): one integer both processes read and write."""

    value: int


# A report from a child (see the pipe protocol above): ("done" | "error" | "progress", task id,
# attempt, ...).
Report = tuple[Any, ...]


@dataclass(frozen=True)
class RunTask:
    task_id: int
    attempt: int
    max_attempts: int
    task_type: str
    input: Any
    parents: dict[str, Any] | None = None  # a workflow step's parents' results, by ref


class _Context:
    """The TaskContext handed to task functions."""

    def __init__(self, conn: Connection, run: RunTask):
        self._conn = conn
        self.task_id = run.task_id
        self.attempt = run.attempt
        self.max_attempts = run.max_attempts
        # A workflow step's parents' results by ref (None for a parent that did not complete).
        self.parents: dict[str, Any] = dict(run.parents or {})
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


def _first_to_go_when_memory_runs_out() -> None:
    """Linux: make this process the OOM killer's first choice, ahead of the supervisor (and of a
    database on the same host). A task that exhausts memory then costs its own attempt (crashed,
    counted), not the worker and everything it holds."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:  # not Linux, or not allowed: the kernel's own choice stands
        pass


def encode_result(value: Any) -> str:
    """JSON text for the jsonb column, or ValueError saying why it cannot be stored."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    if "\\u0000" in text:
        raise ValueError("result contains a NUL character (\\u0000), which jsonb cannot store")
    if len(text.encode()) > MAX_RESULT_BYTES:
        raise ValueError(f"result is larger than {MAX_RESULT_BYTES} bytes")
    return text


def run_one(
    registry: TaskRegistry, conn: Connection, run: RunTask, running: SharedInt | None = None
) -> Report:
    """Run one task and return the message that reports its outcome (and how long it took).
    `running` (shared with the supervisor) is set to the task's id as its function is entered."""
    started = time.perf_counter()
    return (*_outcome(registry, conn, run, running), time.perf_counter() - started)


def _outcome(registry: TaskRegistry, conn: Connection, run: RunTask, running: SharedInt | None) -> Report:
    try:
        task = registry.get(run.task_type)
        data = task.load_input(run.input)
        if running is not None:
            running.value = run.task_id
        value = task.run(data, _Context(conn, run))
        return ("done", run.task_id, run.attempt, encode_result(value))
    except UnknownTaskType:
        message = f"unknown task type {run.task_type!r} in this worker"
        return ("error", run.task_id, run.attempt, message, None)
    except Exception as exc:  # a task's failure is data, not a crash of the child
        message = f"{type(exc).__name__}: {exc}"
        return ("error", run.task_id, run.attempt, message, traceback.format_exc())


def child_main(
    conn: Connection, task_modules: tuple[str, ...], allow_crash: bool, running: SharedInt | None = None
) -> None:
    """Entry point of a child process. `running`: a shared integer (multiprocessing RawValue)."""
    _die_with_parent()
    _first_to_go_when_memory_runs_out()
    # Ctrl-C and a service manager's SIGTERM reach the whole process group; only the supervisor
    # decides what stops (it kills a process with SIGKILL when it must).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
            outcome = run_one(registry, conn, run, running)
            try:
                conn.send(outcome)
            except (BrokenPipeError, OSError):
                return
        sys.stdout.flush()
