"""gunicorn's settings for `gunicorn wsgi:app` in a checkout: they live in api/serving/gunicorn_conf.py
(an installed skiplock: `gunicorn -c python:skiplock.api.serving.gunicorn_conf ...`)."""

from api.serving.gunicorn_conf import *  # noqa: F403
