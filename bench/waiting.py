"""Waiting clients: 1,000 long-polls held open on one API host (gunicorn.conf.py's defaults),
the memory of all its processes while they wait, submits meanwhile next to submits of the
former default (sync workers, nobody waiting), and how soon a waiter hears of its task's final
write (the worker's own statement, committed here one task at a time)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import urllib.parse

import psutil
from harness import ROWS, Databases, Row, connect, percentile, serve_and_load, start_gunicorn, stop, wrk
from psycopg.rows import dict_row

from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import AttemptRef, task_complete_many

WAITERS = 1000
SYNC = ("--worker-class", "sync")  # the default before long-polls


async def _long_poll(host: str, port: int, task_id: int, seconds: int, answers: dict) -> None:
    """One waiting client, on asyncio: a thousand of them cost the bench next to nothing."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET /api/task-status/{task_id}?wait={seconds} HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await reader.readline()
        arrived = time.time()
        raw = await reader.read()
        body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        answers[task_id] = (arrived, int(status_line.split()[1]), body.get("status"))
    finally:
        writer.close()


def hold_waiters(base: str, task_ids: list[int], seconds: int) -> tuple[threading.Thread, dict]:
    """Long-polls on every task, from a thread; its dict fills in as the answers arrive."""
    parts = urllib.parse.urlsplit(base)
    answers: dict[int, tuple[float, int, str]] = {}

    async def all_of_them():
        # Connections opened a hundred at a time: a burst of 1,000 SYNs overflows the listen
        # backlog (gunicorn's 2048 is capped by net.core.somaxconn) and costs retransmits.
        tasks = []
        for i in range(0, len(task_ids), 100):
            tasks += [
                asyncio.create_task(_long_poll(parts.hostname, parts.port, t, seconds, answers))
                for t in task_ids[i : i + 100]
            ]
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=asyncio.run, args=(all_of_them(),), daemon=True)
    thread.start()
    return thread, answers


def family_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its children, together."""
    parent = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20


def long_polls(dbs: Databases, seconds: int, *options: str) -> None:
    """`options`: gunicorn settings other than gunicorn.conf.py's (to compare worker classes)."""
    if not shutil.which("wrk"):
        ROWS.append(
            Row(f"submit while {WAITERS:,} long-polls wait", "wrk missing", "-", None, ">= 90%", None)
        )
        return
    url = dbs.fresh("submit_sync")
    sync_rps = serve_and_load("wsgi:app", url, seconds, *SYNC)[0]
    dbs.drop(url)
    url = dbs.fresh("waiting")
    with connect(url) as conn:
        task_ids = [
            r[0]
            for r in conn.execute(
                # Runnable at once (a turn each, first in the rotation): the claim below takes
                # these, before anything the load submits meanwhile.
                "INSERT INTO tasks (task_type, input, turn) SELECT 'noop', 'null', g FROM generate_series(1, %s) g "
                "RETURNING id",
                (WAITERS,),
            )
        ]
    server, base = start_gunicorn("wsgi:app", url, *options)
    try:
        wrk(base + "/api/submit-task", 2)  # warm-up (workers booting)
        thread, answers = hold_waiters(base, task_ids, 60)
        with connect(url) as conn:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and watched(conn) < WAITERS:
                time.sleep(0.2)
            assert watched(conn) == WAITERS, f"only {watched(conn)} of {WAITERS} long-polls registered"
            rss = family_rss_mib(server.pid)
            waiting_rps = wrk(base + "/api/submit-task", seconds)[0]
            still_waiting = WAITERS - len(answers)
            lags = complete_one_by_one(conn, task_ids, rate=200)
        thread.join(30)
    finally:
        stop(server)
        dbs.drop(url)
    final = [t for t, (_, code, status) in answers.items() if code == 200 and status == "completed"]
    assert len(final) == WAITERS, f"{WAITERS - len(final)} waiters did not hear of their task's completion"
    latencies = [(answers[t][0] - lags[t]) * 1000 for t in task_ids]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    ROWS.append(
        Row(
            f"memory of the API host, {WAITERS:,} long-polls waiting",
            f"{rss:,.0f} MiB (all processes)",
            "-",
            None,
            "<= 300 MiB",
            rss <= 300,
        )
    )
    ratio = waiting_rps / sync_rps
    ROWS.append(
        Row(
            f"submit while {WAITERS:,} long-polls wait (16 conns)",
            f"{waiting_rps:,.0f} req/s ({still_waiting:,} still waiting)",
            f"{sync_rps:,.0f} req/s (sync workers, none waiting)",
            ratio,
            ">= 90%",
            ratio >= 0.9,
        )
    )
    ROWS.append(
        Row(
            "final write -> long-poll answer (200/s), p50",
            f"{p50:.1f} ms",
            "-",
            None,
            "<= 5 ms",
            p50 <= 5,
        )
    )
    ROWS.append(
        Row(
            "final write -> long-poll answer (200/s), p99",
            f"{p99:.1f} ms (max {max(latencies):.1f})",
            "-",
            None,
            "<= 20 ms",
            p99 <= 20,
        )
    )


def watched(conn) -> int:
    return conn.execute("SELECT count(DISTINCT task_id) FROM task_watchers").fetchone()[0]


def complete_one_by_one(conn, task_ids: list[int], rate: float) -> dict[int, float]:
    """Claim the waited-on tasks as a worker would, then complete them one per statement at
    `rate`/s with the worker's own final write; returns when each was committed."""
    conn.row_factory = dict_row
    claimed = task_claim(conn, worker_id="bench", limit=len(task_ids), lease_seconds=600)
    assert sorted(t.id for t in claimed) == sorted(task_ids), "the claim took other tasks"
    time.sleep(1)  # the waiters woken by the claim (now processing) wait again
    committed, start = {}, time.monotonic()
    for i, task in enumerate(claimed):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        ref = AttemptRef(task.id, task.attempt)
        task_complete_many(conn, worker_id="bench", results=[(ref, "null")])
        committed[task.id] = time.time()
    return committed
