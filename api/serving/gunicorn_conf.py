"""gunicorn's settings and hooks for the API (override any of them on the command line): the
checkout's gunicorn.conf.py loads this module; an installed skiplock names it with
`-c python:skiplock.api.serving.gunicorn_conf`."""

import multiprocessing
import os

from .logger import GunicornLogger

bind = os.environ.get("SKIPLOCK_BIND", "127.0.0.1:8000")
# gevent: a process holds many requests at once, and one that waits (a long-poll, an event
# stream, a query) costs a greenlet, not a process. Measured against sync and gthread with 1,000
# long-polls waiting (docs/benchmarks.md, bench/waiting.py): gevent with one process per core
# took the least memory (174 MiB for all, against 285 for gthread with 300 threads per process),
# answered waiters soonest (p99 3.9 ms, gthread 49 ms) and submitted at least as fast as sync.
# psycopg (>= 3.1.14) cooperates with gevent by itself.
worker_class = os.environ.get("SKIPLOCK_WORKER_CLASS", "gevent")
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
# Clients one process holds at once (waiters included); gunicorn's default is 1,000.
worker_connections = int(os.environ.get("SKIPLOCK_WORKER_CONNECTIONS", 2000))
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = os.environ.get("SKIPLOCK_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("SKIPLOCK_LOG_LEVEL", "info").lower()
# SKIPLOCK_LOG_FORMAT=json: the error log, the access log and the app's lines as JSON objects, one
# per line (skiplock/logs.py); text (the default): gunicorn's own logger, unchanged. A logger
# class rather than logconfig_dict, which would make gunicorn build every request's access-log
# fields even with the access log off.
logger_class = GunicornLogger
proc_name = "skiplock-api"
# gunicorn 27's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl), which
# each instance removes when it starts and stops: two skiplock APIs of one user would break each
# other's. skiplock does not use it (gunicornc); to have it, give each instance its own path.
control_socket = os.environ.get("SKIPLOCK_GUNICORN_CONTROL_SOCKET") or None
control_socket_disable = control_socket is None


def on_starting(server):
    """Refuse to serve without authentication on an address other clients can reach, unless
    the operator insists (SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND=1), or with settings, a database or
    task modules every worker would fail on (one line naming the fix, not a traceback per
    worker); then prepare the directory where every worker process keeps its metrics
    (prometheus-client's multiprocess mode), before any worker imports prometheus-client."""
    from .bind_guard import refuse_public_bind_without_auth
    from .metrics_dir import prepare
    from .startup_checks import refuse_unless_startable, serves_skiplock

    refuse_public_bind_without_auth(server.cfg.bind, server.log)
    if serves_skiplock(getattr(server.app, "app_uri", None)):  # not another app under this config
        refuse_unless_startable(server.log)
    prepare(server.log)


def child_exit(server, worker):
    """A worker process is gone: its live gauges go with it (its counters stay summed)."""
    from .metrics_dir import forget_process

    forget_process(worker.pid)


def worker_exit(server, worker):
    """Close the app's pool and listener while the process can still join their threads (left
    to the garbage collector at exit, psycopg_pool's cleanup fails under gevent)."""
    app = getattr(worker, "wsgi", None)
    store = getattr(app, "extensions", {}).get("skiplock")
    if store is not None:
        store.close()


def on_exit(server):
    from .metrics_dir import remove

    remove()
