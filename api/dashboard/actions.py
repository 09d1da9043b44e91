"""The dashboard's buttons: retry and cancel a task, pause and resume a queue. To htmx, each
answers with a notice and the live region refreshes at once; without JavaScript, back to the page,
which shows the notice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import flash, g, make_response, redirect, render_template, url_for

from skiplock.errors import InvalidTransition, TaskNotFound, UniqueTaken
from skiplock.sql.limits import queue_pause_take_effect
from skiplock.sql.operations import task_queue_set_paused
from skiplock.sql.rows import Connection
from skiplock.sql.tasks import task_cancel, task_retry
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
    key = g.get("dashboard_key")
    by = key["prefix"] if key else "dashboard (auth off)"
    with db() as conn:  # autocommit: the pause is committed, then it takes effect
        task_queue_set_paused(conn, queue=queue, paused=paused, by=by)
        if paused:  # from this answer on, none of its tasks starts (claimed ones go back)
            queue_pause_take_effect(conn, queue=queue)
    return _answer(f"Queue {queue} {'paused' if paused else 'resumed'}.", ok=True, back=back)


def _answer(message: str, *, ok: bool, code: int = 200, back: str):
    """To htmx: the message, and the live region refreshes. Without JavaScript: back to the
    page, which shows the message."""
    if htmx():
        response = make_response(render_template("dashboard/_notice.html", message=message, ok=ok), code)
        response.headers["HX-Trigger-After-Swap"] = REFRESH_EVENT
        return response
    flash(message, "ok" if ok else "error")
    return redirect(back, 303)
