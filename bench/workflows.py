"""Workflows (issue 17): what dependencies cost where users feel it.

- chain: a chain of CHAIN_STEPS noop steps run by one worker.py (default settings): the time from
  a step's end to its child's start (database clock), p50 and p99. Each step is released in the
  transaction that ended its parent and idle workers are woken at its commit.
- fan-out / fan-in: N noop steps and one join step that depends on all of them, drained by the
  worker, against the plain drain of N tasks (drain.py, default settings) in the same rounds;
  the rate counts the N + 1 tasks from the first start to the join's end.
"""

from __future__ import annotations

import json
import time

import psycopg
from drain import drain
from harness import ROWS, Databases, Row, cost_row, log, percentile, start_worker, stop
from psycopg.rows import dict_row

from skiplock.sql.inserts import NewTask
from skiplock.sql.workflow_store import workflow_insert
from skiplock.workflows import Step, chain, checked

CHAIN_STEPS = 100
NOOP = NewTask("noop", json.dumps(None), "default", 0, 3, 30)


def _noop(_spec) -> NewTask:
    return NOOP


def _wait_final(conn: psycopg.Connection, workflow_id: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (
        conn.execute("SELECT finished_at FROM workflows WHERE id = %s", (workflow_id,)).fetchone()[
            "finished_at"
        ]
        is None
    ):
        assert time.monotonic() < deadline, f"workflow {workflow_id} did not finish in {timeout} s"
        time.sleep(0.1)


def chain_latency(dbs: Databases, rounds: int) -> None:
    gaps: list[float] = []
    for round_ in range(rounds):
        url = dbs.fresh("workflow_chain")
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            worker = start_worker(url)
            try:
                time.sleep(2)  # started and idle: each step is woken by its parent's end
                workflow_id, _ = workflow_insert(conn, checked(chain([None] * CHAIN_STEPS)), _noop)
                _wait_final(conn, workflow_id, 120)
            finally:
                stop(worker)
            rows = conn.execute(
                """
                SELECT extract(epoch FROM c.started_at - p.finished_at)::float8 * 1000 AS ms
                FROM task_dependencies d JOIN tasks c ON c.id = d.task_id JOIN tasks p ON p.id = d.parent_id
                WHERE c.workflow_id = %s
                """,
                (workflow_id,),
            ).fetchall()
            gaps += [r["ms"] for r in rows]
        dbs.drop(url)
        log(f"  round {round_ + 1}: p50 {percentile(gaps, 50):.2f} ms, p99 {percentile(gaps, 99):.2f} ms")
    p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
    ROWS.append(
        Row(
            f"chain of {CHAIN_STEPS} noop steps: a step's end to the next one's start",
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
            f"{len(gaps)} steps over {rounds} round(s)",
            None,
            "p50 <= 5 ms",
            p50 <= 5.0,
        )
    )


def _fill_fan(url: str, tasks: int) -> None:
    steps = [Step(f"t{n}", None) for n in range(tasks - 1)]
    steps.append(Step("join", None, tuple(s.ref for s in steps)))
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        workflow_insert(conn, checked(steps), _noop)


def _fan_info(conn: psycopg.Connection) -> dict:
    status, finished_at = conn.execute(
        "SELECT status::text, finished_at FROM tasks WHERE workflow_ref = 'join'"
    ).fetchone()
    assert status == "completed", status
    return {"join_finished_at": finished_at}


def fan_in(dbs: Databases, tasks: int, rounds: int) -> None:
    """N-1 steps and a join on all of them (N tasks), against the plain drain of N."""
    plain: list[float] = []
    fanned: list[float] = []
    for round_ in range(rounds):
        order = ("plain", "fan") if round_ % 2 == 0 else ("fan", "plain")
        for which in order:
            if which == "plain":
                plain.append(drain(dbs, tasks)[0])
            else:
                fanned.append(drain(dbs, tasks, fill=_fill_fan, check=_fan_info)[0])
        log(f"  round {round_ + 1}: {plain[-1]:,.0f} tasks/s plain, {fanned[-1]:,.0f} tasks/s fan-out/fan-in")
    cost_row(
        f"fan-out of {tasks - 1:,} steps and a fan-in on all of them",
        fanned,
        plain,
        "tasks/s",
        f"plain drain of {tasks:,}",
        0.7,
    )
