"""Where one Postgres tops out (docs/scaling.md): what a task costs the database and a worker, in
CPU seconds, WAL bytes and commits, and what an idle worker costs the database.

    make scaling    # an embedded Postgres; or BENCH_DATABASE_URL=postgresql://… (on this machine)

Each measure runs on a fresh database of that server, with the server on this machine: the CPU
is read from the server's own processes (the postmaster's children, found from its
checkpointer) and from the worker's process tree, before and after."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Databases, connect, log, start_worker, stop

from skiplock import embedded
from skiplock.enqueue import Enqueuer


@dataclass
class Usage:
    """What the server used between two readings."""

    pg_cpu: float = 0.0  # seconds
    wal_bytes: int = 0
    writes: int = 0  # transactions that wrote (transaction ids consumed)


class Meter:
    """Readings of the server (its processes' CPU, its WAL position, its database's commits)."""

    def __init__(self, url: str):
        self.conn = connect(url)  # held open: its backend's CPU is counted, and it never exits
        pid = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
        ).fetchone()[0]
        self.postmaster = psutil.Process(pid).parent()

    def cpu(self) -> float:
        total = 0.0
        for proc in [self.postmaster, *self.postmaster.children()]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def reading(self) -> tuple[float, int, int]:
        wal, xid = self.conn.execute(
            "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, pg_current_xact_id()::text::bigint"
        ).fetchone()
        return self.cpu(), int(wal), xid

    def commits(self) -> int:
        """The database's commits so far, as its statistics have them (a backend reports its own
        when idle for a second, or when it exits)."""
        return self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]

    @staticmethod
    def used(before: tuple[float, int, int], after: tuple[float, int, int]) -> Usage:
        # Transaction ids are the whole server's (another database's writes count too), and the
        # later reading took one itself.
        return Usage(after[0] - before[0], after[1] - before[1], after[2] - before[2] - 1)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    except psutil.NoSuchProcess:
        pass
    return total


def submit(dbs: Databases, tasks: int, clients: int, per_transaction: int = 1) -> dict:
    """`clients` threads enqueueing `per_transaction` tasks per transaction (skiplock.enqueue: one,
    as an application or the API does per request; or a batch): the server's cost per task."""
    url = dbs.fresh("scaling_submit")
    meter = Meter(url)
    enqueuer = Enqueuer()

    batch = [{"task_type": "noop", "task_input": {"n": 1}}] * per_transaction

    def client(conn: psycopg.Connection, n: int) -> None:
        for _ in range(n // per_transaction):
            with conn.transaction():
                if per_transaction == 1:
                    enqueuer.submit(conn, "noop", {"n": 1})
                else:
                    enqueuer.submit_many(conn, batch)

    # Connected before the first reading and closed after the last: their backends' CPU counts.
    conns = [psycopg.connect(url) for _ in range(clients)]
    before = meter.reading()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:  # .result(): a client's error ends the measure
        for done_ in [pool.submit(client, c, tasks // clients) for c in conns]:
            done_.result()
    seconds = time.perf_counter() - started
    used = Meter.used(before, meter.reading())
    for c in conns:
        c.close()
    meter.conn.close()
    dbs.drop(url)
    done = tasks // clients * clients
    return {"rate": done / seconds, "pg_cpu_per_task": used.pg_cpu / done, "wal_per_task": used.wal_bytes / done,
            "writes_per_task": used.writes / done}  # fmt: skip


def drain(dbs: Databases, tasks: int) -> dict:
    """One worker.py (default settings) draining `tasks` noop tasks: the server's cost and the
    worker's per task, and the rate."""
    url = dbs.fresh("scaling_drain")
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO tasks (task_type, input, turn) SELECT 'noop', 'null', g FROM generate_series(1, %s) g",
            (tasks,),
        )
        conn.execute("VACUUM ANALYZE tasks")
    dbs.settle()
    meter = Meter(url)
    before = meter.reading()
    worker = start_worker(url)
    try:
        while meter.conn.execute(
            "SELECT EXISTS (SELECT FROM tasks WHERE status IN ('pending', 'processing'))"
        ).fetchone()[0]:
            time.sleep(0.2)
        used = Meter.used(before, meter.reading())
        worker_cpu = tree_cpu(worker.pid)
        connections = meter.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'skiplock-%%'"
        ).fetchone()[0]
    finally:
        stop(worker)
    first, last = meter.conn.execute(
        "SELECT min(started_at), max(finished_at) FROM tasks WHERE status = 'completed'"
    ).fetchone()
    meter.conn.close()
    dbs.drop(url)
    return {"rate": tasks / (last - first).total_seconds(), "pg_cpu_per_task": used.pg_cpu / tasks,
            "wal_per_task": used.wal_bytes / tasks, "writes_per_task": used.writes / tasks,
            "worker_cpu_per_task": worker_cpu / tasks, "connections_per_worker": connections}  # fmt: skip


def idle(dbs: Databases, workers: int, seconds: float) -> dict:
    """`workers` idle worker.py (1 process each) for `seconds` once started: what each costs the
    server per second while there is nothing to do."""
    url = dbs.fresh("scaling_idle")
    meter = Meter(url)
    procs = [start_worker(url, "--concurrency", "1") for _ in range(workers)]
    try:
        time.sleep(5)  # started, registered, waiting
        time.sleep(1.5)  # their statistics reported (an idle backend reports after a second)
        commits = meter.commits()
        before = meter.reading()
        time.sleep(seconds)
        used = Meter.used(before, meter.reading())
        time.sleep(1.5)
        commits = meter.commits() - commits
        connections = meter.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'skiplock-%%'"
        ).fetchone()[0]
    finally:
        for proc in procs:
            stop(proc)
    meter.conn.close()
    dbs.drop(url)
    per = workers * seconds
    return {"pg_cpu_per_worker_second": used.pg_cpu / per, "writes_per_worker_second": used.writes / per,
            "commits_per_worker_second": commits / per, "connections_per_worker": connections / workers}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run: CI); no verdict")
    args = parser.parse_args()
    if args.quick:
        args.tasks = 5_000
    idle_workers, idle_seconds = (2, 3.0) if args.quick else (4, 20.0)
    url = os.environ.get("BENCH_DATABASE_URL")  # a server on this machine (its processes' CPU is read)
    if not url:
        url = embedded.start(
            Path(tempfile.mkdtemp(prefix="skiplock-scaling-pg-")) / "pgdata", keep_data=False, database=None
        )
    dbs = Databases(url)
    try:
        log("submit: 2 clients, one task per transaction")
        s = submit(dbs, args.tasks // 5, 2)
        log(f"  {s}")
        log("submit: 2 clients, 100 tasks per transaction")
        b = submit(dbs, args.tasks, 2, 100)
        log(f"  {b}")
        log(f"drain: one worker.py, {args.tasks:,} noop tasks")
        d = drain(dbs, args.tasks)
        log(f"  {d}")
        log(f"idle: {idle_workers} worker.py with nothing to do, {idle_seconds:.0f} s")
        i = idle(dbs, idle_workers, idle_seconds)
        log(f"  {i}")
    finally:
        dbs.drop_all()
    pg_task = s["pg_cpu_per_task"] + d["pg_cpu_per_task"]
    print(f"\nserver CPU per task, submitted and drained: {pg_task * 1e6:.0f} us "
          f"({1 / pg_task:,.0f} tasks/s per server core; submit {s['pg_cpu_per_task'] * 1e6:.0f} us at "
          f"{s['rate']:,.0f}/s, drain {d['pg_cpu_per_task'] * 1e6:.0f} us); "
          f"WAL {s['wal_per_task'] + d['wal_per_task']:,.0f} B/task (submit {s['wal_per_task']:,.0f}); "
          f"writing transactions {s['writes_per_task'] + d['writes_per_task']:.2f}/task")  # fmt: skip
    print(f"submitted 100 per transaction: server CPU {b['pg_cpu_per_task'] * 1e6:.0f} us/task "
          f"({b['rate']:,.0f} tasks/s), WAL {b['wal_per_task']:,.0f} B/task; with the drain "
          f"{(b['pg_cpu_per_task'] + d['pg_cpu_per_task']) * 1e6:.0f} us "
          f"({1 / (b['pg_cpu_per_task'] + d['pg_cpu_per_task']):,.0f} tasks/s per server core)")  # fmt: skip
    print(f"worker CPU per noop task: {d['worker_cpu_per_task'] * 1e6:.0f} us "
          f"({1 / d['worker_cpu_per_task']:,.0f} tasks/s per worker core); drain {d['rate']:,.0f} tasks/s; "
          f"{d['connections_per_worker']} connections per worker.py")  # fmt: skip
    print(f"idle worker.py: {i['pg_cpu_per_worker_second'] * 1e3:.2f} ms server CPU/s, "
          f"{i['commits_per_worker_second']:.2f} transactions/s ({i['writes_per_worker_second']:.2f} writing), "
          f"{i['connections_per_worker']:.0f} connections")  # fmt: skip


if __name__ == "__main__":
    main()
