"""Latency: from a client's submit to the task's start in a worker process, at 100 tasks/s into
idle workers, next to the HTTP round trip itself."""

from __future__ import annotations

import statistics
import time

from harness import (
    FACTS,
    PLOTS,
    ROWS,
    Databases,
    Row,
    connect,
    percentile,
    post,
    start_gunicorn,
    start_worker,
    stop,
)


def latency(dbs: Databases, count: int, rate: float = 100.0) -> None:
    url = dbs.fresh("latency")
    worker = start_worker(url)
    api, base = start_gunicorn("wsgi:app", url)
    sent: dict[int, float] = {}
    round_trips: list[float] = []
    try:
        time.sleep(1)  # let the worker settle on LISTEN
        start = time.monotonic()
        # The first second is a warm-up, not counted (gunicorn workers still booting; see
        # serve_and_load).
        warm_up = int(rate)
        for i in range(warm_up + count):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            t0 = time.time()
            _, answer = post(base + "/api/submit-task", {"task_type": "noop", "task_input": i})
            if i >= warm_up:
                round_trips.append((time.time() - t0) * 1000)
                sent[answer["task_id"]] = t0
        with connect(url) as conn:
            while conn.execute(
                "SELECT count(*) FROM tasks WHERE status IN ('pending', 'processing')"
            ).fetchone()[0]:
                time.sleep(0.1)
            rows = conn.execute(
                "SELECT id, extract(epoch FROM started_at), extract(epoch FROM created_at) "
                "FROM tasks WHERE id = ANY(%s)",
                (list(sent),),
            ).fetchall()
    finally:
        stop(api)
        stop(worker)
    waits = [(float(started) - sent[task_id]) * 1000 for task_id, started, _ in rows]
    # Where the time goes: until the API's INSERT began (HTTP, Flask, validation), then until
    # a task process started it (insert, commit, NOTIFY, wake-up, the claim and its commit,
    # the hand-over to the process).
    to_insert = statistics.median((float(created) - sent[task_id]) * 1000 for task_id, _, created in rows)
    to_claim = statistics.median((float(started) - float(created)) * 1000 for _, started, created in rows)
    FACTS["latency split (p50)"] = f"request -> INSERT {to_insert:.1f} ms, INSERT -> start {to_claim:.1f} ms"
    p50, p90, p99 = (percentile(waits, p) for p in (50, 90, 99))
    PLOTS["latency"] = {"p50": p50, "p90": p90, "p99": p99, "max": max(waits)}
    ROWS.append(
        Row(
            f"latency submit -> start ({rate:.0f}/s), p50",
            f"{p50:.1f} ms",
            f"{statistics.median(round_trips):.1f} ms (HTTP round trip)",
            None,
            "<= 3 ms",
            p50 <= 3,
        )
    )
    ROWS.append(
        Row(
            f"latency submit -> start ({rate:.0f}/s), p99",
            f"{p99:.1f} ms",
            f"{percentile(round_trips, 99):.1f} ms (HTTP round trip)",
            None,
            "<= 10 ms",
            p99 <= 10,
        )
    )


# --- report -----------------------------------------------------------------------------------
