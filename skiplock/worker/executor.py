"""The child side of a worker: a process that runs one task at a time and never touches the database.

The supervisor owns every database write (so they can be batched and fenced) and the child only
talks to it through a pipe. A child that hangs, crashes or is no longer wanted is simply killed.

Pipe protocol (pickled by multiprocessing):
    supervisor -> child: [RunTask, ...] (run in order) | None (exit)
    child -> supervisor: ("progress", task_id, attempt, fraction)
                         ("done", task_id, attempt, result_json, seconds)
                         ("error", task_id, attempt, message, traceback, fate, seconds)
                         ("ready",) once started: task types loaded, @process_setup run
                         ("setup_failed", message, traceback): it then exits, having run nothing
                         ("retire", limit, why) after an outcome: a recycling limit is reached;
                             it runs no more of its batch, runs its teardowns and exits
    (fate: None, or a Fate the task chose by raising NonRetryableError or RetryAfter)
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
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, Protocol

import psutil

from skiplock.registry import TaskRegistry, UnknownTaskType, load_registry, process_hooks
from skiplock.settings import DEFAULT_MAX_RESULT_BYTES, Settings
from skiplock.task_exceptions import NonRetryableError, RetryAfter
from skiplock.tracing import run_span

# A child sends at most one progress message per interval: each becomes a row update.
PROGRESS_MIN_INTERVAL_SECONDS = 0.25
# A task process's own state, set once as it starts (child_main): encode_result and _Context are
# called from _outcome, which takes no settings.
_max_result_bytes = DEFAULT_MAX_RESULT_BYTES
_resources: dict[str, Any] = {}  # what this process's @process_setup functions returned

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
class Fate:
    """What a task decided about its own failure (skiplock.task_exceptions): the attempt's
    outcome (failed_for_good, retry_requested), and for a retry its delay and whether it counts."""

    outcome: str
    retry_in_seconds: float | None = None
    charge_attempt: bool = True


class RunTask(NamedTuple):
    """A task as its process gets it (pickled through the pipe: a tuple is the cheapest to make
    and to pickle, once per task in the supervisor)."""

    task_id: int
    attempt: int
    max_attempts: int
    task_type: str
    input: Any
    parents: dict[str, Any] | None = None  # a workflow step's parents' results, by ref
    queue: str = "default"
    trace_context: dict[str, str] | None = None  # the submit's (skiplock.tracing), if traced


class _Context:
    """The TaskContext handed to task functions."""

    def __init__(self, conn: Connection, run: RunTask):
        self._conn = conn
        self.task_id = run.task_id
        self.attempt = run.attempt
        self.max_attempts = run.max_attempts
        # A workflow step's parents' results by ref (None for a parent that did not complete).
        self.parents: dict[str, Any] = dict(run.parents or {})
        self.resources: dict[str, Any] = _resources
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
    size = len(text.encode())
    if size > _max_result_bytes:
        raise ValueError(
            f"result is {size:,} bytes, over SKIPLOCK_MAX_RESULT_BYTES ({_max_result_bytes:,}): "
            "store big outputs elsewhere (object storage) and return a reference"
        )
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
        with run_span(run.task_type, run.task_id, run.attempt, run.queue, run.trace_context):
            value = task.run(data, _Context(conn, run))
        return ("done", run.task_id, run.attempt, encode_result(value))
    except UnknownTaskType:
        message = f"unknown task type {run.task_type!r} in this worker"
        return ("error", run.task_id, run.attempt, message, None, None)
    except RetryAfter as exc:  # the task asks to run again later: no traceback, it is no error
        retry = Fate("retry_requested", exc.seconds, exc.charge_attempt)
        return ("error", run.task_id, run.attempt, f"{type(exc).__name__}: {exc}", None, retry)
    except Exception as exc:  # a task's failure is data, not a crash of the child
        message = f"{type(exc).__name__}: {exc}"
        fate = Fate("failed_for_good") if isinstance(exc, NonRetryableError) else None
        return ("error", run.task_id, run.attempt, message, traceback.format_exc(), fate)


@dataclass(frozen=True)
class ProcessConfig:
    """What a task process takes from the worker's settings (pickled to it)."""

    task_modules: tuple[str, ...]
    allow_crash: bool
    max_result_bytes: int
    max_tasks: int  # recycled after this many tasks; 0: never
    max_memory_mb: int  # recycled when its RSS is above this after a task; 0: never
    start_delay: float = 0.0  # seconds to wait before the setup: back-off after failed ones

    @classmethod
    def from_settings(cls, settings: Settings, start_delay: float = 0.0) -> ProcessConfig:
        return cls(
            task_modules=settings.task_modules,
            allow_crash=settings.allow_crash,
            max_result_bytes=settings.max_result_bytes,
            max_tasks=settings.max_tasks_per_process,
            max_memory_mb=settings.max_memory_per_process_mb,
            start_delay=start_delay,
        )


def child_main(conn: Connection, config: ProcessConfig, running: SharedInt | None = None) -> None:
    """Entry point of a child process. `running`: a shared integer (multiprocessing RawValue)."""
    global _max_result_bytes
    _die_with_parent()
    _first_to_go_when_memory_runs_out()
    # Ctrl-C and a service manager's SIGTERM reach the whole process group; only the supervisor
    # decides what stops (it kills a process with SIGKILL when it must).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _max_result_bytes = config.max_result_bytes
    registry = load_registry(config.task_modules, allow_crash=config.allow_crash)
    time.sleep(config.start_delay)
    try:
        _set_up(registry)
    except Exception as exc:  # reported, not raised: the supervisor logs it once and backs off
        _send(conn, ("setup_failed", str(exc), traceback.format_exc()))
        return
    try:
        # The supervisor claims for this process only from now on.
        if _send(conn, ("ready",)):
            _serve(conn, registry, config, running)
    finally:
        _tear_down()
        sys.stdout.flush()


def _set_up(registry: TaskRegistry) -> None:
    """Import the functions declared by "module:function" (their modules may declare more hooks),
    then run every @process_setup, keeping what each returns in ctx.resources."""
    for function in registry.lazy_functions():
        try:
            function.resolve()
        except Exception as exc:
            raise RuntimeError(
                f"run={function.target!r} cannot be imported: {type(exc).__name__}: {exc}"
            ) from exc
    setups, _ = process_hooks()
    for name, setup in setups.items():
        try:
            _resources[name] = setup()
        except Exception as exc:
            raise RuntimeError(f"process_setup {name}() raised {type(exc).__name__}: {exc}") from exc


def _tear_down() -> None:
    """Every @process_teardown, each whatever the others do: a failure is one line on stderr."""
    _, teardowns = process_hooks()
    for name, teardown in teardowns.items():
        try:
            teardown(_resources)
        except Exception as exc:
            print(
                f"skiplock task process {os.getpid()}: process_teardown {name}() raised "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )


def _serve(
    conn: Connection, registry: TaskRegistry, config: ProcessConfig, running: SharedInt | None
) -> None:
    """Run the batches sent until told to exit, or until a recycling limit is reached: then the
    rest of the batch is left to the supervisor (never started, it goes back uncounted)."""
    tasks_run = 0
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for run in batch:
            if not _send(conn, run_one(registry, conn, run, running)):
                return
            tasks_run += 1
            reason = _recycle_reason(config, tasks_run)
            if reason is not None:
                _send(conn, ("retire", *reason))
                return
        sys.stdout.flush()


def _recycle_reason(config: ProcessConfig, tasks_run: int) -> tuple[str, str] | None:
    """(limit, why) once this process should be replaced, as Celery's max_tasks_per_child and
    max_memory_per_child: checked after each task, in the process (the supervisor's loop never
    waits on it)."""
    if config.max_tasks and tasks_run >= config.max_tasks:
        return "tasks", f"ran {tasks_run} tasks (SKIPLOCK_MAX_TASKS_PER_PROCESS={config.max_tasks})"
    if config.max_memory_mb:
        rss = psutil.Process().memory_info().rss
        if rss > config.max_memory_mb * 1024 * 1024:
            return "memory", (
                f"uses {rss / 2**20:,.0f} MiB, over SKIPLOCK_MAX_MEMORY_PER_PROCESS_MB={config.max_memory_mb}"
            )
    return None


def _send(conn: Connection, message: Report) -> bool:
    """Send to the supervisor; False if it is gone."""
    try:
        conn.send(message)
        return True
    except (BrokenPipeError, OSError):
        return False
