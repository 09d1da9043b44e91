"""The HTTP API: a Flask app (app.py's create_app) with one flask-smorest blueprint per resource.

Importing this package loads nothing: gunicorn's config imports api.serving in its master process,
before gevent patches the standard library, so the app's modules (and what they import) must load
only in the workers, through create_app."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "create_app":  # `from api import create_app`, loaded on first use
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
