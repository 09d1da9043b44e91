"""Submit: one task per request under wrk, next to a bare Flask endpoint and to bare Flask plus
the one INSERT a submit needs; and a group-commit design kept as a reference."""

from __future__ import annotations

import shutil
import statistics

import psycopg
from harness import FACTS, ROWS, Databases, Row, connect, log, median_and_spread, serve_and_load

GTHREAD = ("--worker-class", "gthread", "--workers", "4", "--threads", "4")


def submit_one_per_request(dbs: Databases, seconds: int, rounds: int) -> None:
    """Rounds of (bare Flask, skiplock, bare Flask + INSERT), each app freshly started: a drift
    of the machine during the run then touches all three alike, and medians are reported."""
    if not shutil.which("wrk"):
        ROWS.append(Row("submit, 1 task/request (16 conns)", "wrk missing", "-", None, ">= 70%", None))
        return
    results: dict[str, list[tuple[float, float, float]]] = {"bare": [], "skiplock": [], "reference": []}
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        results["bare"].append(serve_and_load("bare_app:app", None, seconds))
        url = dbs.fresh("submit")
        results["skiplock"].append(serve_and_load("wsgi:app", url, seconds, record_rss=round_ == 0))
        dbs.drop(url)
        reference_url = dbs.fresh("submit_reference")
        results["reference"].append(serve_and_load("bare_insert_app:app", reference_url, seconds))
        dbs.drop(reference_url)
    rps, spread = median_and_spread([r[0] for r in results["skiplock"]])
    bare_rps, bare_spread = median_and_spread([r[0] for r in results["bare"]])
    reference_rps, _ = median_and_spread([r[0] for r in results["reference"]])
    p50 = statistics.median(r[1] for r in results["skiplock"])
    p99 = statistics.median(r[2] for r in results["skiplock"])
    bare_p99 = statistics.median(r[2] for r in results["bare"])
    FACTS["submit rounds (req/s)"] = f"skiplock {spread}, bare Flask {bare_spread} ({rounds} rounds)"
    ratio = rps / bare_rps
    ROWS.append(
        Row(
            "submit, 1 task/request (16 conns)",
            f"{rps:,.0f} req/s",
            f"{bare_rps:,.0f} req/s (bare Flask)",
            ratio,
            ">= 70%",
            ratio >= 0.7,
        )
    )
    ROWS.append(
        Row(
            "  reference: bare Flask + the same INSERT",
            f"{rps:,.0f} req/s",
            f"{reference_rps:,.0f} req/s",
            rps / reference_rps,
            ">= 90%",
            rps / reference_rps >= 0.9,
        )
    )
    group_commit(dbs, seconds, reference_rps)
    ROWS.append(
        Row(
            "submit p99 latency (16 conns)",
            f"{p99:.1f} ms (p50 {p50:.1f})",
            f"{bare_p99:.1f} ms",
            None,
            "< 20 ms",
            p99 < 20,
        )
    )


def group_commit(dbs: Databases, seconds: int, reference_rps: float) -> None:
    """Reference row: would gthread workers with group commit (bench/group_commit_app.py: one
    INSERT and one commit for whatever requests wait) beat one commit per request (the sync
    reference)? Neither validates. Bare Flask itself is no baseline under gthread here: which
    worker accepts wrk's 16 keep-alive connections decides, and it swung 3k-9k req/s."""
    url = dbs.fresh("group_commit")
    with connect(url) as conn:
        commits_before = commits(conn)
        rps = serve_and_load("group_commit_app:app", url, seconds, *GTHREAD)[0]
        rows = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        per_commit = rows / max(1, commits(conn) - commits_before)
    dbs.drop(url)
    FACTS["group commit reference"] = f"{per_commit:.1f} rows per commit on average"
    ROWS.append(
        Row(
            "  reference: gthread + group commit vs the INSERT",
            f"{rps:,.0f} req/s",
            f"{reference_rps:,.0f} req/s",
            rps / reference_rps,
            "-",
            None,
        )
    )


def commits(conn: psycopg.Connection) -> int:
    """Transactions committed in this database so far (pg_stat_database, flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return conn.execute(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()[0]
