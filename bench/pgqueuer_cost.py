"""PgQueuer as a baseline measured in the same run (issue 19): skiplock's enqueue from the
application's own transaction against PgQueuer's enqueue, one task per transaction on one
connection each (target: at least as fast), and skiplock's drain of noop tasks with 2 task
processes against PgQueuer's with 2 worker processes (target: 3x).

PgQueuer's pins conflict with skiplock's, so it runs in a venv of its own, .venv-pgqueuer (`make
bench` builds it from bench/requirements-pgqueuer.txt), driven by bench/pgqueuer_jobs.py, each
round on a fresh database of its own with PgQueuer's schema installed by PgQueuer. Without that
venv both rows are skipped, and the log says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse

import psycopg
from drain import drain
from harness import BENCH, FACTS, ROOT, ROWS, Databases, Row, cost_row, log, median_and_spread
from psycopg.conninfo import conninfo_to_dict
from scheduling import _order

from skiplock.enqueue import Enqueuer

PYTHON = ROOT / ".venv-pgqueuer" / "bin" / "python"
JOBS = BENCH / "pgqueuer_jobs.py"
PROCESSES = 2
ENQUEUE_TARGET = 1.0
DRAIN_TARGET = 3.0
# PgQueuer's batch_size for short jobs (its default is 10): where its drain stopped growing here.
TUNED_BATCH_SIZE = 100
# A full drain's 100,000 jobs take well under a minute on two cores; a hang must still end.
TIMEOUT_SECONDS = 1800


def _version() -> tuple[str | None, str]:
    """(PgQueuer's version in its venv, or None; why not)."""
    if not PYTHON.exists():
        return None, f"{PYTHON.relative_to(ROOT)} missing (`make bench` builds it)"
    probe = subprocess.run(
        [PYTHON, "-P", "-c", "import asyncpg, uvloop, pgqueuer; print(pgqueuer.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        lines = probe.stderr.strip().splitlines() or ["no error message"]
        return None, f"{PYTHON.relative_to(ROOT)} cannot import PgQueuer: {lines[-1]}"
    return probe.stdout.strip(), ""


def _skip(name: str, why: str, target: float) -> None:
    log(f"  skipped: {why}")
    ROWS.append(Row(name, "PgQueuer unavailable", "-", None, f">= {target:.0%}", None))


def _url(conninfo: str) -> str:
    """The harness's key=value conninfo as the postgresql:// URL asyncpg wants (the password,
    if any, goes by PGPASSWORD instead: see _pgqueuer)."""
    params = conninfo_to_dict(conninfo)
    user = urllib.parse.quote(str(params.get("user", "")), safe="")
    query = urllib.parse.urlencode({k: params[k] for k in ("host", "port", "sslmode") if params.get(k)})
    return f"postgresql://{user + '@' if user else ''}/{urllib.parse.quote(str(params['dbname']))}?{query}"


def _pgqueuer(conninfo: str, *args: str) -> dict:
    """Run `pgqueuer_jobs.py COMMAND URL ARGS` in PgQueuer's venv: its JSON answer, if any."""
    command, *rest = args
    password = conninfo_to_dict(conninfo).get("password")
    env = {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}
    out = subprocess.run(
        [PYTHON, "-P", JOBS, command, _url(conninfo), *rest],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=TIMEOUT_SECONDS,
    ).stdout
    return json.loads(out) if out.strip() else {}


def _pgqueuer_database(dbs: Databases) -> str:
    """A fresh database with PgQueuer's schema (skiplock's comes with every fresh one, unused)."""
    conninfo = dbs.fresh("pgqueuer")
    _pgqueuer(conninfo, "install")
    return conninfo


def _skiplock_enqueue(conninfo: str, tasks: int, enqueuer: Enqueuer) -> float:
    """Tasks/s of Enqueuer.submit, one task per transaction on one connection, in autocommit as
    PgQueuer's side is: each call one statement, its own transaction (enqueue_cost measures it
    inside the application's transaction, BEGIN and COMMIT around it)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        started = time.perf_counter()
        for _ in range(tasks):
            enqueuer.submit(conn, "noop", {"n": 1})
        return tasks / (time.perf_counter() - started)


def enqueue_against_pgqueuer(dbs: Databases, tasks: int, rounds: int) -> None:
    """Rounds of (skiplock's enqueue, PgQueuer's), the order alternating, each on a fresh
    database; PgQueuer's rate is timed inside its script (its interpreter's start is not in it)."""
    version, why = _version()
    name = f"enqueue {tasks:,} (1 task/tx) vs PgQueuer {version or ''}".rstrip()
    if version is None:
        _skip(name, why, ENQUEUE_TARGET)
        return
    enqueuer = Enqueuer()
    ours: list[float] = []
    theirs: list[float] = []
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for side in _order(round_, "pgqueuer"):  # "plain": skiplock's
            if side == "plain":
                conninfo = dbs.fresh("enqueue")
                ours.append(_skiplock_enqueue(conninfo, tasks, enqueuer))
            else:
                conninfo = _pgqueuer_database(dbs)
                theirs.append(_pgqueuer(conninfo, "enqueue", str(tasks))["per_second"])
            dbs.drop(conninfo)
        log(f"  {ours[-1]:,.0f} tasks/s skiplock, {theirs[-1]:,.0f} jobs/s PgQueuer")
    cost_row(name, ours, theirs, "tasks/s", "PgQueuer enqueue; both autocommit", ENQUEUE_TARGET)


def drain_against_pgqueuer(dbs: Databases, tasks: int, rounds: int) -> None:
    """Rounds of (skiplock's drain with PROCESSES task processes, PgQueuer's with PROCESSES worker
    processes), the order alternating, each on a fresh database; both from the first task's
    start to the last one's end by the database's clock."""
    version, why = _version()
    name = f"drain {tasks:,} noop tasks, {PROCESSES} processes, vs PgQueuer {version or ''}".rstrip()
    if version is None:
        _skip(name, why, DRAIN_TARGET)
        return
    ours: list[float] = []
    theirs: list[float] = []
    walls: list[float] = []
    batch_size = None
    for round_ in range(rounds):
        log(f"  round {round_ + 1} of {rounds}")
        for side in _order(round_, "pgqueuer"):  # "plain": skiplock's
            if side == "plain":
                ours.append(drain(dbs, tasks, processes=PROCESSES)[0])
            else:
                conninfo = _pgqueuer_database(dbs)
                answer = _pgqueuer(conninfo, "drain", str(tasks), str(PROCESSES))
                dbs.drop(conninfo)
                theirs.append(answer["per_second"])
                walls.append(answer["wall_per_second"])
                batch_size = answer["batch_size"]
        log(f"  {ours[-1]:,.0f} tasks/s skiplock, {theirs[-1]:,.0f} jobs/s PgQueuer")
    # PgQueuer tuned for short jobs (its guide: raise batch_size), once: how far its default is
    # from its best on this machine.
    conninfo = _pgqueuer_database(dbs)
    tuned = _pgqueuer(conninfo, "drain", str(tasks), str(PROCESSES), str(TUNED_BATCH_SIZE))
    dbs.drop(conninfo)
    log(f"  PgQueuer with batch_size {TUNED_BATCH_SIZE}: {tuned['per_second']:,.0f} jobs/s")
    FACTS["PgQueuer drain, batch_size tuned"] = (
        f"{tuned['per_second']:,.0f} jobs/s with batch_size {TUNED_BATCH_SIZE} (one round): skiplock "
        f"{median_and_spread(ours)[0] / tuned['per_second']:.2f}x"
    )
    FACTS["PgQueuer drain"] = (
        f"{median_and_spread(walls)[1]} jobs/s by wall clock from starting its {PROCESSES} processes "
        f"to their exit ({version}: uvloop, asyncpg, an async noop entrypoint, batch_size {batch_size}, other settings default)"
    )
    cost_row(name, ours, theirs, "tasks/s", f"PgQueuer, {PROCESSES} worker processes", DRAIN_TARGET)
