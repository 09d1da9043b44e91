"""The dashboard's buttons: retry and cancel a task, pause and resume a queue or a schedule, run a
schedule now. To htmx, each
answers with a notice and the live region refreshes at once; without JavaScript, back to the page,
which shows the notice. Only an admin key (or anyone, auth off) gets here: views.guard refuses a
viewer key's POSTs, and the pages show a viewer no button (_macros.html action)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import flash, g, make_response, redirect, render_template, url_for

from skiplock.errors import InvalidTransition, ScheduleNotFound, TaskNotFound, UniqueTaken, WorkflowNotFound
from skiplock.sql.limits import queue_pause_take_effect
from skiplock.sql.operations import task_queue_set_paused
from skiplock.sql.rows import Connection
from skiplock.sql.schedule_fires import schedule_run_now
from skiplock.sql.schedules import schedule_set_paused, schedules_announce
from skiplock.sql.tasks import task_cancel, task_retry
from skiplock.sql.workflow_store import workflow_cancel
from skiplock.submission import is_name

from ..extensions import db
from .views import REFRESH_EVENT, bp, htmx


@bp.post("/tasks/<task_id:task_id>/retry")
def retry(task_id: int):
    return _task_action(task_id, task_retry, "is pending again")


@bp.post("/tasks/<task_id:task_id>/cancel")
def cancel(task_id: int):
    return _task_action(task_id, task_cancel, "was cancelled")


def _task_action(task_id: int, change: Callable[[Connection, int], Any], done: str):
    back = url_for(".task", task_id=task_id)
    try:
        with db() as conn:
            change(conn, task_id)
    except (InvalidTransition, UniqueTaken) as exc:
        return _answer(str(exc), ok=False, code=409, back=back)
    except TaskNotFound as exc:
        return _answer(str(exc), ok=False, code=404, back=url_for(".overview"))
    return _answer(f"Task {task_id} {done}.", ok=True, back=back)


@bp.post("/queues/<queue>/pause")
def pause_queue(queue: str):
    return _set_paused(queue, True)


@bp.post("/queues/<queue>/resume")
def resume_queue(queue: str):
    return _set_paused(queue, False)


def _set_paused(queue: str, paused: bool):
    back = url_for(".overview")
    if not is_name(queue):
        return _answer(f"No queue can be named {queue!r}.", ok=False, code=404, back=back)
    with db() as conn:  # autocommit: the pause is committed, then it takes effect
        task_queue_set_paused(conn, queue=queue, paused=paused, by=_by())
        if paused:  # from this answer on, none of its tasks starts (claimed ones go back)
            queue_pause_take_effect(conn, queue=queue)
    return _answer(f"Queue {queue} {'paused' if paused else 'resumed'}.", ok=True, back=back)


@bp.post("/schedules/<int:schedule_id>/pause")
def pause_schedule(schedule_id: int):
    return _schedule_paused(schedule_id, True)


@bp.post("/schedules/<int:schedule_id>/resume")
def resume_schedule(schedule_id: int):
    return _schedule_paused(schedule_id, False)


def _schedule_paused(schedule_id: int, paused: bool):
    back = url_for(".overview")
    try:
        with db() as conn:
            row = schedule_set_paused(conn, schedule_id, paused=paused, by=_by())
            if not paused:
                schedules_announce(conn)
    except ScheduleNotFound as exc:
        return _answer(str(exc), ok=False, code=404, back=back)
    return _answer(f"Schedule {row['name']} {'paused' if paused else 'resumed'}.", ok=True, back=back)


@bp.post("/schedules/<int:schedule_id>/run")
def run_schedule(schedule_id: int):
    back = url_for(".overview")
    try:
        with db() as conn:
            fire = schedule_run_now(conn, schedule_id, by=_by())
    except ScheduleNotFound as exc:
        return _answer(str(exc), ok=False, code=404, back=back)
    if fire.outcome == "created":
        return _answer(f"Schedule {schedule_id} ran now: task {fire.task_id}.", ok=True, back=back)
    return _answer(f"Schedule {schedule_id} created nothing: {fire.reason}.", ok=False, code=409, back=back)


@bp.post("/workflows/<int:workflow_id>/cancel")
def cancel_workflow(workflow_id: int):
    back = url_for(".workflow", workflow_id=workflow_id)
    try:
        with db() as conn:
            view = workflow_cancel(conn, workflow_id)
    except WorkflowNotFound as exc:
        return _answer(str(exc), ok=False, code=404, back=url_for(".overview"))
    return _answer(f"Workflow {workflow_id} is {view['state']}.", ok=True, back=back)


def _by() -> str:
    key = g.get("dashboard_key")
    return key["prefix"] if key else "dashboard (auth off)"


def _answer(message: str, *, ok: bool, code: int = 200, back: str):
    """To htmx: the message, and the live region refreshes. Without JavaScript: back to the
    page, which shows the message."""
    if htmx():
        response = make_response(render_template("dashboard/_notice.html", message=message, ok=ok), code)
        response.headers["HX-Trigger-After-Swap"] = REFRESH_EVENT
        return response
    flash(message, "ok" if ok else "error")
    return redirect(back, 303)
