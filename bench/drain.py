"""Drain: how fast worker.py empties a full queue of no-op tasks, next to pgbench running the
claim-and-complete statement alone on the same table (bench/claim_complete.sql); the same with
millions of finished rows in the table; and the curve over task processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from harness import (
    BENCH,
    Databases,
    connect,
    embedded_bin,
    family_peak_rss,
    log,
    start_worker,
    stop,
)
from psycopg.conninfo import conninfo_to_dict

from skiplock import queries


def pgbench_baseline(dbs: Databases, seconds: int) -> float:
    """Rows/s of a pgbench script claiming 10 rows with SKIP LOCKED and marking them done."""
    url = dbs.fresh("pgbench")
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO tasks (task_type, input) SELECT 'noop', 'null' FROM generate_series(1, 400000)"
        )
        conn.execute("VACUUM ANALYZE tasks")
    dbs.settle()
    params = conninfo_to_dict(url)
    env = {
        **os.environ,
        "PGHOST": str(params.get("host", "")),
        "PGPORT": str(params.get("port", "5432")),
        "PGUSER": str(params.get("user", "postgres")),
        "PGDATABASE": str(params["dbname"]),
    }
    pgbench = shutil.which("pgbench") or str(embedded_bin("pgbench"))
    out = subprocess.run(
        [pgbench, "-n", "-c", "2", "-j", "2", "-T", str(seconds), "-f", str(BENCH / "claim_complete.sql")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    dbs.drop(url)
    return tps * 10


def drain(
    dbs: Databases, tasks: int, processes: int | None = None, finished_rows: int = 0
) -> tuple[float, dict]:
    """Tasks/s for worker.py (default settings unless `processes`) to run `tasks` noop tasks,
    from its first claim to its last completion (database clock)."""
    url = dbs.fresh("drain")
    with connect(url) as conn:
        if finished_rows:
            log(f"  filling {finished_rows:,} finished tasks")
            conn.execute(
                """
                INSERT INTO tasks (task_type, input, status, result, attempts, worker_id, started_at, finished_at, created_at, run_at)
                SELECT 'noop', 'null', 'completed', 'null', 1, 'old', now() - interval '1 hour', now() - interval '1 hour',
                       now() - interval '1 hour', now() - interval '1 hour'
                FROM generate_series(1, %s)
                """,
                (finished_rows,),
            )
        conn.execute(
            "INSERT INTO tasks (task_type, input) SELECT 'noop', 'null' FROM generate_series(1, %s)", (tasks,)
        )
        conn.execute("VACUUM ANALYZE tasks")
        dbs.settle()
        worker = start_worker(url, *(["--concurrency", str(processes)] if processes else []))
        rss: dict = {}
        try:
            # EXISTS, not count(*): the poll must not take CPU from the worker it measures.
            while conn.execute(
                "SELECT EXISTS (SELECT FROM tasks WHERE status IN ('pending', 'processing'))"
            ).fetchone()[0]:
                rss = family_peak_rss(worker.pid)
                time.sleep(0.2)
        finally:
            stop(worker)
        first, last, done = conn.execute(
            "SELECT min(started_at), max(finished_at), count(*) FROM tasks WHERE worker_id <> 'old' AND status = 'completed'"
        ).fetchone()
        assert done == tasks, f"only {done} of {tasks} completed"
        plan = conn.execute(
            "EXPLAIN " + queries.TASK_CLAIM_SQL,
            {"queues": None, "types": None, "limit": 10, "worker_id": "x", "lease": 30},
            prepare=False,
        ).fetchall()
    dbs.drop(url)
    uses_index = any("tasks_claim_idx" in line[0] for line in plan) and not any(
        "Seq Scan on tasks" in line[0] for line in plan
    )
    return tasks / (last - first).total_seconds(), {"rss": rss, "claim_uses_partial_index": uses_index}
