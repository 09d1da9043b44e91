"""Fault injection: the real system (gunicorn, worker.py, Postgres) broken the ways production
breaks Postgres queues, judged afterwards from the database and from what really ran
(tests/chaos/faults.py: the `tally` task records each execution).

Each scenario is a test you can run alone (`pytest tests/chaos/test_faults.py -k poison`). Sizes are
reduced inside `make test`; `make chaos` runs them at full size and prints the table."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import timedelta

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from skiplock.db import apply_schema, connect
from skiplock.sql.inserts import NewTask, task_insert_many
from skiplock.sql.limits import limit_put
from tests.chaos.faults import (
    FULL,
    Cluster,
    Kill,
    LimitSampler,
    Report,
    SubmitLoop,
    assert_passed,
    judge,
    size,
    submit_many,
    tally_body,
    wait_all_final,
)
from tests.chaos.servers import PrivatePostgres
from tests.helpers import task_row, wait_running, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture
def cluster(request, settings, conn):
    c = Cluster(settings, conn)
    yield c
    c.close(keep_logs=_failed(request))


def _failed(request) -> bool:
    """Keep the workers' logs of a failed scenario (their folder is printed) for the diagnosis."""
    report = getattr(request.node, "rep_call", None)
    return report is not None and report.failed


def attempt_history(conn, task_id: int) -> list[tuple[str, str]]:
    """(outcome, worker_id) of each ended attempt, oldest first."""
    rows = conn.execute(
        "SELECT outcome::text AS outcome, worker_id FROM task_attempts WHERE task_id = %s ORDER BY id",
        (task_id,),
    ).fetchall()
    return [(r["outcome"], r["worker_id"]) for r in rows]


def tally_bodies(n: int, seconds: float = 0.0, **fields) -> list[dict]:
    return [tally_body(seconds, **fields) for _ in range(n)]


def insert_tallies(conn, n: int, seconds: float, max_attempts: int = 20) -> list[int]:
    """n tally tasks inserted directly, in one statement (a backlog, faster than HTTP)."""
    rows = conn.execute(
        "INSERT INTO tasks (task_type, input, max_attempts) "
        "SELECT 'tally', jsonb_build_object('seconds', %s::float8), %s FROM generate_series(1, %s) RETURNING id",
        (seconds, max_attempts, n),
    ).fetchall()
    return sorted(r["id"] for r in rows)


def wait_registered(conn, count: int) -> None:
    wait_until(
        lambda: conn.execute("SELECT count(*) AS n FROM task_workers").fetchone()["n"] >= count,
        timeout=30,
        message=f"{count} worker(s) registered",
    )


def completed_count(conn, ids: list[int]) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND status = 'completed'", (ids,)
    ).fetchone()["n"]


# --- processes dying -----------------------------------------------------------------------------


def test_kill_9_under_load(cluster, conn, settings):
    """Random task processes, and now and then a whole worker.py with its processes, SIGKILLed
    while thousands of short tasks flow: every task completes, none twice, and a dead worker's
    tasks are back in the queue within a rescue interval."""
    n = size(1500, 10_000)
    period = size(0.7, 2.0)
    http = cluster.start_api()
    for _ in range(3):
        cluster.start_worker()
    bodies = tally_bodies(n, 0.01)
    logs = []
    submitted = threading.Thread(target=lambda: logs.append(submit_many(http, bodies)))
    submitted.start()
    kills = 0
    while submitted.is_alive() or cluster.conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE status <> 'completed'"
    ).fetchone()["n"] > size(300, 1000):
        time.sleep(period)
        victim = random.choice(cluster.live_workers())
        if kills % 4 == 3:
            cluster.kill_supervisor(victim)
            cluster.start_worker()
        else:
            cluster.kill_task_process(victim)
        kills += 1
    submitted.join()
    [log] = logs
    report = judge(
        Report("kill -9 under load", faults=kills),
        conn,
        log.acknowledged,
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    assert len(log.acknowledged) == n
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE status <> 'completed'").fetchone()["n"] == 0
    assert_passed(report)


def test_concurrency_limits_hold_while_workers_are_killed(cluster, conn, database_url, settings):
    """Tasks over 50 concurrency keys, each limited to max_running 3, drained by three worker.py
    while one of them is SIGKILLed (with its processes) and replaced every period. Sampled from
    the database every 10 ms, no key ever has more than 3 tasks processing, nor more than 3
    holding its slots (task_limit_usage.running); every task completes exactly once, every slot
    is free at the end, and the invariants view is empty (its limit_exceeded rows count only a
    minute after a limit was set: the sampler is what watches the limits during the run)."""
    n, keys, limit = size(600, 5000), 50, 3
    period = size(1.0, 2.0)
    for k in range(keys):
        limit_put(conn, scope="key", owner=0, name=f"key-{k}", max_running=limit, by="chaos")
    for _ in range(3):
        cluster.start_worker()
    wait_registered(conn, 3)
    # Key after key, so the claim's order (the turns) keeps a few keys at their limit at a time.
    ids, per_key = [], [n // keys + (1 if k < n % keys else 0) for k in range(keys)]
    for k, count in enumerate(per_key):
        task = NewTask(
            "tally", json.dumps({"seconds": 0.03}), "default", 0, 20, 600, concurrency_key=f"key-{k}"
        )
        ids += [t.id for t in task_insert_many(conn, [task] * count)]
    kills, deadline = 0, time.monotonic() + size(120, 600)
    with LimitSampler(database_url, limit, interval=0.01) as sampler:
        while wait_all_final(conn, ids, timeout=period):
            assert time.monotonic() < deadline, "the tasks did not drain"
            cluster.kill_supervisor(random.choice(cluster.live_workers()))
            cluster.start_worker()
            kills += 1
    report = judge(
        Report(f"limits under kill -9 ({keys} keys, max_running {limit})", faults=kills),
        conn,
        ids,
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    report.notes = "; ".join(filter(None, [sampler.summary(), report.notes]))
    not_once = conn.execute(
        """
        SELECT count(*) AS n FROM tasks t
        WHERE t.id = ANY(%s)
          AND (t.status <> 'completed'
               OR (SELECT count(*) FROM task_attempts a WHERE a.task_id = t.id AND a.outcome = 'completed') <> 1)
        """,
        (ids,),
    ).fetchone()["n"]
    usage = conn.execute(
        "SELECT sum(running) AS running, sum(waiting) AS waiting FROM task_limit_usage WHERE scope = 'key'"
    ).fetchone()
    if sampler.over or not_once:
        report.verdict = "FAIL"
    assert not sampler.over, sampler.over[:10]
    assert sampler.samples >= sampler.seconds / 0.05, sampler.summary()  # sampled all along
    assert not_once == 0, report
    assert usage["running"] == 0 and usage["waiting"] == 0, usage  # every slot free again at the end
    assert kills >= size(2, 5), kills
    assert sampler.most_processing == limit, sampler.summary()  # the limits were reached, and held
    assert_passed(report)


def test_a_schedule_fires_once_per_second_while_workers_are_killed(cluster, conn, settings):
    """Two schedules every second, made through the API (two gunicorn processes), fired by three
    worker.py while one is SIGKILLed and replaced every period; then every worker stopped for an
    outage and started again. Each second gets exactly one task per schedule while any worker
    is up, none twice; after the outage the `skip` schedule records the seconds it missed (no
    task for them) and the `run_all` one runs each of them once."""
    seconds, period, outage = size(12, 60), size(3.0, 5.0), size(4, 10)
    http = cluster.start_api()
    ids = {}
    for name, missed in (("skip", "skip"), ("run_all", "run_all")):
        code, _, body = http.request(
            "POST", "/api/schedules",
            {"name": name, "every_seconds": 1, "missed": missed, "task": tally_body(0.0, queue="default")},
        )  # fmt: skip
        assert code == 201, body
        ids[name] = body["schedule_id"]
    for _ in range(3):
        cluster.start_worker()
    wait_registered(conn, 3)
    up_at = cluster.db_now()  # (what fell due before the first workers were up may be missed)
    kills, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        time.sleep(period)
        cluster.kill_supervisor(random.choice(cluster.live_workers()))
        cluster.start_worker()
        kills += 1
    before_outage = len(cluster.kills)
    for worker in cluster.live_workers():  # the outage: nobody fires
        cluster.kill_supervisor(worker)
    down_from = cluster.db_now()
    time.sleep(outage)
    for _ in range(3):
        cluster.start_worker()
    back_at = cluster.db_now()
    # With every worker down nobody can rescue: the outage's tasks are due back within the bound
    # from the moment rescuers are up again, not from the kill.
    cluster.kills[before_outage:] = [replace(k, at=max(k.at, back_at)) for k in cluster.kills[before_outage:]]
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) AS n FROM task_schedule_fires WHERE schedule_id = %s AND scheduled_for > %s",
                (ids["skip"], back_at),
            ).fetchone()["n"]
            >= 3
        ),
        timeout=60,
        message="fires after the outage",
    )
    for worker in cluster.live_workers():
        os.kill(worker.pid, signal.SIGTERM)
    for worker in cluster.live_workers():
        worker.wait(30)
    fires = {
        name: conn.execute(
            "SELECT scheduled_for, kind, outcome, task_id, missed_count, missed_until FROM task_schedule_fires"
            " WHERE schedule_id = %s ORDER BY scheduled_for",
            (sid,),
        ).fetchall()
        for name, sid in ids.items()
    }
    tasks = conn.execute(
        "SELECT schedule_id, scheduled_for, count(*) AS n FROM tasks WHERE schedule_id IS NOT NULL GROUP BY 1, 2"
    ).fetchall()
    twice = [t for t in tasks if t["n"] > 1]
    problems = []
    for name, rows in fires.items():
        made = [r["scheduled_for"] for r in rows if r["outcome"] == "created"]
        missed = [r for r in rows if r["outcome"] == "missed"]
        last = max(r["scheduled_for"] for r in rows)
        covered = set(made)
        for m in missed:  # the seconds a missed row stands for
            at = m["scheduled_for"]
            while at <= m["missed_until"]:
                covered.add(at)
                at += timedelta(seconds=1)
        second, gaps = made[0], []
        while second <= last:
            if second not in covered:
                gaps.append(second)
            second += timedelta(seconds=1)
        if gaps:
            problems.append(f"{name}: seconds neither fired nor recorded missed: {gaps[:5]}")
        in_outage = [t for t in made if down_from + timedelta(seconds=1) < t < back_at - timedelta(seconds=1)]
        if name == "skip":
            if in_outage or not missed:
                problems.append(f"skip: {len(in_outage)} outage seconds ran, {len(missed)} missed rows")
            while_up = [m for m in missed if up_at + timedelta(seconds=1) < m["missed_until"] < down_from]
            if while_up:
                problems.append(f"skip: seconds missed while workers were up: {while_up[:3]}")
        elif len(in_outage) < outage - 3 or not any(r["kind"] == "catch_up" for r in rows):
            problems.append(f"run_all: only {len(in_outage)} of the ~{outage} outage seconds ran")
    acknowledged = [r["task_id"] for rows in fires.values() for r in rows if r["outcome"] == "created"]
    for _ in range(3):
        cluster.start_worker()
    report = judge(
        Report(f"schedule every 1 s, kill -9 every {period:.0f} s, {outage} s outage", faults=kills + 1),
        conn,
        acknowledged,
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    report.notes = "; ".join(
        filter(None, [f"{len(acknowledged)} fires, {len(twice)} seconds twice", *problems, report.notes])
    )
    if twice or problems:
        report.verdict = "FAIL"
    assert not twice, twice
    assert not problems, problems
    assert_passed(report)


def test_a_fan_out_and_fan_in_workflow_while_workers_are_killed(cluster, conn, settings):
    """A batch of tally tasks (5% failing for good) with `then` and `finally`, submitted through
    the API, drained by three worker.py while one is SIGKILLed and replaced every period: every
    task ends once, `finally` runs exactly once and after every task of the batch, `then` ends
    cancelled naming a failed task, the workflow ends failed, the self-audit is empty."""
    n, period = size(200, 1000), size(1.0, 2.0)
    http = cluster.start_api()
    failing = set(random.sample(range(n), n // 20))
    batch = [
        tally_body(0.02, task_input={"seconds": 0.02, "fail": True}, max_attempts=1)
        if i in failing
        else tally_body(0.02)
        for i in range(n)
    ]
    code, _, made = http.request(
        "POST", "/api/workflows", {"batch": batch, "then": tally_body(0.0), "finally": tally_body(0.0)}
    )
    assert code == 201, made
    workflow_id = made["workflow_id"]
    ids = {t["ref"]: t["task_id"] for t in made["tasks"]}
    for _ in range(3):
        cluster.start_worker()
    kills, deadline = 0, time.monotonic() + size(120, 600)
    while (
        conn.execute("SELECT finished_at FROM workflows WHERE id = %s", (workflow_id,)).fetchone()[
            "finished_at"
        ]
        is None
    ):
        assert time.monotonic() < deadline, "the workflow did not finish"
        time.sleep(period)
        cluster.kill_supervisor(random.choice(cluster.live_workers()))
        cluster.start_worker()
        kills += 1
    acknowledged = list(ids.values())
    report = judge(
        Report(f"workflow: fan-out {n} + then + finally, 5% failing, kill -9", faults=kills),
        conn,
        acknowledged,
        cluster.kills,
        settings,
        tally=cluster.tally,
        planned_executions=n + 1,  # `then` never runs
    )
    view = conn.execute("SELECT state FROM workflows WHERE id = %s", (workflow_id,)).fetchone()
    then = task_row(conn, ids["then"])
    final = task_row(conn, ids["finally"])
    batch_end = conn.execute(
        "SELECT max(finished_at) AS t FROM tasks WHERE workflow_id = %s AND workflow_ref LIKE 'task-%%'",
        (workflow_id,),
    ).fetchone()["t"]
    runs = cluster.tally.executions()
    problems = []
    if view["state"] != "failed":
        problems.append(f"workflow {view['state']}")
    if then["status"] != "cancelled" or not (then["error"] or "").startswith("upstream: task "):
        problems.append(f"then: {then['status']} {then['error']}")
    if final["status"] != "completed" or runs[ids["finally"]] != 1 or final["started_at"] < batch_end:
        problems.append(
            f"finally: {final['status']}, ran {runs[ids['finally']]}x, started {final['started_at']} vs {batch_end}"
        )
    statuses = Counter(task_row(conn, i)["status"] for i in acknowledged)
    report.notes = "; ".join(filter(None, [f"{dict(statuses)}", *problems, report.notes]))
    if problems:
        report.verdict = "FAIL"
    assert not problems, problems
    assert statuses["failed"] == len(failing), statuses
    assert_passed(report)


def test_a_killed_worker_costs_only_what_it_was_running(cluster, conn, settings):
    """The prefetch that makes the drain fast must not make a crash expensive: a worker.py
    SIGKILLed with its processes mid-drain, tasks with max_attempts=1. Only the tasks it had
    handed to its processes are charged (and so fail): those running, and the short ones queued
    behind them in their batches, which the dead worker's record cannot tell apart. Everything
    else it had claimed goes back uncounted, and all of it is back in the queue within a rescue
    interval, not a lease."""
    n = size(800, 3000)
    survivor = cluster.start_worker("--concurrency", "2")
    victim = cluster.start_worker("--concurrency", "2")
    wait_registered(conn, 2)
    ids = insert_tallies(conn, n, 0.005, max_attempts=1)
    victim_id = cluster.worker_id(victim)
    wait_until(lambda: cluster.held(victim_id) >= 8, timeout=30, message="the victim to hold a backlog")
    time.sleep(0.3)
    held = cluster.held(victim_id)
    kill = cluster.kill_supervisor(victim)
    report = judge(
        Report("worker SIGKILLed mid-drain (max_attempts=1)", faults=1),
        conn,
        ids,
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    failed = conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND status = 'failed'", (ids,)
    ).fetchone()["n"]
    released = conn.execute(
        "SELECT count(*) AS n FROM task_attempts WHERE worker_id = %s AND outcome = 'released'", (victim_id,)
    ).fetchone()["n"]
    report.notes = (
        f"held {held} when killed, {kill.in_flight} running, {len(kill.in_hand)} in its processes' hands; "
        f"{failed} failed, {released} released uncounted; "
        f"{report.notes}"
    )
    assert survivor.poll() is None
    # Only what it had handed to its processes can have been charged (and so failed): what was
    # running, and at most a batch of short tasks per process; the claimed rest went back.
    assert failed <= len(kill.in_hand), report
    # Each attempt it held ended lost only if its record had it in a process's hands; the rest
    # went back released, uncounted. (How many it had claimed beyond its hands is chance: on a
    # busy machine its look-ahead may have handed over all of it, so none need be released.)
    ended = conn.execute(
        "SELECT task_id, attempt, outcome::text AS outcome FROM task_attempts WHERE worker_id = %s AND task_id = ANY(%s)",
        (victim_id, ids),
    ).fetchall()
    lost = {(a["task_id"], a["attempt"]) for a in ended if a["outcome"] == "lost"}
    assert lost <= kill.in_hand, report
    assert {a["outcome"] for a in ended} <= {"completed", "lost", "released"}, report
    assert completed_count(conn, ids) == n - failed
    assert (
        report.max_until_rescued is not None
        and report.max_until_rescued <= settings.rescue_interval_seconds + 1
    )
    assert_passed(report)


def test_poison_task_runs_exactly_max_attempts(cluster, conn, settings):
    n = size(300, 1000)
    http = cluster.start_api()
    cluster.start_worker()
    cluster.start_worker()
    poison = http.request(
        "POST", "/api/submit-task", {"task_type": "crash", "task_input": None, "max_attempts": 3}
    )
    log = submit_many(http, tally_bodies(n))
    poison_id = poison[2]["task_id"]
    report = judge(
        Report("poison task (crash, max_attempts=3)", faults=1),
        conn,
        [poison_id, *log.acknowledged],
        [],
        settings,
        tally=cluster.tally,
        planned_executions=n + 3,
    )
    row = task_row(conn, poison_id)
    attempts = conn.execute(
        "SELECT outcome::text AS outcome FROM task_attempts WHERE task_id = %s", (poison_id,)
    ).fetchall()
    assert row["status"] == "failed"
    assert [a["outcome"] for a in attempts] == ["crashed"] * 3
    assert "died" in row["error"]
    assert completed_count(conn, log.acknowledged) == n
    assert_passed(report)


def test_hung_task_is_stopped_at_its_timeout(cluster, conn, settings):
    http = cluster.start_api()
    cluster.start_worker("--concurrency", "1")
    hung = http.request(
        "POST", "/api/submit-task", {"task_type": "hang", "task_input": None, "timeout_seconds": 2}
    )[2]["task_id"]
    after = http.request("POST", "/api/submit-task", tally_body())[2]["task_id"]
    report = judge(
        Report("hung task (timeout 2 s)", faults=1), conn, [hung, after], [], settings, tally=cluster.tally
    )
    [attempt] = conn.execute(
        "SELECT outcome::text AS outcome, extract(epoch FROM finished_at - started_at) AS ran FROM task_attempts WHERE task_id = %s",
        (hung,),
    ).fetchall()
    assert attempt["outcome"] == "timed_out"
    assert 2 <= attempt["ran"] <= 2 + 5  # stopped within 5 s of its timeout
    assert task_row(conn, after)["status"] == "completed"  # the slot was reused
    report.notes = f"killed {float(attempt['ran']) - 2:.2f} s after its timeout"
    assert_passed(report)


def test_frozen_worker_is_fenced_out(cluster, conn, settings):
    """SIGSTOP a worker past its lease, then SIGCONT: the task was taken over, and the frozen
    worker's late result is not written; exactly one result, from the newer attempt."""
    frozen = cluster.start_worker("--concurrency", "1")
    [task_id] = insert_tallies(conn, 1, 1.0)
    wait_running(conn, task_id)
    frozen_id = cluster.worker_id(frozen)
    os.kill(frozen.pid, signal.SIGSTOP)  # its task process keeps running
    cluster.kills.append(Kill(frozen_id, cluster.db_now(), cluster.in_flight(frozen_id)))
    rescuer = cluster.start_worker()
    wait_until(lambda: task_row(conn, task_id)["status"] == "completed", timeout=30, message="takeover")
    os.kill(frozen.pid, signal.SIGCONT)
    time.sleep(2)  # the thawed worker tries to write its stale result now
    report = judge(
        Report("frozen worker (SIGSTOP past lease)", faults=1),
        conn,
        [task_id],
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    assert attempt_history(conn, task_id) == [
        ("lost", frozen_id),
        ("completed", cluster.worker_id(rescuer)),
    ]
    assert task_row(conn, task_id)["worker_id"] == cluster.worker_id(rescuer)
    assert frozen.poll() is None  # it carries on
    assert_passed(report)


def test_long_task_keeps_its_lease_and_runs_once(cluster, conn, settings):
    """A healthy task running 5 leases long, with another worker's rescue duty running all
    along: renewals keep it, and it runs exactly once."""
    lease = size(1.0, settings.lease_seconds)
    cluster.start_worker("--concurrency", "1", lease_seconds=lease)
    [task_id] = insert_tallies(conn, 1, 5 * lease)
    wait_running(conn, task_id)
    cluster.start_worker("--concurrency", "1", lease_seconds=lease)
    report = judge(
        Report(f"task running 5 leases ({5 * lease:.0f} s)", faults=0),
        conn,
        [task_id],
        [],
        settings,
        tally=cluster.tally,
        timeout=5 * lease + 30,
    )
    assert cluster.tally.executions()[task_id] == 1
    assert attempt_history(conn, task_id) == [("completed", task_row(conn, task_id)["worker_id"])]
    assert_passed(report)


def test_a_worker_whose_clock_is_ten_minutes_ahead_changes_nothing(cluster, conn, settings):
    """Leases, backoffs and rescues are decided on the database clock: a worker host whose clock
    runs 10 minutes ahead (libfaketime) beside a correct one causes no extra run."""
    libraries = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    if not libraries:
        pytest.skip("libfaketime is not installed (Debian package faketime; `make test` installs it)")
    n = size(400, 1000)
    cluster.start_worker("--concurrency", "2", "--queue", "default")
    # Preloaded into worker.py itself (the faketime command would run it as its child).
    skewed = cluster.start_worker(
        "--concurrency", "2", "--queue", "default", "--queue", "probe",
        env={"LD_PRELOAD": libraries[0], "FAKETIME": "+10m"},
    )  # fmt: skip
    wait_registered(conn, 2)
    # Only the skewed worker serves the probe's queue: its answer shows the skew is real.
    [probe] = conn.execute(
        "INSERT INTO tasks (task_type, input, queue) VALUES ('clock', 'null', 'probe') RETURNING id"
    ).fetchall()
    ids = insert_tallies(conn, n, 0.01)
    report = judge(
        Report("worker clock 10 min ahead (faketime)", faults=1), conn, ids, [], settings, tally=cluster.tally
    )
    assert wait_all_final(conn, [probe["id"]], 30) == 0
    probe_row = task_row(conn, probe["id"])
    skew = probe_row["result"]["time"] - probe_row["finished_at"].timestamp()
    ran_on_skewed = conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND worker_id = %s",
        (ids, cluster.worker_id(skewed)),
    ).fetchone()["n"]
    report.notes = f"{ran_on_skewed} of {n} ran on the worker {skew:+.0f} s ahead"
    assert 590 < skew < 610, skew
    assert report.extra_executions == 0, report
    assert ran_on_skewed >= n // 10
    assert_passed(report)


# --- stopping --------------------------------------------------------------------------------------


def test_graceful_stop_hands_back_and_exits_0(cluster, conn, settings):
    leaving = cluster.start_worker("--concurrency", "2", "--shutdown-grace", "0.5")
    ids = insert_tallies(conn, 4, 2.0)
    leaving_id = cluster.worker_id(leaving)
    wait_until(lambda: cluster.in_flight(leaving_id) == 2, message="two tasks running")
    cluster.kills.append(Kill(leaving_id, cluster.db_now(), cluster.in_flight(leaving_id)))
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(20) == 0
    assert cluster.held(leaving_id) == 0
    cluster.start_worker()
    report = judge(
        Report("graceful stop (SIGTERM, grace 0.5 s)", faults=1),
        conn,
        ids,
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    handed_back = conn.execute(
        "SELECT count(*) AS n FROM task_attempts WHERE outcome = 'handed_back'"
    ).fetchone()["n"]
    assert handed_back == 2
    assert_passed(report)


def test_sigterm_to_the_process_group_is_a_graceful_stop(cluster, conn, settings):
    """systemd's default KillMode=control-group, and Ctrl-C in a terminal, signal every process
    of the worker, not only the supervisor: it must behave exactly as a SIGTERM to the
    supervisor (running tasks finish within the grace, exit 0), not kill the task processes."""
    leaving = cluster.start_worker("--concurrency", "2", "--shutdown-grace", "10")
    running = insert_tallies(conn, 2, 1.5)
    for task_id in running:
        wait_running(conn, task_id)
    leaving_id = cluster.worker_id(leaving)
    later = insert_tallies(conn, 3, 0.0)
    os.killpg(leaving.pid, signal.SIGTERM)  # the supervisor, its forkserver and its task processes
    assert leaving.wait(20) == 0
    outcomes = {task_id: attempt_history(conn, task_id) for task_id in running}
    assert outcomes == {task_id: [("completed", leaving_id)] for task_id in running}
    assert cluster.held(leaving_id) == 0
    cluster.start_worker()
    report = judge(
        Report("SIGTERM to the worker's process group", faults=1),
        conn,
        running + later,
        [],
        settings,
        tally=cluster.tally,
    )
    crashed = conn.execute("SELECT count(*) AS n FROM task_attempts WHERE outcome = 'crashed'").fetchone()[
        "n"
    ]
    assert crashed == 0
    report.notes = "; ".join(
        filter(None, [f"{len(running)} running tasks finished in the grace period, exit 0", report.notes])
    )
    assert_passed(report)


def drain_rate(conn, ids: list[int], bucket: float = 0.5) -> list[tuple[float, int]]:
    """(seconds since the first completion, completions in that bucket), database clock."""
    rows = conn.execute(
        """
        WITH done AS (SELECT finished_at FROM tasks WHERE id = ANY(%(ids)s) AND status = 'completed')
        SELECT floor(extract(epoch FROM finished_at - (SELECT min(finished_at) FROM done)) / %(b)s) AS k, count(*) AS n
        FROM done GROUP BY 1 ORDER BY 1
        """,
        {"ids": ids, "b": bucket},
    ).fetchall()
    return [(float(r["k"]) * bucket, r["n"]) for r in rows]


def test_rolling_restart_under_load(cluster, conn, settings):
    """A deep backlog drains through two workers; one gets SIGTERM while its replacement starts.
    It stops claiming at once, hands back everything it had not started in one statement
    (uncounted), finishes what runs, exits 0; nothing is lost or run twice, and the drain rate
    dips for a few seconds at most."""
    n = size(8_000, 50_000)
    ids = insert_tallies(conn, n, 0.002)
    # A graceful restart is about hand-backs, not leases. At reduced size the scenario shares two
    # cores with the rest of `make test`, where a 2 s lease can lapse while a supervisor waits
    # for the CPU (its tasks then run twice, at least once as promised, and the count is off).
    lease = {"lease_seconds": size(10.0, settings.lease_seconds)}
    old = cluster.start_worker("--concurrency", "2", "--shutdown-grace", "10", **lease)
    cluster.start_worker("--concurrency", "2", **lease)
    # Polled gently: the measure must not take the CPU it measures.
    wait_until(
        lambda: (
            conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'completed'").fetchone()["n"]
            >= n // 4
        ),
        timeout=120,
        interval=0.5,
        message="a quarter drained",
    )
    old_id = cluster.worker_id(old)
    restarted_at = cluster.db_now()
    in_flight = cluster.in_flight(old_id)
    old.send_signal(signal.SIGTERM)
    cluster.start_worker("--concurrency", "2", **lease)  # the replacement
    assert old.wait(30) == 0
    cluster.kills.append(Kill(old_id, restarted_at, in_flight))
    report = judge(
        Report(f"rolling restart ({n:,} backlog)", faults=1),
        conn,
        ids,
        cluster.kills,
        settings,
        tally=cluster.tally,
        timeout=300,
    )
    handed = conn.execute(
        """
        SELECT outcome::text AS outcome, count(*) AS n, count(DISTINCT finished_at) AS statements
        FROM task_attempts WHERE worker_id = %s AND outcome IN ('released', 'handed_back') GROUP BY 1
        """,
        (old_id,),
    ).fetchall()
    handed = {h["outcome"]: h for h in handed}
    # The drain rate per half second around the restart, against the rate before it.
    rates = drain_rate(conn, ids)
    first_done = conn.execute(
        "SELECT min(finished_at) AS t FROM tasks WHERE id = ANY(%s)", (ids,)
    ).fetchone()["t"]
    restart = (restarted_at - first_done).total_seconds()
    before = [count for at, count in rates if 1.0 <= at < restart - 0.5]
    after = [(at, count) for at, count in rates if at >= restart - 0.5]
    normal = statistics.median(before)
    dip = 0.5 * sum(1 for at, count in after[:-1] if count < 0.6 * normal)  # the last bucket is partial
    released = handed.get("released", {"n": 0, "statements": 0})
    report.notes = (
        f"{released['n']} released in {released['statements']} statement(s), "
        f"{handed.get('handed_back', {'n': 0})['n']} handed back; rate {normal * 2:.0f}/s before, "
        f"below 60% of it for {dip:.1f} s; {report.notes}"
    )
    # One statement; a row another session has locked at that moment is skipped by the fence and
    # written by the next one (skiplock/sql/fenced.py _HELD): on a loaded machine, one more.
    assert released["statements"] <= (1 if FULL else 2), handed
    assert "handed_back" not in handed  # a 10 s grace: what ran finished
    # The dip is a speed: judged at full size (`make chaos`, alone on the machine); in `make test`
    # (reduced, sharing the CPU with the rest of the suite) it is reported, not asserted.
    if FULL:
        assert dip <= 3.0, (dip, rates)
    assert_passed(report)


# --- the database misbehaving ---------------------------------------------------------------------


@pytest.fixture
def private_pg(settings):
    pg = PrivatePostgres()
    apply_schema(pg.url)
    yield pg
    pg.close()


@pytest.fixture
def private_cluster(private_pg, settings):
    c = Cluster(
        replace(settings, database_url=private_pg.url), connect(private_pg.url, role="test", guarded=False)
    )
    yield c, private_pg
    c.close()
    c.conn.close()  # the test may have replaced it (after a restart)


def assert_only_202_and_503(log, max_latency: float = 5.0) -> None:
    assert set(log.codes) <= {202, 503}, log.codes
    assert log.codes.get(202, 0) > 0
    assert log.errors == 0
    assert log.max_latency < max_latency, log.max_latency


# On a Postgres of its own (the embedded one), whichever server the suite runs against.
@pytest.mark.pg_agnostic
def test_postgres_restart_while_clients_submit(private_cluster, settings):
    cluster, pg = private_cluster
    http = cluster.start_api()
    cluster.start_worker()
    with SubmitLoop(http, tally_body(max_attempts=10)) as load:
        time.sleep(1)
        # What the worker holds when Postgres goes may run again (at-least-once): its processes
        # go on with the batches they were sent, whose outcomes cannot be stored, and a worker not
        # back within its grace has them rescued. So every held task counts as in flight here, not
        # only those started at this instant (tasks of a few ms: usually none; one CI run on a
        # loaded machine saw 2 run twice).
        held = cluster.conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'processing'").fetchone()
        fault = Kill("*", cluster.db_now(), held["n"])
        pg.stop()  # pg_ctl stop -m fast: every connection dropped
        stopped = time.monotonic()
        time.sleep(size(3, 5))
        cluster.conn.close()
        pg.start()
        down = time.monotonic() - stopped
        time.sleep(size(2, 5))  # clients keep going; the API and workers recover by themselves
    with connect(pg.url, role="test", guarded=False) as conn:
        report = judge(
            Report(f"Postgres restart (down ~{down:.0f} s)", faults=1),
            conn,
            load.log.acknowledged,
            [fault],
            settings,
            tally=cluster.tally,
        )
        report.notes = f"answers {dict(sorted(load.log.codes.items()))}, slowest {load.log.max_latency:.2f} s"
    assert load.log.codes.get(503, 0) > 0  # it was down, and said so
    assert_only_202_and_503(load.log)
    assert_passed(report)


def test_connections_killed_repeatedly(cluster, conn, settings):
    """Every skiplock connection killed every 0.3 s: workers reconnect within the grace, so
    nobody takes their tasks, and nothing runs twice that was not in flight."""
    http = cluster.start_api()
    cluster.start_worker()
    cluster.start_worker()
    rounds = 0
    with SubmitLoop(http, tally_body(0.02, max_attempts=10)) as load:
        deadline = time.monotonic() + size(4, 15)
        while time.monotonic() < deadline:
            time.sleep(0.3)
            cluster.kills.append(Kill("*", cluster.db_now(), cluster.in_flight()))
            cluster.terminate_connections()
            rounds += 1
    report = judge(
        Report("connections killed (pg_terminate_backend)", faults=rounds),
        conn,
        load.log.acknowledged,
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    report.notes = "; ".join(filter(None, [f"answers {dict(sorted(load.log.codes.items()))}", report.notes]))
    assert_only_202_and_503(load.log)
    assert_passed(report)


def test_lost_wakeups_are_covered_by_polling(cluster, conn, settings):
    """Notifications never arrive (listener killed, then the trigger disabled): tasks still start
    within the poll interval."""
    poll = 0.5
    http = cluster.start_api()
    cluster.start_worker(poll_interval_seconds=poll)
    first = http.request("POST", "/api/submit-task", tally_body())[2]["task_id"]
    wait_until(lambda: task_row(conn, first)["status"] == "completed", message="warm up")
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'skiplock-listener'"
    ).fetchone()["n"]
    assert killed == 1
    conn.execute("ALTER TABLE tasks DISABLE TRIGGER tasks_notify_inserted")
    log = submit_many(http, tally_bodies(size(20, 100)), threads=1)
    report = judge(
        Report("lost wake-ups (listener killed, no NOTIFY)", faults=2),
        conn,
        log.acknowledged,
        [],
        settings,
        tally=cluster.tally,
    )
    waits = conn.execute(
        "SELECT max(extract(epoch FROM started_at - created_at)) AS w FROM tasks WHERE id = ANY(%s)",
        (log.acknowledged,),
    ).fetchone()["w"]
    report.notes = f"slowest pickup {float(waits):.2f} s (poll {poll} s)"
    assert waits <= poll + 0.5
    assert_passed(report)


# --- a worker host cut off -------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns():
    """A network namespace joined to this host by a veth pair: a worker host of our own."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to make a network namespace")
    tag = f"{os.getpid() % 10000}{random.randint(0, 99)}"
    ns, host_if, ns_if = f"skl{tag}", f"sklh{tag}", f"skln{tag}"
    octet = random.randint(1, 250)
    host_ip, ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield {"ns": ns, "host_if": host_if, "host_ip": host_ip, "network": f"10.213.{octet}.0/30"}
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# On a Postgres of its own (the embedded one), whichever server the suite runs against.
@pytest.mark.pg_agnostic
def test_worker_host_cut_off_from_the_network(private_cluster, netns, settings):
    cluster, pg = private_cluster
    pg.listen_on(netns["host_ip"], netns["network"])
    cluster.conn.close()
    cluster.conn = connect(pg.url, role="test", guarded=False)
    conn = cluster.conn
    port = conninfo_to_dict(pg.url).get("port") or "5432"
    remote_url = make_conninfo(pg.url, host=netns["host_ip"], port=port)
    http = cluster.start_api()
    remote = cluster.start_worker(
        "--concurrency", "1", prefix=["ip", "netns", "exec", netns["ns"]], env={"DATABASE_URL": remote_url}
    )
    remote_id = cluster.worker_id(remote)
    task_id = http.request("POST", "/api/submit-task", tally_body(1.5))[2]["task_id"]
    wait_until(
        lambda: (row := task_row(conn, task_id))["worker_id"] == remote_id and row["started_at"] is not None,
        timeout=20,
        message="the remote worker to run it",
    )

    _ip("link", "set", netns["host_if"], "down")  # cut: packets vanish, no RST
    cut_at = cluster.db_now()
    cluster.kills.append(Kill(remote_id, cut_at, 1))
    local = cluster.start_worker()
    wait_until(
        lambda: task_row(conn, task_id)["status"] == "completed", timeout=30, message="re-run elsewhere"
    )
    time.sleep(1)
    _ip("link", "set", netns["host_if"], "up")  # the link returns: the late result arrives

    # It carries on working: with the local worker gone, new tasks are the remote one's.
    local.send_signal(signal.SIGTERM)
    assert local.wait(20) == 0
    later = submit_many(http, tally_bodies(5)).acknowledged
    report = judge(
        Report("worker host cut off (netns link down)", faults=1),
        conn,
        [task_id, *later],
        cluster.kills,
        settings,
        tally=cluster.tally,
        timeout=60,
    )
    assert attempt_history(conn, task_id) == [
        ("lost", remote_id),
        ("completed", cluster.worker_id(local)),
    ]
    assert {task_row(conn, t)["worker_id"] for t in later} == {remote_id}
    assert remote.poll() is None
    assert_passed(report)


# --- other sessions in the database ----------------------------------------------------------------


def test_long_transaction_and_a_dba_row_lock(cluster, conn, database_url, settings):
    http = cluster.start_api()
    cluster.start_worker()
    locked_task = http.request("POST", "/api/submit-task", tally_body(1.0))[2]["task_id"]
    wait_running(conn, locked_task)
    with psycopg.connect(database_url) as long_tx, psycopg.connect(database_url) as dba:
        long_tx.execute("SELECT txid_current()")  # a transaction left open (holds back vacuum)
        dba.execute("SELECT * FROM tasks WHERE id = %s FOR UPDATE", (locked_task,))  # a DBA's row lock
        others = submit_many(http, tally_bodies(size(300, 3000))).acknowledged
        not_done = wait_all_final(conn, others, timeout=60)
        assert not_done == 0, "the queue stopped flowing behind a locked row"
        assert task_row(conn, locked_task)["status"] == "processing"  # it cannot move while locked
        time.sleep(settings.lease_seconds)  # past its lease, while still locked
        dba.rollback()
        long_tx.rollback()
    # Its lease lapsed while it was locked: it may have been rescued and run again once.
    cluster.kills.append(Kill("*", cluster.db_now(), 1))
    report = judge(
        Report("long transaction + DBA row lock", faults=2),
        conn,
        [locked_task, *others],
        cluster.kills,
        settings,
        tally=cluster.tally,
    )
    assert task_row(conn, locked_task)["status"] == "completed"
    assert_passed(report)
