"""Enqueue from the application's own transaction (skiplock.enqueue), one task per transaction on
one connection, against a bare INSERT of the same row in the same loop: the columns a submit
fills (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at, and a turn: a
due task is runnable, so it enters the same indexes), written as constants. What is measured is
what skiplock adds to the row an application would write itself: the rules (skiplock.submission),
the fair turn (task_turn_start's index probes), the limit checks, psycopg's handling of the
statement's parameters and answer. The row's own cost (its indexes, the wake-up trigger) is in
both."""

from __future__ import annotations

import time

import psycopg
from harness import Databases, cost_row, log
from scheduling import _order

from skiplock.enqueue import Enqueuer

BARE_INSERT = """INSERT INTO tasks (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at, turn)
VALUES (%s, %s::jsonb, 'default', 0, 3, 300, now(), 1)"""


def _rate(url: str, tasks: int, mode: str, enqueuer: Enqueuer) -> float:
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        for _ in range(tasks):
            with conn.transaction():
                if mode == "enqueue":
                    enqueuer.submit(conn, "noop", {"n": 1})
                else:
                    conn.execute(BARE_INSERT, ("noop", '{"n": 1}'))
        return tasks / (time.perf_counter() - started)


def enqueue_cost(dbs: Databases, tasks: int, rounds: int) -> None:
    """Rounds of (bare INSERT, enqueue), each on a fresh database."""
    enqueuer = Enqueuer()
    bare, enqueued = [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for mode in _order(round_, "enqueue"):
            url = dbs.fresh("enqueue")
            (enqueued if mode == "enqueue" else bare).append(_rate(url, tasks, mode, enqueuer))
            dbs.drop(url)
        log(f"  {bare[-1]:,.0f} tasks/s bare INSERT, {enqueued[-1]:,.0f} tasks/s enqueued")
    cost_row("enqueue in your own transaction (1 task/tx)", enqueued, bare, "tasks/s", "bare INSERT", 0.8)
