"""The dashboard's pages and the live fragments htmx fetches again every REFRESH_SECONDS: the
overview (queues, limits, throughput charts of the last hour, running tasks, recent failures,
health)
and a task's page (its attempts on a timeline, input and result). Every figure comes from
skiplock.sql.operations' operator queries."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import redirect, render_template, url_for

from skiplock.sql.limits import LimitRow
from skiplock.sql.operations import (
    FailureRow,
    HealthRow,
    QueueSummaryRow,
    ThroughputRow,
    UnservedRow,
    limit_usage_all,
    queue_summaries,
    task_failures_recent,
    task_health_get,
    task_throughput_recent,
    task_unserved_counts,
    tasks_running_list,
)
from skiplock.sql.schedules import schedule_list, schedule_view
from skiplock.sql.table_stats import DeadRowsRow, table_dead_rows
from skiplock.sql.tasks import AttemptRow, TaskRow, task_attempts_list, task_get
from skiplock.sql.workflow_store import workflows_recent

from ..extensions import db
from .formatting import ago, duration, percent, seconds_of
from .views import bp

THROUGHPUT_MINUTES = 60
RUNNING_SHOWN = 50
FAILURES_SHOWN = 20
LIMITS_SHOWN = 50
RECENT_WORKFLOWS = 10
# Health figures past these are shown red.
OLDEST_DUE_WAIT_BAD_SECONDS = 60
OLDEST_TRANSACTION_BAD_SECONDS = 300
# Dead rows call for a look when autovacuum should have removed them and has not, on a table
# where they weigh: more than its trigger (autovacuum_vacuum_threshold + scale_factor x live rows,
# Postgres' defaults below: 30 dead rows of 50 are no news, autovacuum waits for 60) and more than
# DEAD_ROWS_BAD. Dead rows do not slow the claim at that size (measured: 200,000 dead rows in
# tasks, a claim of 10 took 5.0 ms against 5.8 ms after VACUUM: index entries of dead rows are
# skipped once marked), they bloat the table and every scan of it: 100,000 is tens of MB.
DEAD_ROWS_BAD = 100_000
AUTOVACUUM_THRESHOLD = 50
AUTOVACUUM_SCALE_FACTOR = 0.2
NOTIFY_QUEUE_USAGE_BAD = 0.5
# Input and result beyond this many characters are cut on the task's page.
JSON_SHOWN_CHARS = 20_000
# The attempt timeline: an axis of at least a millisecond; a bar at least this wide (percent of
# the axis) stays visible; its label goes right of it if it ends before LABEL_RIGHT_BEFORE, else
# left of it if it starts after LABEL_LEFT_AFTER, else inside it, LABEL_GAP from its edge.
TIMELINE_MIN_SPAN_SECONDS = 1e-3
BAR_MIN_WIDTH = 0.6
LABEL_RIGHT_BEFORE = 70
LABEL_LEFT_AFTER = 30
LABEL_GAP = 0.8


@bp.get("")
def overview():
    return render_template("dashboard/overview.html", **overview_data())


@bp.get("/")
def overview_slash():
    return redirect(url_for(".overview"), 308)


@bp.get("/live")
def live():
    return render_template("dashboard/_live.html", **overview_data())


@bp.get("/tasks/<task_id:task_id>")
def task(task_id: int):
    return render_template("dashboard/task.html", **task_data(task_id))


@bp.get("/tasks/<task_id:task_id>/live")
def task_live(task_id: int):
    return render_template("dashboard/_task.html", **task_data(task_id))


def overview_data() -> dict[str, Any]:
    with db() as conn:
        summaries = queue_summaries(conn)
        throughput = task_throughput_recent(conn, minutes=THROUGHPUT_MINUTES)
        running = tasks_running_list(conn, limit=RUNNING_SHOWN)
        failures = task_failures_recent(conn, limit=FAILURES_SHOWN)
        health = task_health_get(conn)
        dead_rows = table_dead_rows(conn)
        unserved = task_unserved_counts(conn)
        limits = limit_usage_all(conn)
        schedules = schedule_rows(conn)
        workflows = workflows_recent(conn, limit=RECENT_WORKFLOWS)
    now = datetime.now(UTC)
    charts = throughput_charts(throughput, now)
    queues = queue_rows(summaries, charts)
    return {
        "now": now,
        "queues": queues,
        "limits": busiest_limits(limits),
        "limits_count": len(limits),
        "schedules": schedules,
        "workflows": workflows,
        "charts": charts,
        "running": running,
        "failures": failure_rows(failures),
        "health": [*health_figures(health, queues), *vacuum_figures(dead_rows), unserved_figure(unserved)],
    }


def schedule_rows(conn) -> list[dict[str, Any]]:
    """Every schedule with its last fire and what daylight saving does to its next run."""
    rows = []
    for row in schedule_list(conn):
        view = schedule_view(conn, row, fires=1)
        rows.append(
            {**view, "last": view["last_fires"][0] if view["last_fires"] else None,
             "next_note": view["next_runs"][0]["note"]}
        )  # fmt: skip
    return rows


def throughput_charts(rows: list[ThroughputRow], now: datetime) -> dict[str, Any]:
    """Per queue, attempts completed and failed in each minute of the last hour (0 where no
    worker wrote any), on one axis of minutes (Unix seconds) that ends at the current minute."""
    last = max([now.replace(second=0, microsecond=0), *(r["minute"] for r in rows)])
    minutes = [last - timedelta(minutes=n) for n in range(THROUGHPUT_MINUTES, -1, -1)]
    index = {minute: n for n, minute in enumerate(minutes)}
    queues: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        series = queues.setdefault(
            row["queue"], {"completed": [0] * len(minutes), "failed": [0] * len(minutes)}
        )
        n = index.get(row["minute"])
        if n is not None:
            series["completed"][n] += row["completed"]
            series["failed"][n] += row["failed"]
    return {"minutes": [int(m.timestamp()) for m in minutes], "queues": dict(sorted(queues.items()))}


def queue_rows(summaries: list[QueueSummaryRow], charts: dict[str, Any]) -> list[dict[str, Any]]:
    """Every queue with unfinished tasks, a setting or attempts in the last hour, with its
    depth, oldest wait and the hour's totals."""
    rows: dict[str, dict[str, Any]] = {s["queue"]: dict(s) for s in summaries}
    for queue in charts["queues"]:
        rows.setdefault(
            queue,
            dict(
                queue=queue,
                due=0,
                scheduled=0,
                reserved=0,
                running=0,
                oldest_due_wait_seconds=None,
                paused=False,
                waiting_on_limit=0,
                expired_last_hour=0,
                limit=None,
            ),
        )
    for queue, row in rows.items():
        series = charts["queues"].get(queue, {"completed": [], "failed": []})
        row["completed_hour"] = sum(series["completed"])
        row["failed_hour"] = sum(series["failed"])
        row["wait_bad"] = (row["oldest_due_wait_seconds"] or 0) > OLDEST_DUE_WAIT_BAD_SECONDS
    return [rows[q] for q in sorted(rows)]


def busiest_limits(limits: list[LimitRow]) -> list[LimitRow]:
    """The LIMITS_SHOWN limits with the most tasks waiting, then running (ties by scope and
    name)."""
    ordered = sorted(limits, key=lambda r: (-r["waiting"], -r["running"], r["scope"], r["name"]))
    return ordered[:LIMITS_SHOWN]


def failure_rows(failures: list[FailureRow]) -> list[dict[str, Any]]:
    """The recent failures; a Retry button on the newest row of each task that can be retried."""
    seen: set[int] = set()
    rows = []
    for failure in failures:
        retry = (
            failure["task_status"] in ("failed", "cancelled", "expired") and failure["task_id"] not in seen
        )
        seen.add(failure["task_id"])
        rows.append({**failure, "retry": retry})
    return rows


def health_figures(health: HealthRow, queues: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task_health row as labelled figures, each marked bad when it calls for a look."""
    due = sum(q["due"] for q in queues)
    wait = seconds_of(health["oldest_due_wait"])
    transaction = seconds_of(health["oldest_transaction_age"])
    usage = health["notification_queue_usage"] or 0
    no_workers = health["workers"] == 0 and due > 0
    lapsed = health["lapsed_leases"] > 0

    def figure(label: str, value: str, bad: bool, note: str = "") -> dict[str, Any]:
        return {"label": label, "value": value, "bad": bad, "note": note}

    figures = [
        figure(
            "Workers alive", str(health["workers"]), no_workers, f"and {due} tasks due" if no_workers else ""
        ),
        figure("Oldest due wait", duration(wait), (wait or 0) > OLDEST_DUE_WAIT_BAD_SECONDS, "for a worker"),
        figure("Lapsed leases", str(health["lapsed_leases"]), lapsed, "a rescue is due" if lapsed else ""),
        figure(
            "Oldest transaction",
            duration(transaction),
            (transaction or 0) > OLDEST_TRANSACTION_BAD_SECONDS,
            health["oldest_transaction_holder"] or "",
        ),
        figure("NOTIFY queue in use", percent(usage), usage > NOTIFY_QUEUE_USAGE_BAD),
    ]
    return figures


def vacuum_figures(tables: list[DeadRowsRow]) -> list[dict[str, Any]]:
    """Dead rows per table, bad when autovacuum is behind on many of them (DEAD_ROWS_BAD)."""
    figures = []
    for row in tables:
        dead, live = row["dead"], row["live"]
        behind = dead > AUTOVACUUM_THRESHOLD + AUTOVACUUM_SCALE_FACTOR * live
        bad = behind and dead >= DEAD_ROWS_BAD
        vacuumed = f"vacuumed {ago(row['last_vacuum'])}" if row["last_vacuum"] else "never vacuumed"
        note = f"{vacuumed}; autovacuum is behind" if bad else vacuumed
        value = f"{dead:,} ({percent(dead / max(1, dead + live))})"
        figures.append({"label": f"Dead rows in {row['table']}", "value": value, "bad": bad, "note": note})
    return figures


def unserved_figure(unserved: list[UnservedRow]) -> dict[str, Any]:
    """Runnable tasks of a type (or queue) no live worker runs: they wait forever."""
    total = sum(row["tasks"] for row in unserved)
    note = ", ".join(f"{row['task_type']} ({row['tasks']} in {row['queue']})" for row in unserved)
    return {"label": "Due tasks no worker runs", "value": str(total), "bad": total > 0, "note": note}


def task_data(task_id: int) -> dict[str, Any]:
    with db() as conn:
        task = task_get(conn, task_id, with_input=True)
        attempts = task_attempts_list(conn, task_id)
    now = datetime.now(UTC)
    return {
        "task": task,
        "attempts": attempts,
        "timeline": attempt_timeline(task, attempts, now),
        "input_json": pretty_json(task["input"]),
        "result_json": pretty_json(task["result"]) if task["result"] is not None else None,
        "now": now,
    }


def attempt_timeline(task: TaskRow, attempts: list[AttemptRow], now: datetime) -> dict[str, Any]:
    """The task's attempts on one time axis, from its creation to its end (or now): a bar per
    attempt that ran (from started_at to finished_at), a tick for one released before it
    started, and the attempt running now. Positions are percentages of the axis."""
    bars: list[dict[str, Any]] = [
        {
            "attempt": a["attempt"],
            "outcome": a["outcome"],
            "start": a["started_at"],
            "end": a["finished_at"],
            "worker": a["worker_id"],
            "error": a["error"],
        }
        for a in attempts
    ]
    if task["status"] == "processing" and task["started_at"] is not None:
        bars.append(
            {
                "attempt": task["attempts"],
                "outcome": "running",
                "start": task["started_at"],
                "end": now,
                "worker": None,
                "error": None,
            }
        )
    begin = task["created_at"]
    end = max([task["finished_at"] or now, *(b["end"] for b in bars)])
    span = max((end - begin).total_seconds(), TIMELINE_MIN_SPAN_SECONDS)

    def at(moment: datetime) -> float:
        return round(100 * min(max((moment - begin).total_seconds() / span, 0.0), 1.0), 2)

    for bar in bars:
        bar["left"] = at(bar["start"] or bar["end"])
        bar["width"] = max(round(at(bar["end"]) - bar["left"], 2), BAR_MIN_WIDTH)
        bar["took"] = (bar["end"] - bar["start"]).total_seconds() if bar["start"] else None
        # Its label where there is room: right of the bar, else left of it, else inside it.
        right = bar["left"] + bar["width"]
        if right < LABEL_RIGHT_BEFORE:
            bar["label_at"], bar["label_anchor"], bar["label_inside"] = right + LABEL_GAP, "start", False
        elif bar["left"] > LABEL_LEFT_AFTER:
            bar["label_at"], bar["label_anchor"], bar["label_inside"] = bar["left"] - LABEL_GAP, "end", False
        else:
            bar["label_at"], bar["label_anchor"], bar["label_inside"] = bar["left"] + LABEL_GAP, "start", True
    return {"begin": begin, "end": end, "bars": bars}


def pretty_json(value: Any) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    if len(text) > JSON_SHOWN_CHARS:
        return text[:JSON_SHOWN_CHARS] + f"\n… ({len(text) - JSON_SHOWN_CHARS} more characters)"
    return text
