"""Big tables (issue 20, part 3): the statements the hot paths and the operators' pages send, on a
table holding millions of finished tasks and their attempts, against the same statements on a
table with none, both measured in the same run; and each statement's plan on the big table,
which must read tasks and task_attempts through indexes (no Seq Scan of either).

The two databases hold the same live work (DUE due tasks, PROCESSING processing, the same API
keys) and the same last hour (RECENT finished tasks); the big one adds `rows` finished tasks
over the HISTORY_DAYS days before that. Finished tasks: 1% failed and 1% retried once (one
attempt each, two for those); half of them of one client key (`big`), a tenth of another
(`tidy`, none of whose tasks failed), the rest spread. Each statement runs on both in turn,
run by run, ROUNDS times RUNS, on connections set up as the API's pool sets them up (statements
prepared after 5 runs); write statements (claim, submit) run in a transaction rolled back, so
each run sees the same table. A row's ratio is the big table's median time over the empty
one's (target: <= 1.10).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import psycopg
from harness import ROOT, ROWS, Databases, Row, log

from skiplock import keys as key_admin
from skiplock.db import connect as engine_connect
from skiplock.sql.claim import task_claim
from skiplock.sql.inserts import NewTask, task_insert_many
from skiplock.sql.operations import (
    limit_usage_all,
    queue_summaries,
    task_failure_counts,
    task_failures_recent,
    task_health_get,
    task_invariant_violation_count,
    task_throughput_recent,
    task_unserved_counts,
    tasks_running_list,
)
from skiplock.sql.schedules import schedule_list, schedule_metrics
from skiplock.sql.table_stats import table_dead_rows
from skiplock.sql.tasks import task_get, task_list
from skiplock.sql.workflow_store import workflow_metrics, workflows_recent

HISTORY_DAYS = 20
DUE = 2_000
PROCESSING = 20
RECENT = 10_000  # finished in the last hour, in both tables
FILL_CHUNK = 1_000_000  # rows per INSERT: each statement stays minutes at most
# Rounds of runs, the rounds' medians' median counted: a row of sub-millisecond statements moved
# by 10-15% from one run of 3 rounds of 60 to the next; of a submit's 10 rounds of 300, one was
# 0.91 and another 1.10 (the same two tables, a minute apart).
ROUNDS = 7
RUNS = 150
TARGET = 1.10

Statement = Callable[[Any, dict], Any]


def _rolled_back(call: Statement) -> Statement:
    def run(conn, ctx):
        with conn.transaction(force_rollback=True):
            return call(conn, ctx)

    return run


def _several(*calls: Statement) -> Statement:
    def run(conn, ctx):
        for call in calls:
            call(conn, ctx)

    return run


# (row name, what it runs): the engine's own query functions, as the API, the worker, the
# dashboard's overview and /metrics call them.
STATEMENTS: list[tuple[str, Statement]] = [
    (
        "claim 10 of 2,000 due tasks",
        _rolled_back(lambda c, x: task_claim(c, worker_id="bench", limit=10, lease_seconds=30)),
    ),
    (
        "submit one task (a client key's)",
        _rolled_back(
            lambda c, x: task_insert_many(
                c, [NewTask("noop", "null", "default", 0, 3, 300)], owner_key_id=x["big"]
            )
        ),
    ),
    ("status or result of a recent task", lambda c, x: task_get(c, x["next_recent"](), owner=x["big"])),
    ("a client's task list, first page", lambda c, x: task_list(c, owner=x["big"], limit=50)),
    (
        "a client's failed tasks, first page",
        lambda c, x: task_list(c, owner=x["big"], status="failed", limit=50),
    ),
    (
        "a client's failed tasks, it has none",
        lambda c, x: task_list(c, owner=x["tidy"], status="failed", limit=50),
    ),
    (
        "dashboard overview (10 query functions)",
        _several(
            lambda c, x: queue_summaries(c),
            lambda c, x: task_throughput_recent(c, minutes=60),
            lambda c, x: tasks_running_list(c, limit=50),
            lambda c, x: task_failures_recent(c, limit=20),
            lambda c, x: task_health_get(c),
            lambda c, x: table_dead_rows(c),
            lambda c, x: task_unserved_counts(c),
            lambda c, x: limit_usage_all(c),
            lambda c, x: workflows_recent(c, limit=10),
            lambda c, x: schedule_list(c),
        ),
    ),
    (
        "/metrics' queue reads (7 query functions)",
        _several(
            lambda c, x: queue_summaries(c),
            lambda c, x: task_health_get(c),
            lambda c, x: task_unserved_counts(c),
            lambda c, x: task_failure_counts(c, minutes=60),
            lambda c, x: limit_usage_all(c),
            lambda c, x: schedule_metrics(c),
            lambda c, x: workflow_metrics(c),
        ),
    ),
    ("invariants view (task_invariant_violations)", lambda c, x: task_invariant_violation_count(c)),
]


def _insert_finished(conn, count: int, newest_ago: str, span: str, owners: dict) -> None:
    """`count` finished tasks (and their attempts) finished evenly over `span` up to `newest_ago`
    before now, in chunks; 1% failed, 1% retried once; owners as the module says."""
    first_id = conn.execute("SELECT coalesce(max(id), 0) AS id FROM tasks").fetchone()["id"]
    for start in range(0, count, FILL_CHUNK):
        stop = min(count, start + FILL_CHUNK)
        conn.execute(
            """
            INSERT INTO tasks (task_type, queue, input, status, result, error, error_traceback,
                               attempts, max_attempts, worker_id, owner_key_id,
                               run_at, created_at, started_at, finished_at)
            SELECT 'type_' || g %% 10, 'queue_' || g %% 5, 'null',
                   CASE WHEN failed THEN 'failed' ELSE 'completed' END::task_status,
                   CASE WHEN failed THEN NULL ELSE '{"ok": true}'::jsonb END,
                   CASE WHEN failed THEN 'boom' END,
                   CASE WHEN failed THEN 'Traceback (most recent call last): ...' END,
                   CASE WHEN g %% 100 = 1 THEN 2 ELSE 1 END, 3, 'w1',
                   CASE WHEN g %% 2 = 0 THEN %(big)s WHEN g %% 10 = 1 THEN %(tidy)s
                        WHEN g %% 10 = 3 THEN NULL ELSE (%(others)s::bigint[])[1 + g %% 8] END,
                   f - interval '2 seconds', f - interval '2 seconds', f - interval '1 second', f
            FROM generate_series(%(start)s + 1, %(stop)s) g,
                 LATERAL (SELECT g %% 100 = 0 AS failed,
                                 now() - %(newest_ago)s::interval - %(span)s::interval * (%(n)s - g) / %(n)s AS f) t
            """,
            {"start": start, "stop": stop, "n": count, "newest_ago": newest_ago, "span": span, **owners},
        )  # fmt: skip
        conn.execute(
            """
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, finished_at, error)
            SELECT id, a, 'w1',
                   CASE WHEN status = 'failed' OR a < attempts THEN 'failed' ELSE 'completed' END::task_attempt_outcome,
                   started_at - make_interval(secs => attempts - a), finished_at - make_interval(secs => attempts - a),
                   CASE WHEN status = 'failed' OR a < attempts THEN 'boom' END
            FROM tasks, generate_series(1, attempts) a
            WHERE id > %(first)s AND id <= %(last)s
            """,
            {"first": first_id + start, "last": first_id + stop},
        )
        if count >= FILL_CHUNK:
            log(f"    {stop:,} of {count:,} finished tasks")


def fill_history(conn: psycopg.Connection, history: int) -> dict:
    """The keys and `history` finished tasks (and their attempts) over the HISTORY_DAYS days
    before the last hour; returns the owners (fill_present's argument)."""
    owners = {
        "big": key_admin.create_key(conn, name="big")["id"],
        "tidy": key_admin.create_key(conn, name="tidy")["id"],
        "others": [key_admin.create_key(conn, name=f"client{n}")["id"] for n in range(8)],
    }
    if history:
        with _loading(conn):
            _insert_finished(conn, history, "1 hour", f"{HISTORY_DAYS} days", owners)
            _vacuum_analyze(conn)  # here, not minutes later between the two tables' present
    return owners


def fill_present(conn: psycopg.Connection, owners: dict) -> dict:
    """The last hour's RECENT finished tasks and the live work; returns what the statements
    need. Both tables get theirs at the same moment, after the big one's history (minutes to
    load): the reads of the last 10 minutes or hour then find the same rows in both while they
    are measured. (Filled before the history, the empty table's last 10 minutes had moved on
    past most of its recent rows by the time it was measured: the self-audit read 276 tasks on
    it against 1,323 on the big one, and looked 2-5 times slower on the big one.)"""
    with _loading(conn):
        _insert_finished(conn, RECENT, "0 seconds", "1 hour", owners)
    conn.execute(
        "INSERT INTO tasks (task_type, queue, input, turn) SELECT 'noop', 'default', 'null', g FROM generate_series(1, %s) g",
        (DUE,),
    )
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, status, attempts, worker_id, lease_expires_at, started_at)
        SELECT 'noop', 'default', 'null', 'processing', 1, 'w2', now() + interval '1 hour', now()
        FROM generate_series(1, %s)
        """,
        (PROCESSING,),
    )
    with _loading(conn):
        _vacuum_analyze(conn)
    recent = [
        r["id"]
        for r in conn.execute(
            "SELECT id FROM tasks WHERE owner_key_id = %s AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 500",
            (owners["big"],),
        ).fetchall()
    ]
    turn = iter(range(10**9))
    return {
        "big": owners["big"],
        "tidy": owners["tidy"],
        "next_recent": lambda: recent[next(turn) % len(recent)],
    }


def _vacuum_analyze(conn: psycopg.Connection) -> None:
    conn.execute("VACUUM ANALYZE tasks")
    conn.execute("VACUUM ANALYZE task_attempts")


@contextmanager
def _loading(conn: psycopg.Connection):
    """Rows loaded as pg_restore loads them: the triggers off for the session (every row is
    consistent by construction; CHECK constraints and indexes apply), no statement timeout."""
    conn.execute("SET statement_timeout = 0")
    conn.execute("SET session_replication_role = replica")
    try:
        yield
    finally:
        conn.execute("SET session_replication_role = DEFAULT")
        conn.execute("RESET statement_timeout")


class _Explained:
    """Stands in for a connection: each statement EXPLAINed first, then run (its rows answer)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.plans: list[dict] = []

    def execute(self, query, params=None, **kwargs):
        plan = self.conn.execute(f"EXPLAIN (FORMAT JSON) {query}", params).fetchone()["QUERY PLAN"][0]["Plan"]
        self.plans.append(plan)
        return self.conn.execute(query, params, **kwargs)

    def transaction(self, **kwargs):
        return self.conn.transaction(**kwargs)


def _seq_scans(plan: dict) -> set[str]:
    found = set()
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") in ("tasks", "task_attempts"):
        found.add(plan["Relation Name"])
    for child in plan.get("Plans", ()):
        found |= _seq_scans(child)
    return found


def _medians_ms(
    big, empty, call: Statement, big_ctx: dict, empty_ctx: dict, runs: int
) -> tuple[float, float]:
    """The statement's median time on each table, `runs` times each, the two taking turns run
    by run: whatever else the machine does in the meantime weighs on both alike."""
    on_big, on_empty = [], []
    pair = [(big, big_ctx, on_big), (empty, empty_ctx, on_empty)]
    for _ in range(runs):
        pair.reverse()  # each goes first every other run
        for conn, ctx, times in pair:
            started = time.perf_counter()
            call(conn, ctx)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(on_big), 1000 * statistics.median(on_empty)


def big_table_reads(dbs: Databases, rows: int, rounds: int = ROUNDS, runs: int = RUNS) -> None:
    """One row per statement: its median time with `rows` finished tasks in the table, against
    an empty one; FAIL if slower by more than TARGET or if its plan reads tasks or
    task_attempts whole."""
    empty_url, big_url = dbs.fresh("empty_table"), dbs.fresh("big_table")
    # As the API's pool connects (psycopg prepares a statement after 5 runs, and Postgres may then
    # plan it generically): a plan that only a custom plan makes fast would show here. (The
    # claim is never prepared: task_claim.)
    with engine_connect(empty_url, role="bench") as empty, engine_connect(big_url, role="bench") as big:
        log(f"  the big table: {rows:,} finished tasks and their attempts")
        started = time.monotonic()
        empty_owners, big_owners = fill_history(empty, 0), fill_history(big, rows)
        log("  both tables: the last hour and the live work")
        empty_ctx, big_ctx = fill_present(empty, empty_owners), fill_present(big, big_owners)
        size = big.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('tasks') + pg_total_relation_size('task_attempts'))"
        ).fetchone()["pg_size_pretty"]
        log(f"  filled in {time.monotonic() - started:,.0f} s ({size} with indexes)")
        for name, call in STATEMENTS:
            explained = _Explained(big)
            call(explained, big_ctx)
            scanned = set().union(*(_seq_scans(p) for p in explained.plans))
            on_big, on_empty = [], []
            for _ in range(rounds):
                call(big, big_ctx), call(empty, empty_ctx)  # warm: plans, caches
                b, e = _medians_ms(big, empty, call, big_ctx, empty_ctx, runs)
                on_big.append(b)
                on_empty.append(e)
            b, e = statistics.median(on_big), statistics.median(on_empty)
            ratio = b / e
            ROWS.append(
                Row(
                    f"{rows:,} finished rows: {name}",
                    f"{b:.2f} ms" + (f"; Seq Scan of {', '.join(sorted(scanned))}" if scanned else ""),
                    f"{e:.2f} ms (empty table)",
                    ratio,
                    f"<= {TARGET:.2f}, no Seq Scan",
                    ratio <= TARGET and not scanned,
                )
            )
            log(
                f"  {name}: {b:.2f} ms against {e:.2f} ms ({ratio:.2f}){' SEQ SCAN ' + str(scanned) if scanned else ''}"
            )
    dbs.drop(big_url)
    dbs.drop(empty_url)


def prune_during_drain(dbs: Databases, tasks: int, pruned: int, rounds: int) -> None:
    """A day's worth of finished tasks (`pruned`, an hour old) deleted by `skiplock prune` (the
    cron path, at its default pace) while the worker drains `tasks` noops, against the same
    drain over the same table with nothing pruned. Target: >= 90% of the rate. The prune's rate
    over the drain says how long the day's worth takes at that pace."""
    from drain import drain  # (drain imports harness too: kept out of this module's import time)

    def prune(url: str) -> subprocess.Popen:
        env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "skiplock.cli", "prune", "--older-than", "1800"]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)

    def left(conn) -> dict:
        return {"left": conn.execute("SELECT count(*) FROM tasks WHERE worker_id = 'old'").fetchone()[0]}

    alone, with_prune, rates = [], [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}: the drain over {pruned:,} finished rows, alone")
        alone.append(drain(dbs, tasks, finished_rows=pruned)[0])
        log("    and while `skiplock prune` deletes them")
        rate, info = drain(dbs, tasks, finished_rows=pruned, alongside=prune, check=left)
        with_prune.append(rate)
        rates.append((pruned - info["left"]) / info["alongside_seconds"])
        log(f"    {alone[-1]:,.0f} tasks/s alone, {rate:,.0f} while pruning ({rates[-1]:,.0f} rows/s pruned)")
    a, p, r = statistics.median(alone), statistics.median(with_prune), statistics.median(rates)
    ROWS.append(
        Row(
            f"drain {tasks:,} noops while `skiplock prune` deletes a day's worth ({pruned:,})",
            f"{p:,.0f} tasks/s (pruning {r:,.0f} rows/s: the day's worth in {pruned / r / 60:.0f} min)",
            f"{a:,.0f} tasks/s (nothing pruned)",
            p / a,
            ">= 0.90",
            p / a >= 0.90,
        )
    )
