"""Schedules (issue 17): what the due-schedule checks cost an idle system. A worker with nothing
to do, on a database with 1,000 schedules none of which is due during the measure, against the
same worker on a database without schedules: transactions per second it makes (each of its
statements outside a transaction is one), read from pg_stat_database over the same window.

The worker reads the earliest next_fire_at every RECHECK_SECONDS (skiplock/worker/duties/
scheduler.py) and sleeps until it; idle, the rest is its poll for tasks and its own upkeep."""

from __future__ import annotations

import time

import psycopg
from harness import ROWS, Databases, Row, log, start_worker, stop
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from skiplock.schedules import Rule
from skiplock.sql.schedules import schedule_create

SCHEDULES = 1_000
TASK = {"task_type": "noop", "task_input": None, "queue": "default", "priority": 0, "max_attempts": 1,
        "timeout_seconds": 5}  # fmt: skip


def _counts(url: str) -> tuple[int, int]:
    """Transactions of the database so far, and reads of task_schedules (the due checks)."""
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s),
                   (SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables
                    WHERE relname = 'task_schedules')
            """,
            (name,),
        ).fetchone()
    return int(row[0]), int(row[1])


def _idle_rate(dbs: Databases, schedules: int, seconds: float) -> tuple[float, float]:
    url = dbs.fresh("schedules_idle")
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        for n in range(schedules):
            # daily, at a minute of the night: none falls due during the measure
            schedule_create(
                conn,
                name=f"s{n}",
                rule=Rule(cron=f"{n % 60} 3 * * *", timezone="Pacific/Kiritimati"),
                task=TASK,
            )
    worker = start_worker(url)
    try:
        time.sleep(3)  # started, registered, its first look at the schedules done
        before = _counts(url)
        time.sleep(seconds)
        after = _counts(url)
    finally:
        stop(worker)
    dbs.drop(url)
    # (less this measure's own read in between)
    return (after[0] - before[0] - 1) / seconds, (after[1] - before[1]) / seconds


def idle_cost(dbs: Databases, seconds: float) -> None:
    """Transactions per second of an idle worker with SCHEDULES schedules, against without."""
    without, _ = _idle_rate(dbs, 0, seconds)
    with_schedules, checks = _idle_rate(dbs, SCHEDULES, seconds)
    extra = with_schedules - without
    log(
        f"  {without:.2f} /s without schedules, {with_schedules:.2f} /s with {SCHEDULES:,} ({checks:.2f} due checks/s)"
    )
    ROWS.append(
        Row(
            f"idle worker, {SCHEDULES:,} schedules none due: transactions/s",
            f"{with_schedules:.2f} /s (+{extra:.2f}; due checks {checks:.2f} /s)",
            f"{without:.2f} /s (no schedules)",
            None,
            "<= +0.5 /s",
            extra <= 0.5,
        )
    )
