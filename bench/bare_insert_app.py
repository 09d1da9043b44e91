"""A reference for submit throughput: bare Flask plus the one INSERT a submit needs (same pool,
same table and trigger), no validation and no flask-smorest. The distance from bare_app.py to
this is what one committed row per request costs; from this to skiplock, everything else."""

import os

from flask import Flask, request
from psycopg.types.json import Jsonb

from skiplock.db import create_pool, pooled_connection

app = Flask(__name__)
_pools: dict = {}


def pool():
    if os.getpid() not in _pools:  # gunicorn forks: one pool per process, opened after the fork
        _pools[os.getpid()] = create_pool(os.environ["DATABASE_URL"], size=4, timeout_seconds=2)
    return _pools[os.getpid()]


@app.post("/api/submit-task")
def submit():
    body = request.get_json()
    with pooled_connection(pool()) as conn:
        row = conn.execute(
            "INSERT INTO tasks (task_type, input) VALUES (%s, %s) RETURNING id, status::text AS status",
            (body.get("task_type", "default"), Jsonb(body["task_input"])),
        ).fetchone()
    return {"task_id": row["id"], "status": row["status"]}, 202
