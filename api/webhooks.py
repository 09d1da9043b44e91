"""Webhooks, for clients: the secret that signs their webhooks, a task's deliveries with every
try, and sending a delivery again. (Deliveries are made by the final write of a task submitted
with callback_url, and sent by the workers: skiplock/webhooks/sender.py.)"""

from __future__ import annotations

from flask.views import MethodView
from marshmallow import Schema, fields
from webargs.flaskparser import abort  # flask_smorest.abort, typed (NoReturn)

from skiplock.sql.tasks import task_get
from skiplock.sql.webhooks import webhook_deliveries_of_task, webhook_resend, webhook_secret
from skiplock.webhooks.signing import message_id, new_secret

from .auth import principal
from .extensions import Blueprint, db, store
from .tasks import TASK_ID, not_found

blp = Blueprint(
    "webhooks",
    __name__,
    url_prefix="/api",
    description="Webhooks: tasks submitted with callback_url are POSTed there once final.",
)

DELIVERY_ID = "<int(signed=False):delivery_id>"


class WebhookSecretSchema(Schema):
    secret = fields.String(
        metadata={"description": "whsec_...: verify webhook-signature with it (Standard Webhooks)."}
    )


class WebhookTrySchema(Schema):
    attempt = fields.Integer()
    sender = fields.String(metadata={"description": "The worker that sent it."})
    started_at = fields.String(metadata={"format": "date-time"})
    latency_ms = fields.Float(allow_none=True)
    status_code = fields.Integer(allow_none=True, metadata={"description": "null: no answer"})
    error = fields.String(allow_none=True, metadata={"description": "null: a 2xx"})


class WebhookDeliverySchema(Schema):
    delivery_id = fields.Integer(attribute="id")
    webhook_id = fields.Function(
        lambda d: message_id(d["id"]), metadata={"description": "The webhook-id header"}
    )
    task_id = fields.Integer()
    url = fields.String()
    event = fields.String(metadata={"enum": ["task.completed", "task.failed", "task.cancelled"]})
    status = fields.String(metadata={"enum": ["pending", "delivered", "dead"]})
    attempts = fields.Integer()
    max_attempts = fields.Integer(allow_none=True, metadata={"description": "null: the server's default"})
    next_attempt_at = fields.DateTime()
    created_at = fields.DateTime()
    delivered_at = fields.DateTime(allow_none=True)
    last_status_code = fields.Integer(allow_none=True)
    last_error = fields.String(allow_none=True)


class WebhookDeliveryWithTriesSchema(WebhookDeliverySchema):
    tries = fields.List(fields.Nested(WebhookTrySchema))


class WebhookDeliveryConflictSchema(Schema):
    code = fields.Integer()
    status = fields.String(metadata={"description": "The delivery's status: pending"})
    message = fields.String()
    delivery_id = fields.Integer()


@blp.route("/webhooks/secret")
class WebhookSecret(MethodView):
    @blp.response(200, WebhookSecretSchema)
    def get(self):
        """The secret that signs the webhooks of this key's tasks (made on first use); a task
        submitted with callback_secret is signed with that instead."""
        with db() as conn:
            return {"secret": webhook_secret(conn, owner_key_id=principal().key_id, candidate=new_secret())}


@blp.route(f"/tasks/{TASK_ID}/webhooks")
class TaskWebhooks(MethodView):
    @blp.response(200, WebhookDeliveryWithTriesSchema(many=True))
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    def get(self, task_id):
        """A task's webhook deliveries (one per time it became final), each with every try:
        when, how long the receiver took, what it answered."""
        owner = principal().owner
        with db() as conn:
            task_get(conn, task_id, owner=owner)  # 404/410 as for the task itself
            return webhook_deliveries_of_task(conn, task_id, owner=owner)


@blp.route(f"/webhooks/{DELIVERY_ID}/resend")
class ResendWebhook(MethodView):
    @blp.response(200, WebhookDeliverySchema)
    @blp.alt_response(404, response="DEFAULT_ERROR", description="No such delivery")
    @blp.alt_response(409, schema=WebhookDeliveryConflictSchema, description="Still pending: it will be sent")
    def post(self, delivery_id):
        """Send a delivered or dead webhook again, now (same webhook-id and body: a receiver
        that already has it can tell), with a full set of tries."""
        with db() as conn:
            resent, delivery = webhook_resend(
                conn,
                delivery_id,
                owner=principal().owner,
                max_attempts=store().settings.webhook_max_attempts,
            )
        if delivery is None:
            abort(404, message=f"No webhook delivery has the id {delivery_id}.")
        if not resent:
            abort(
                409,
                message=f"Webhook delivery {delivery_id} is still pending; it will be sent "
                f"(next try at {delivery['next_attempt_at'].isoformat()}).",
                extra={"status": delivery["status"], "delivery_id": delivery_id},
            )
        return delivery
