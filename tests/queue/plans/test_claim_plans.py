"""Query plans of the worker's hot statements (EXPLAIN of the very statements the query functions
send, never timing): the claim walks its partial index of runnable tasks (tasks_runnable_idx, per
queue tasks_runnable_queue_idx) in claim order, for any queue filter, on an empty table and
behind many finished rows; the next-due lookup is one probe of tasks_scheduled_idx; the worker's
batch writes are never planned generically and reach rows by primary key. The scheduling
statements on a big queue (owners, limits, admission) are in test_scheduling_plans.py."""

from __future__ import annotations

import time

import psycopg
import pytest

from skiplock.db import connect, connect_worker
from skiplock.sql.claim import (
    TASK_CLAIM_SQL,
    TASK_NEXT_DUE_SQL,
    ClaimPosition,
    task_claim,
    task_claim_from_queues_sql,
    task_claim_statement,
    task_next_due_in,
    with_hand_over,
)
from skiplock.sql.fenced import AttemptRef, task_complete_many, task_hand_over, task_held_ids
from tests.helpers import Explain, indexes_used, insert_task, plan_nodes, seq_scanned

# --- query plan of the claim -------------------------------------------------------------------

CLAIM_FILTERS = {
    "any": {},
    "queues": {"queues": ["default", "other"]},
    "types": {"types": ["noop"]},
    "both": {"queues": ["default"], "types": ["noop"], "limit": 1},
}


def claim_plan(conn, hand_over: int = 0, **params) -> dict:
    """EXPLAIN of the very statement task_claim runs, with the parameters it sends (unprepared);
    with hand_over, its variant that records the first tasks as handed to processes."""
    params = {"queues": None, "types": None, "limit": 10, "worker_id": "w1", "lease": 30.0} | params
    statement, queue_params = task_claim_statement(params["queues"])
    if hand_over:
        statement = with_hand_over(statement)
        queue_params |= {"hand_over": hand_over, "kept_ids": [1], "kept_attempts": [1]}
    [row] = conn.execute(
        "EXPLAIN (FORMAT JSON) " + statement, params | queue_params, prepare=False
    ).fetchall()
    plan = row["QUERY PLAN"][0]["Plan"]
    # Which index the claim must use: workers of some queues have their own (per-queue probes).
    plan["expected index"] = "tasks_runnable_queue_idx" if params["queues"] else "tasks_runnable_idx"
    return plan


def assert_claim_uses_its_index(plan: dict) -> None:
    index = plan["expected index"]
    nodes = list(plan_nodes(plan))
    seq_scans = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
    assert seq_scans == [], f"Seq Scan on tasks in the claim plan: {plan}"
    assert any(n.get("Index Name") == index for n in nodes), f"{index} unused: {plan}"


def reads_tasks_unlimited(node: dict) -> bool:
    """Whether rows of tasks reach this node without passing a Limit (a Sort above a Limit
    sorts at most that many rows)."""
    return any(
        child.get("Relation Name") == "tasks"
        or (child["Node Type"] != "Limit" and reads_tasks_unlimited(child))
        for child in node.get("Plans", ())
    )


def assert_claim_walks_its_index_in_order(plan: dict) -> None:
    """The best plan: an Index Scan of the claim's index yields rows in claim order, and nothing
    sorts table rows (per-queue probes may sort what they found: at most `limit` per queue)."""
    assert_claim_uses_its_index(plan)
    nodes = list(plan_nodes(plan))
    sorts_of_rows = [n for n in nodes if n["Node Type"] == "Sort" and reads_tasks_unlimited(n)]
    assert sorts_of_rows == [], f"the claim sorts table rows: {plan}"
    assert any(
        n["Node Type"] == "Index Scan" and n.get("Index Name") == plan["expected index"] for n in nodes
    )


# Runnable: pending, with a turn, waiting on no limit (schema.sql).
RUNNABLE = "(status = 'pending'::task_status) AND (turn IS NOT NULL) AND (waiting_on IS NULL)"


def test_claim_index_is_partial_and_in_claim_order(conn):
    index = conn.execute(
        """
        SELECT pg_get_expr(i.indpred, i.indrelid) AS predicate,
               array(SELECT pg_get_indexdef(i.indexrelid, k, true)
                     FROM generate_series(1, i.indnkeyatts) k) AS keys,
               (SELECT array_agg(o & 1 = 1 ORDER BY n) FROM unnest(i.indoption::int2[]) WITH ORDINALITY u(o, n)) AS descending
        FROM pg_index i WHERE i.indexrelid = 'tasks_runnable_idx'::regclass
        """
    ).fetchone()
    assert index["predicate"] == f"({RUNNABLE})"
    assert index["keys"] == ["priority", "turn", "id"]
    assert index["descending"] == [True, False, False]


def test_task_claim_runs_the_explained_statement(conn, monkeypatch):
    """The plan tests below EXPLAIN task_claim_statement(): make sure task_claim runs it."""
    seen: list[str] = []
    original = psycopg.Connection.execute

    def spy(self, query, params=None, **kwargs):
        seen.append(str(query))
        return original(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", spy)
    task_claim(conn, worker_id="w1", limit=1, lease_seconds=1)
    task_claim(conn, worker_id="w1", limit=1, lease_seconds=1, queues=["default"])
    assert seen == [TASK_CLAIM_SQL, task_claim_from_queues_sql(1)]
    assert task_claim_statement(None) == task_claim_statement([]) == (TASK_CLAIM_SQL, {})
    # One probe per distinct queue, each naming its queue.
    statement, params = task_claim_statement(["b", "a", "b"])
    assert statement == task_claim_from_queues_sql(2)
    assert params == {"queue_0": "b", "queue_1": "a"}


def test_claim_index_per_queue_is_partial_and_in_claim_order(conn):
    index = conn.execute(
        """
        SELECT pg_get_expr(i.indpred, i.indrelid) AS predicate,
               array(SELECT pg_get_indexdef(i.indexrelid, k, true)
                     FROM generate_series(1, i.indnkeyatts) k) AS keys
        FROM pg_index i WHERE i.indexrelid = 'tasks_runnable_queue_idx'::regclass
        """
    ).fetchone()
    # queue IS NOT NULL (always true: the column is NOT NULL) keeps the claim of every queue
    # off this index: its query does not imply it, so it can only use tasks_runnable_idx.
    assert index["predicate"] == f"({RUNNABLE} AND (queue IS NOT NULL))"
    assert index["keys"] == ["queue", "priority", "turn", "id"]


def test_claim_from_some_queues_never_walks_another_queues_backlog(conn):
    """A worker of queue 'urgent' while 100,000 tasks wait in 'bulk': its claim must probe its
    own queue, not read the backlog (the old plan: a scan of the whole table per claim)."""
    # Runnable (turns set as admission would), so they are in the claim's indexes.
    conn.execute(
        "INSERT INTO tasks (task_type, input, queue, turn) "
        "SELECT 'noop', 'null', 'bulk', g FROM generate_series(1, 100000) g"
    )
    urgent = [insert_task(conn, "noop", queue="urgent", priority=p) for p in (0, 5, 0)]
    conn.execute("VACUUM ANALYZE tasks")
    for types in (None, ["noop"]):
        statement, queue_params = task_claim_statement(["urgent"])
        params = {"types": types, "limit": 10, "worker_id": "w1", "lease": 30.0} | queue_params
        [row] = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params, prepare=False
        ).fetchall()
        conn.execute(
            "UPDATE tasks SET status = 'pending', attempts = 0, worker_id = NULL, lease_expires_at = NULL "
            "WHERE queue = 'urgent'"
        )
        plan = row["QUERY PLAN"][0]["Plan"] | {"expected index": "tasks_runnable_queue_idx"}
        assert_claim_walks_its_index_in_order(plan)
        # A backlog walk or a table scan reads thousands of pages; the probe a handful.
        assert plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0) < 100, plan
    claimed = task_claim(conn, worker_id="w1", limit=10, lease_seconds=30, queues=["urgent", "urgent"])
    assert [t.id for t in claimed] == [urgent[1], urgent[0], urgent[2]]


def test_claim_from_several_queues_merges_them_in_claim_order(conn):
    a1 = insert_task(conn, "noop", queue="a", priority=1)
    b1 = insert_task(conn, "noop", queue="b", priority=3)
    a2 = insert_task(conn, "noop", queue="a", priority=3)
    insert_task(conn, "noop", queue="c", priority=9)  # not asked for
    b2 = insert_task(conn, "noop", queue="b", priority=0)
    claimed = task_claim(conn, worker_id="w1", limit=3, lease_seconds=30, queues=["a", "b"])
    assert [t.id for t in claimed] == [b1, a2, a1]
    # What the limit left out stayed pending, unlocked: the next claim takes it.
    [last] = task_claim(conn, worker_id="w2", limit=3, lease_seconds=30, queues=["b", "a"])
    assert last.id == b2


def selection_of(plan: dict) -> list[dict]:
    """The part of a claim plan that picks the rows: the LockRows nodes (FOR UPDATE SKIP
    LOCKED) and what feeds them."""
    return [n for n in plan_nodes(plan) if n["Node Type"] == "LockRows"]


def test_claim_plan_on_the_empty_table_after_schema_apply(conn):
    """On a new database the claim picks its rows through its index. (Joining the few picked ids
    back to tasks for the UPDATE, the planner may prefer a Seq Scan of the empty table, costed
    as the 10 pages it assumes for a table never vacuumed: the claim with rows and stale
    statistics is checked below.)"""
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0
    for filters in CLAIM_FILTERS.values():
        plan = claim_plan(conn, **filters)
        selection = selection_of(plan)
        assert selection, plan
        for lock in selection:
            assert_claim_uses_its_index(lock | {"expected index": plan["expected index"]})
        if not filters.get("queues"):
            assert_claim_uses_its_index(plan)  # the walk of every queue: the whole statement


def _fill_finished(conn, finished: int, pending: int) -> None:
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, status, result, progress, attempts, worker_id,
                           run_at, created_at, started_at, finished_at)
        SELECT 'noop', 'default', jsonb_build_object('n', g), 'completed', '{"ok": true}', 1, 1, 'w1',
               now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour', now()
        FROM generate_series(1, %s) g
        """,
        (finished,),
    )
    # Runnable: turns set as admission gives them (one owner: in the order they fell due).
    conn.execute(
        "INSERT INTO tasks (task_type, queue, input, priority, turn) "
        "SELECT 'noop', 'default', to_jsonb(g), g %% 3, g FROM generate_series(1, %s) g",
        (pending,),
    )


def test_claim_plan_with_many_finished_rows(conn):
    # Autovacuum must not analyze behind the test's back: the first half is about stale statistics.
    conn.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
    _fill_finished(conn, finished=200_000, pending=50)

    # Statistics still say the table is empty (as after a first deploy followed by a busy day).
    stats = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'tasks'::regclass").fetchone()
    assert stats["reltuples"] <= 0
    for filters in CLAIM_FILTERS.values():
        assert_claim_uses_its_index(claim_plan(conn, **filters))
    # A worker of every queue and type (the default) walks the index even on stale statistics.
    assert_claim_walks_its_index_in_order(claim_plan(conn))

    conn.execute("ANALYZE tasks")
    for filters in CLAIM_FILTERS.values():
        assert_claim_walks_its_index_in_order(claim_plan(conn, **filters))
        # The claim of an idle worker, which records its hand-over too, reads the same way.
        assert_claim_walks_its_index_in_order(claim_plan(conn, hand_over=2, **filters))

    # The plan is not just cheap on paper: the claim takes the right rows.
    claimed = task_claim(conn, worker_id="w2", limit=5, lease_seconds=30)
    assert [t.priority for t in claimed] == [2] * 5


def test_next_due_lookup_is_one_probe_of_the_scheduled_index(conn):
    """task_next_due_in runs on every worker going idle: with many scheduled tasks (and many
    finished and runnable rows) it must stay one index probe, not a scan of what is scheduled."""
    _fill_finished(conn, finished=50_000, pending=5_000)
    inserted_at = time.monotonic()
    conn.execute(
        "INSERT INTO tasks (task_type, input, priority, run_at) "
        "SELECT 'noop', 'null', g % 4, now() + make_interval(secs => 60 + g) FROM generate_series(1, 50000) g"
    )
    conn.execute("VACUUM ANALYZE tasks")
    [row] = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + TASK_NEXT_DUE_SQL).fetchall()
    plan = row["QUERY PLAN"][0]["Plan"]
    assert not seq_scanned(plan), plan
    assert indexes_used(plan) == {"tasks_scheduled_idx"}, plan
    # The first entry of the index (min(run_at) is its head): a handful of pages; a scan of
    # 50,000 entries reads hundreds.
    assert plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0) < 20, plan
    # The first is due 61 s after the insert, less what the VACUUM took (seconds on a busy machine).
    assert 61 - (time.monotonic() - inserted_at) - 1 < task_next_due_in(conn) < 62


def _batch_write_plans(conn, rounds: int) -> dict:
    """Claim and complete batches the way a worker does, then read this session's plan counters
    for the completion statement. psycopg prepares it after 5 runs; Postgres plans its first 5
    executions with the real parameters, then may switch to a generic plan."""
    for _ in range(rounds):
        claimed = task_claim(conn, worker_id="w1", limit=200, lease_seconds=30)
        refs = [AttemptRef(t.id, t.attempt) for t in claimed]
        written = task_complete_many(conn, worker_id="w1", results=[(r, "null") for r in refs])
        assert written == {r.task_id for r in refs}
    [row] = conn.execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%%INSERT INTO task_attempts%%' AND statement LIKE '%%completed AS%%'"
    ).fetchall()
    return row


def test_worker_batch_writes_are_never_planned_generically(database_url, conn):
    """A generic plan cannot see how many ids an array parameter holds and hash-joins the whole
    table: the worker's connection must plan each batch with its real arrays."""
    _fill_finished(conn, finished=20_000, pending=6_000)
    conn.execute("VACUUM ANALYZE tasks")
    with connect_worker(database_url, timeout_seconds=5) as worker_conn:
        plans = _batch_write_plans(worker_conn, rounds=15)
    assert plans["generic_plans"] == 0, plans
    assert plans["custom_plans"] == 10, plans
    # The control: on a plain connection Postgres does switch to the generic plan, so the
    # assertion above is about the worker's setting, not about Postgres' defaults.
    with connect(database_url) as plain:
        assert _batch_write_plans(plain, rounds=15)["generic_plans"] > 0


def test_big_write_batches_reach_rows_by_primary_key(database_url, conn):
    """A completion of 1,000 attempts on a table of 50,000 rows: planned freely, the fence was a
    scan of the whole table (250 ms instead of 20); it must stay one primary-key probe per ref.
    So must the hand-over that precedes each batch sent to a process."""
    _fill_finished(conn, finished=49_000, pending=1_000)
    conn.execute("VACUUM ANALYZE tasks")
    with connect_worker(database_url, timeout_seconds=5) as worker_conn:
        claimed = task_claim(worker_conn, worker_id="w1", limit=1000, lease_seconds=30)
        assert len(claimed) == 1000
        refs = [AttemptRef(t.id, t.attempt) for t in claimed]
        explain = Explain(worker_conn)  # EXPLAIN only: the writes do not run
        task_complete_many(explain, worker_id="w1", results=[(r, "null") for r in refs])
        task_held_ids(explain, worker_id="w1", refs=refs)
        task_hand_over(explain, worker_id="w1", handing=refs[:500], kept=refs[500:])
    for plan in explain.plans:
        reads = [
            n
            for n in plan_nodes(plan)
            if n.get("Relation Name") == "tasks" and n["Node Type"] != "ModifyTable"
        ]
        assert {(n["Node Type"], n.get("Index Name")) for n in reads} == {("Index Scan", "tasks_pkey")}, plan


@pytest.mark.parametrize("queues", [None, ["default"]], ids=["every queue", "some queues"])
def test_a_claim_from_its_position_steps_over_no_drained_rows(conn, queues):
    """Deep in a backlog, the head of the claim's index is entries of tasks claimed since the last
    VACUUM (dead): a claim from the start steps over every one of them, a claim from where the
    previous one began (TASK_CLAIM_AFTER_SQL; per queue for a worker of some queues) reads a
    handful of pages, through the same index."""
    conn.execute(
        "INSERT INTO tasks (task_type, input, turn) SELECT 'noop', 'null', g FROM generate_series(1, 60000) g"
    )
    conn.execute("VACUUM ANALYZE tasks")
    # 50,000 claimed since (as a drain leaves them: processing or done, their entries dead).
    conn.execute(
        "UPDATE tasks SET status = 'processing', attempts = 1, worker_id = 'w0',"
        " lease_expires_at = now() + interval '1 hour' WHERE turn <= 50000"
    )
    params = {"queues": None, "types": None, "limit": 10, "worker_id": "w1", "lease": 30.0}
    index = "tasks_runnable_queue_idx" if queues else "tasks_runnable_idx"

    def blocks_read(after) -> int:
        """Pages the claim read; from a position, through the claim's index (from the start, a
        probe of one queue that is every task may walk tasks_runnable_idx instead: the same)."""
        statement, extra = task_claim_statement(queues, after)
        [row] = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params | extra, prepare=False
        ).fetchall()
        conn.execute(
            "UPDATE tasks SET status = 'pending', attempts = 0, worker_id = NULL, lease_expires_at = NULL"
            " WHERE worker_id = 'w1'"
        )
        plan = row["QUERY PLAN"][0]["Plan"] | {"expected index": index}
        if after:
            assert_claim_uses_its_index(plan)
        return plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0)

    from_start = blocks_read({})
    position = ClaimPosition(0, 50001.0)
    from_position = blocks_read({q: position for q in queues} if queues else {None: position})
    # 50,000 dead entries: ~250 index pages and the heap pages they point to (1,577 here), against
    # a probe of a few pages (149 with the UPDATE of the 10 rows claimed, which both pay).
    assert from_start > 500, from_start
    assert from_position * 5 < from_start, (from_start, from_position)
