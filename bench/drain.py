"""Drain: how fast worker.py empties a full queue of no-op tasks, next to pgbench running the
claim-and-complete statement alone on the same table (bench/claim_complete.sql); the same with
millions of finished rows in the table; and the curve over task processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable

import psycopg
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

from skiplock.sql.claim import TASK_CLAIM_SQL


def pgbench_baseline(dbs: Databases, seconds: int) -> float:
    """Rows/s of a pgbench script claiming 10 rows with SKIP LOCKED and marking them done. The
    rows are runnable (a turn each, as a submit gives them): the script walks the claim's index."""
    url = dbs.fresh("pgbench")
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO tasks (task_type, input, turn) SELECT 'noop', 'null', g FROM generate_series(1, 400000) g"
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
    dbs: Databases,
    tasks: int,
    processes: int | None = None,
    finished_rows: int = 0,
    *,
    metrics_port: int = 0,
    callback_url: str | None = None,
    env: dict | None = None,
    fill: Callable[[str, int], None] | None = None,
    check: Callable[[psycopg.Connection], dict] | None = None,
    timeline_step: float = 0.5,
    alongside: Callable[[str], subprocess.Popen] | None = None,
) -> tuple[float, dict]:
    """Tasks/s for worker.py (default settings unless `processes`) to run `tasks` noop tasks,
    from its first claim to its last completion (database clock). With `metrics_port` the
    worker serves its metrics there, and they are scraped five times a second meanwhile. With
    `callback_url` every task names it, and the worker runs until every webhook is delivered:
    info["delivered_per_second"] is their rate, from the first task's start. With `fill`, it
    queues the tasks (fill(url, tasks)) instead of the plain INSERT (the scheduling rows: owners,
    concurrency keys); `check` looks at the drained table (its answer goes into info). With
    `alongside`, a process it starts on the database as the worker starts runs meanwhile (a
    `skiplock prune`), stopped with the drain if still at work: info["alongside_seconds"] is
    how long it ran."""
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
        if fill is not None:
            fill(url, tasks)
        else:
            # Runnable, as a submit leaves them (a turn each): without one, the workers' admission
            # would first have to give every task its turn.
            conn.execute(
                "INSERT INTO tasks (task_type, input, callback_url, turn)"
                " SELECT 'noop', 'null', %s, g FROM generate_series(1, %s) g",
                (callback_url, tasks),
            )
        conn.execute("VACUUM ANALYZE tasks")
        dbs.settle()
        args = ["--concurrency", str(processes)] if processes else []
        if metrics_port:
            args += ["--metrics-port", str(metrics_port)]
        worker = start_worker(url, *args, env=env)
        helper = alongside(url) if alongside is not None else None
        helper_started = time.monotonic()
        rss: dict = {}
        scrapes = 0
        last_metrics = ""
        unfinished = "SELECT EXISTS (SELECT FROM tasks WHERE status IN ('pending', 'processing'))"
        if callback_url:
            unfinished = "SELECT EXISTS (SELECT FROM webhook_deliveries WHERE status <> 'delivered') OR " + (
                unfinished.removeprefix("SELECT ")
            )
        try:
            # EXISTS, not count(*): the poll must not take CPU from the worker it measures.
            while conn.execute(unfinished).fetchone()[0]:
                rss = family_peak_rss(worker.pid)
                if metrics_port:
                    metrics = scrape(metrics_port)
                    scrapes += bool(metrics)
                    last_metrics = metrics or last_metrics
                time.sleep(0.2)
            if metrics_port:
                last_metrics = scrape(metrics_port) or last_metrics
        finally:
            stop(worker)
        helper_seconds = None
        if helper is not None:  # stopped with the drain if still at work
            if helper.poll() is None:
                helper.terminate()
            assert helper.wait(60) in (0, -15), f"{helper.args} failed"
            helper_seconds = time.monotonic() - helper_started
        first, last, done = conn.execute(
            "SELECT min(started_at), max(finished_at), count(*) FROM tasks WHERE worker_id <> 'old' AND status = 'completed'"
        ).fetchone()
        assert done == tasks, f"only {done} of {tasks} completed"
        assert not metrics_port or scrapes, "the worker's metrics were never scraped"
        info: dict = {
            "rss": rss,
            "seconds": (last - first).total_seconds(),
            "alongside_seconds": helper_seconds,
        }
        if last_metrics:  # what the hand-overs before each batch cost the supervisor's loop
            info["hand_overs"] = metric(last_metrics, "skiplock_worker_hand_over_seconds_count")
            info["hand_over_seconds"] = metric(last_metrics, "skiplock_worker_hand_over_seconds_sum")
        if callback_url:
            delivered, last_delivery = conn.execute(
                "SELECT count(*), max(delivered_at) FROM webhook_deliveries WHERE status = 'delivered'"
            ).fetchone()
            assert delivered == tasks, f"only {delivered} of {tasks} webhooks delivered"
            info["delivered_per_second"] = tasks / (last_delivery - first).total_seconds()
        if check is not None:
            info.update(check(conn))
        # The drain over time: tasks finished per second, in steps of timeline_step from the
        # first start (info["timeline"]: (seconds, tasks/s) at each step's start).
        info["timeline"] = [
            (float(r[0]), float(r[1]))
            for r in conn.execute(
                """
                SELECT s * %(step)s, count(*) / %(step)s FROM (
                    SELECT floor(extract(epoch FROM finished_at - %(first)s) / %(step)s) AS s FROM tasks
                    WHERE worker_id <> 'old' AND status = 'completed') f
                GROUP BY s ORDER BY s
                """,
                {"step": timeline_step, "first": first},
            )
        ]
        plan = conn.execute(
            "EXPLAIN " + TASK_CLAIM_SQL,
            {"queues": None, "types": None, "limit": 10, "worker_id": "x", "lease": 30},
            prepare=False,
        ).fetchall()
    dbs.drop(url)
    uses_index = any("tasks_runnable_idx" in line[0] for line in plan) and not any(
        "Seq Scan on tasks" in line[0] for line in plan
    )
    info["claim_uses_partial_index"] = uses_index
    return tasks / (last - first).total_seconds(), info


def scrape(port: int) -> str:
    """The worker's /metrics, or "" if it did not answer (it may not be listening yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""


def metric(text: str, name: str) -> float:
    """A sample's value in a /metrics text (0 when absent)."""
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
