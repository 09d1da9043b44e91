"""Queues, for admin keys: their summary, and pausing and resuming them (workers stop claiming
from a paused queue within a second; what runs finishes). The state is a row of task_queues."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import abort

from skiplock.sql.operations import QueueStateRow, queue_summaries, task_queue_set_paused
from skiplock.submission import NAME_RULE, is_name

from .auth import require_admin
from .extensions import Blueprint, db
from .schemas import QueueSchema, QueueStateSchema

blp = Blueprint("queues", __name__, url_prefix="/api", description="Queues (admin keys only).")

QUEUE = "<queue>"


def forbidden():
    return blp.alt_response(403, response="DEFAULT_ERROR", description="Not an admin key")


@blp.route("/queues")
class Queues(MethodView):
    @blp.response(200, QueueSchema(many=True))
    @forbidden()
    def get(self):
        """Every queue with unfinished tasks or a setting: due, scheduled, reserved and running
        counts, the oldest due task's wait, and whether it is paused."""
        require_admin()
        with db() as conn:
            return queue_summaries(conn)


def _set_paused(queue: str, paused: bool) -> QueueStateRow:
    who = require_admin()
    if not is_name(queue):
        abort(404, message=f"No queue can be named {queue!r}: {NAME_RULE}")
    with db() as conn:
        return task_queue_set_paused(conn, queue=queue, paused=paused, by=who.prefix or "auth off")


@blp.route(f"/queues/{QUEUE}/pause")
class PauseQueue(MethodView):
    @blp.response(200, QueueStateSchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="Not a queue name")
    def post(self, queue):
        """Pause a queue: no worker claims from it (within a second); running tasks finish."""
        return _set_paused(queue, True)


@blp.route(f"/queues/{QUEUE}/resume")
class ResumeQueue(MethodView):
    @blp.response(200, QueueStateSchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="Not a queue name")
    def post(self, queue):
        """Resume a paused queue (idle workers are woken at once)."""
        return _set_paused(queue, False)
