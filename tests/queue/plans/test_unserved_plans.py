"""Query plans of the unserved-task checks (task_unserved_counts, read by `skiplock health`,
/metrics at every scrape and the dashboard; a stuck task's waiting_for, no_worker) on
a queue with a history of finished tasks and a runnable backlog larger than the walk's bound:
EXPLAIN (ANALYZE, BUFFERS) of the very statements the functions send. The walk goes through the
claim's partial index, stops at UNSERVED_SCAN_LIMIT whatever the backlog, and never reads the
history."""

from __future__ import annotations

import pytest

from skiplock.db import connect
from skiplock.sql.operations import UNSERVED_SCAN_LIMIT, task_unserved_counts
from skiplock.sql.waiting_for import task_waiting_for
from tests.helpers import Explain, cloned_database, indexes_used, plan_nodes
from tests.live_workers import serving_worker

FINISHED = 200_000
RUNNABLE = 3 * UNSERVED_SCAN_LIMIT
STUCK = 7  # of a type no worker runs, at the front of the claim order (never claimed)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_url(server_url, template_db):
    with cloned_database(server_url, template_db, "unserved") as url, connect(url, role="test") as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute(
            """
            INSERT INTO tasks (task_type, queue, input, status, attempts, worker_id, result,
                               started_at, finished_at)
            SELECT 'noop', 'default', 'null', 'completed', 1, 'w1', 'null', now(), now()
            FROM generate_series(1, %s)
            """,
            (FINISHED,),
        )
        # Runnable (pending with a turn): the stuck ones first in claim order, as they stay.
        conn.execute(
            """
            INSERT INTO tasks (task_type, queue, input, turn)
            SELECT CASE WHEN g <= %(stuck)s THEN 'resize' ELSE 'noop' END, 'default', 'null', g
            FROM generate_series(1, %(n)s) g
            """,
            {"stuck": STUCK, "n": RUNNABLE},
        )
        conn.execute("VACUUM ANALYZE tasks")
        yield url


@pytest.fixture
def big(big_url):
    with connect(big_url, role="test") as conn, serving_worker(big_url, conn, ["noop"]):
        yield conn


def plan_of(conn, function, **kwargs) -> dict:
    explain = Explain(conn, analyze=True, rows=True)
    function(explain, **kwargs)
    [plan] = explain.plans
    return plan


def test_the_walk_is_bounded_and_uses_the_claims_index(big):
    plan = plan_of(big, task_unserved_counts)
    assert indexes_used(plan) == {"tasks_runnable_idx"}, plan
    scans = [n for n in plan_nodes(plan) if n.get("Relation Name") == "tasks"]
    assert all(n["Node Type"] != "Seq Scan" for n in scans), plan
    # The index scan stops at the bound, whatever the backlog (RUNNABLE) and the history.
    assert sum(n["Actual Rows"] for n in scans) == UNSERVED_SCAN_LIMIT, plan
    assert task_unserved_counts(big) == [{"task_type": "resize", "queue": "default", "tasks": STUCK}]


def test_a_stuck_tasks_waiting_for_reads_it_by_id(big):
    """GET /api/tasks/{id} of a stuck task: one statement, its row by primary key and the worker
    registry; the claim order is never walked for it."""
    stuck = big.execute("SELECT id FROM tasks WHERE task_type = 'resize' LIMIT 1").fetchone()["id"]
    explain = Explain(big, analyze=True, rows=True)
    waits = task_waiting_for(explain, stuck)
    assert waits is not None and waits["reason"] == "no_worker"
    [plan] = explain.plans
    assert indexes_used(plan) == {"tasks_pkey"}, plan
    assert "task_workers" in {n.get("Relation Name") for n in plan_nodes(plan)}, plan
