"""Extensions created once at import and attached in create_app()."""

from __future__ import annotations

import os
from contextlib import contextmanager

from flask import current_app
from flask_smorest import Api as BaseApi
from psycopg_pool import ConnectionPool

from skiplock.db import create_pool
from skiplock.registry import TaskRegistry
from skiplock.settings import Settings


class Api(BaseApi):
    def handle_http_exception(self, error):
        """flask-smorest's {code, status, message, errors}, with a message on every error."""
        payload, code, headers = super().handle_http_exception(error)
        payload.setdefault("message", error.description)
        extra = (getattr(error, "data", None) or {}).get("extra")
        if extra:
            payload.update(extra)
        return payload, code, headers


api = Api()


class TaskStore:
    """Per-app state: settings, the task registry and a connection pool, opened lazily in each
    process (gunicorn forks workers; a pool must never cross a fork)."""

    def __init__(self, settings: Settings, registry: TaskRegistry):
        self.settings = settings
        self.registry = registry
        self.catalogue: list[dict] = []  # GET /api/task-types, built once in create_app
        self._pool: ConnectionPool | None = None
        self._pool_pid: int | None = None

    def pool(self) -> ConnectionPool:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = create_pool(
                self.settings.database_url,
                size=self.settings.pool_size,
                timeout_seconds=self.settings.db_timeout_seconds,
            )
            self._pool_pid = os.getpid()
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
        self._pool = None


def store() -> TaskStore:
    return current_app.extensions["skiplock"]


@contextmanager
def db():
    """A pooled connection for one request (autocommit: every query is its own transaction)."""
    with store().pool().connection() as conn:
        yield conn
