"""GET /api/tasks/{id}/events: a task's changes as server-sent events (text/event-stream), until
it is final; then the stream ends.

Each event is the task as task-status shows it, named `status` (its status or attempt changed)
or `progress` (only its progress did). Its id names that state, so a client that reconnects with
Last-Event-ID gets the next change, not what it has already seen; one that already saw the final
state gets 204, which tells a browser's EventSource to stop reconnecting. Changes that follow
each other faster than the stream reads them arrive as the latest of them: the stream sends
states, and the final state is always sent.

A browser's EventSource cannot send an Authorization header: it opens the stream with a stream
token in the URL instead (?token=, POST /api/tasks/{id}/stream-token; api/stream_auth.py), and
may then do so from any origin.

Like a long-poll, a stream waits on its process's WatchHub (api/watch.py), with no database
connection held; it needs a worker class that holds many idle requests (api/serving/gunicorn_conf.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator, Iterator

from flask import Response, request
from flask.views import MethodView
from psycopg_pool import PoolTimeout

from skiplock.db import SESSION_ENDED
from skiplock.errors import TaskGone, TaskNotFound
from skiplock.sql.fragments import FINAL_STATUSES
from skiplock.sql.tasks import TaskRow

from .extensions import store
from .schemas import TaskSchema
from .tasks import TASK_ID, blp, loader, not_found
from .watch import Waiter

log = logging.getLogger("skiplock.api")
# What a stream waits out and retries: the database unreachable, or the session ended.
UNAVAILABLE: tuple[type[Exception], ...] = (*SESSION_ENDED, PoolTimeout)

# While the database cannot be read, the stream stays open and looks again this often.
UNAVAILABLE_RETRY_SECONDS = 1.0
# What a browser's EventSource waits before reconnecting after the stream breaks.
RECONNECT_MILLISECONDS = 2000
TASK = TaskSchema()

EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["status", "progress", "gone"]},
        "id": {"type": "string", "description": "attempts.status.progress: resume with Last-Event-ID"},
        "data": {
            "type": "string",
            "description": "JSON: the task as task-status answers it; for `gone`, task_id and message",
        },
        "retry": {"type": "integer", "description": "Milliseconds to wait before reconnecting"},
    },
}
# The stream token, for a browser (api/stream_auth.py checks it before the view runs).
TOKEN_PARAMETER = {
    "name": "token",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "A stream token (POST .../stream-token) instead of the Authorization header, for a "
    "browser's EventSource; such a request may come from any origin (CORS).",
}
STREAM_DOC = {
    "200": {
        "description": "The stream: `status` and `progress` events whose data is the task (as "
        "task-status answers), each with an id to resume from (Last-Event-ID). It ends after the "
        "final status.",
        # For text/event-stream the schema describes one event (as OpenAPI 3.2's itemSchema does).
        "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
    },
    "204": {"description": "Last-Event-ID names the task's final state: nothing more will come."},
    "401": {"description": "No key, or a stream token that is expired or not one made here"},
    "403": {"description": "A stream token for another task"},
}


def state_id(task: TaskRow) -> str:
    """The event id of a task's state: attempt, status and progress."""
    progress = "" if task["progress"] is None else f"{task['progress']:g}"
    return f"{task['attempts']}.{task['status']}.{progress}"


def event(name: str, task: TaskRow) -> str:
    return f"id: {state_id(task)}\nevent: {name}\ndata: {json.dumps(TASK.dump(task))}\n\n"


def kind_of_change(before: TaskRow | None, after: TaskRow) -> str | None:
    """`status`, `progress`, or None if a client that saw `before` has nothing new in `after`."""
    if before is None or (before["status"], before["attempts"]) != (after["status"], after["attempts"]):
        return "status"
    if before["progress"] != after["progress"]:
        return "progress"
    return None


@blp.route(f"/tasks/{TASK_ID}/events")
class TaskEvents(MethodView):
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    @blp.doc(
        responses=STREAM_DOC,
        parameters=[
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "The id of the last event received: the stream resumes after it.",
            },
            TOKEN_PARAMETER,
        ],
    )
    def get(self, task_id):
        """The task's status and progress changes as server-sent events, until it is final."""
        load = loader(task_id)
        task = load()  # not found, gone, another key's: a JSON error, before any stream
        resumed = request.headers.get("Last-Event-ID")
        if task["status"] in FINAL_STATUSES and resumed == state_id(task):
            return Response(status=204)
        hub = store().watch
        waiter = hub.watch(task_id, final_only=False)
        try:
            task = load()  # after registering: a change from now on is announced to the hub
            waiter.saw(task)
        except BaseException:
            hub.unwatch(waiter)
            raise
        response = Response(
            events(waiter, load, task, resumed, heartbeat=store().settings.stream_heartbeat_seconds),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},  # nginx: do not buffer
        )
        # When the stream ends, the client goes or the server stops: the server closes it.
        response.call_on_close(lambda: hub.unwatch(waiter))
        return response


def events(
    waiter: Waiter, load: Callable[[], TaskRow], task: TaskRow, resumed: str | None, *, heartbeat: float
) -> Iterator[str]:
    """The stream's text, chunk by chunk, until the task is final (or the client goes: the
    next write fails)."""
    yield f"retry: {RECONNECT_MILLISECONDS}\n\n"
    sent = task if resumed == state_id(task) else None
    try:
        while True:
            kind = kind_of_change(sent, task)
            if kind:
                yield event(kind, task)
                sent = task
            if task["status"] in FINAL_STATUSES:
                return
            task = yield from next_state(waiter, load, heartbeat)
    except (TaskGone, TaskNotFound) as exc:  # pruned (or deleted by hand) while streaming
        yield f"event: gone\ndata: {json.dumps({'task_id': waiter.task_id, 'message': str(exc)})}\n\n"


def next_state(
    waiter: Waiter, load: Callable[[], TaskRow], heartbeat: float
) -> Generator[str, None, TaskRow]:
    """Waits for the next change (heartbeats meanwhile) and reads the task. While the database
    cannot be read the stream stays open, and tries again: a browser's EventSource would not
    reconnect after the 503 a new request would get."""
    beat = time.monotonic() + heartbeat
    while not waiter.wait(beat - time.monotonic()):
        yield ": keep-alive\n\n"
        beat = time.monotonic() + heartbeat
    while True:
        try:
            task = load()
            waiter.saw(task)
            return task
        except UNAVAILABLE as exc:
            log.warning("event stream cannot read its task: %s", str(exc).strip() or type(exc).__name__)
            yield ": the database is unavailable; trying again\n\n"
            time.sleep(UNAVAILABLE_RETRY_SECONDS)
