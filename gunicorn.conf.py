"""gunicorn settings for `gunicorn wsgi:app` (override any of them on the command line)."""

import multiprocessing
import os

bind = os.environ.get("SKIPLOCK_BIND", "127.0.0.1:8000")
# Requests spend their time waiting on Postgres; two sync workers per core keep the cores busy.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2))
worker_class = "sync"
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = os.environ.get("SKIPLOCK_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("SKIPLOCK_LOG_LEVEL", "info").lower()
proc_name = "skiplock-api"
# gunicorn 27's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl), which
# each instance removes when it starts and stops: two skiplock APIs of one user would break each
# other's. skiplock does not use it (gunicornc); to have it, give each instance its own path.
control_socket = os.environ.get("SKIPLOCK_GUNICORN_CONTROL_SOCKET") or None
control_socket_disable = control_socket is None


def on_starting(server):
    """Refuse to serve without authentication on an address other clients can reach, unless
    the operator insists (SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND=1); then prepare the directory where
    every worker process keeps its metrics (prometheus-client's multiprocess mode), before any
    worker imports prometheus-client."""
    from skiplock.bind_guard import refuse_public_bind_without_auth
    from skiplock.metrics_dir import prepare

    refuse_public_bind_without_auth(server.cfg.bind, server.log)
    prepare(server.log)


def child_exit(server, worker):
    """A worker process is gone: its live gauges go with it (its counters stay summed)."""
    from skiplock.metrics_dir import forget_process

    forget_process(worker.pid)


def on_exit(server):
    from skiplock.metrics_dir import remove

    remove()
