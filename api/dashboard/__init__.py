"""The operators' dashboard (/dashboard): server-rendered pages (views.py) behind a session of their
own (session.py), with its templates and vendored static files beside them."""

from .views import register

__all__ = ["register"]
