"""`skiplock submit|status|result|list|retry|cancel`: tasks from the command line, checked by the
API's own submit rules (skiplock/submission.py: the task type's schema first) and stored as the API
stores them (one INSERT)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

import click

from skiplock.cli.common import (
    EXIT_WAIT_TIMEOUT,
    TASK_ID,
    Context,
    FiniteFloatRange,
    emit,
    emit_record,
    fail,
    json_option,
    name_check,
    queue_name,
    to_json,
)
from skiplock.sql.fragments import FINAL_STATUSES as FINAL
from skiplock.sql.inserts import task_insert
from skiplock.sql.rows import Connection
from skiplock.sql.tasks import TaskRow, task_cancel, task_get, task_list, task_retry
from skiplock.submission import (
    MAX_ATTEMPTS,
    MAX_DELAY_SECONDS,
    MAX_EXPIRES_IN_SECONDS,
    MAX_INPUT_DEPTH,
    MAX_KEY_LENGTH,
    MAX_TIMEOUT_SECONDS,
    PRIORITY_LIMIT,
    STATUSES,
    ExpiryRefused,
    InputNotStorable,
    InputRefused,
    StorageProblem,
    SubmitRefused,
    UnknownType,
    prepare,
)

# submit --wait polls the task (one primary-key read), backing off by WAIT_POLL_BACKOFF up to
# WAIT_POLL_MAX_SECONDS.
WAIT_POLL_FIRST_SECONDS = 0.05
WAIT_POLL_BACKOFF = 1.5
WAIT_POLL_MAX_SECONDS = 0.5
# Tasks `skiplock list` shows at once, unless told otherwise, and at most.
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 1000
# The exit code of a command interrupted by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130
# The submit rules' storage problems, in the CLI's words.
STORAGE_PROBLEMS = {
    StorageProblem.NUL: "text may not contain NUL (\\u0000) characters",
    StorageProblem.NOT_FINITE: "numbers must be finite",
    StorageProblem.TOO_DEEP: f"nested deeper than {MAX_INPUT_DEPTH} levels",
}

ROW_COLUMNS = ("task_id", "task_type", "queue", "status", "priority", "attempts", "max_attempts", "run_at")
LIST_COLUMNS = (
    "task_id", "task_type", "queue", "status", "priority", "attempts", "max_attempts", "progress",
    "created_at", "finished_at",
)  # fmt: skip
STATUS_FIELDS = (
    "task_id", "task_type", "queue", "status", "priority", "progress", "attempts", "max_attempts",
    "timeout_seconds", "created_at", "run_at", "started_at", "finished_at", "error", "result",
)  # fmt: skip


def task_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A task as the API shows it (task-status): its id is `task_id`."""
    return {"task_id": row["id"], **{k: v for k, v in row.items() if k != "id"}}


def _flat(text: str | None) -> str:
    return " ".join((text or "").split())


# --- submit ------------------------------------------------------------------------------------


def parse_input(text: str) -> object:
    """The JSON argument; what is not JSON (NaN and Infinity included) is bad usage."""

    def not_json(constant: str) -> NoReturn:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(text, parse_constant=not_json)
    except RecursionError:
        raise click.BadParameter(f"nested deeper than {MAX_INPUT_DEPTH} levels", param_hint="JSON") from None
    except ValueError as exc:
        raise click.BadParameter(
            f"not JSON ({exc}); quote a string as JSON: '\"some text\"'", param_hint="JSON"
        ) from None


def refusal(exc: SubmitRefused) -> str:
    """A refused submit in the CLI's words."""
    if isinstance(exc, ExpiryRefused):
        return str(exc)
    if isinstance(exc, UnknownType):
        return f"unknown task type {exc.name!r}; known types: {', '.join(exc.known)}"
    if isinstance(exc, InputRefused):
        return f"the input is refused by {exc.task_type}'s schema: {json.dumps(exc.messages, sort_keys=True)}"
    if isinstance(exc, InputNotStorable):
        return f"the input is refused: {STORAGE_PROBLEMS[exc.problem]}"
    raise TypeError(f"no message for {type(exc).__name__}")


def scheduling_key(click_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--fairness-key, --concurrency-key, --unique-key: 1 to MAX_KEY_LENGTH characters."""
    if value is not None and not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise click.BadParameter(f"must be 1 to {MAX_KEY_LENGTH} characters")
    return value


def aware_time(click_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """--expires-at: ISO 8601 with a UTC offset (a time without one would depend on this host)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("not an ISO 8601 time (2030-01-31T09:00:00+00:00)") from None
    if parsed.tzinfo is None:
        raise click.BadParameter("give a UTC offset (+00:00, Z)")
    return parsed


def wait_for(conn: Connection, task_id: int, timeout: float | None) -> TaskRow:
    """Poll the task until it is final or `timeout` seconds have passed (None: no limit); returns
    it as last read."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = WAIT_POLL_FIRST_SECONDS
    while True:
        task = task_get(conn, task_id)
        if task["status"] in FINAL:
            return task
        left = math.inf if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return task
        time.sleep(min(delay, left))
        delay = min(delay * WAIT_POLL_BACKOFF, WAIT_POLL_MAX_SECONDS)


def result_text(result: Any) -> str:
    return json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False)


@click.command("submit", short_help="Submit a task (checked by its type's schema); --wait for it.")
@click.argument("task_type", metavar="TYPE")
@click.argument("task_input", metavar="JSON")
@click.option("--queue", "-q", default="default", show_default=True, callback=queue_name, help="Queue.")
@click.option(
    "--priority",
    "-p",
    type=click.IntRange(-PRIORITY_LIMIT, PRIORITY_LIMIT),
    default=0,
    show_default=True,
    help="Higher runs first.",
)
@click.option(
    "--delay",
    "delay_seconds",
    type=click.FloatRange(0, MAX_DELAY_SECONDS),
    metavar="SECONDS",
    help="Run no earlier than this many seconds from now.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, MAX_ATTEMPTS),
    help="Attempts before it fails for good (default: the type's).",
)
@click.option(
    "--timeout",
    "timeout_seconds",
    type=click.IntRange(1, MAX_TIMEOUT_SECONDS),
    metavar="SECONDS",
    help="An attempt running longer is killed (default: the type's).",
)
@click.option(
    "--fairness-key",
    callback=scheduling_key,
    metavar="TEXT",
    help="Whom the task is for: tasks of different fairness keys take turns.",
)
@click.option(
    "--concurrency-key",
    callback=scheduling_key,
    metavar="TEXT",
    help="Counts the task against this key's limit (skiplock limits).",
)
@click.option(
    "--unique-key",
    callback=scheduling_key,
    metavar="TEXT",
    help="While an unfinished task has this key, submit nothing and answer that task.",
)
@click.option(
    "--expires-at",
    callback=aware_time,
    metavar="TIME",
    help="If not started by then (ISO 8601 with a UTC offset), it never starts: it ends expired.",
)
@click.option(
    "--expires-in",
    "expires_in_seconds",
    type=FiniteFloatRange(0, MAX_EXPIRES_IN_SECONDS, min_open=True),
    metavar="SECONDS",
    help="As --expires-at, this many seconds from now.",
)
@click.option("--wait", is_flag=True, help="Wait until the task is final and print its result.")
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help=f"Stop waiting after this long (exit {EXIT_WAIT_TIMEOUT}; the task carries on). Implies --wait.",
)
@json_option
@click.pass_obj
def submit(
    ctx: Context,
    task_type: str,
    task_input: str,
    queue: str,
    priority: int,
    delay_seconds: float | None,
    max_attempts: int | None,
    timeout_seconds: int | None,
    fairness_key: str | None,
    concurrency_key: str | None,
    unique_key: str | None,
    expires_at: datetime | None,
    expires_in_seconds: float | None,
    wait: bool,
    wait_timeout: float | None,
) -> None:
    """Submit a task of type TYPE with input JSON ('-': read it from stdin).

    The input is checked against the type's schema first, as the API checks it: a refused input
    never reaches the database. With --wait: print the result once completed (exit 0), or the
    error if it failed, was cancelled or expired (exit 1). --json prints the task (with --wait:
    as it ended).

    With --unique-key, while an unfinished task has the key, nothing is submitted: the command
    answers that task (--json: "deduplicated": true) and says so on stderr."""
    value = parse_input(sys.stdin.read() if task_input == "-" else task_input)
    try:
        new = prepare(
            ctx.registry(),
            task_type=task_type,
            task_input=value,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout_seconds=timeout_seconds,
            delay_seconds=delay_seconds,
            fairness_key=fairness_key,
            concurrency_key=concurrency_key,
            unique_key=unique_key,
            expires_at=expires_at,
            expires_in_seconds=expires_in_seconds,
        )
    except SubmitRefused as exc:
        fail(refusal(exc))
    with ctx.connect() as conn:
        row = task_insert(conn, input=new.input, **new.columns())
        if row.get("deduplicated"):
            click.echo(
                f"task {row['id']} (unfinished) has unique key {unique_key!r}: nothing submitted", err=True
            )
        if not (wait or wait_timeout):
            emit(ctx, task_view(row), ROW_COLUMNS)
            return
        if sys.stderr.isatty():  # for people watching; a script's stderr stays one line
            click.echo(f"task {row['id']} submitted; waiting for it to finish", err=True)
        try:
            final = wait_for(conn, row["id"], wait_timeout)
        except KeyboardInterrupt:
            fail(
                f"stopped waiting; task {row['id']} carries on (skiplock status {row['id']})",
                EXIT_INTERRUPTED,
            )
    report_outcome(ctx, final, wait_timeout)


def report_outcome(ctx: Context, task: TaskRow, waited: float | None) -> None:
    task_id, status = task["id"], task["status"]
    if ctx.as_json:
        click.echo(to_json(task_view(task)))
    if status == "completed":
        if not ctx.as_json:
            click.echo(result_text(task["result"]))
    elif status == "failed":
        fail(f"task {task_id} failed: {_flat(task['error'])}")
    elif status == "cancelled":
        fail(f"task {task_id} was cancelled")
    elif status == "expired":
        fail(f"task {task_id} expired: {_flat(task['error'])}")
    else:
        fail(
            f"task {task_id} is still {status} after {waited:g} s; it carries on (skiplock status {task_id})",
            EXIT_WAIT_TIMEOUT,
        )


# --- reading tasks -----------------------------------------------------------------------------


@click.command("status", short_help="A task's status, attempts, times, error and result.")
@click.argument("task_id", type=TASK_ID, metavar="ID")
@json_option
@click.pass_obj
def status(ctx: Context, task_id: int) -> None:
    """A task: its status, attempts, times, error and result."""
    with ctx.connect() as conn:
        task = task_get(conn, task_id)
    emit_record(ctx, task_view(task), STATUS_FIELDS)


@click.command("result", short_help="A completed task's result (exit 1 if none).")
@click.argument("task_id", type=TASK_ID, metavar="ID")
@json_option
@click.pass_obj
def result(ctx: Context, task_id: int) -> None:
    """A completed task's result (JSON); exit 1 if it has none (yet)."""
    with ctx.connect() as conn:
        task = task_get(conn, task_id)
    state = task["status"]
    if state == "failed":
        fail(f"task {task_id} failed: {_flat(task['error'])}")
    if state == "cancelled":
        fail(f"task {task_id} was cancelled: it has no result")
    if state != "completed":
        fail(f"task {task_id} is {state}: it has no result yet")
    if ctx.as_json:
        click.echo(to_json({"task_id": task_id, "result": task["result"]}))
    else:
        click.echo(result_text(task["result"]))


@click.command("list", short_help="Tasks, newest first, filtered and paged.")
@click.option("--status", "state", type=click.Choice(STATUSES), help="Only tasks in this status.")
@click.option("--queue", callback=queue_name, help="Only this queue.")
@click.option("--type", "task_type", callback=name_check("task type"), help="Only this task type.")
@click.option(
    "--limit",
    type=click.IntRange(1, LIST_LIMIT_MAX),
    default=LIST_LIMIT_DEFAULT,
    show_default=True,
    help="At most this many.",
)
@click.option("--before", type=TASK_ID, metavar="ID", help="Only tasks with a smaller id (the next page).")
@json_option
@click.pass_obj
def list_tasks(
    ctx: Context, state: str | None, queue: str | None, task_type: str | None, limit: int, before: int | None
) -> None:
    """Tasks, newest first. --json: {"tasks": [...], "next_before": ID or null}, as the API."""
    with ctx.connect() as conn:
        rows = task_list(
            conn, status=state, queue=queue, task_type=task_type, before_id=before, limit=limit + 1
        )
    tasks = [task_view(r) for r in rows[:limit]]
    next_before = tasks[-1]["task_id"] if len(rows) > limit else None
    if ctx.as_json:
        click.echo(to_json({"tasks": tasks, "next_before": next_before}))
        return
    emit(ctx, tasks, LIST_COLUMNS)
    if next_before is not None:
        click.echo(f"(more: --before {next_before})", err=True)


# --- changing tasks ----------------------------------------------------------------------------


@click.command("retry", short_help="Run a failed or cancelled task again.")
@click.argument("task_id", type=TASK_ID, metavar="ID")
@json_option
@click.pass_obj
def retry(ctx: Context, task_id: int) -> None:
    """Run a failed or cancelled task again (one more attempt if it had none left)."""
    with ctx.connect() as conn:
        row = task_retry(conn, task_id)
    emit(ctx, task_view(row), ROW_COLUMNS)


@click.command("cancel", short_help="Cancel a pending or processing task.")
@click.argument("task_id", type=TASK_ID, metavar="ID")
@json_option
@click.pass_obj
def cancel(ctx: Context, task_id: int) -> None:
    """Cancel a pending or processing task (a running one has its process stopped)."""
    with ctx.connect() as conn:
        row = task_cancel(conn, task_id)
    emit(ctx, task_view(row), ROW_COLUMNS)


COMMANDS = (submit, status, result, list_tasks, retry, cancel)
