"""Liveness and readiness probes, and the static files of the interactive docs (/docs)."""

from __future__ import annotations

import flask
import swagger_ui_bundle
from flask.views import MethodView
from flask_smorest import Blueprint

from skiplock.sql.operations import database_ping

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
    @blp.alt_response(503, response="DEFAULT_ERROR", description="Database unreachable")
    @blp.doc(security=[])  # public: no API key
    def get(self):
        """The database answers: this process can serve requests."""
        with db() as conn:
            database_ping(conn)
        return {"status": "ready"}


# Swagger UI's files come from a Python package, so /docs works without internet access.
# A plain Flask blueprint: not part of the API, so not in the OpenAPI document.
docs_static = flask.Blueprint(
    "docs_static", __name__, static_folder=swagger_ui_bundle.swagger_ui_path, static_url_path="/docs/static"
)
