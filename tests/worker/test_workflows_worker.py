"""Workflows run by a real worker.py (issue 17, points 2 and 4): a chain whose steps add their
parent's result, each started by the previous step's end without waiting for a poll; a fan-out
and fan-in where the join sees every parent's result; a workflow's webhook row once it is final."""

from __future__ import annotations

import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from skiplock.sql.inserts import NewTask
from skiplock.sql.workflow_store import workflow_get, workflow_insert
from skiplock.workflows import Step, chain, checked
from tests.helpers import free_port, wait_until


def add_task(spec) -> NewTask:
    return NewTask("add", json.dumps(spec), "default", 0, 1, 10)


def steps_taken(port: int) -> float:
    """The worker's count of workflow steps it took itself (its --metrics-port)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        families = text_string_to_metric_families(answer.read().decode())
    [family] = [f for f in families if f.name == "skiplock_worker_workflow_steps_taken"]
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


def test_a_chain_passes_each_result_to_the_next_step(conn, worker_process):
    workflow_id, ids = workflow_insert(conn, checked(chain([1] * 20)), add_task)
    port = free_port()
    # A step that waited for a poll would show.
    worker_process("--concurrency", "2", "--metrics-port", str(port), poll_interval_seconds=5.0)
    view = wait_until(
        lambda: (v := workflow_get(conn, workflow_id))["state"] != "running" and v,
        timeout=60,
        message="the chain",
    )
    assert view["state"] == "completed"
    results = {
        r["id"]: r["result"]
        for r in conn.execute("SELECT id, result FROM tasks WHERE workflow_id = %s", (workflow_id,))
    }
    assert [results[ids[f"step-{n}"]] for n in range(1, 21)] == list(range(1, 21))
    gaps = conn.execute(
        """
        SELECT max(c.started_at - p.finished_at) AS worst FROM task_dependencies d
        JOIN tasks c ON c.id = d.task_id JOIN tasks p ON p.id = d.parent_id WHERE c.workflow_id = %s
        """,
        (workflow_id,),
    ).fetchone()["worst"]
    assert gaps.total_seconds() < 2.0, gaps  # each step started by its parent's end, not by a 5 s poll
    # Idle once its first claim came back short, the worker took each next step itself in the
    # transaction that ended the previous one (the first ones may go by NOTIFY and a claim).
    assert steps_taken(port) >= 15
    attempts = conn.execute(
        "SELECT count(*) AS n FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.workflow_id = %s",
        (workflow_id,),
    ).fetchone()["n"]
    assert attempts == 20  # each step ran once


def test_a_released_step_of_a_queue_the_worker_does_not_serve_goes_to_one_that_does(conn, worker_process):
    specs = [(1, "default"), (1, "mail"), (1, "default")]
    workflow_id, _ = workflow_insert(
        conn, checked(chain(specs)), lambda spec: NewTask("add", json.dumps(spec[0]), spec[1], 0, 1, 10)
    )
    default_worker = worker_process("--concurrency", "2", "--queue", "default")
    mail_worker = worker_process("--concurrency", "2", "--queue", "mail")
    view = wait_until(
        lambda: (v := workflow_get(conn, workflow_id))["state"] != "running" and v,
        timeout=60,
        message="the chain across two queues",
    )
    assert view["state"] == "completed"
    ran_by = {
        r["queue"]: r["pids"]
        for r in conn.execute(
            "SELECT queue, array_agg(DISTINCT split_part(worker_id, ':', 2)::int) AS pids FROM tasks"
            " WHERE workflow_id = %s GROUP BY queue",
            (workflow_id,),
        )
    }
    assert ran_by == {"default": [default_worker.pid], "mail": [mail_worker.pid]}


def test_a_fan_in_sees_every_parent(conn, worker_process):
    steps = [Step(f"p{n}", n) for n in range(50)] + [Step("join", 0, tuple(f"p{n}" for n in range(50)))]
    workflow_id, ids = workflow_insert(
        conn, checked(steps), add_task, callback_url="https://example.com/done"
    )
    worker_process("--concurrency", "2")
    wait_until(
        lambda: workflow_get(conn, workflow_id)["state"] != "running", timeout=60, message="the fan-in"
    )
    join = conn.execute(
        "SELECT status::text AS status, result FROM tasks WHERE id = %s", (ids["join"],)
    ).fetchone()
    assert join == {"status": "completed", "result": sum(range(50))}
    hooks = conn.execute(
        "SELECT event FROM webhook_deliveries WHERE workflow_id = %s", (workflow_id,)
    ).fetchall()
    assert [h["event"] for h in hooks] == ["workflow.completed"]
