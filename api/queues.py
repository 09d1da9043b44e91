"""Queues, for admin keys: their summary, pausing and resuming them, and their limit (at most
max_running of a queue's tasks run at once across every worker, at most max_starts_per_second
start). A pause and a limit hold when the request answers: tasks a worker had claimed but not
started go back to pending; what runs finishes. The state is a row of task_queues, the limit one
of task_limits (scope queue)."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import abort

from skiplock.sql.limits import limit_delete, limit_get, limit_put, queue_pause_take_effect
from skiplock.sql.operations import queue_summaries, task_queue_set_paused
from skiplock.submission import NAME_RULE, is_name

from .auth import require_admin
from .extensions import Blueprint, db
from .limit_schemas import LimitSchema, LimitSetSchema, QueueChangedSchema, QueueSummarySchema

blp = Blueprint("queues", __name__, url_prefix="/api", description="Queues (admin keys only).")

QUEUE = "<queue>"


def forbidden():
    return blp.alt_response(403, response="DEFAULT_ERROR", description="Not an admin key")


@blp.route("/queues")
class Queues(MethodView):
    @blp.response(200, QueueSummarySchema(many=True))
    @forbidden()
    def get(self):
        """Every queue with unfinished tasks, a setting or tasks expired in the last hour: due
        (of which waiting on a limit), scheduled, reserved and running counts, the oldest due
        task's wait, whether it is paused, and its limit."""
        require_admin()
        with db() as conn:
            return queue_summaries(conn)


def _checked(queue: str) -> str:
    if not is_name(queue):
        abort(404, message=f"No queue can be named {queue!r}: {NAME_RULE}")
    return queue


def _set_paused(queue: str, paused: bool) -> dict:
    who = require_admin()
    _checked(queue)
    with db() as conn:  # autocommit: the pause is committed before it takes effect
        state = dict(task_queue_set_paused(conn, queue=queue, paused=paused, by=who.prefix or "auth off"))
        if paused:
            state["released"] = queue_pause_take_effect(conn, queue=queue)
    return state


@blp.route(f"/queues/{QUEUE}/pause")
class PauseQueue(MethodView):
    @blp.response(200, QueueChangedSchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="Not a queue name")
    def post(self, queue):
        """Pause a queue: from this answer on none of its tasks starts, those claimed but not
        started included (they are pending again: `released`); running tasks finish."""
        return _set_paused(queue, True)


@blp.route(f"/queues/{QUEUE}/resume")
class ResumeQueue(MethodView):
    @blp.response(200, QueueChangedSchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="Not a queue name")
    def post(self, queue):
        """Resume a paused queue (idle workers are woken at once)."""
        return _set_paused(queue, False)


@blp.route(f"/queues/{QUEUE}/limit")
class QueueLimit(MethodView):
    @blp.response(200, LimitSchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="No limit on this queue")
    def get(self, queue):
        """The queue's limit, with how many of its tasks run and wait."""
        require_admin()
        with db() as conn:
            row = limit_get(conn, scope="queue", owner=0, name=_checked(queue))
        if row is None:
            abort(404, message=f"No limit is set on the queue {queue!r}.")
        return row

    @blp.arguments(LimitSetSchema)
    @blp.response(200, LimitSchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="Not a queue name")
    def put(self, data, queue):
        """Set (or change) the queue's limit: at most max_running of its tasks run at once, at
        most max_starts_per_second start, across every worker (max_running 0 holds them all).
        It holds when this answers."""
        who = require_admin()
        with db() as conn:
            return limit_put(
                conn, scope="queue", owner=0, name=_checked(queue), by=who.prefix or "auth off", **data
            )

    @blp.response(204)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="No limit on this queue")
    def delete(self, queue):
        """Remove the queue's limit: its waiting tasks may start at once."""
        require_admin()
        with db() as conn:
            deleted = limit_delete(conn, scope="queue", owner=0, name=_checked(queue))
        if not deleted:
            abort(404, message=f"No limit is set on the queue {queue!r}.")
