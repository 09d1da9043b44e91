"""A reference for submit throughput: bare Flask plus the one INSERT a submit needs (the same
statement, skiplock.sql.inserts.task_insert, so the same row with its fair turn; the same pool,
table and trigger), no validation and no flask-smorest. The distance from bare_app.py to this is
what one committed row per request costs; from this to skiplock, everything else. (Until
2026-12-06 it inserted only task_type and input: a row without a turn, which no worker claims.)"""

import atexit
import os

from flask import Flask, request

from skiplock.db import create_pool, pooled_connection
from skiplock.sql.inserts import task_insert

app = Flask(__name__)
_pools: dict = {}


def pool():
    if os.getpid() not in _pools:  # gunicorn forks: one pool per process, opened after the fork
        _pools[os.getpid()] = create_pool(os.environ["DATABASE_URL"], size=4, timeout_seconds=2)
        # Closed while the process can still join the pool's threads: left to the garbage
        # collector at exit, psycopg_pool's cleanup fails under gevent (a traceback per worker).
        atexit.register(_pools[os.getpid()].close)
    return _pools[os.getpid()]


@app.post("/api/submit-task")
def submit():
    body = request.get_json()
    with pooled_connection(pool()) as conn:
        row = task_insert(
            conn,
            task_type=body.get("task_type", "default"),
            input=body["task_input"],
            queue="default",
            priority=0,
            max_attempts=3,
            timeout_seconds=300,
            full_row=False,
        )
    return {"task_id": row["id"], "status": row["status"]}, 202
