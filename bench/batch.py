"""Batch submit: 1,000 tasks per request from 3 clients, next to the same INSERT statement issued
straight from Python."""

from __future__ import annotations

import json
import threading
import time

import psycopg
from harness import ROWS, Databases, Row, connect, post, start_gunicorn, stop

from skiplock.sql.inserts import NewTask, task_insert_many

BATCH = {"tasks": [{"task_type": "noop", "task_input": {"n": i}} for i in range(1000)]}


def batch_rate(url: str, seconds: float, *, env: dict | None = None, token: str | None = None) -> float:
    """Tasks/s of 3 clients posting 1,000 tasks per request to a fresh gunicorn for `seconds`."""
    api, base = start_gunicorn("wsgi:app", url, env=env)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    counts: list[int] = []

    def client():
        n, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            status, answer = post(base + "/api/tasks/batch", BATCH, headers)
            assert status == 202 and len(answer["task_ids"]) == 1000, (status, answer)
            n += 1000
        counts.append(n)

    try:
        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.monotonic() - started)
    finally:
        stop(api)


def batch_submit(dbs: Databases, seconds: float) -> None:
    url = dbs.fresh("batch")
    rate = batch_rate(url, seconds)
    # Baseline: the same rows through the same statement straight from Python, no HTTP.
    new = [NewTask("noop", json.dumps({"n": i}), "default", 0, 3, 30) for i in range(1000)]
    with connect(url) as conn:
        conn.row_factory = psycopg.rows.dict_row
        n, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            task_insert_many(conn, new)
            n += 1000
        direct = n / (time.monotonic() - started)
    ratio = rate / direct
    ROWS.append(
        Row(
            "batch submit (1,000/request)",
            f"{rate:,.0f} tasks/s",
            f"{direct:,.0f} rows/s (direct INSERT)",
            ratio,
            ">= 80%",
            ratio >= 0.8,
        )
    )
