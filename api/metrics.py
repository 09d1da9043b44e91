"""GET /metrics, in Prometheus' text format: the API's requests (by route, method and status) and
their latency, for every gunicorn process together (prometheus-client's multiprocess mode: the
directory is made and cleaned by api/serving/gunicorn_conf.py), and the queue's state read from the database
when scraped: one cheap statement per view, cached a few seconds, so ten scrapers cost about one.
When auth is on it needs a metrics key (a scrape config's `authorization`), or a viewer or
admin key.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import flask
import psycopg
from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from psycopg_pool import PoolTimeout

from skiplock.errors import DatabaseUnavailable
from skiplock.sql.limits import SCOPES, LimitRow
from skiplock.sql.operations import (
    UNSERVED_SCAN_LIMIT,
    limit_usage_all,
    queue_summaries,
    task_failure_counts,
    task_health_get,
    task_invariant_violation_count,
    task_unserved_counts,
)
from skiplock.sql.schedules import schedule_metrics
from skiplock.sql.workflow_store import workflow_metrics

from .auth import authenticate_scraper
from .extensions import TaskStore, db, store

log = logging.getLogger("skiplock.api")

REQUESTS = Counter(
    "skiplock_http_requests",
    "HTTP requests answered, by route, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "skiplock_http_request_duration_seconds",
    "Time to answer a request, by route and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# How long what was read from the database is served again.
STATE_CACHE_SECONDS = 5.0
AUDIT_CACHE_SECONDS = 60.0
# skiplock_task_failures counts the failed attempts of this many minutes.
FAILURES_WINDOW_MINUTES = 60

blp = flask.Blueprint("metrics", __name__)


def register(app: Flask) -> None:
    if not app.extensions["skiplock"].settings.metrics:
        return
    # First of the before_request hooks: a request that auth or the limits refuse is counted too.
    app.before_request_funcs.setdefault(None, []).insert(0, _started)
    app.after_request(_observed)
    app.extensions["skiplock"].count_early_refusal = _refused_early
    app.extensions["skiplock.metrics"] = DatabaseCollector(app.extensions["skiplock"])
    app.register_blueprint(blp)


def _started() -> None:
    g.metrics_started = time.perf_counter()


def _refused_early(method: str) -> None:
    """A 429 answered before routing (api.limits.EarlyRefusal): no route, no latency worth one."""
    REQUESTS.labels("refused before routing", method, "429").inc()


def _observed(response: Response) -> Response:
    started = g.get("metrics_started")
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        LATENCY.labels(route, request.method).observe(time.perf_counter() - started)
    return response


@blp.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition of this API's processes and of the queue."""
    if store().settings.auth_on:
        authenticate_scraper()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:  # every gunicorn process's samples, from the files they write
        processes = CollectorRegistry()
        MultiProcessCollector(processes, path=directory)
    else:
        processes = REGISTRY
    queue = CollectorRegistry(auto_describe=False)
    queue.register(flask.current_app.extensions["skiplock.metrics"])
    body = generate_latest(processes) + generate_latest(queue)
    return Response(body, mimetype=CONTENT_TYPE_LATEST.split(";")[0], content_type=CONTENT_TYPE_LATEST)


class DatabaseCollector(Collector):
    """The queue's state and health, read at scrape time through queue_summaries, task_health,
    task_failures, the limits' usage (limit_usage_all) and task_invariant_violations, each cached
    (per process)."""

    def __init__(self, task_store: TaskStore):
        self.store = task_store
        self._lock = threading.Lock()
        self._state: tuple[float, dict | None] = (float("-inf"), None)
        self._audit: tuple[float, int | None] = (float("-inf"), None)

    def _read(self) -> dict | None:
        now = time.monotonic()
        with self._lock:
            at, state = self._state
            if now - at < STATE_CACHE_SECONDS:
                return state
            try:
                with db() as conn:
                    state = {
                        "queues": queue_summaries(conn),
                        "health": task_health_get(conn),
                        "unserved": task_unserved_counts(conn),
                        "failures": task_failure_counts(conn, minutes=FAILURES_WINDOW_MINUTES),
                        "limits": limit_usage_all(conn),
                        "schedules": schedule_metrics(conn),
                        "workflows": workflow_metrics(conn),
                    }
                    if now - self._audit[0] >= AUDIT_CACHE_SECONDS:
                        self._audit = (now, task_invariant_violation_count(conn))
            except (
                psycopg.Error,
                PoolTimeout,
                DatabaseUnavailable,
            ) as exc:  # a scrape answers: database down
                log.warning(
                    "metrics: the database could not be read: %s", str(exc).strip() or type(exc).__name__
                )
                state = None
            self._state = (now, state)
            return state

    def collect(self):
        state = self._read()
        yield GaugeMetricFamily(
            "skiplock_database_up",
            "1 if the last read of the queue's state succeeded.",
            value=int(state is not None),
        )
        if state is None:
            return
        tasks = GaugeMetricFamily(
            "skiplock_queue_tasks",
            "Unfinished tasks per queue: due (waiting for a worker), scheduled (later), reserved (claimed, not started), running.",
            labels=["queue", "state"],
        )
        wait = GaugeMetricFamily(
            "skiplock_queue_oldest_due_wait_seconds",
            "How long the oldest due task has waited.",
            labels=["queue"],
        )
        paused = GaugeMetricFamily("skiplock_queue_paused", "1 if the queue is paused.", labels=["queue"])
        on_limit = GaugeMetricFamily(
            "skiplock_queue_waiting_on_limit_tasks",
            "Due tasks of the queue waiting for a concurrency, type, queue or rate limit (counted in due too).",
            labels=["queue"],
        )
        expired = GaugeMetricFamily(
            "skiplock_queue_expired_last_hour",
            "Tasks of the queue that expired before they started, in the last hour.",
            labels=["queue"],
        )
        for q in state["queues"]:
            for name in ("due", "scheduled", "reserved", "running"):
                tasks.add_metric([q["queue"], name], q[name])
            wait.add_metric([q["queue"]], q["oldest_due_wait_seconds"] or 0.0)
            paused.add_metric([q["queue"]], int(q["paused"]))
            on_limit.add_metric([q["queue"]], q["waiting_on_limit"])
            expired.add_metric([q["queue"]], q["expired_last_hour"])
        yield from (tasks, wait, paused, on_limit, expired)
        yield from self._limits(state["limits"])
        yield from self._schedules(state["schedules"])
        yield from self._workflows(state["workflows"])
        h = state["health"]
        dead = GaugeMetricFamily(
            "skiplock_table_dead_tuple_ratio",
            "Dead row versions as a share of all (vacuum is behind when high).",
            labels=["table"],
        )
        dead.add_metric(["tasks"], float(h["tasks_dead_tuple_share"] or 0))
        dead.add_metric(["task_attempts"], float(h["attempts_dead_tuple_share"] or 0))
        yield dead
        vacuumed = GaugeMetricFamily(
            "skiplock_table_last_vacuum_timestamp_seconds",
            "When the table was last vacuumed (0: never).",
            labels=["table"],
        )
        vacuumed.add_metric(["tasks"], h["tasks_last_vacuum"].timestamp() if h["tasks_last_vacuum"] else 0.0)
        vacuumed.add_metric(
            ["task_attempts"], h["attempts_last_vacuum"].timestamp() if h["attempts_last_vacuum"] else 0.0
        )
        yield vacuumed
        age = h["oldest_transaction_age"]
        yield GaugeMetricFamily(
            "skiplock_oldest_transaction_age_seconds",
            "Age of the transaction that holds back vacuum the longest (0: none).",
            value=age.total_seconds() if age else 0.0,
        )
        yield GaugeMetricFamily(
            "skiplock_oldest_transaction_xmin_age",
            "Transaction ids that transaction's snapshot holds back.",
            value=h["oldest_transaction_xmin_age"] or 0,
        )
        yield GaugeMetricFamily(
            "skiplock_notification_queue_usage_ratio",
            "Share of the NOTIFY queue in use (pg_notification_queue_usage()).",
            value=h["notification_queue_usage"],
        )
        yield GaugeMetricFamily(
            "skiplock_lapsed_leases",
            "Tasks processing past their lease (a rescue is due).",
            value=h["lapsed_leases"],
        )
        due = h["oldest_due_wait"]
        yield GaugeMetricFamily(
            "skiplock_oldest_due_wait_seconds",
            "How long the task that has waited longest for a worker has waited (any queue).",
            value=due.total_seconds() if due else 0.0,
        )
        yield GaugeMetricFamily("skiplock_workers", "Workers alive (task_workers).", value=h["workers"])
        unserved = GaugeMetricFamily(
            "skiplock_tasks_unserved",
            "Runnable tasks whose type (in their queue) no live worker runs: they wait until one does "
            f"(counted among the first {UNSERVED_SCAN_LIMIT:,} runnable tasks).",
            labels=["task_type", "queue"],
        )
        for row in state["unserved"]:
            unserved.add_metric([row["task_type"], row["queue"]], row["tasks"])
        yield unserved
        failures = GaugeMetricFamily(
            "skiplock_failed_attempts_last_hour",
            "Attempts that failed, timed out, crashed or were lost in the last hour.",
            labels=["task_type", "outcome"],
        )
        for row in state["failures"]:
            failures.add_metric([row["task_type"], row["outcome"]], row["n"])
        yield failures
        violations = self._audit[1]
        if violations is not None:
            yield GaugeMetricFamily(
                "skiplock_invariant_violations",
                "Rows of task_invariant_violations (read every minute): above 0 is a bug to report.",
                value=violations,
            )

    @staticmethod
    def _workflows(workflows: dict):
        yield GaugeMetricFamily(
            "skiplock_workflows_running", "Workflows with a task unfinished.", value=workflows["running"]
        )
        finished = GaugeMetricFamily(
            "skiplock_workflows_finished_last_hour",
            "Workflows that ended in the last hour, by state (completed, failed, cancelled).",
            labels=["state"],
        )
        for state in ("completed", "failed", "cancelled"):
            finished.add_metric([state], workflows["finished_last_hour"].get(state, 0))
        yield finished

    @staticmethod
    def _schedules(schedules: dict):
        count = GaugeMetricFamily("skiplock_schedules", "Schedules, by state.", labels=["state"])
        count.add_metric(["active"], schedules["active"])
        count.add_metric(["paused"], schedules["paused"])
        yield count
        yield GaugeMetricFamily(
            "skiplock_schedule_overdue_seconds",
            "How late the most overdue active schedule is (0: none is due): above a few seconds, no worker fires.",
            value=schedules["overdue_seconds"],
        )
        fires = GaugeMetricFamily(
            "skiplock_schedule_fires_last_hour",
            "Fire times of the last hour, by outcome (created, deduplicated, skipped, refused, missed).",
            labels=["outcome"],
        )
        for outcome in ("created", "deduplicated", "skipped", "refused", "missed"):
            fires.add_metric([outcome], schedules["fires_last_hour"].get(outcome, 0))
        yield fires

    @staticmethod
    def _limits(limits: list[LimitRow]):
        """Per scope, the tasks waiting on its limits; per limit (they are few), what holds a
        slot and the cap (task_limit_usage)."""
        waiting = GaugeMetricFamily(
            "skiplock_limit_waiting_tasks",
            "Due tasks waiting for a slot or a start of a limit, per scope (key, type, queue).",
            labels=["scope"],
        )
        running = GaugeMetricFamily(
            "skiplock_limit_running_tasks",
            "Tasks holding a slot of the limit (running, or admitted and about to start).",
            labels=["scope", "owner_key_id", "name"],
        )
        cap = GaugeMetricFamily(
            "skiplock_limit_max_running",
            "The limit's max_running (limits without one are not listed).",
            labels=["scope", "owner_key_id", "name"],
        )
        per_scope = dict.fromkeys(SCOPES, 0)
        for limit in limits:
            per_scope[limit["scope"]] += limit["waiting"]
            labels = [limit["scope"], str(limit["owner_key_id"]), limit["name"]]
            running.add_metric(labels, limit["running"])
            if limit["max_running"] is not None:
                cap.add_metric(labels, limit["max_running"])
        for scope, n in per_scope.items():
            waiting.add_metric([scope], n)
        yield from (waiting, running, cap)
