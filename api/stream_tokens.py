"""POST /api/tasks/{id}/stream-token and /api/workflows/{id}/stream-token: a short-lived token
that opens that one event stream from a browser (`new EventSource(url)`), for a backend to hand
to its page instead of its API key. The task's owner, an admin or a viewer key may mint one;
what the token is and how it is checked: skiplock/stream_tokens.py, api/stream_auth.py."""

from __future__ import annotations

from flask.views import MethodView
from marshmallow import Schema, fields, validate

from skiplock.sql.tasks import task_get
from skiplock.sql.workflow_store import workflow_get
from skiplock.stream_tokens import DEFAULT_LIFETIME_SECONDS, MAX_LIFETIME_SECONDS, MIN_LIFETIME_SECONDS

from . import tasks, workflows
from .auth import principal
from .extensions import db
from .stream_auth import new_token


class StreamTokenArgsSchema(Schema):
    lifetime_seconds = fields.Integer(
        load_default=DEFAULT_LIFETIME_SECONDS,
        validate=validate.Range(min=MIN_LIFETIME_SECONDS, max=MAX_LIFETIME_SECONDS),
        metadata={
            "description": "How long the token may open the stream (a stream opened in time runs to its end; "
            "a reconnect after it needs a new token)."
        },
    )


class StreamTokenSchema(Schema):
    token = fields.String(required=True, metadata={"description": "Send it as ?token= on the stream's URL."})
    expires_at = fields.DateTime(required=True, metadata={"description": "It opens no stream from then on."})
    url = fields.String(
        required=True, metadata={"description": "The stream's URL with the token: new EventSource(url)."}
    )


@tasks.blp.route(f"/tasks/{tasks.TASK_ID}/stream-token")
class TaskStreamToken(MethodView):
    @tasks.blp.arguments(StreamTokenArgsSchema, location="query", as_kwargs=True)
    @tasks.blp.response(201, StreamTokenSchema)
    @tasks.not_found("No such task")
    @tasks.blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    def post(self, task_id, lifetime_seconds):
        """A token that opens this task's event stream without an API key, for a browser."""
        who = principal()
        with db() as conn:
            task_get(conn, task_id, owner=who.owner)  # 404/410 as for the task itself
        return new_token("task", task_id, who.key_id, lifetime_seconds)


@workflows.blp.route(f"/workflows/{workflows.WORKFLOW_ID}/stream-token")
class WorkflowStreamToken(MethodView):
    @workflows.blp.arguments(StreamTokenArgsSchema, location="query", as_kwargs=True)
    @workflows.blp.response(201, StreamTokenSchema)
    @workflows.not_found()
    def post(self, workflow_id, lifetime_seconds):
        """A token that opens this workflow's event stream without an API key, for a browser."""
        who = principal()
        with db() as conn:
            workflow_get(conn, workflow_id, owner=who.owner)  # 404 as for the workflow itself
        return new_token("workflow", workflow_id, who.key_id, lifetime_seconds)
