"""PgQueuer's side of the bench's `pgqueuer` measure (bench/pgqueuer_cost.py runs it), with
`.venv-pgqueuer/bin/python -P`: PgQueuer's pins conflict with skiplock's, so it has a venv of its
own and this script imports only pgqueuer (uvloop is its own dependency), asyncpg and the standard
library. -P: bench/'s modules (report, batch, ...) must not shadow a module of theirs.

    pgqueuer_jobs.py install URL                PgQueuer's schema, by its own installer
    pgqueuer_jobs.py enqueue URL N              N jobs, one enqueue call (one transaction) each
    pgqueuer_jobs.py drain URL N PROCESSES [BATCH]
                                                N noop jobs queued in bulk, then drained

enqueue and drain print one JSON object with "per_second". URL: postgresql://... (asyncpg takes no
key=value strings). PgQueuer runs as its own benchmark runs it (tools/benchmark.py in
janbjorge/pgqueuer, strategy "drain"): on uvloop (also what `pgq run` uses), the asyncpg driver on
one connection per PgQueuer, async noop entrypoints, run(mode=drain) with run()'s defaults; but
one PgQueuer per OS process, as `pgq run` deploys it (that benchmark runs 5 in one process).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time

import asyncpg
import uvloop
from pgqueuer import AsyncpgDriver, Job, PgQueuer, Queries
from pgqueuer.types import QueueExecutionMode

ENTRYPOINT = "noop"
PAYLOAD = b'{"n": 1}'  # the input skiplock's side submits
FILL_CHUNK = 10_000  # jobs per enqueue call while queueing the drain's jobs (not timed)
# Jobs per dequeue, and per write of the completion log (one commit each): run()'s default, also
# `pgq run`'s and tools/benchmark.py's. PgQueuer's performance guide advises raising it for jobs
# shorter than a second, without a number; on this 2-core machine 50 drained about 3x faster, 100
# about 4x (fewer commits). The default is the baseline: it is what PgQueuer ships and measures.
BATCH_SIZE = 10


async def install(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        # What `pgq install` runs (its CLI adds only the already-installed check): durability
        # "durable", its default, every table logged as skiplock's are.
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def enqueue(url: str, jobs: int) -> dict:
    """Jobs/s of one enqueue call after another on one connection, as skiplock's loop does. Each
    call is one statement in autocommit, i.e. one transaction: PgQueuer's usual way, and its
    fastest (skiplock's side pays BEGIN and COMMIT, being inside the application's transaction)."""
    conn = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        started = time.perf_counter()
        for _ in range(jobs):
            await queries.enqueue(ENTRYPOINT, PAYLOAD)
        elapsed = time.perf_counter() - started
        queued = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    finally:
        await conn.close()
    assert queued == jobs, f"{queued} of {jobs} jobs queued"
    return {"per_second": jobs / elapsed}


async def _fill(url: str, jobs: int) -> None:
    """The jobs, in bulk, then what skiplock's drain does after its fill: VACUUM ANALYZE and a
    CHECKPOINT, so that neither side's drain pays for its fill."""
    conn = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        for start in range(0, jobs, FILL_CHUNK):
            n = min(FILL_CHUNK, jobs - start)
            await queries.enqueue([ENTRYPOINT] * n, [PAYLOAD] * n, [0] * n)
        await conn.execute("VACUUM ANALYZE pgqueuer, pgqueuer_log")
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            pass  # not allowed for this role: as in the harness, measure anyway
    finally:
        await conn.close()


async def _consume(url: str, batch_size: int) -> float | None:
    """One worker process's PgQueuer until the queue is empty: when it picked its first job
    (epoch seconds, the database's clock), None if it got none."""
    conn = await asyncpg.connect(url)
    pgq = PgQueuer(AsyncpgDriver(conn))
    first: float | None = None

    @pgq.entrypoint(ENTRYPOINT)
    async def noop(job: Job) -> None:
        # `updated` is the dequeue's NOW(): when the job was picked, as skiplock's started_at
        # is its claim's. PgQueuer deletes the row when done, so only the job itself can tell.
        nonlocal first
        picked = job.updated.timestamp()
        if first is None or picked < first:
            first = picked

    try:
        # Otherwise run()'s defaults, as `pgq run` and tools/benchmark.py use them: no
        # max_concurrent_tasks (every picked job runs at once on the loop), heartbeats every 15 s,
        # the log folded into statistics every 30 s.
        await pgq.run(mode=QueueExecutionMode.drain, batch_size=batch_size)
    finally:
        await conn.close()
    return first


def _consume_process(url: str, batch_size: int) -> float | None:
    return uvloop.run(_consume(url, batch_size))


async def _ended(url: str) -> tuple[float, int, int]:
    """(the last completion, epoch seconds; jobs logged successful; jobs left in the queue)."""
    conn = await asyncpg.connect(url)
    try:
        last, done = await conn.fetchrow(
            "SELECT extract(epoch FROM max(created))::float8, count(*) FROM pgqueuer_log"
            " WHERE status = 'successful'"
        )
        left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    finally:
        await conn.close()
    return last, done, left


def drain(url: str, jobs: int, processes: int, batch_size: int = BATCH_SIZE) -> dict:
    """Jobs/s from the first job's pick to the last one's completion, both by the database's
    clock (the log row a completion writes), as skiplock's drain is measured; the processes'
    start-up is outside it on both sides. Also the wall-clock rate from starting the processes
    to all of them ending, for reference."""
    uvloop.run(_fill(url, jobs))
    started = time.perf_counter()
    # spawn: each worker a fresh interpreter, as `pgq run` in its own process would be.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        firsts = pool.starmap(_consume_process, [(url, batch_size)] * processes, chunksize=1)
    wall = time.perf_counter() - started
    last, done, left = uvloop.run(_ended(url))
    assert done == jobs and left == 0, f"{done} of {jobs} jobs done, {left} left in the queue"
    picked = [f for f in firsts if f is not None]
    return {
        "per_second": jobs / (last - min(picked)),
        "wall_per_second": jobs / wall,
        "processes_with_jobs": len(picked),
        "batch_size": batch_size,
    }


def main(argv: list[str]) -> int:
    match argv:
        case ["install", url]:
            uvloop.run(install(url))
        case ["enqueue", url, jobs]:
            print(json.dumps(uvloop.run(enqueue(url, int(jobs)))))
        case ["drain", url, jobs, processes]:
            print(json.dumps(drain(url, int(jobs), int(processes))))
        case ["drain", url, jobs, processes, batch_size]:
            print(json.dumps(drain(url, int(jobs), int(processes), int(batch_size))))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
