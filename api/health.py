"""Liveness and readiness probes, and the static files of the interactive docs (/docs)."""

from __future__ import annotations

import flask
import swagger_ui_bundle
from flask.views import MethodView
from flask_smorest import Blueprint, abort

from skiplock.startup import schema_state

from .extensions import db

blp = Blueprint("health", __name__, description="Probes for load balancers and orchestrators.")


@blp.route("/healthz")
class Health(MethodView):
    @blp.response(200)
    @blp.doc(security=[])  # public: no API key
    def get(self):
        """The process is up (does not touch the database)."""
        return {"status": "ok"}


@blp.route("/readyz")
class Ready(MethodView):
    @blp.response(200)
    @blp.alt_response(
        503,
        response="DEFAULT_ERROR",
        description="Database unreachable, or its schema missing or older than this code needs "
        "(the message names the fix)",
    )
    @blp.doc(security=[])  # public: no API key
    def get(self):
        """The database answers, with a schema this code can use: this process can serve
        requests. A newer schema is served (schema changes only add), with a `warning`."""
        with db() as conn:
            state = schema_state(conn)
        if state.refusal:
            abort(503, message=state.refusal)
        body = {"status": "ready", "schema_version": state.version}
        return {**body, "warning": state.warning} if state.warning else body


# Swagger UI's files come from a Python package, so /docs works without internet access.
# A plain Flask blueprint: not part of the API, so not in the OpenAPI document.
docs_static = flask.Blueprint(
    "docs_static", __name__, static_folder=swagger_ui_bundle.swagger_ui_path, static_url_path="/docs/static"
)
