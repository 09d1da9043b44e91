"""The API's building blocks, attached to each app in create_app()."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import marshmallow
from flask import current_app
from flask_smorest import Api as BaseApi
from flask_smorest import Blueprint as BaseBlueprint
from flask_smorest import abort
from psycopg_pool import ConnectionPool
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import RequestEntityTooLarge

from skiplock.db import create_pool, pooled_connection
from skiplock.registry import TaskRegistry
from skiplock.settings import Settings
from skiplock.sql.rows import Connection

from .watch import WatchHub

if TYPE_CHECKING:  # they import this module: attached in create_app
    from .auth import KeysByDigest
    from .limits import QuotaKeeper, RateLimiter


class Api(BaseApi):
    def handle_http_exception(self, error):
        """flask-smorest's {code, status, message, errors}, with a message on every error, and
        the headers the error itself calls for (Allow on a 405), which flask-smorest drops."""
        payload, code, headers = super().handle_http_exception(error)
        payload.setdefault("message", error.description)
        headers = dict(headers or {})
        for name, value in error.get_headers():
            if name.lower() != "content-type":
                headers.setdefault(name, value)
        extra = (getattr(error, "data", None) or {}).get("extra")
        if extra:
            payload.update(extra)
        return payload, code, headers


def api() -> Api:
    """This app's Api (one per app: an Api holds its app's OpenAPI document)."""
    return current_app.extensions["skiplock.api"]


class Parser(FlaskParser):
    # An unknown query parameter is a mistake to point out (a typo like ?stauts=failed would
    # otherwise list everything), as an unknown body field is.
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, "query": marshmallow.RAISE}

    def load_json(self, req, schema):
        """A JSON body must say so: anything else (a form, text, no Content-Type) is refused
        with 415 instead of being read as an empty body."""
        if not req.is_json:
            abort(415, message="Send the body as JSON, with Content-Type: application/json.")
        return super().load_json(req, schema)

    def _raw_load_json(self, req):
        """JSON that Python's parser cannot take (nested too deeply, an integer of more than 4300
        digits) is an invalid body (400) like any other, not a server error (500). A body sent
        without Content-Length (chunked) is cut at the size limit by Werkzeug, silently: one that
        reaches the limit is too large (413), not truncated JSON (400)."""
        limit = req.max_content_length
        if req.content_length is None and limit is not None and len(req.get_data(cache=True)) >= limit:
            raise RequestEntityTooLarge(f"The body is larger than the limit of {limit} bytes.")
        try:
            return super()._raw_load_json(req)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise  # webargs answers these with a 400
        except (RecursionError, ValueError) as exc:
            raise json.JSONDecodeError(str(exc), "<request body>", 0) from exc


class Blueprint(BaseBlueprint):
    ARGUMENTS_PARSER = Parser()


class TaskStore:
    """Per-app state: settings, the task registry and a connection pool, opened lazily in each
    process (gunicorn forks workers; a pool must never cross a fork)."""

    # Per process, attached in create_app: keys read (api.auth), rate limits and quotas
    # (api.limits).
    keys: KeysByDigest
    limiter: RateLimiter
    quotas: QuotaKeeper

    def __init__(self, settings: Settings, registry: TaskRegistry):
        self.settings = settings
        self.registry = registry
        self.catalogue: list[dict] = []  # GET /api/task-types, built once in create_app
        self.watch = WatchHub(self)  # long-polls and event streams (listens once first used)
        # api.metrics: counts a 429 that api.limits.EarlyRefusal sent before Flask saw the request.
        self.count_early_refusal: Callable[[str], None] | None = None
        self._pool: ConnectionPool | None = None
        self._pool_pid: int | None = None

    def pool(self) -> ConnectionPool:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = create_pool(
                self.settings.database_url,
                size=self.settings.pool_size,
                timeout_seconds=self.settings.db_timeout_seconds,
                pooler=self.settings.database_pooler,
            )
            self._pool_pid = os.getpid()
        return self._pool

    def close(self) -> None:
        self.watch.close()
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
        self._pool = None


def store() -> TaskStore:
    return current_app.extensions["skiplock"]


@contextmanager
def db() -> Iterator[Connection]:
    """A pooled connection for one request (autocommit: every query is its own transaction)."""
    with pooled_connection(store().pool()) as conn:
        yield conn
