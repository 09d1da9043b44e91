"""GET /api/workflows/{id}/events: a workflow's progress as server-sent events, until it is
final; then the stream ends.

Each event, named `state`, is the workflow's state and its tasks' counts by status (not the
list of tasks: GET /api/workflows/{id} has it); its id names that state, so a client that
reconnects with Last-Event-ID gets the next change, and one that saw the final state gets 204.
The stream reads the workflow every POLL_SECONDS with a pooled connection per read (none held
between): a workflow's changes come from many tasks, each announced apart, and a reader wants
their sum, not each of them. A browser opens it with a stream token in the URL (?token=, POST
/api/workflows/{id}/stream-token), as a task's stream (api/events.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, request
from flask.views import MethodView

from skiplock.db import pooled_connection
from skiplock.errors import WorkflowNotFound
from skiplock.sql.workflow_store import workflow_get

from .auth import principal
from .events import RECONNECT_MILLISECONDS, TOKEN_PARAMETER, UNAVAILABLE, UNAVAILABLE_RETRY_SECONDS
from .extensions import store
from .workflows import WORKFLOW_ID, blp, not_found

log = logging.getLogger("skiplock.api")

POLL_SECONDS = 0.5
STREAM_DOC = {
    "200": {
        "description": "The stream: `state` events whose data is {workflow_id, state, counts}, each with "
        "an id to resume from (Last-Event-ID). It ends after the final state.",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["state", "gone"]},
                        "id": {"type": "string"},
                        "data": {"type": "string", "description": "JSON: workflow_id, state, counts"},
                        "retry": {"type": "integer"},
                    },
                }
            }
        },
    },
    "204": {"description": "Last-Event-ID names the workflow's final state: nothing more will come."},
    "401": {"description": "No key, or a stream token that is expired or not one made here"},
    "403": {"description": "A stream token for another workflow"},
}


def summary(view: dict[str, Any]) -> dict[str, Any]:
    return {"workflow_id": view["id"], "state": view["state"], "counts": view["counts"]}


def state_id(view: dict[str, Any]) -> str:
    counts = ",".join(f"{k}:{v}" for k, v in sorted(view["counts"].items()))
    return f"{view['state']}.{counts}"


@blp.route(f"/workflows/{WORKFLOW_ID}/events")
class WorkflowEvents(MethodView):
    @not_found()
    @blp.doc(
        responses=STREAM_DOC,
        parameters=[
            {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
            TOKEN_PARAMETER,
        ],
    )
    def get(self, workflow_id):
        """The workflow's state and counts as server-sent events, until it is final."""
        owner, task_store = principal().owner, store()

        def load() -> dict[str, Any]:
            with pooled_connection(task_store.pool()) as conn:
                return workflow_get(conn, workflow_id, owner=owner)

        view = load()  # not found, another key's: a JSON error (api.errors), before any stream
        resumed = request.headers.get("Last-Event-ID")
        if view["state"] != "running" and resumed == state_id(view):
            return Response(status=204)
        return Response(
            events(load, view, resumed),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )


def events(load: Callable[[], dict[str, Any]], view: dict[str, Any], resumed: str | None) -> Iterator[str]:
    yield f"retry: {RECONNECT_MILLISECONDS}\n\n"
    sent = state_id(view) if resumed == state_id(view) else None
    while True:
        if state_id(view) != sent:
            sent = state_id(view)
            yield f"id: {sent}\nevent: state\ndata: {json.dumps(summary(view))}\n\n"
        if view["state"] != "running":
            return
        time.sleep(POLL_SECONDS)
        try:
            view = load()
        except WorkflowNotFound as exc:  # deleted by hand while streaming
            yield f"event: gone\ndata: {json.dumps({'message': str(exc)})}\n\n"
            return
        except UNAVAILABLE as exc:
            log.warning("workflow stream cannot read: %s", str(exc).strip() or type(exc).__name__)
            yield ": the database is unavailable; trying again\n\n"
            time.sleep(UNAVAILABLE_RETRY_SECONDS)
