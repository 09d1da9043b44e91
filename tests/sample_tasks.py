"""A task module of the kind operators write, loaded through SKIPLOCK_TASK_MODULES in the tests."""

from __future__ import annotations

import os
import signal
import time

from marshmallow import Schema, ValidationError, fields, validate

from skiplock.registry import task_type


class GreetInput(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=50))


@task_type("greet", input=GreetInput, timeout_seconds=10, max_attempts=2)
def greet(data, ctx):
    """Say hello (a custom task type)."""
    return {"greeting": f"Hello, {data['name']}!", "attempt": ctx.attempt}


@task_type("hang", timeout_seconds=2, max_attempts=1)
def hang(value, ctx):
    """Loop forever ignoring SIGTERM and SIGINT: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        time.sleep(0.01)


@task_type("pid", timeout_seconds=10)
def report_pid(value, ctx):
    """Return the pid of the process that ran it."""
    return {"pid": os.getpid()}


@task_type("stamp", timeout_seconds=10)
def stamp(value, ctx):
    """Return when it ran (CLOCK_MONOTONIC is machine-wide, so stamps compare across processes)."""
    return {"at": time.monotonic_ns()}


# The fault suite counts real executions, not database rows: every run of a `tally` task appends
# "S task attempt pid" when it starts and "E ..." when it ends to this file (O_APPEND: lines from
# concurrent processes never interleave).
TALLY_ENV = "SKIPLOCK_TEST_TALLY"


def _is_bool(value) -> None:
    if not isinstance(value, bool):
        raise ValidationError("Not a boolean.")


class TallyInput(Schema):
    seconds = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=600))
    # Raise once recorded (a task that fails). true or false only (a Boolean field takes 0 and 1).
    fail = fields.Raw(
        load_default=False,
        validate=_is_bool,
        metadata={"type": "boolean"},
    )


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@task_type("tally", input=TallyInput, timeout_seconds=600, max_attempts=20)
def tally(data, ctx):
    """Record this execution's start and end (SKIPLOCK_TEST_TALLY), sleeping `seconds` between."""
    path = os.environ[TALLY_ENV]
    _append(path, f"S {ctx.task_id} {ctx.attempt} {os.getpid()}\n")
    time.sleep(data["seconds"])
    _append(path, f"E {ctx.task_id} {ctx.attempt} {os.getpid()}\n")
    if data["fail"]:
        raise RuntimeError("tally asked to fail")
    return None


@task_type("clock", timeout_seconds=10)
def clock(value, ctx):
    """Return the wall clock of the process that ran it (time.time())."""
    return {"time": time.time()}


@task_type("add", timeout_seconds=10, max_attempts=1)
def add(value, ctx):
    """Its input (a number) plus its workflow parents' results (numbers), by ref."""
    return (value or 0) + sum(v for v in ctx.parents.values() if isinstance(v, int | float))


@task_type("kill_worker", timeout_seconds=10, max_attempts=3)
def kill_worker(value, ctx):
    """SIGKILL the worker.py whose pid it is given (if it still runs), then return: a task that
    runs to its end while its worker dies, before the worker can store anything of it."""
    try:
        os.kill(value["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    return {"pid": os.getpid()}
