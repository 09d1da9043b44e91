"""Workflows (POST /api/workflows, GET /api/workflows/{id}, cancel): tasks that run after other
tasks, as a graph (refs and depends_on), a chain, or a batch with then / catch / finally, stored
all or nothing (skiplock/sql/workflow_store.py). Each task is an ordinary task of the caller's:
its id works with every task endpoint, owners, quotas, limits and fairness apply. A client key
sees its own workflows only (another key's answers 404, as a missing one)."""

from __future__ import annotations

import json
from collections.abc import Callable

from flask import request, url_for
from flask.views import MethodView

from skiplock.sql.inserts import NewTask
from skiplock.sql.rows import Connection
from skiplock.sql.workflow_store import workflow_cancel, workflow_get, workflow_insert
from skiplock.submission import Submission
from skiplock.tracing import submit_context

from .auth import principal
from .extensions import Blueprint, db
from .idempotency import Stored
from .limits import quota_more_slots
from .tasks import IDEMPOTENCY_HEADER_DOC, Slots, refused_as_422, submitted
from .workflow_schemas import WorkflowSchema, WorkflowSubmitSchema

WORKFLOW = WorkflowSchema()  # built once (see api.tasks.SUBMITTED)

blp = Blueprint(
    "workflows",
    __name__,
    url_prefix="/api",
    description="Tasks that run after other tasks: graphs, chains, batches.",
)

WORKFLOW_ID = "<int:workflow_id>"


def _step_maker(trace_context: str | None) -> Callable[[Submission], NewTask]:
    """Makes the steps, each carrying the submit's trace context (its runs are children of it)."""

    def new_task(task: Submission) -> NewTask:
        return NewTask(input_json=json.dumps(task.input), trace_context=trace_context, **task.columns())

    return new_task


def not_found():
    return blp.alt_response(404, response="DEFAULT_ERROR", description="No such workflow (or not yours)")


@blp.route("/workflows")
class Workflows(MethodView):
    @blp.arguments(WorkflowSubmitSchema())
    @blp.response(201, WorkflowSchema)
    @blp.doc(parameters=[IDEMPOTENCY_HEADER_DOC])
    def post(self, data):
        """Submit a workflow: `tasks` (each with a ref, depends_on and a trigger_rule), or a
        `chain`, or a `batch` with `then`, `catch` and `finally`. Stored in one transaction, all
        or nothing, up to 10,000 tasks (counted whole against your quota); a cycle or an unknown
        ref is a 422 naming it. Tasks without parents start at once; the others when their
        trigger_rule holds, in the transaction that ended their last parent. A step's code gets
        its parents' results by ref (ctx.parents)."""
        graph = data["graph"]

        def insert(conn: Connection, slots: Slots) -> Stored:
            with refused_as_422():
                workflow_id, ids = workflow_insert(
                    conn, graph, _step_maker(submit_context(request.headers)), owner_key_id=principal().key_id, name=data["name"],
                    callback_url=data["callback_url"], slots=slots,
                    more_slots=quota_more_slots if slots else None,
                )  # fmt: skip
            body = workflow_get(conn, workflow_id)
            location = url_for("workflows.Workflow", workflow_id=workflow_id)
            return Stored(body, 201, location, list(ids.values()), len(ids))

        return submitted(WORKFLOW, insert, [None] * len(graph.steps))


@blp.route(f"/workflows/{WORKFLOW_ID}")
class Workflow(MethodView):
    @blp.response(200, WorkflowSchema)
    @not_found()
    def get(self, workflow_id):
        """A workflow: its state (running until every task is final, then completed, failed or
        cancelled), its tasks' counts by status, and each task with its ref, status, trigger_rule,
        parents and error."""
        with db() as conn:
            return workflow_get(conn, workflow_id, owner=principal().owner)


@blp.route(f"/workflows/{WORKFLOW_ID}/cancel")
class WorkflowCancel(MethodView):
    @blp.response(200, WorkflowSchema)
    @not_found()
    def post(self, workflow_id):
        """Cancel every unfinished task of the workflow (running ones are stopped, as a task's
        cancel does); it ends cancelled (failed if a task had failed)."""
        with db() as conn:
            return workflow_cancel(conn, workflow_id, owner=principal().owner)
