"""WSGI entry point of a checkout: `gunicorn wsgi:app` (settings from the environment). An installed
skiplock serves the same app as `gunicorn -c python:skiplock.api.serving.gunicorn_conf
'skiplock.api:create_app()'`."""

from api.app import create_app

app = create_app()
