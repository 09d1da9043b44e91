"""What tracing costs a submit: one task per request under wrk, with a W3C traceparent header
(the API extracts it and stores the context with the task, tasks.trace_context) against the same
requests without one. Both with opentelemetry-api installed (the `tracing` extra)."""

from __future__ import annotations

import shutil

from harness import ROWS, Databases, Row, cost_row, log, serve_and_load
from scheduling import _dict_conn, _order


def submit_cost(dbs: Databases, seconds: int, rounds: int) -> None:
    """Rounds of (without, with) a traceparent, each a fresh database and gunicorn."""
    name = "submit with a traceparent (16 conns)"
    if not shutil.which("wrk"):
        ROWS.append(Row(name, "wrk missing", "-", None, ">= 90%", None))
        return
    plain, traced = [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for mode in _order(round_, "traced"):
            url = dbs.fresh("tracing")
            results = traced if mode == "traced" else plain
            results.append(
                serve_and_load("wsgi:app", url, seconds, script="traced.lua", script_args=(mode,))[0]
            )
            with _dict_conn(url) as conn:
                row = conn.execute(
                    """SELECT count(*) AS n, count(trace_context) AS traced FROM tasks
                    WHERE input = '{"n": 1}'::jsonb"""
                ).fetchone()
            expected = row["n"] if mode == "traced" else 0
            assert row["n"] and row["traced"] == expected, f"{mode}: {row} (is opentelemetry-api installed?)"
            dbs.drop(url)
        log(f"  {plain[-1]:,.0f} req/s without, {traced[-1]:,.0f} req/s with a traceparent")
    cost_row(name, traced, plain, "req/s", "no traceparent", 0.9)
