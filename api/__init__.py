"""The HTTP API: a Flask app factory. `create_app()` reads settings from the environment;
tests pass their own Settings."""

from __future__ import annotations

from flask import Flask

from api import errors, health, task_types, tasks
from api.extensions import Api, TaskStore
from skiplock.registry import load_registry
from skiplock.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set (`make run` starts a database for you)")
    app = Flask(__name__)
    app.config.update(
        API_TITLE="skiplock",
        API_VERSION="1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="/docs/static/",
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_SPEC_OPTIONS={
            "info": {
                "description": "Submit CPU-heavy work, poll its status, fetch its result. "
                "PostgreSQL is the queue (FOR UPDATE SKIP LOCKED)."
            }
        },
    )
    registry = load_registry(settings.task_modules, allow_crash=settings.allow_crash)
    task_store = app.extensions["skiplock"] = TaskStore(settings, registry)
    # One Api per app, not one per process: an Api keeps the OpenAPI document of its app.
    api = app.extensions["skiplock.api"] = Api(app)
    errors.register(app)
    for blueprint in (tasks.blp, task_types.blp, health.blp):
        api.register_blueprint(blueprint)
    app.register_blueprint(health.docs_static)
    task_types.publish_input_schemas(api, task_store)
    return app
