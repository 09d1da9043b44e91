"""Keys and limits on the hot path: submits with an API key whose limits are set (high enough
never to refuse, so every check runs and none refuses), next to the same with auth off; the same
for batch submits; and one key flooding at about 1,000 requests/s while another submits at
50/s: the other's latency, next to the same without the flood."""

from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import time
import urllib.parse

import psycopg
from batch import batch_rate
from harness import (
    BENCH,
    ROWS,
    Databases,
    Row,
    cost_row,
    log,
    percentile,
    serve_and_load,
    start_gunicorn,
    stop,
    wrk,
)

from skiplock import keys

AUTH_ON = {"SKIPLOCK_AUTH": "on"}
# Limits set, but never reached in these measures.
GENEROUS = {"rate_per_second": 1_000_000.0, "burst": 1_000_000, "max_unfinished": 100_000_000}


def new_key(url: str, **limits) -> str:
    with psycopg.connect(url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        return keys.create_key(conn, name="bench", **limits)["token"]


def submit_cost(dbs: Databases, seconds: int, rounds: int) -> None:
    off, on = [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        url = dbs.fresh("auth_off")
        off.append(serve_and_load("wsgi:app", url, seconds)[0])
        dbs.drop(url)
        url = dbs.fresh("auth_on")
        on.append(serve_and_load("wsgi:app", url, seconds, env=AUTH_ON, token=new_key(url, **GENEROUS))[0])
        dbs.drop(url)
    cost_row("submit with a key and its limits (16 conns)", on, off, "req/s", "auth off", 0.9)


def quota_cost(dbs: Databases, seconds: int, rounds: int) -> None:
    """Submits of a key with max_unfinished (an exact quota: the key's lock, the bound kept per
    process) next to those of a key without any limit, both with auth on, in alternate order.
    The cap is far: every submit decides from the bound, as all do until a key nears its cap."""
    capped, uncapped = [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for with_cap in (round_ % 2 == 1, round_ % 2 == 0):
            url = dbs.fresh("quota")
            token = new_key(url, max_unfinished=100_000_000) if with_cap else new_key(url)
            (capped if with_cap else uncapped).append(
                serve_and_load("wsgi:app", url, seconds, env=AUTH_ON, token=token)[0]
            )
            dbs.drop(url)
    cost_row(
        "submit of a key with max_unfinished (16 conns)", capped, uncapped, "req/s", "key without limits", 0.9
    )


def batch_cost(dbs: Databases, seconds: float) -> None:
    url = dbs.fresh("batch_off")
    off = batch_rate(url, seconds)
    dbs.drop(url)
    url = dbs.fresh("batch_on")
    on = batch_rate(url, seconds, env=AUTH_ON, token=new_key(url, **GENEROUS))
    dbs.drop(url)
    ratio = on / off
    ROWS.append(
        Row(
            "batch submit with a key and its limits",
            f"{on:,.0f} tasks/s",
            f"{off:,.0f} tasks/s (auth off)",
            ratio,
            ">= 90%",
            ratio >= 0.9,
        )
    )


def paced_latencies(base: str, token: str, rate: float, seconds: float) -> list[float]:
    """Milliseconds of each submit of one client sending `rate` requests/s."""
    parts = urllib.parse.urlsplit(base)
    body = json.dumps({"task_type": "noop", "task_input": None})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    latencies, start = [], time.monotonic()
    for i in range(int(rate * seconds)):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        began = time.perf_counter()
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("POST", "/api/submit-task", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 202, response.status
        finally:
            conn.close()
        latencies.append((time.perf_counter() - began) * 1000)
    return latencies


def flood_isolation(dbs: Databases, seconds: float) -> None:
    url = dbs.fresh("flood")
    flooder = new_key(url, rate_per_second=10.0, burst=10)
    victim = new_key(url, **GENEROUS)
    server, base = start_gunicorn("wsgi:app", url, env=AUTH_ON)
    try:
        wrk(base + "/api/submit-task", 2, token=victim)  # warm-up (workers booting)
        alone = paced_latencies(base, victim, 50, seconds)
        flood = subprocess.Popen(
            ["wrk", "-t2", "-c10", f"-d{seconds + 2:.0f}s", "-H", f"Authorization: Bearer {flooder}",
             "-s", str(BENCH / "flood.lua"), base + "/api/submit-task"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(1)
        during = paced_latencies(base, victim, 50, seconds)
        out, _ = flood.communicate(timeout=seconds + 30)
    finally:
        stop(server)
        dbs.drop(url)
    flood_rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p95_alone, p95_during = percentile(alone, 95), percentile(during, 95)
    ratio = p95_during / p95_alone
    ROWS.append(
        Row(
            f"p95 of a key at 50/s while another floods at {flood_rps:,.0f}/s",
            f"{p95_during:.1f} ms (p50 {statistics.median(during):.1f})",
            f"{p95_alone:.1f} ms alone (p50 {statistics.median(alone):.1f})",
            ratio,
            "<= 120%",
            ratio <= 1.2,
        )
    )
    log(f"  flood: {flood_rps:,.0f} req/s, {refused.group(1) if refused else 0} refused (429)")
