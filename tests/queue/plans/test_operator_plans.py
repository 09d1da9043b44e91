"""Query plans of what operators read (the task_health and task_failures views, queue_summaries,
task_failure_counts, task_failures_recent, tasks_running_list, task_pending_queues) on a queue
with a million finished tasks and their attempts: EXPLAIN (ANALYZE, BUFFERS) of the very
statements the query functions send, which must reach rows through their indexes and read
buffers in proportion to what they return, never to the history.

The big database is built once for the module (about 15 s on two cores: a million tasks over
the last two days and a million attempts, 1% of tasks failed for good and 1% retried once) and
only read by the tests. The self-audit (task_invariant_violations, run every minute) builds
a history of its own."""

from __future__ import annotations

import pytest

from skiplock.db import connect
from skiplock.sql.fenced import AttemptRef, task_complete_many
from skiplock.sql.operations import (
    queue_summaries,
    task_failure_counts,
    task_failures_recent,
    task_health_get,
    task_pending_queues,
    tasks_running_list,
)
from tests.helpers import (
    Explain,
    admit,
    claim,
    cloned_database,
    indexes_used,
    invariant_violations,
    plan_nodes,
)

FINISHED = 1_000_000
HISTORY_HOURS = 48
PENDING = 2_000
PROCESSING = 20
LAPSED = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big(server_url, template_db):
    """A connection to a database holding FINISHED finished tasks (and their attempts), PENDING
    pending and PROCESSING processing ones, vacuumed and analyzed."""
    with cloned_database(server_url, template_db, "plans") as url, connect(url, role="test") as conn:
        _fill(conn)
        yield conn


def _fill(conn) -> None:
    # A fill, not a statement under test: its millions of rows may take longer than the bound
    # a skiplock session puts on one statement (on a busy CI machine they did).
    conn.execute("SET statement_timeout = 0")
    # Loading test data as pg_restore does: foreign-key and notify triggers off for the session
    # (every row is consistent by construction); CHECK constraints and indexes still apply.
    conn.execute("SET session_replication_role = replica")
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, status, result, error, error_traceback, progress,
                           attempts, max_attempts, worker_id, run_at, created_at, started_at, finished_at)
        SELECT 'type_' || g %% 10, 'queue_' || g %% 5, 'null',
               CASE WHEN g %% 100 = 0 THEN 'failed' ELSE 'completed' END::task_status,
               CASE WHEN g %% 100 = 0 THEN NULL ELSE 'null'::jsonb END,
               CASE WHEN g %% 100 = 0 THEN 'boom' END,
               CASE WHEN g %% 100 IN (0, 1) THEN 'Traceback (most recent call last): ...' END,
               1, CASE WHEN g %% 100 = 1 THEN 2 ELSE 1 END, 3, 'w1',
               f - interval '2 seconds', f - interval '2 seconds', f - interval '1 second', f
        FROM generate_series(1, %(n)s) g,
             LATERAL (SELECT now() - make_interval(hours => %(hours)s) * (%(n)s - g) / %(n)s AS f) t
        """,
        {"n": FINISHED, "hours": HISTORY_HOURS},
    )
    # One attempt per task (failed for the failed ones), and a failed first attempt before the
    # completed second one for the retried ones.
    conn.execute(
        """
        INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, finished_at, error)
        SELECT id, a, 'w1', CASE WHEN status = 'failed' OR a < attempts THEN 'failed' ELSE 'completed' END::task_attempt_outcome,
               started_at - make_interval(secs => attempts - a), finished_at - make_interval(secs => attempts - a),
               CASE WHEN status = 'failed' OR a < attempts THEN 'boom' END
        FROM tasks, generate_series(1, attempts) a
        ORDER BY id, a
        """
    )
    conn.execute("SET session_replication_role = DEFAULT")
    # What is unfinished: pending in three queues (half due, half scheduled, two priorities)
    # and processing (half started, LAPSED past their lease).
    conn.execute(
        "INSERT INTO tasks (task_type, queue, input, priority, run_at) "
        "SELECT 'noop', 'live_' || g %% 3, 'null', g %% 2, now() + make_interval(secs => (g %% 4 - 2) * 60) "
        "FROM generate_series(1, %s) g",
        (PENDING,),
    )
    while admit(conn).promoted:  # the due ones get their turns, as the workers' admission gives them
        pass
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, status, attempts, worker_id, lease_expires_at, started_at)
        SELECT 'noop', 'live_' || g %% 3, 'null', 'processing', 1, 'w2',
               now() + CASE WHEN g <= %s THEN interval '-1 minute' ELSE interval '1 hour' END,
               CASE WHEN g %% 2 = 0 THEN now() END
        FROM generate_series(1, %s) g
        """,
        (LAPSED, PROCESSING),
    )
    conn.execute("VACUUM ANALYZE tasks")
    conn.execute("VACUUM ANALYZE task_attempts")
    conn.execute("RESET statement_timeout")


def plan_of(conn, function, **kwargs) -> dict:
    explain = Explain(conn, analyze=True, rows=True)
    function(explain, **kwargs)
    [plan] = explain.plans
    return plan


def buffers(plan: dict) -> int:
    return plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0)


def indexes_on(plan: dict, relation: str) -> set[str]:
    return {
        n["Index Name"] for n in plan_nodes(plan) if n.get("Relation Name") == relation and "Index Name" in n
    }


# The partial indexes that hold pending rows only (each a part of them, see schema.sql).
PENDING_INDEXES = {
    "tasks_runnable_idx", "tasks_runnable_queue_idx", "tasks_flow_idx", "tasks_scheduled_idx",
    "tasks_waiting_idx", "tasks_expiry_idx",
}  # fmt: skip


def assert_no_scan_of_history(plan: dict) -> None:
    seq = [
        n["Relation Name"] for n in plan_nodes(plan) if n["Node Type"] == "Seq Scan" and "Relation Name" in n
    ]
    assert not set(seq) & {"tasks", "task_attempts"}, plan


def table_pages(conn, table: str) -> int:
    return conn.execute("SELECT relpages FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()[
        "relpages"
    ]


def pages_holding(conn, condition: str) -> int:
    """How many heap pages of tasks hold the rows matching condition (from their ctids)."""
    return conn.execute(
        f"SELECT count(DISTINCT (ctid::text::point)[0]) AS pages FROM tasks WHERE {condition}"
    ).fetchone()["pages"]


def test_the_history_is_big_enough_to_matter(big):
    """The bounds below are small against the tables: a scan of either reads thousands of pages."""
    counts = big.execute(
        "SELECT (SELECT count(*) FROM tasks WHERE status IN ('completed', 'failed')) AS finished, "
        "(SELECT count(*) FROM task_attempts) AS attempts"
    ).fetchone()
    assert counts == {"finished": FINISHED, "attempts": FINISHED + FINISHED // 100}
    assert table_pages(big, "tasks") > 10_000
    assert table_pages(big, "task_attempts") > 5_000


def test_task_health_is_a_few_index_probes(big):
    plan = plan_of(big, task_health_get)
    assert_no_scan_of_history(plan)
    # The pending tasks through the partial indexes of what is pending (runnable, scheduled,
    # waiting on a limit), the processing ones through theirs.
    assert indexes_on(plan, "tasks") <= PENDING_INDEXES | {"tasks_processing_idx"}, plan
    assert "tasks_processing_idx" in indexes_on(plan, "tasks"), plan
    # Two priorities of pending tasks (3 probes to find them, 2 for their oldest run_at), the
    # processing entries, the statistics views' catalog lookups: about 60 buffers measured.
    assert buffers(plan) < 300, plan
    health = task_health_get(big)
    assert health["lapsed_leases"] == LAPSED
    assert 119 <= health["oldest_due_wait"].total_seconds() < 300


def test_task_failure_counts_read_only_the_last_hours_failures(big):
    in_window = big.execute(
        "SELECT count(*) AS n FROM task_attempts WHERE outcome IN ('failed', 'timed_out', 'crashed', 'lost') "
        "AND finished_at > now() - interval '60 minutes'"
    ).fetchone()["n"]
    # 2% of the ~20,800 attempts an hour of this history.
    assert 300 < in_window < 600
    plan = plan_of(big, task_failure_counts, minutes=60)
    assert_no_scan_of_history(plan)
    assert indexes_on(plan, "task_attempts") == {"task_attempts_failures_idx"}, plan
    assert indexes_on(plan, "tasks") == {"tasks_pkey"}, plan
    # Per failure: its index entry, its attempt row (neighbours share pages) and a primary-key
    # probe of its task (3 to 4 pages of a 3-level index plus the heap): about 5 measured; 10 is
    # the bound. A scan of either table reads more than 5,000 pages.
    assert buffers(plan) < 10 * in_window + 100, plan
    counted = {(r["task_type"], r["outcome"]): r["n"] for r in task_failure_counts(big, minutes=60)}
    assert sum(counted.values()) == in_window


def test_recent_failures_read_what_they_return(big):
    plan = plan_of(big, task_failures_recent, limit=20)
    assert_no_scan_of_history(plan)
    assert indexes_on(plan, "task_attempts") == {"task_attempts_failures_idx"}, plan
    assert indexes_on(plan, "tasks") == {"tasks_pkey"}, plan
    # 20 failures, two primary-key probes of tasks each (the view's join and the traceback's):
    # about 170 measured.
    assert buffers(plan) < 20 * 15 + 100, plan
    recent = task_failures_recent(big, limit=20)
    assert len(recent) == 20
    assert [r["finished_at"] for r in recent] == sorted((r["finished_at"] for r in recent), reverse=True)
    assert all(r["error_traceback"] and r["error"] == "boom" for r in recent)


@pytest.mark.parametrize(
    "read, kwargs",
    [(task_failure_counts, {"minutes": 60}), (task_failures_recent, {"limit": 20})],
    ids=["task_failure_counts", "task_failures_recent"],
)
def test_a_prepared_failure_read_keeps_the_plan_made_for_its_bound(big, read, kwargs):
    """/metrics and the dashboard send these every few seconds, prepared by psycopg after 5 runs.
    With the window or the limit a parameter, the generic plan could not see it and guessed a
    large share of a day's failures (on 20 million tasks a parallel bitmap scan, 60 ms), so
    Postgres planned the statement anew on every run instead, and on a big history that
    planning was most of its cost. With the bound in the text, the plan made for it is kept.
    (Fails on the parameterised statements: 5 custom plans, no generic one.)"""
    with connect(big.info.dsn, role="test") as conn:  # a session of its own: nothing prepared yet
        answers = [read(conn, **kwargs) for _ in range(10)]
        [kept] = conn.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"  # this session's one statement
        ).fetchall()
    assert all(answers), answers  # (the hour slides between runs: their counts may differ by one)
    # Postgres plans a prepared statement for its parameters the first 5 times, then keeps a
    # generic plan unless it costs more than those: here the generic plan is that plan.
    assert kept["generic_plans"] >= 4 and kept["custom_plans"] <= 5, kept


def test_a_failure_reads_bound_must_be_a_count():
    """The bound goes into the statement's text: anything but a count is refused before a
    statement is sent (no connection is even looked at)."""
    for bad in ("60; DROP TABLE tasks", 1.5, -1, True, None):
        with pytest.raises(ValueError, match="non-negative integer"):
            task_failure_counts(None, minutes=bad)
        with pytest.raises(ValueError, match="non-negative integer"):
            task_failures_recent(None, limit=bad)


def test_the_task_failures_view_with_a_limit_reads_what_it_returns(big):
    """As a DBA reads it (the view's comment: add LIMIT)."""
    [row] = big.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM task_failures LIMIT 50"
    ).fetchall()
    plan = row["QUERY PLAN"][0]["Plan"]
    assert_no_scan_of_history(plan)
    assert indexes_on(plan, "task_attempts") == {"task_attempts_failures_idx"}, plan
    assert buffers(plan) < 50 * 10 + 100, plan


def test_queue_summaries_count_only_what_is_unfinished(big):
    plan = plan_of(big, queue_summaries)
    assert_no_scan_of_history(plan)
    # What is pending and processing through their partial indexes; what expired in the last
    # hour through tasks_finished_at_idx (a range of the last hour's entries).
    assert indexes_on(plan, "tasks") <= PENDING_INDEXES | {"tasks_processing_idx", "tasks_finished_at_idx"}, (
        plan
    )
    assert "tasks_processing_idx" in indexes_on(plan, "tasks"), plan
    # At most one page per unfinished row (they share pages: about 160 measured); the finished
    # rows are never read.
    assert buffers(plan) < PENDING + PROCESSING + 100, plan
    summaries = {q["queue"]: q for q in queue_summaries(big)}
    assert set(summaries) == {"live_0", "live_1", "live_2"}
    assert sum(q["due"] + q["scheduled"] for q in summaries.values()) == PENDING
    assert sum(q["running"] + q["reserved"] for q in summaries.values()) == PROCESSING


def test_running_tasks_are_read_through_the_processing_index(big):
    plan = plan_of(big, tasks_running_list, limit=50)
    assert_no_scan_of_history(plan)
    assert indexes_on(plan, "tasks") == {"tasks_processing_idx"}, plan
    assert buffers(plan) < 100, plan
    running = tasks_running_list(big, limit=50)
    assert len(running) == PROCESSING
    started = [r for r in running if r["started_at"] is not None]
    assert running[: len(started)] == started  # running first, then reserved


def test_pending_queues_are_found_by_a_skip_scan(big):
    """What a worker claims from while some queue is paused (skiplock/worker/queue_filter.py)."""
    plan = plan_of(big, task_pending_queues)
    assert_no_scan_of_history(plan)
    # The queues a claim can take from: runnable tasks, per queue (tasks_runnable_queue_idx).
    assert indexes_on(plan, "tasks") == {"tasks_runnable_queue_idx"}, plan
    # Three queues: four probes of a few pages each, however many tasks wait in them.
    assert buffers(plan) < 50, plan
    assert task_pending_queues(big) == ["live_0", "live_1", "live_2"]


# A backlog, added (and removed again) by the test below.
BACKLOG = 200_000


def test_queue_summaries_never_scan_the_history_behind_a_backlog(big):
    """BUG (skiplock/sql/operations.py queue_summaries): with a backlog (200,000 pending beside a
    million finished rows) the planner read the pending rows with a parallel Seq Scan of all of
    tasks (~27,000 pages, the finished rows included), on every /metrics scrape, GET /api/queues
    and dashboard refresh. Each part of the pending rows is now read through its partial index.

    The bound is derived from the rows it counts, not from the table: at most twice the heap pages
    holding them (a bitmap scan reads each page once; the indexes' pages come on top). A fixed share
    of the table (a quarter) was too tight: the 200,000 rows not yet admitted fill ~4,300 pages
    of ~26,600, and a CI run read 7,003 against 6,644 in a plan with no scan of the history."""
    last = big.execute("SELECT max(id) AS id FROM tasks").fetchone()["id"]
    big.execute(
        "INSERT INTO tasks (task_type, queue, input, priority, run_at) "
        "SELECT 'noop', 'live_' || g %% 3, 'null', g %% 2, now() + make_interval(secs => (g %% 4 - 2) * 60) "
        "FROM generate_series(1, %s) g",
        (BACKLOG,),
    )
    try:
        big.execute("VACUUM ANALYZE tasks")
        plan = plan_of(big, queue_summaries)
        assert_no_scan_of_history(plan)
        # Through the indexes of unfinished rows only (the limits' slots: tasks_limited_idx), and
        # the last hour's range of tasks_finished_at_idx.
        assert indexes_on(plan, "tasks") <= PENDING_INDEXES | {
            "tasks_processing_idx", "tasks_finished_at_idx", "tasks_limited_idx",
        }, plan  # fmt: skip
        counted = pages_holding(
            big, "status IN ('pending', 'processing') OR finished_at > now() - interval '1 hour'"
        )
        # The bound means something: the history is most of the table.
        assert 2 * counted < table_pages(big, "tasks") / 2
        assert buffers(plan) < 2 * counted, plan
        summaries = queue_summaries(big)
        assert sum(q["due"] + q["scheduled"] for q in summaries) == PENDING + BACKLOG
    finally:  # the other tests' database again, whatever order they run in
        big.execute("DELETE FROM tasks WHERE id > %s", (last,))
        big.execute("VACUUM ANALYZE tasks")


# --- the self-audit ------------------------------------------------------------------------------


def test_the_self_audit_is_costed_as_the_few_rows_it_reads(big):
    """Postgres JIT-compiles a statement whose estimated cost passes jit_above_cost (100,000 by
    default), and compiles with optimisation past 500,000. task_limit_usage counted each limit's
    slots with a scan of its own; task_limits, never analyzed, is assumed to hold hundreds of
    rows, so the self-audit that reads it was costed at 1.4 million on 20 million finished tasks
    and compiled for 0.9 s to run for 4 ms, in any session that left jit on (a DBA's psql). Now
    the slots are counted in one pass: the estimate stays that of the rows it reads."""
    limits = big.execute("SELECT reltuples FROM pg_class WHERE oid = 'task_limits'::regclass").fetchone()
    assert limits["reltuples"] < 0  # never analyzed, as in a deployment without limits
    for view in ("task_invariant_violations", "task_limit_usage"):
        # (The counts asked for: a bare count(*) would let the planner drop them from the view.)
        counts = "count(*)" if view == "task_invariant_violations" else "sum(running), sum(waiting)"
        [row] = big.execute(f"EXPLAIN (FORMAT JSON) SELECT {counts} FROM {view}").fetchall()
        plan = row["QUERY PLAN"][0]["Plan"]
        assert plan["Total Cost"] < 100_000, (view, plan["Total Cost"])
        # No scan of the slot holders a limit: their cost times the assumed hundreds of limits
        # is what grows with the table (on a million rows it stays under the threshold).
        per_limit = [n for n in plan_nodes(plan) if n.get("Parent Relationship") == "SubPlan"]
        slot_scans = {i for n in per_limit for i in indexes_used(n, "tasks")}
        assert not slot_scans & {"tasks_processing_idx", "tasks_limited_idx"}, (view, plan)


def test_skiplock_sessions_never_jit_compile(big):
    """Whatever a plan's estimate: skiplock's statements read a few rows each (db.server_settings)."""
    with connect(big.info.dsn, role="test") as conn:
        assert conn.execute("SELECT current_setting('jit') AS jit").fetchone()["jit"] == "off"


def test_invariant_audit_reads_only_what_can_break(conn):
    """Run every minute, it must not grow with the table: with 200,000 tasks (and attempts)
    finished an hour ago it reads the processing and recently finished rows only."""
    conn.execute(
        """
        INSERT INTO tasks (task_type, input, status, result, progress, attempts, worker_id,
                           run_at, created_at, started_at, finished_at)
        SELECT 'noop', 'null', 'completed', 'null', 1, 1, 'w1', now() - interval '1 hour',
               now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour'
        FROM generate_series(1, 200000)
        """
    )
    conn.execute(
        "INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, finished_at) "
        "SELECT id, 1, 'w1', 'completed', started_at, finished_at FROM tasks"
    )
    conn.execute(
        "INSERT INTO tasks (task_type, input, priority) SELECT 'noop', 'null', 0 FROM generate_series(1, 150)"
    )
    claimed = claim(conn, worker_id="w2", limit=150, lease_seconds=60)  # admitted first
    assert len(claimed) == 150
    task_complete_many(
        conn, worker_id="w2", results=[(AttemptRef(t.id, t.attempt), "1") for t in claimed[:100]]
    )
    conn.execute("VACUUM ANALYZE tasks")
    conn.execute("VACUUM ANALYZE task_attempts")

    [row] = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM task_invariant_violations"
    ).fetchall()
    plan = row["QUERY PLAN"][0]["Plan"]
    nodes = list(plan_nodes(plan))
    seq_scans = [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan" and "Relation Name" in n]
    assert not set(seq_scans) & {"tasks", "task_attempts"}, plan
    # The tasks processing and recently finished, and (limit_exceeded) what holds a limit's
    # slots: processing or admitted under a limit (tasks_limited_idx).
    assert indexes_used(plan) == {"tasks_processing_idx", "tasks_finished_at_idx", "tasks_limited_idx"}, plan
    # 150 checked tasks, a few pages each; a scan of the finished rows reads thousands.
    assert plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0) < 1500, plan
    assert invariant_violations(conn) == set()
