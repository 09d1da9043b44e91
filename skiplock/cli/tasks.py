"""`skiplock submit|status|result|list|retry|cancel`: tasks from the command line, validated and
stored exactly as the API does (the task type's schema first, then one INSERT)."""

from __future__ import annotations

import json
import math
import sys
import time

import click
import marshmallow
import psycopg

from skiplock.cli.common import (
    EXIT_WAIT_TIMEOUT,
    TASK_ID,
    Context,
    emit,
    emit_record,
    fail,
    json_option,
    name_check,
    queue_name,
    to_json,
)
from skiplock.registry import UnknownTaskType
from skiplock.sql.tasks import task_cancel, task_get, task_insert, task_list, task_retry

# The API's limits on a submit (api/schemas.py), repeated here: importing the API would pull in
# Flask and double the command's start-up time.
MAX_DELAY_SECONDS = 366 * 24 * 3600
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
PRIORITY_LIMIT = 1_000_000
MAX_INPUT_DEPTH = 100

STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
FINAL = ("completed", "failed", "cancelled")
# submit --wait polls the task (one primary-key read), backing off up to this.
WAIT_POLL_FIRST_SECONDS = 0.05
WAIT_POLL_MAX_SECONDS = 0.5

ROW_COLUMNS = ("task_id", "task_type", "queue", "status", "priority", "attempts", "max_attempts", "run_at")
LIST_COLUMNS = (
    "task_id", "task_type", "queue", "status", "priority", "attempts", "max_attempts", "progress",
    "created_at", "finished_at",
)  # fmt: skip
STATUS_FIELDS = (
    "task_id", "task_type", "queue", "status", "priority", "progress", "attempts", "max_attempts",
    "timeout_seconds", "created_at", "run_at", "started_at", "finished_at", "error", "result",
)  # fmt: skip


def task_view(row: dict) -> dict:
    """A task as the API shows it (task-status): its id is `task_id`."""
    return {"task_id": row["id"], **{k: v for k, v in row.items() if k != "id"}}


def _flat(text: str | None) -> str:
    return " ".join((text or "").split())


# --- submit ------------------------------------------------------------------------------------


def parse_input(text: str) -> object:
    """The JSON argument; what is not JSON (NaN and Infinity included) is bad usage."""

    def not_json(constant: str):
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(text, parse_constant=not_json)
    except RecursionError:
        raise click.BadParameter(f"nested deeper than {MAX_INPUT_DEPTH} levels", param_hint="JSON") from None
    except ValueError as exc:
        raise click.BadParameter(
            f"not JSON ({exc}); quote a string as JSON: '\"some text\"'", param_hint="JSON"
        ) from None


def storage_problem(value) -> str | None:
    """Why Postgres could not store this JSON and read it back (as api.schemas checks it): jsonb
    holds no U+0000, and nesting is bounded. Iterative, so any depth is safe to inspect."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return "text may not contain NUL (\\u0000) characters"
        if isinstance(item, float) and not math.isfinite(item):
            return "numbers must be finite"
        if isinstance(item, (dict, list)):
            if depth > MAX_INPUT_DEPTH:
                return f"nested deeper than {MAX_INPUT_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def wait_for(conn: psycopg.Connection, task_id: int, timeout: float | None) -> dict:
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
        delay = min(delay * 1.5, WAIT_POLL_MAX_SECONDS)


def result_text(result) -> str:
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
    type=click.IntRange(1, 100),
    help="Attempts before it fails for good (default: the type's).",
)
@click.option(
    "--timeout",
    "timeout_seconds",
    type=click.IntRange(1, MAX_TIMEOUT_SECONDS),
    metavar="SECONDS",
    help="An attempt running longer is killed (default: the type's).",
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
    wait: bool,
    wait_timeout: float | None,
) -> None:
    """Submit a task of type TYPE with input JSON ('-': read it from stdin).

    The input is checked against the type's schema first, as the API checks it: a refused input
    never reaches the database. With --wait: print the result once completed (exit 0), or the
    error if it failed or was cancelled (exit 1). --json prints the task (with --wait: as it
    ended)."""
    value = parse_input(sys.stdin.read() if task_input == "-" else task_input)
    registry = ctx.registry()
    try:
        task = registry.get(task_type)
    except UnknownTaskType:
        fail(f"unknown task type {task_type!r}; known types: {', '.join(registry.names())}")
    try:
        task.load_input(value)
    except marshmallow.ValidationError as exc:
        fail(f"the input is refused by {task_type}'s schema: {json.dumps(exc.messages, sort_keys=True)}")
    problem = storage_problem(value)
    if problem:
        fail(f"the input is refused: {problem}")
    with ctx.connect() as conn:
        row = task_insert(
            conn,
            task_type=task_type,
            input=value,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts or task.max_attempts,
            timeout_seconds=timeout_seconds or task.timeout_seconds,
            delay_seconds=delay_seconds,
        )
        if not (wait or wait_timeout):
            emit(ctx, task_view(row), ROW_COLUMNS)
            return
        if sys.stderr.isatty():  # for people watching; a script's stderr stays one line
            click.echo(f"task {row['id']} submitted; waiting for it to finish", err=True)
        try:
            final = wait_for(conn, row["id"], wait_timeout)
        except KeyboardInterrupt:
            fail(f"stopped waiting; task {row['id']} carries on (skiplock status {row['id']})", 130)
    report_outcome(ctx, final, wait_timeout)


def report_outcome(ctx: Context, task: dict, waited: float | None) -> None:
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
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="At most this many."
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
