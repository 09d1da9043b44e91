"""Prometheus metrics, scraped and parsed with prometheus-client's own parser: the API's /metrics
(requests and latency summed over real gunicorn processes, the queue's state and health read from
the database, who may scrape, SKIPLOCK_METRICS=off) and a real worker.py's --metrics-port
(what ran, by queue, type and outcome), with the task_throughput rows workers write."""

from __future__ import annotations

import glob
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from api import metrics as api_metrics
from skiplock import keys as key_admin
from skiplock.settings import Settings
from skiplock.sql.fenced import AttemptFailure, task_fail_many
from skiplock.sql.operations import (
    queue_summaries,
    task_health_get,
    task_queue_set_paused,
    task_throughput_recent,
)
from skiplock.worker import stats as worker_stats
from tests.helpers import (
    UNREACHABLE_DB,
    WORKER,
    assert_error,
    claim_refs,
    free_port,
    insert_task,
    settings_env,
    start_all,
    start_gunicorn,
    task_row,
    wait_until,
)

COUNTED_ROUTE = "/api/task-types"
# Metric families the API's /metrics reads from the database (besides the per-queue ones).
HEALTH_FAMILIES = {
    "skiplock_database_up",
    "skiplock_table_dead_tuple_ratio",
    "skiplock_table_last_vacuum_timestamp_seconds",
    "skiplock_oldest_transaction_age_seconds",
    "skiplock_oldest_transaction_xmin_age",
    "skiplock_notification_queue_usage_ratio",
    "skiplock_lapsed_leases",
    "skiplock_oldest_due_wait_seconds",
    "skiplock_workers",
    "skiplock_failed_attempts_last_hour",
    "skiplock_invariant_violations",
}


# --- helpers -----------------------------------------------------------------------------------


def parse(text: str) -> dict:
    """Metric families by name, as prometheus-client's parser reads the exposition."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels) -> float:
    """Sum of the samples named `sample` whose labels include `labels` (0 when there is none)."""
    family = sample
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample.endswith(suffix) and sample not in families:
            family = sample[: -len(suffix)]
            break
    if family not in families:
        return 0.0
    return sum(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def label_sets(families: dict, sample: str, *names: str) -> dict[tuple, float]:
    """{(label values...): value} of every sample named `sample` (one family)."""
    family = families[sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    return {tuple(s.labels[n] for n in names): s.value for s in family.samples if s.name == sample}


def assert_histogram_consistent(families: dict, name: str, **labels) -> None:
    """Buckets are cumulative and end with +Inf, which equals _count."""
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in families[name].samples
        if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert buckets, f"no buckets of {name} {labels}"
    buckets.sort()
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), buckets
    assert buckets[-1][0] == float("inf")
    assert buckets[-1][1] == value(families, f"{name}_count", **labels)


def http_get(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, dict, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read().decode()


def scrape_client(client, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return parse(response.get_data(as_text=True))


def per_process_requests(directory: str, route: str) -> dict[str, float]:
    """{counter file: requests of `route` it counted}: one file per gunicorn process."""
    out = {}
    for path in glob.glob(os.path.join(directory, "counter_*.db")):
        total = 0.0
        for metric in MultiProcessCollector.merge([path]):
            for s in metric.samples:
                if s.name == "skiplock_http_requests_total" and s.labels.get("route") == route:
                    total += s.value
        out[os.path.basename(path)] = total
    return out


# --- the API's /metrics through real gunicorn ----------------------------------------------------


@pytest.mark.slow
def test_gunicorn_processes_are_summed_and_the_queue_is_read_from_the_database(settings, conn, tmp_path):
    # The queue, before anything scrapes (each process caches what it read for a few seconds).
    alpha_due = [insert_task(conn, "noop", queue="alpha") for _ in range(3)]
    conn.execute("UPDATE tasks SET run_at = now() - interval '90 seconds' WHERE id = %s", (alpha_due[0],))
    for _ in range(2):
        insert_task(conn, "noop", queue="alpha", delay_seconds=3600)
    for _ in range(3):
        insert_task(conn, "noop", queue="beta")
    running, _reserved = claim_refs(conn, 2, queue="beta")  # claimed, not started
    start_all(conn, [running])
    insert_task(conn, "noop", queue="gamma")
    [failing] = claim_refs(conn, 1, queue="gamma")
    start_all(conn, [failing])
    task_fail_many(
        conn,
        worker_id=WORKER,
        failures=[AttemptFailure(failing.task_id, failing.attempt, "failed", "boom")],
        backoff_base=3600,
        backoff_max=3600,
    )
    task_queue_set_paused(conn, queue="idle", paused=True, by="test")
    expected = {
        # queue: (due, scheduled, reserved, running, paused)
        "alpha": (3, 2, 0, 0, 0),
        "beta": (1, 0, 1, 1, 0),
        "gamma": (0, 1, 0, 0, 0),  # retried after a backoff of about an hour
        "idle": (0, 0, 0, 0, 1),  # paused, no task: listed through task_queues
    }
    in_database = {
        q["queue"]: (q["due"], q["scheduled"], q["reserved"], q["running"], int(q["paused"]))
        for q in queue_summaries(conn)
    }
    assert in_database == expected

    directory = str(tmp_path / "metrics")
    # Each process is replaced after 100 requests (max_requests): the kernel may hand one gevent
    # process every connection (480 of 480 seen here), and the sum must hold across processes,
    # including one that has exited (its counter file stays). A gevent process notices it is
    # done within a second (its loop's tick), so the bursts are paced to let that happen.
    server, http = start_gunicorn(
        settings,
        workers=2,
        quiet=True,
        env={"PROMETHEUS_MULTIPROC_DIR": directory, "GUNICORN_CMD_ARGS": "--max-requests 100"},
    )
    try:
        base = http.base
        sent = 0
        # Two processes at least must answer some: send bursts of concurrent requests until two
        # have counted requests of the route, each in its own file.
        with ThreadPoolExecutor(max_workers=16) as pool:
            for _ in range(30):
                codes = list(pool.map(lambda _: http_get(base + COUNTED_ROUTE)[0], range(16)))
                assert codes == [200] * 16
                sent += 16
                if sum(1 for n in per_process_requests(directory, COUNTED_ROUTE).values() if n) >= 2:
                    break
                time.sleep(0.2)
        per_process = per_process_requests(directory, COUNTED_ROUTE)
        assert sum(1 for n in per_process.values() if n) >= 2, per_process
        assert sum(per_process.values()) == sent
        assert http_get(base + "/no/such/page")[0] == 404

        code, headers, text = http_get(base + "/metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain; version=")
        families = parse(text)

        # Requests: every process's, summed, by route, method and status.
        assert value(families, "skiplock_http_requests_total", route=COUNTED_ROUTE, method="GET") == sent
        assert value(families, "skiplock_http_requests_total", route=COUNTED_ROUTE, status="200") == sent
        assert value(families, "skiplock_http_requests_total", route="unmatched", status="404") == 1
        assert value(families, "skiplock_http_requests_total", route="/healthz", status="200") >= 1
        latency = "skiplock_http_request_duration_seconds"
        assert value(families, f"{latency}_count", route=COUNTED_ROUTE, method="GET") == sent
        assert 0 < value(families, f"{latency}_sum", route=COUNTED_ROUTE, method="GET") < sent * 5
        assert_histogram_consistent(families, latency, route=COUNTED_ROUTE, method="GET")

        # The queue's state, as the database has it.
        tasks = label_sets(families, "skiplock_queue_tasks", "queue", "state")
        paused = label_sets(families, "skiplock_queue_paused", "queue")
        scraped = {
            q: (
                tasks[(q, "due")],
                tasks[(q, "scheduled")],
                tasks[(q, "reserved")],
                tasks[(q, "running")],
                paused[(q,)],
            )
            for q in expected
        }
        assert scraped == expected
        assert {q for q, _ in tasks} == set(expected)
        waits = label_sets(families, "skiplock_queue_oldest_due_wait_seconds", "queue")
        assert 90 <= waits[("alpha",)] < 150
        assert 0 <= waits[("beta",)] < 60
        assert waits[("gamma",)] == waits[("idle",)] == 0  # nothing due

        # Health, from task_health, task_failures and the self-audit.
        assert set(families) >= HEALTH_FAMILIES, HEALTH_FAMILIES - set(families)
        health = task_health_get(conn)
        assert value(families, "skiplock_database_up") == 1
        assert value(families, "skiplock_lapsed_leases") == health["lapsed_leases"] == 0
        assert value(families, "skiplock_workers") == health["workers"] == 0
        assert 90 <= value(families, "skiplock_oldest_due_wait_seconds") < 150
        assert 0 <= value(families, "skiplock_notification_queue_usage_ratio") < 1
        assert {labels for labels in label_sets(families, "skiplock_table_dead_tuple_ratio", "table")} == {
            ("tasks",),
            ("task_attempts",),
        }
        assert label_sets(families, "skiplock_failed_attempts_last_hour", "task_type", "outcome") == {
            ("noop", "failed"): 1
        }
        assert value(families, "skiplock_invariant_violations") == 0
    finally:
        server.terminate()
        server.wait(20)

    # A restart starts from zero: the files the old processes left are emptied out first.
    assert glob.glob(os.path.join(directory, "counter_*.db"))
    server, http = start_gunicorn(
        settings, workers=2, quiet=True, env={"PROMETHEUS_MULTIPROC_DIR": directory}
    )
    try:
        code, _, text = http_get(http.base + "/metrics")
        assert code == 200
        assert value(parse(text), "skiplock_http_requests_total", route=COUNTED_ROUTE) == 0
    finally:
        server.terminate()
        server.wait(20)


# --- the API's /metrics through the Flask test client ---------------------------------------------


def test_metrics_need_an_admin_key_when_auth_is_on(make_app, conn):
    client = make_app(auth="on", key_cache_seconds=0.2).test_client()
    admin = key_admin.create_key(conn, name="ops", role="admin")
    reader = key_admin.create_key(conn, name="client", role="client")

    refused = client.get("/metrics")
    assert_error(refused, 401)
    assert refused.headers["WWW-Authenticate"].startswith('Bearer realm="skiplock"')
    assert_error(client.get("/metrics", headers={"Authorization": "Bearer skl_" + "x" * 32}), 401)
    assert_error(client.get("/metrics", headers={"Authorization": f"Bearer {reader['token']}"}), 403)
    families = scrape_client(client, admin["token"])
    assert value(families, "skiplock_database_up") == 1

    key_admin.revoke_key(conn, key_id=admin["id"])
    time.sleep(0.4)  # past key_cache_seconds: what a process trusts about a key
    assert_error(client.get("/metrics", headers={"Authorization": f"Bearer {admin['token']}"}), 401)


def test_requests_refused_by_authentication_or_rate_limits_are_counted(make_app, conn):
    """BUG (api/__init__.py registers auth and limits before metrics): a request that a
    before_request handler refuses (401 from api/auth.py, 429 from api/limits.py) never runs
    metrics' _started, so _observed does not count it: a flood of bad or throttled keys is
    invisible in skiplock_http_requests_total."""
    client = make_app(auth="on").test_client()
    admin = key_admin.create_key(conn, name="ops", role="admin")
    throttled = key_admin.create_key(conn, name="slow", role="client", rate_per_second=0.01, burst=1)
    route = "/api/tasks"

    def counted(status: str) -> float:
        families = scrape_client(client, admin["token"])
        return value(families, "skiplock_http_requests_total", route=route, method="GET", status=status)

    before = {status: counted(status) for status in ("200", "401", "429")}
    for _ in range(3):
        assert client.get(route).status_code == 401
    assert client.get(route, headers={"Authorization": f"Bearer {throttled['token']}"}).status_code == 200
    assert client.get(route, headers={"Authorization": f"Bearer {throttled['token']}"}).status_code == 429
    after = {status: counted(status) for status in ("200", "401", "429")}
    assert {status: after[status] - before[status] for status in after} == {"200": 1, "401": 3, "429": 1}


def test_metrics_off_removes_the_endpoint_and_the_counting(settings, make_app):
    off = Settings.from_env({**settings_env(settings), "SKIPLOCK_METRICS": "off"})
    assert off.metrics is False
    client = make_app(metrics=off.metrics).test_client()

    def counted() -> float:
        return (
            REGISTRY.get_sample_value(
                "skiplock_http_requests_total", {"route": "/healthz", "method": "GET", "status": "200"}
            )
            or 0.0
        )

    before = counted()
    assert client.get("/healthz").status_code == 200
    assert_error(client.get("/metrics"), 404)
    assert counted() == before
    # The control: with metrics on, the same request is counted.
    assert make_app().test_client().get("/healthz").status_code == 200
    assert counted() == before + 1


def test_the_queue_state_is_cached_for_a_few_seconds(make_app, conn):
    """Ten scrapers cost about one read: what was read is served again for STATE_CACHE_SECONDS."""
    client = make_app().test_client()
    insert_task(conn, "noop", queue="cached")
    first = time.monotonic()
    assert value(scrape_client(client), "skiplock_queue_tasks", queue="cached", state="due") == 1
    read_by = time.monotonic()  # the cached read was taken between first and read_by
    insert_task(conn, "noop", queue="cached")
    assert value(scrape_client(client), "skiplock_queue_tasks", queue="cached", state="due") == 1
    assert time.monotonic() - first < api_metrics.STATE_CACHE_SECONDS  # the second came from the cache
    # Wait out the cache from the latest moment it can have been read (a slow first request on CI
    # can take longer than any fixed margin after `first`).
    time.sleep(max(0.0, read_by + api_metrics.STATE_CACHE_SECONDS + 0.1 - time.monotonic()))
    assert value(scrape_client(client), "skiplock_queue_tasks", queue="cached", state="due") == 2


def test_with_the_database_down_metrics_still_answer(make_app):
    client = make_app(database_url=UNREACHABLE_DB, db_timeout_seconds=0.5).test_client()
    families = scrape_client(client)
    assert value(families, "skiplock_database_up") == 0
    assert "skiplock_queue_tasks" not in families
    assert "skiplock_http_requests" in families  # the process's own metrics are still there


# --- a worker's --metrics-port ---------------------------------------------------------------------


def test_worker_metrics_count_exactly_what_ran(settings, conn, worker_process):
    tasks = {
        "noop": [insert_task(conn, "noop") for _ in range(3)],
        "greet": [insert_task(conn, "greet", {"name": "Ada"}, queue="mail") for _ in range(2)],
        "fail twice": [insert_task(conn, "fail", {"times": 5}, queue="bad", max_attempts=2)],
        "fail once": [insert_task(conn, "fail", {"times": 1}, queue="bad", max_attempts=3)],
        "crash": [insert_task(conn, "crash", queue="bad", max_attempts=1)],
        "time out": [
            insert_task(conn, "sleep", {"seconds": 30}, queue="slow", max_attempts=1, timeout_seconds=1)
        ],
    }
    port = free_port()
    worker = worker_process("--concurrency", "2", "--metrics-port", str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    ids = [i for group in tasks.values() for i in group]
    wait_until(
        lambda: all(task_row(conn, i)["status"] in ("completed", "failed") for i in ids),
        timeout=60,
        message="every task to finish",
    )
    assert worker.poll() is None
    statuses = {name: [task_row(conn, i)["status"] for i in group] for name, group in tasks.items()}
    assert statuses == {
        "noop": ["completed"] * 3,
        "greet": ["completed"] * 2,
        "fail twice": ["failed"],
        "fail once": ["completed"],
        "crash": ["failed"],
        "time out": ["failed"],
    }
    # The outcomes are counted before they are written: once the rows are final, the counters are.
    families = wait_until(
        lambda: (f := parse(http_get(url)[2])) and value(f, "skiplock_worker_outcomes_unwritten") == 0 and f,
        message="the worker's gauges to settle",
    )

    # Every counter, exactly: what task_attempts recorded, and what the tasks above must have done.
    attempts = {
        (r["queue"], r["task_type"], r["outcome"]): r["n"]
        for r in conn.execute(
            "SELECT t.queue, t.task_type, a.outcome::text AS outcome, count(*)::int AS n "
            "FROM task_attempts a JOIN tasks t ON t.id = a.task_id GROUP BY 1, 2, 3"
        )
    }
    assert attempts == {
        ("default", "noop", "completed"): 3,
        ("mail", "greet", "completed"): 2,
        ("bad", "fail", "failed"): 3,
        ("bad", "fail", "completed"): 1,
        ("bad", "crash", "crashed"): 1,
        ("slow", "sleep", "timed_out"): 1,
    }
    for outcome in worker_stats.OUTCOMES:
        counted = label_sets(families, f"skiplock_tasks_{outcome}_total", "queue", "task_type")
        assert counted == {(q, t): n for (q, t, o), n in attempts.items() if o == outcome}, outcome
    started = {}
    for (q, t, _), n in attempts.items():
        started[(q, t)] = started.get((q, t), 0) + n
    assert label_sets(families, "skiplock_tasks_started_total", "queue", "task_type") == started
    assert label_sets(families, "skiplock_tasks_lost_total", "queue", "task_type") == {}
    assert label_sets(families, "skiplock_tasks_released_total", "queue", "task_type") == {}

    # Run times: one observation per attempt, by type.
    run = "skiplock_task_run_seconds"
    per_type = {}
    for (_, t, _), n in attempts.items():
        per_type[(t,)] = per_type.get((t,), 0) + n
    assert label_sets(families, f"{run}_count", "task_type") == per_type
    for (task_type,) in per_type:
        assert_histogram_consistent(families, run, task_type=task_type)
    assert value(families, f"{run}_sum", task_type="sleep") >= 1.0  # killed at its 1 s timeout
    assert value(families, f"{run}_sum", task_type="noop") < 3.0

    # Claims and writes: every attempt was claimed once (nothing was handed back or released).
    claims = "skiplock_worker_claim_batch_size"
    assert value(families, f"{claims}_sum") == sum(attempts.values())
    assert_histogram_consistent(families, claims)
    writes = "skiplock_worker_write_batch_size"
    assert value(families, f"{writes}_count") >= 1
    assert_histogram_consistent(families, writes)

    assert value(families, "skiplock_worker_processes") == 2  # the crashed and killed ones replaced
    assert value(families, "skiplock_worker_processes_busy") == 0
    assert value(families, "skiplock_worker_rescue_rounds_total") >= 1
    assert value(families, "skiplock_worker_reconnects_total") == 0
    assert value(families, "skiplock_worker_fenced_out_total") == 0
    assert "skiplock_worker_lease_renewals" in families


def worker_throughput(conn) -> dict[tuple[str, str], tuple[int, int]]:
    rows = conn.execute(
        "SELECT queue, task_type, sum(completed)::int AS completed, sum(failed)::int AS failed "
        "FROM task_throughput GROUP BY 1, 2"
    ).fetchall()
    return {(r["queue"], r["task_type"]): (r["completed"], r["failed"]) for r in rows}


def test_workers_write_their_throughput_per_minute(conn, start_worker, monkeypatch):
    # Every 10 s in production; a quarter of a second here (read by the worker at each turn).
    monkeypatch.setattr(worker_stats, "THROUGHPUT_FLUSH_SECONDS", 0.25)
    done = [insert_task(conn, "noop") for _ in range(3)]
    done += [insert_task(conn, "fail", {"times": 1}, queue="bad", max_attempts=3)]
    failed = [insert_task(conn, "fail", {"times": 5}, queue="bad", max_attempts=2)]
    worker = start_worker()
    expected = {("default", "noop"): (3, 0), ("bad", "fail"): (1, 3)}
    wait_until(lambda: worker_throughput(conn) == expected, timeout=30, message=f"throughput {expected}")
    assert all(task_row(conn, i)["status"] == "completed" for i in done)
    assert task_row(conn, failed[0])["status"] == "failed"

    rows = conn.execute("SELECT *, now() AS now FROM task_throughput").fetchall()
    assert {r["worker_id"] for r in rows} == {worker.supervisor.worker_id}
    for r in rows:
        assert r["minute"].second == 0 and r["minute"].microsecond == 0
        assert 0 <= (r["now"] - r["minute"]).total_seconds() < 120
        assert r["run_seconds"] > 0
    # What the dashboard charts: per minute and queue, the same totals.
    recent = task_throughput_recent(conn, minutes=60)
    per_queue = {}
    for r in recent:
        c, f = per_queue.get(r["queue"], (0, 0))
        per_queue[r["queue"]] = (c + r["completed"], f + r["failed"])
    assert per_queue == {"default": (3, 0), "bad": (1, 3)}
    time.sleep(0.6)  # more flushes with nothing new add nothing
    assert worker_throughput(conn) == expected


def test_a_stopping_worker_writes_its_last_throughput(conn, start_worker):
    """BUG (skiplock/worker/supervisor.py _shutdown, skiplock/worker/stats.py): throughput is only
    written by flush_throughput_if_due, every THROUGHPUT_FLUSH_SECONDS (10 s) from the loop; a
    worker that stops (every deploy, every scale-down) drops what it finished since its last
    flush, and one that ran less than 10 s leaves no row at all."""
    ids = [insert_task(conn, "noop") for _ in range(2)]
    worker = start_worker()
    wait_until(lambda: all(task_row(conn, i)["status"] == "completed" for i in ids), message="the tasks")
    assert worker.stop() == 0
    assert worker_throughput(conn) == {("default", "noop"): (2, 0)}


def test_schedules_their_fires_and_an_overdue_one_are_in_the_metrics(make_app, conn):
    from skiplock.schedules import Rule
    from skiplock.sql.schedule_fires import schedules_fire_due
    from skiplock.sql.schedules import schedule_create

    task = {"task_type": "noop", "task_input": None, "max_attempts": 1, "timeout_seconds": 5}
    every = schedule_create(conn, name="every", rule=Rule(every_seconds=1), task=task, missed="skip")
    schedule_create(conn, name="off", rule=Rule(every_seconds=1), task=task, paused=True)
    conn.execute(
        "UPDATE task_schedules SET next_fire_at = now() - interval '30 seconds' WHERE id = %s", (every["id"],)
    )
    families = scrape_client(make_app().test_client())
    assert value(families, "skiplock_schedules", state="active") == 1
    assert value(families, "skiplock_schedules", state="paused") == 1
    assert value(families, "skiplock_schedule_overdue_seconds") >= 30  # no worker fires it
    schedules_fire_due(conn, by="w")
    families = scrape_client(make_app().test_client())  # a fresh process: no cached state
    assert (
        value(families, "skiplock_schedule_overdue_seconds") < 5
    )  # fired: at most the time since its next second
    assert value(families, "skiplock_schedule_fires_last_hour", outcome="created") >= 1
    assert (
        value(families, "skiplock_schedule_fires_last_hour", outcome="missed") >= 29
    )  # each missed time counts


def test_workflows_running_and_finished_are_in_the_metrics(make_app, conn):
    import json

    from skiplock.sql.inserts import NewTask
    from skiplock.sql.workflow_store import workflow_cancel, workflow_insert
    from skiplock.workflows import chain, checked

    def noop(_):
        return NewTask("noop", json.dumps(None), "default", 0, 1, 5)

    running, _ = workflow_insert(conn, checked(chain([None, None])), noop)
    cancelled, _ = workflow_insert(conn, checked(chain([None])), noop)
    workflow_cancel(conn, cancelled)
    families = scrape_client(make_app().test_client())
    assert value(families, "skiplock_workflows_running") == 1
    assert value(families, "skiplock_workflows_finished_last_hour", state="cancelled") == 1
    assert value(families, "skiplock_workflows_finished_last_hour", state="completed") == 0
    assert running != cancelled
