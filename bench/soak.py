"""`make soak`: tasks at a steady rate for an hour, with retention on, while two worker.py run
them and prune what finished longer ago than the retention: the tables' size and dead row
versions must level off once the retention has passed, not grow with the hours.

    python bench/soak.py [--minutes 60] [--rate 200] [--retention 600] [--report docs/soak-latest.md]

Starts its own Postgres (embedded; or uses SOAK_DATABASE_URL's server, creating and dropping its
own database there). Tasks are submitted through the engine's submit statement (task_insert_many,
a batch every 0.1 s), not HTTP: what is measured is the table. Every minute it samples the size
of tasks and task_attempts (with their indexes and TOAST), their live and dead row versions and
their last autovacuum; it prints the samples and writes them, with the verdict, to --report.
The verdict: at the end, the size is within SIZE_GROWTH_LIMIT of its size at the first sample
once the retention has turned over twice (and the workers have pruned twice since), and every
task submitted more than a minute before the end is done. A shorter run gives no verdict.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import psycopg
from harness import DOCS, Databases, log, server, start_worker, stop

from skiplock import embedded
from skiplock.db import connect
from skiplock.settings import Settings
from skiplock.sql.inserts import NewTask, task_insert_many

SAMPLE_SECONDS = 60.0
PRUNE_INTERVAL_SECONDS = Settings().prune_interval_seconds  # the workers' default, which they run with
SIZE_GROWTH_LIMIT = 1.25  # the end's size over the size once the retention has turned over twice
BATCHES_PER_SECOND = 10

SIZE_SQL = """
SELECT now() AS at,
       pg_total_relation_size('tasks') AS tasks_bytes,
       pg_total_relation_size('task_attempts') AS attempts_bytes,
       (SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'tasks') AS tasks_live,
       (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'tasks') AS tasks_dead,
       (SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'task_attempts') AS attempts_live,
       (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'task_attempts') AS attempts_dead,
       (SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks') AS tasks_autovacuums,
       (SELECT count(*) FROM tasks WHERE finished_at IS NULL) AS unfinished
"""


class Submitter:
    """`rate` noop tasks a second, in BATCHES_PER_SECOND batches, until stopped."""

    def __init__(self, url: str, rate: int):
        self.url, self.rate = url, rate
        self.submitted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        per_batch = max(1, self.rate // BATCHES_PER_SECOND)
        batch = [NewTask("noop", "null", "default", 0, 3, 300)] * per_batch
        with connect(self.url, role="soak") as conn:
            next_at = time.monotonic()
            while not self._stop.is_set():
                task_insert_many(conn, batch)
                self.submitted += per_batch
                next_at += 1 / BATCHES_PER_SECOND
                time.sleep(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Submitter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def render(samples: list[dict], started, args, verdict: str) -> str:
    lines = [
        "# Soak: a steady rate with retention on",
        "",
        f"`make soak` ({args.minutes} min, {args.rate} tasks/s, retention {args.retention:.0f} s, two "
        f"worker.py with the default prune interval), run of {time.strftime('%Y-%m-%d')}.",
        "",
        "| minutes in | tasks MiB | task_attempts MiB | tasks live / dead | attempts live / dead | tasks autovacuums | unfinished |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        minute = (s["at"] - started).total_seconds() / 60
        lines.append(
            f"| {minute:.1f} | {mib(s['tasks_bytes'])} | {mib(s['attempts_bytes'])} | "
            f"{s['tasks_live']:,} / {s['tasks_dead']:,} | {s['attempts_live']:,} / {s['attempts_dead']:,} | "
            f"{s['tasks_autovacuums']} | {s['unfinished']:,} |"
        )
    return "\n".join([*lines, "", verdict, ""])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=200, help="tasks submitted per second")
    parser.add_argument("--retention", type=float, default=600.0, help="SKIPLOCK_RETENTION_SECONDS")
    parser.add_argument("--report", default=str(DOCS / "soak-latest.md"))
    parser.add_argument("--sample-seconds", type=float, default=SAMPLE_SECONDS, help="(a smoke run: less)")
    args = parser.parse_args()
    admin_url, data_root = server("SOAK_DATABASE_URL", "soak")
    dbs = Databases(admin_url)
    env = {"SKIPLOCK_RETENTION_SECONDS": str(args.retention)}
    workers = []
    try:
        url = dbs.fresh("soak")
        workers = [start_worker(url, env=env) for _ in range(2)]
        samples: list[dict] = []
        with psycopg.connect(url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
            started = conn.execute("SELECT now() AS now").fetchone()["now"]
            log(f"soak: {args.rate} tasks/s for {args.minutes} min, retention {args.retention:.0f} s")
            with Submitter(url, args.rate) as submitter:
                begun = time.monotonic()
                end = begun + args.minutes * 60
                next_sample = time.monotonic() + args.sample_seconds
                while time.monotonic() < end:
                    time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
                    if time.monotonic() >= next_sample:
                        samples.append(conn.execute(SIZE_SQL).fetchone())
                        s = samples[-1]
                        log(
                            f"  {(time.monotonic() - begun) / 60:.1f} min: tasks {mib(s['tasks_bytes'])} MiB "
                            f"({s['tasks_live']:,} live, {s['tasks_dead']:,} dead), attempts "
                            f"{mib(s['attempts_bytes'])} MiB, {s['unfinished']:,} unfinished, "
                            f"{submitter.submitted:,} submitted"
                        )
                        next_sample += args.sample_seconds
            behind = conn.execute(
                "SELECT count(*) AS n FROM tasks WHERE finished_at IS NULL AND created_at < now() - interval '1 minute'"
            ).fetchone()["n"]
        # Level once the retention has turned over twice, and the workers have pruned twice since.
        settled = 2 * args.retention + 2 * PRUNE_INTERVAL_SECONDS
        turned = [s for s in samples if (s["at"] - started).total_seconds() >= settled]
        if len(turned) < 2:
            verdict = (
                f"**No verdict**: the soak was too short to level off ({settled:.0f} s and two samples)."
            )
            ok = True
        else:
            first, last = turned[0], samples[-1]
            size = lambda s: s["tasks_bytes"] + s["attempts_bytes"]  # noqa: E731
            growth = size(last) / size(first)
            ok = growth <= SIZE_GROWTH_LIMIT and behind == 0
            verdict = (
                f"**{'PASS' if ok else 'FAIL'}**: tasks and task_attempts took {mib(size(first))} MiB at minute "
                f"{(first['at'] - started).total_seconds() / 60:.0f} and {mib(size(last))} MiB at the end "
                f"({growth:.2f}x; limit {SIZE_GROWTH_LIMIT}x); {behind} task(s) submitted over a minute "
                "before the end still unfinished."
            )
        report = render(samples, started, args, verdict)
        print(report)
        Path(args.report).write_text(report)
        log(f"written to {args.report}")
        return 0 if ok else 1
    finally:
        for worker in workers:
            stop(worker)
        dbs.drop_all()
        if data_root is not None:
            embedded.stop(data_root / "pgdata")
            shutil.rmtree(data_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
