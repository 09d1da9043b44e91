"""Scheduling (issue 16): what fair shares, concurrency limits and unique tasks cost, each next
to the plain drain or submit measured in the same rounds, and whether a second owner's tasks
start promptly behind another owner's deep backlog.

- fair_drain: the drain of N noop tasks of 1,000 owners (API keys), each owner's submitted with
  task_insert_many under its key (so they get turns at submit), against the plain drain.
- limited_drain: the drain of N noop tasks over 1,000 concurrency keys, each with a limit of
  max_running 5 (limit_put), against the plain drain.
  The plain drain (drain.py, default settings) is of N noop tasks without owner or key queued by
  the same task_insert_many (fill_plain), in the same rounds.
- unique_submit: wrk submits with a fresh unique_key each, against the same without one.
- starvation: owner A's backlog of noop tasks queued and the workers draining it; owner B submits
  one task at a time over HTTP: B's submit -> start latency, next to what FIFO would give.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Callable

import psycopg
from drain import drain
from harness import (
    FACTS,
    ROWS,
    Databases,
    Row,
    cost_row,
    log,
    percentile,
    post,
    serve_and_load,
    start_gunicorn,
    start_worker,
    stop,
)
from psycopg.rows import dict_row

from skiplock import keys
from skiplock.sql.inserts import NewTask, task_insert_many
from skiplock.sql.limits import limit_put

OWNERS = 1_000
CONCURRENCY_KEYS = 1_000
MAX_RUNNING = 5
# Tasks per task_insert_many statement when one owner has more.
CHUNK = 1_000

NOOP = NewTask("noop", json.dumps(None), "default", 0, 3, 30)


def _dict_conn(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def _spread(total: int, parts: int) -> list[int]:
    """`total` split over `parts` as evenly as whole numbers allow."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def fill_plain(url: str, tasks: int) -> None:
    """`tasks` noop tasks with no owner, key or limit, through task_insert_many as the others (so
    they get their turns at submit, as an API submit does). The baseline: the `drain` row's plain
    INSERT leaves the turns to the workers' admission, which made that drain 25-30% slower here."""
    with _dict_conn(url) as conn:
        for start in range(0, tasks, CHUNK):
            task_insert_many(conn, [NOOP] * min(CHUNK, tasks - start))


def fill_owners(url: str, tasks: int) -> None:
    """`tasks` noop tasks of OWNERS API keys, each owner's in one task_insert_many under its key."""
    with _dict_conn(url) as conn:
        owners = [keys.create_key(conn, name=f"owner-{i}")["id"] for i in range(OWNERS)]
        for owner, count in zip(owners, _spread(tasks, OWNERS), strict=True):
            for start in range(0, count, CHUNK):
                task_insert_many(conn, [NOOP] * min(CHUNK, count - start), owner_key_id=owner)


def fill_limited(url: str, tasks: int) -> None:
    """`tasks` noop tasks (auth off: no owner), task i under concurrency key i mod
    CONCURRENCY_KEYS, each key limited to MAX_RUNNING (set before the tasks arrive)."""
    with _dict_conn(url) as conn:
        for k in range(CONCURRENCY_KEYS):
            limit_put(conn, scope="key", owner=0, name=f"key-{k}", max_running=MAX_RUNNING, by="bench")
        for start in range(0, tasks, CHUNK):
            batch = [
                dataclasses.replace(NOOP, concurrency_key=f"key-{i % CONCURRENCY_KEYS}")
                for i in range(start, min(tasks, start + CHUNK))
            ]
            task_insert_many(conn, batch)


def _order(round_: int, other: str) -> tuple[str, str]:
    """Which goes first in a round: the plain measure in even rounds, the other in odd ones (the
    first drain or server of a run tends to be the slowest; neither side should always pay it)."""
    return ("plain", other) if round_ % 2 == 0 else (other, "plain")


def _drains_with_plain(
    dbs: Databases,
    tasks: int,
    rounds: int,
    what: str,
    fill: Callable[[str, int], None],
    check: Callable[[psycopg.Connection], dict],
) -> tuple[list[float], list[float], list[dict]]:
    """Rounds of (plain drain, drain of tasks queued by `fill`): the plain rates, the others'
    rates and their infos (`check`'s answers)."""
    plain: list[float] = []
    rates: list[float] = []
    infos: list[dict] = []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for which in _order(round_, what):
            if which == "plain":
                plain.append(drain(dbs, tasks, fill=fill_plain)[0])
            else:
                rate, info = drain(dbs, tasks, fill=fill, check=check)
                rates.append(rate)
                infos.append(info)
        log(f"  {plain[-1]:,.0f} tasks/s plain, {rates[-1]:,.0f} tasks/s {what}")
    return plain, rates, infos


def owners_in_first_starts(conn: psycopg.Connection) -> dict:
    """How many owners the first OWNERS tasks to start belonged to (all of them, if the owners
    took turns; 10 if the workers ran the backlog in submit order)."""
    row = conn.execute(
        """SELECT count(DISTINCT owner_key_id) FROM (
               SELECT owner_key_id FROM tasks WHERE started_at IS NOT NULL ORDER BY started_at, id LIMIT %s) f""",
        (OWNERS,),
    ).fetchone()
    return {"owners_first": row[0]}


def most_running_per_key(conn: psycopg.Connection) -> dict:
    """The most tasks of one concurrency key that ran at once (started_at to finished_at:
    running in a process, a part of the slot a limit counts)."""
    row = conn.execute(
        """SELECT max(running) FROM (
               SELECT sum(d) OVER (PARTITION BY concurrency_key ORDER BY at, d) AS running
               FROM (SELECT concurrency_key, started_at AS at, 1 AS d FROM tasks WHERE started_at IS NOT NULL
                     UNION ALL
                     SELECT concurrency_key, finished_at, -1 FROM tasks WHERE started_at IS NOT NULL) e) r"""
    ).fetchone()
    return {"most_running": row[0]}


def fair_drain(dbs: Databases, tasks: int, rounds: int) -> None:
    plain, fair, infos = _drains_with_plain(
        dbs, tasks, rounds, f"over {OWNERS:,} owners", fill_owners, owners_in_first_starts
    )
    owners_first = [info["owners_first"] for info in infos]
    FACTS["fair drain"] = (
        f"the first {OWNERS:,} tasks to start belonged to {min(owners_first):,}-{max(owners_first):,} "
        f"owners ({tasks // OWNERS:,} tasks each, submitted owner after owner)"
    )
    name = f"drain {tasks:,} tasks of {OWNERS:,} owners (fair shares)"
    cost_row(name, fair, plain, "tasks/s", "plain drain, same submit path", 0.9)


def limited_drain(dbs: Databases, tasks: int, rounds: int) -> None:
    plain, limited, infos = _drains_with_plain(
        dbs, tasks, rounds, f"under {CONCURRENCY_KEYS:,} limits", fill_limited, most_running_per_key
    )
    most = max(info["most_running"] for info in infos)
    FACTS["limited drain"] = f"most tasks of one key running at once (started to finished): {most}"
    name = f"drain {tasks:,} tasks over {CONCURRENCY_KEYS:,} concurrency keys (max_running {MAX_RUNNING})"
    cost_row(name, limited, plain, "tasks/s", "plain drain, same submit path", 0.7)
    if most > MAX_RUNNING:  # a faster drain that breaks its limits is no pass
        ROWS[-1].ok = False
        ROWS[-1].skiplock += f", {most} of one key ran at once"


def unique_submit(dbs: Databases, seconds: int, rounds: int) -> None:
    """Rounds of (without, with) a unique_key, each a fresh database and gunicorn, one task per
    request under wrk (as the submit row), the bodies built per request by the same script."""
    name = "submit with a unique_key (16 conns)"
    if not shutil.which("wrk"):
        ROWS.append(Row(name, "wrk missing", "-", None, ">= 90%", None))
        return
    without, with_key = [], []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for mode in _order(round_, "unique"):
            results = with_key if mode == "unique" else without
            url = dbs.fresh("unique_submit")
            results.append(
                serve_and_load("wsgi:app", url, seconds, script="unique.lua", script_args=(mode,))[0]
            )
            if mode == "unique":
                with _dict_conn(url) as conn:
                    # wrk's tasks (input {"n": 1}; start_gunicorn's probe has none) each had its key.
                    row = conn.execute(
                        """SELECT count(*) AS n, count(DISTINCT unique_key) AS keyed FROM tasks
                        WHERE input = '{"n": 1}'::jsonb"""
                    ).fetchone()
                assert row["n"] and row["keyed"] == row["n"], (
                    f"not every task had a unique_key of its own: {row}"
                )
            dbs.drop(url)
        log(f"  {without[-1]:,.0f} req/s without, {with_key[-1]:,.0f} req/s with a unique_key")
    cost_row(name, with_key, without, "req/s", "no unique_key", 0.9)


def starvation(dbs: Databases, backlog: int, count: int, rate: float = 50.0) -> None:
    """Owner A's `backlog` noop tasks queued, a worker.py (default settings) draining them with
    every process busy; owner B submits up to `count` tasks one at a time, `rate` a second, over
    HTTP with its key, for as long as A's backlog surely lasts (at most 60% of its estimated
    remaining drain time). B's latency: from just before its request to the task's start
    (started_at). The FIFO baseline: A's tasks not yet taken at B's first submit, over the rate
    A's tasks were taken while B submitted."""
    url = dbs.fresh("starvation")
    with _dict_conn(url) as conn:
        a, b = keys.create_key(conn, name="A"), keys.create_key(conn, name="B")
        for start in range(0, backlog, CHUNK):
            task_insert_many(conn, [NOOP] * min(CHUNK, backlog - start), owner_key_id=a["id"])
        conn.execute("VACUUM ANALYZE tasks")
    dbs.settle()
    api, base = start_gunicorn("wsgi:app", url, env={"SKIPLOCK_AUTH": "on"})
    worker = start_worker(url)
    headers = {"Authorization": f"Bearer {b['token']}"}
    body = {"task_type": "noop", "task_input": None}
    sent: dict[int, float] = {}
    conn = _dict_conn(url)
    try:
        deadline = time.monotonic() + 60
        while _taken(conn, a["id"]) < min(backlog // 20, 2_000):  # busy: every process runs A's
            assert time.monotonic() < deadline, "the worker never took A's tasks"
            time.sleep(0.05)
        # One second of B's submits not counted (gunicorn workers booting, as in the latency
        # row), which also tells how fast A's backlog goes.
        before, warm_up_from = _taken(conn, a["id"]), time.monotonic()
        for i in range(int(rate)):
            time.sleep(max(0.0, warm_up_from + i / rate - time.monotonic()))
            post(base + "/api/submit-task", body, headers)
        a_taken_first = _taken(conn, a["id"])
        estimate = (a_taken_first - before) / (time.monotonic() - warm_up_from)
        lasts = (backlog - a_taken_first) / max(estimate, 1.0)
        count = min(count, int(0.6 * lasts * rate))
        assert count >= 20, f"A's backlog of {backlog:,} lasts {lasts:.1f} s more: too small to measure B"
        first_at = time.time()
        for i in range(count):
            time.sleep(max(0.0, first_at + i / rate - time.time()))
            t0 = time.time()
            status, answer = post(base + "/api/submit-task", body, headers)
            assert status == 202, (status, answer)
            sent[answer["task_id"]] = t0
        window = time.time() - first_at
        a_taken_last = _taken(conn, a["id"])
        deadline = time.monotonic() + 120
        while conn.execute(
            "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND started_at IS NULL", (list(sent),)
        ).fetchone()["n"]:
            assert time.monotonic() < deadline, "B's tasks did not all start"
            time.sleep(0.1)
        rows = conn.execute(
            "SELECT id, turn, extract(epoch FROM started_at)::float8 AS started, extract(epoch FROM created_at)::float8 AS created"
            " FROM tasks WHERE id = ANY(%s)",
            (list(sent),),
        ).fetchall()
        ahead = _ran_ahead(conn, a["id"], rows)
    finally:
        conn.close()
        stop(worker)
        stop(api)
        dbs.drop(url)
    waits = [(r["started"] - sent[r["id"]]) * 1000 for r in rows]
    a_rate = (a_taken_last - a_taken_first) / window
    a_left = backlog - a_taken_last  # A still had a backlog after B's last submit: busy throughout
    fifo_ms = (backlog - a_taken_first) / a_rate * 1000
    p50, p99 = percentile(waits, 50), percentile(waits, 99)
    to_insert = statistics.median((r["created"] - sent[r["id"]]) * 1000 for r in rows)
    to_start = statistics.median((r["started"] - r["created"]) * 1000 for r in rows)
    FACTS["starvation"] = (
        f"B submitted {count} tasks at {rate:.0f}/s while A's were taken at {a_rate:,.0f}/s, "
        f"{a_left:,} of A's still queued after B's last; B's p50 split: request -> INSERT "
        f"{to_insert:.1f} ms, INSERT -> start {to_start:.1f} ms; B's slowest {max(waits):.1f} ms; "
        f"A's tasks started between a B task's INSERT and its start: median {statistics.median(ahead[0]):,.0f}, "
        f"max {max(ahead[0]):,}, of them claimed before B's task existed (a later turn than B's: "
        f"a claim after its INSERT would have taken it first) median {statistics.median(ahead[1]):,.0f}, "
        f"max {max(ahead[1]):,}"
    )
    ROWS.append(
        Row(
            f"B's submit -> start behind A's {backlog:,} queued, p99",
            f"{p99:.1f} ms (p50 {p50:.1f})" + ("" if a_left > 0 else ", A's backlog ran out"),
            f"{fifo_ms:,.0f} ms (FIFO: {backlog - a_taken_first:,} of A's / {a_rate:,.0f} tasks/s)",
            None,
            "<= 100 ms",
            p99 <= 100 and a_left > 0,
        )
    )


def _taken(conn: psycopg.Connection, owner: int) -> int:
    """How many of the owner's tasks the workers have taken (claimed, running or ended)."""
    return conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE owner_key_id = %s AND status <> 'pending'", (owner,)
    ).fetchone()["n"]


def _ran_ahead(conn: psycopg.Connection, owner: int, b_rows: list[dict]) -> tuple[list[int], list[int]]:
    """Per B task: how many of A's tasks started between its INSERT and its start, and how many
    of those had a later turn than B's: any claim made after B's INSERT would have taken B's
    first, so those were claimed before it (the worker's prefetch)."""
    a_rows = conn.execute(
        "SELECT turn, extract(epoch FROM started_at)::float8 AS started FROM tasks"
        " WHERE owner_key_id = %s AND started_at IS NOT NULL ORDER BY started_at",
        (owner,),
    ).fetchall()
    starts = [r["started"] for r in a_rows]
    between, later = [], []
    for b in b_rows:
        ran = a_rows[bisect.bisect_right(starts, b["created"]) : bisect.bisect_left(starts, b["started"])]
        between.append(len(ran))
        later.append(sum(1 for r in ran if r["turn"] > b["turn"]))
    return between, later
