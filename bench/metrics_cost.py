"""What the metrics cost on the hot paths: submits with the API's metrics on (the default) next
to SKIPLOCK_METRICS=off, and a drain by a worker serving its metrics (scraped five times a
second, far more often than Prometheus would) next to one that does not serve them."""

from __future__ import annotations

import shutil

from drain import drain
from harness import ROWS, Databases, Row, cost_row, free_port, log, serve_and_load

METRICS_OFF = {"SKIPLOCK_METRICS": "off"}


def submit_cost(dbs: Databases, seconds: int, rounds: int) -> None:
    if not shutil.which("wrk"):
        ROWS.append(Row("submit with metrics on (16 conns)", "wrk missing", "-", None, ">= 95%", None))
        return
    on, off = [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for results, env in ((off, METRICS_OFF), (on, None)):
            url = dbs.fresh("metrics_submit")
            results.append(serve_and_load("wsgi:app", url, seconds, env=env)[0])
            dbs.drop(url)
    cost_row("submit with metrics on, the default (16 conns)", on, off, "req/s", "SKIPLOCK_METRICS=off", 0.95)


def drain_cost(dbs: Databases, tasks: int, rounds: int) -> None:
    served, unserved, infos = [], [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        unserved.append(drain(dbs, tasks)[0])
        rate, info = drain(dbs, tasks, metrics_port=free_port())
        served.append(rate)
        infos.append(info)
    name = f"drain {tasks:,} tasks, worker metrics served and scraped 5/s"
    cost_row(name, served, unserved, "tasks/s", "not served", 0.95)
    hand_over_row(tasks, infos)


def hand_over_row(tasks: int, infos: list[dict]) -> None:
    """What recording each hand-over to a process (task_workers.in_hand, before the batch is
    sent) cost the drain: the time the supervisor's loop waited on those statements, next to
    the drain's own time (the worker's metrics, from the served drains above; the median round)."""
    info = sorted(infos, key=lambda i: i["hand_over_seconds"] / i["seconds"])[len(infos) // 2]
    share = info["hand_over_seconds"] / info["seconds"]
    ROWS.append(
        Row(
            f"hand-over before each batch (drain {tasks:,} noops)",
            f"{info['hand_overs']:,.0f} statements ({1000 * info['hand_overs'] / tasks:.1f} per 1,000 tasks), "
            f"{1000 * info['hand_over_seconds']:,.0f} ms waited",
            f"{1000 * info['seconds']:,.0f} ms (the drain)",
            share,
            "<= 5%",
            share <= 0.05,
        )
    )
