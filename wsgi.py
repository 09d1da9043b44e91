"""WSGI entry point of a checkout: `gunicorn wsgi:app` (settings from the environment). An installed
skiplock serves the same app as `gunicorn -c python:skiplock.api.serving.gunicorn_conf
'skiplock.api:create_app()'` (gunicorn's checks at start are in that module's on_starting)."""

from api.app import create_app
from api.serving.startup_checks import app_or_refusal

app = app_or_refusal(create_app)  # a task module that fails to import: one line, then gunicorn stops
