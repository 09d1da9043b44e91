"""Query plans of the statements a workflow step's end runs in the worker's writer transaction,
generic-planned as they run there (skiplock.sql.workflows.workflow_steps_ended sets
plan_cache_mode = force_generic_plan), on a table with many finished tasks and many finished
workflows' edges: each reads what it moves through primary keys and edges, never a whole table;
the probe for an unfinished parent of a 5,000-parent fan-in reads a handful of pages, not its
edges. EXPLAIN (ANALYZE, BUFFERS) of the very statement texts, counting buffers, never timing."""

from __future__ import annotations

import re

import pytest
from psycopg import sql

from skiplock.db import connect
from skiplock.sql.claim import TASK_CLAIM_RELEASED_SQL
from skiplock.sql.fragments import PENDING_CHANNEL, RUNNABLE
from skiplock.sql.workflows import (
    _BAD_PARENT_SQL,
    _DECIDE_SQL,
    _LOCK_SQL,
    _RELEASE_SQL,
    BLOCKED_RUN_AT,
)
from tests.helpers import cloned_database, plan_nodes, seq_scanned

FINISHED = 200_000  # finished plain tasks
OLD_WORKFLOWS, OLD_STEPS = 200, 50  # finished fan-ins: 10,000 edges
PARENTS = 5_000  # the live fan-in's parents, the older half completed


@pytest.fixture(scope="module")
def big(server_url, template_db):
    with cloned_database(server_url, template_db, "wfplan") as url, connect(url, role="test") as conn:
        yield conn, _fill(conn)


def _fill(conn) -> dict:
    # A fill, not a statement under test: its millions of rows may take longer than the bound
    # a skiplock session puts on one statement (on a busy CI machine they did).
    conn.execute("SET statement_timeout = 0")
    conn.execute("SET session_replication_role = replica")  # no notify trigger per statement
    done = "'completed', 'null', 1, 1, 'w1', now() - interval '1 day', now() - interval '1 day'"
    conn.execute(
        f"""
        INSERT INTO tasks (task_type, queue, input, status, result, progress, attempts, worker_id,
                           started_at, finished_at)
        SELECT 'noop', 'default', 'null', {done} FROM generate_series(1, %s)
        """,
        (FINISHED,),
    )
    # Finished workflows: OLD_STEPS parents and a join each.
    for _ in range(OLD_WORKFLOWS):
        wf = conn.execute(
            "INSERT INTO workflows (state, finished_at) VALUES ('completed', now()) RETURNING id"
        ).fetchone()["id"]
        ids = [
            r["id"]
            for r in conn.execute(
                f"""
                INSERT INTO tasks (task_type, queue, input, status, result, progress, attempts, worker_id,
                                   started_at, finished_at, workflow_id, workflow_ref, has_dependents,
                                   trigger_rule)
                SELECT 'noop', 'default', 'null', {done}, %s, 's' || g, g < %s,
                       CASE WHEN g = %s THEN 'all_succeeded' END
                FROM generate_series(1, %s) g RETURNING id
                """,
                (wf, OLD_STEPS + 1, OLD_STEPS + 1, OLD_STEPS + 1),
            )
        ]
        join = max(ids)
        conn.execute(
            "INSERT INTO task_dependencies (task_id, parent_id) SELECT %s, unnest(%s::bigint[])",
            (join, [i for i in ids if i != join]),
        )
    # The live fan-in: PARENTS steps, the older half completed, and a join waiting for them.
    wf = conn.execute("INSERT INTO workflows DEFAULT VALUES RETURNING id").fetchone()["id"]
    parents = [
        r["id"]
        for r in conn.execute(
            """
            INSERT INTO tasks (task_type, queue, input, turn, workflow_id, workflow_ref, has_dependents)
            SELECT 'noop', 'default', 'null', g, %s, 'p' || g, true FROM generate_series(1, %s) g RETURNING id
            """,
            (wf, PARENTS),
        )
    ]
    parents.sort()
    ended = parents[: PARENTS // 2]
    conn.execute(
        "UPDATE tasks SET status = 'completed', result = 'null', progress = 1, attempts = 1, worker_id = 'w1',"
        " turn = NULL, started_at = now(), finished_at = now() WHERE id = ANY(%s)",
        (ended,),
    )
    join = conn.execute(
        "INSERT INTO tasks (task_type, queue, input, run_at, workflow_id, workflow_ref, trigger_rule)"
        " VALUES ('noop', 'default', 'null', %s, %s, 'join', 'all_succeeded') RETURNING id",
        (BLOCKED_RUN_AT, wf),
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO task_dependencies (task_id, parent_id) SELECT %s, unnest(%s::bigint[])", (join, parents)
    )
    conn.execute("SET session_replication_role = DEFAULT")
    for table in ("tasks", "task_dependencies", "workflows"):
        conn.execute(f"VACUUM ANALYZE {table}")
    conn.execute("RESET statement_timeout")
    return {"join": join, "ended": ended[-200:], "pending": parents[PARENTS // 2 :]}


def generic_plan(conn, statement: str, params: dict) -> dict:
    """EXPLAIN (ANALYZE, BUFFERS) of `statement` prepared and generic-planned (as the writer's
    settling runs it), executed in a transaction rolled back."""
    names: list[str] = []

    def placeholder(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", placeholder, statement).replace("%%", "%")
    args = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE plan_under_test AS {text}")
        try:
            query = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE plan_under_test ({})").format(
                args
            )
            [row] = conn.execute(query).fetchall()
        finally:
            conn.execute("DEALLOCATE plan_under_test")
    return row["QUERY PLAN"][0]["Plan"]


def whole_tables(plan: dict) -> set[str]:
    """The big tables the plan reads whole (task_waiters, a handful of idle workers, may be)."""
    return seq_scanned(plan) & {"tasks", "task_dependencies", "workflows"}


def pages(plan: dict) -> int:
    return plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)


def test_the_fan_in_is_as_described(big):
    conn, _ = big
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM task_dependencies) AS edges"
    ).fetchone()
    assert counts["tasks"] >= FINISHED + OLD_WORKFLOWS * (OLD_STEPS + 1) + PARENTS + 1
    assert counts["edges"] == OLD_WORKFLOWS * OLD_STEPS + PARENTS


@pytest.mark.parametrize("ended", ["completed parents", "parents that may have failed"])
def test_a_waiting_join_is_decided_in_a_few_pages(big, ended):
    conn, live = big
    params = {"ids": [live["join"]], "ended": [] if ended == "completed parents" else live["ended"]}
    plan = generic_plan(conn, _DECIDE_SQL, params)
    assert plan["Actual Rows"] == 1
    assert whole_tables(plan) == set(), plan
    # Its newest parent is pending: one edge and one task read, not 5,000 edges (plus, for
    # parents that may have failed, a probe of each of those 200).
    bound = 40 if ended == "completed parents" else 40 + 200 * 8
    assert pages(plan) <= bound, plan


def test_the_look_at_all_parents_reads_that_steps_edges_only(big):
    conn, live = big
    plan = generic_plan(conn, _BAD_PARENT_SQL, {"ids": [live["join"]]})
    assert whole_tables(plan) == set(), plan
    edges = [n for n in plan_nodes(plan) if n.get("Relation Name") == "task_dependencies"]
    assert edges and all(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) <= PARENTS for n in edges), plan


def test_locking_the_dependents_of_ended_parents_goes_through_their_edges(big):
    conn, live = big
    plan = generic_plan(conn, _LOCK_SQL, {"ids": live["ended"]})
    assert whole_tables(plan) == set(), plan
    assert plan["Actual Rows"] == 1  # the join, once
    assert pages(plan) <= 5 * len(live["ended"]), plan


def test_releasing_and_taking_a_step_reach_it_by_primary_key(big):
    conn, live = big
    step = live["pending"][:1]
    release = generic_plan(
        conn, _RELEASE_SQL, {"ids": step, "wake": False, "channel": PENDING_CHANNEL, "payload": RUNNABLE}
    )
    assert whole_tables(release) == set(), release
    take = generic_plan(
        conn,
        TASK_CLAIM_RELEASED_SQL,
        {"ids": step, "queues": None, "types": None, "limit": 2, "worker_id": "w", "lease": 30.0},
    )
    assert whole_tables(take) == set(), take
    assert take["Actual Rows"] == 1
    assert pages(take) <= 200, take
