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
    KeptConnection,
    Row,
    connect,
    percentile,
    post,
    start_gunicorn,
    start_worker,
    stop,
)


def latency(dbs: Databases, count: int, rate: float = 100.0) -> None:
    """`count` submits on one kept-alive connection (as a client with a session sends them) and
    `count` on a fresh connection each, interleaved at `rate` per second in all: both kinds
    meet the same machine. The rows are the kept connection's; the facts give the fresh one's."""
    url = dbs.fresh("latency")
    worker = start_worker(url)
    api, base = start_gunicorn("wsgi:app", url)
    kept = KeptConnection(base)
    sent: dict[str, dict[int, float]] = {"kept": {}, "fresh": {}}
    round_trips: dict[str, list[float]] = {"kept": [], "fresh": []}
    try:
        time.sleep(1)  # let the worker settle on LISTEN
        start = time.monotonic()
        # The first second is a warm-up, not counted (gunicorn workers still booting; see
        # serve_and_load).
        warm_up = int(rate)
        for i in range(warm_up + 2 * count):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            kind = "kept" if i % 2 else "fresh"
            body = {"task_type": "noop", "task_input": i}
            t0 = time.time()
            if kind == "kept":
                _, answer = kept.post("/api/submit-task", body)
            else:
                _, answer = post(base + "/api/submit-task", body)
            if i >= warm_up:
                round_trips[kind].append((time.time() - t0) * 1000)
                sent[kind][answer["task_id"]] = t0
        with connect(url) as conn:
            while conn.execute(
                "SELECT count(*) FROM tasks WHERE status IN ('pending', 'processing')"
            ).fetchone()[0]:
                time.sleep(0.1)
            rows = {
                kind: conn.execute(
                    "SELECT id, extract(epoch FROM started_at), extract(epoch FROM created_at) "
                    "FROM tasks WHERE id = ANY(%s)",
                    (list(ids),),
                ).fetchall()
                for kind, ids in sent.items()
            }
    finally:
        kept.close()
        stop(api)
        stop(worker)
    waits = {
        kind: [(float(started) - sent[kind][task_id]) * 1000 for task_id, started, _ in rows[kind]]
        for kind in rows
    }
    # Where the time goes: until the API's INSERT began (HTTP, Flask, validation), then until
    # a task process started it (insert, commit, NOTIFY, wake-up, the claim and its commit,
    # the hand-over to the process).
    kept_rows = rows["kept"]
    to_insert = statistics.median((float(c) - sent["kept"][task_id]) * 1000 for task_id, _, c in kept_rows)
    to_claim = statistics.median((float(s) - float(c)) * 1000 for _, s, c in kept_rows)
    FACTS["latency split (p50)"] = f"request -> INSERT {to_insert:.1f} ms, INSERT -> start {to_claim:.1f} ms"
    fresh = waits["fresh"]
    FACTS["latency on a fresh connection per request"] = (
        f"p50 {percentile(fresh, 50):.1f} ms, p99 {percentile(fresh, 99):.1f} ms "
        f"(HTTP round trip p50 {statistics.median(round_trips['fresh']):.1f} ms)"
    )
    p50, p90, p99 = (percentile(waits["kept"], p) for p in (50, 90, 99))
    PLOTS["latency"] = {"p50": p50, "p90": p90, "p99": p99, "max": max(waits["kept"])}
    trips = round_trips["kept"]
    ROWS.append(
        Row(
            f"latency submit -> start ({rate:.0f}/s, kept connection), p50",
            f"{p50:.1f} ms",
            f"{statistics.median(trips):.1f} ms (HTTP round trip)",
            None,
            "<= 3 ms",
            p50 <= 3,
        )
    )
    ROWS.append(
        Row(
            f"latency submit -> start ({rate:.0f}/s, kept connection), p99",
            f"{p99:.1f} ms",
            f"{percentile(trips, 99):.1f} ms (HTTP round trip)",
            None,
            "<= 8 ms",
            p99 <= 8,
        )
    )


# --- report -----------------------------------------------------------------------------------
