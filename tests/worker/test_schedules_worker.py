"""Schedules fired by real worker.py processes (issue 17, point 1): a schedule every second makes
one task per second while two workers race to fire it, and each task runs; a schedule declared in
code is written by the workers at start (once, whatever their number) and fires the same way."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import timedelta

from skiplock.schedules import Rule
from skiplock.sql.schedules import schedule_create
from tests.helpers import wait_until

NOOP = {"task_type": "noop", "task_input": None, "queue": "default", "priority": 0, "max_attempts": 3,
        "timeout_seconds": 30}  # fmt: skip


def fired(conn, schedule_id: int) -> list[dict]:
    return conn.execute(
        "SELECT t.id, t.scheduled_for, t.created_at, t.status::text AS status FROM tasks t"
        " WHERE schedule_id = %s ORDER BY scheduled_for",
        (schedule_id,),
    ).fetchall()


def test_two_workers_fire_a_schedule_once_per_second_and_run_its_tasks(conn, worker_process):
    schedule = schedule_create(conn, name="pulse", rule=Rule(every_seconds=1), task=NOOP)
    worker_process()
    worker_process()
    wait_until(lambda: len(fired(conn, schedule["id"])) >= 4, timeout=30, message="four fires")

    def first_four_completed():
        first = fired(conn, schedule["id"])[:4]
        return first if all(t["status"] == "completed" for t in first) else None

    tasks = wait_until(first_four_completed, timeout=30, message="the first four to complete")
    times = [t["scheduled_for"] for t in fired(conn, schedule["id"])]
    assert max(Counter(times).values()) == 1  # never twice
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times))  # none left out
    assert all(t["scheduled_for"].microsecond == 0 for t in tasks)
    # created on time: the fire is made within the poll of its second (the database's clock)
    lateness = [(t["created_at"] - t["scheduled_for"]).total_seconds() for t in tasks]
    assert all(0 <= late < 1.0 for late in lateness), lateness
    # what is recorded: a task per fire time, and at most the times before the workers were up as
    # missed (the default grace is the one second to the next fire)
    fires = conn.execute(
        "SELECT outcome, scheduled_for FROM task_schedule_fires ORDER BY scheduled_for"
    ).fetchall()
    assert {f["outcome"] for f in fires} <= {"created", "missed"}
    assert all(f["outcome"] == "created" for f in fires if f["scheduled_for"] >= times[0])


def test_a_schedule_declared_in_code_is_written_at_start_and_fires(conn, worker_process):
    modules = ("tests.sample_tasks", "tests.scheduled_tasks")
    worker_process(task_modules=modules)
    worker_process(task_modules=modules)
    row = wait_until(
        lambda: conn.execute("SELECT * FROM task_schedules WHERE source = 'code'").fetchone(),
        timeout=30,
        message="the declared schedule",
    )
    assert (row["name"], row["owner_key_id"], row["every_seconds"], row["task"]["task_input"]) == (
        "every-second-tick", None, 1, {"from": "code"},
    )  # fmt: skip
    done = wait_until(
        lambda: conn.execute(
            "SELECT result FROM tasks WHERE schedule_id = %s AND status = 'completed' ORDER BY id LIMIT 1",
            (row["id"],),
        ).fetchone(),
        timeout=30,
        message="a completed tick",
    )
    assert done["result"] == {"tick": {"from": "code"}}
    assert conn.execute("SELECT count(*) AS n FROM task_schedules").fetchone()["n"] == 1
