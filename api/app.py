"""The HTTP API: a Flask app factory. `create_app()` reads settings from the environment;
tests pass their own Settings."""

from __future__ import annotations

import logging

from flask import Flask

from skiplock.settings import Settings
from skiplock.startup import load_task_registry

from . import (
    auth,
    concurrency_limits,
    dashboard,
    errors,
    events,  # noqa: F401  (adds GET /api/tasks/{id}/events to tasks.blp)
    health,
    keys,
    limit_schemas,
    limits,
    metrics,
    queues,
    request_log,
    schedules,
    stream_tokens,  # noqa: F401  (adds POST /api/{tasks,workflows}/{id}/stream-token to their blueprints)
    task_types,
    tasks,
    webhooks,
    workflow_events,  # noqa: F401  (adds GET /api/workflows/{id}/events to workflows.blp)
    workflows,
)
from .extensions import Api, TaskStore
from .typed_submit import TypedSubmitPlugin

log = logging.getLogger("skiplock.api")

BEARER_SECURITY = {"ApiKey": {"type": "http", "scheme": "bearer", "description": "An API key: skl_..."}}


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set (`make run` starts a database for you)")
    if settings.database_pooler == "transaction" and not settings.listen_database_url:
        raise RuntimeError(
            "SKIPLOCK_DATABASE_POOLER=transaction needs SKIPLOCK_LISTEN_DATABASE_URL "
            "(LISTEN must bypass the pooler)"
        )
    # No app-wide /static route: the dashboard serves its own files (api/dashboard/static).
    # The package's name (api, or skiplock.api when installed): Flask logs under it.
    app = Flask(__name__.rpartition(".")[0], static_folder=None)
    typed_submit = TypedSubmitPlugin()
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
            },
            "components": {"securitySchemes": BEARER_SECURITY},
            "security": [{"ApiKey": []}] if settings.auth_on else [],
        },
    )
    # A task module that does not import: a StartupError naming it and the fix (PYTHONPATH).
    registry = load_task_registry(settings.task_modules, allow_crash=settings.allow_crash)
    task_store = app.extensions["skiplock"] = TaskStore(settings, registry)
    task_store.keys = auth.keys_by_digest(settings.key_cache_seconds)
    task_store.limiter = limits.RateLimiter()
    task_store.quotas = limits.QuotaKeeper()
    typed_submit.type_names = registry.names()
    # One Api per app, not one per process: an Api keeps the OpenAPI document of its app.
    api = app.extensions["skiplock.api"] = Api(
        app, spec_kwargs={"extra_plugins": [typed_submit, limit_schemas.LimitRulesPlugin()]}
    )
    app.url_map.converters["task_id"] = tasks.TaskIdConverter
    api.register_converter(tasks.TaskIdConverter, lambda converter: dict(tasks.TASK_ID_SCHEMA))
    errors.register(app)
    auth.register(app)  # before the limits: they count per key
    limits.register(app)
    request_log.register(app)  # SKIPLOCK_LOG_FORMAT=json: the caller's key in the access log
    for blueprint in (
        tasks.blp,
        task_types.blp,
        queues.blp,
        concurrency_limits.blp,
        keys.blp,
        schedules.blp,
        workflows.blp,
        webhooks.blp,
        health.blp,
    ):
        api.register_blueprint(blueprint)
    app.register_blueprint(health.docs_static)
    dashboard.register(app)  # /dashboard: its own session cookie, CSRF checks and assets
    metrics.register(app)
    task_types.publish_input_schemas(api, task_store, typed_submit)
    if not settings.auth_on:
        log.warning("authentication is OFF (SKIPLOCK_AUTH=off): anyone who reaches this API may use it")
    return app
