"""Fault injection: the real system (gunicorn, worker.py, Postgres) broken the ways production
breaks Postgres queues, judged afterwards from the database alone (tests/faults.py).

Each scenario is a test you can run alone (`pytest tests/test_faults.py -k poison`). Sizes are
reduced inside `make test`; `make chaos` runs them at full size and prints the table."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from skiplock import embedded
from skiplock.db import apply_schema, connect
from tests.conftest import task_row, wait_until
from tests.faults import (
    Cluster,
    Kill,
    Report,
    SubmitLoop,
    assert_passed,
    judge,
    size,
    submit_many,
    wait_all_final,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(request, settings, conn):
    c = Cluster(settings, conn)
    yield c
    c.close(keep_logs=_failed(request))


def _failed(request) -> bool:
    """Keep the workers' logs of a failed scenario (their paths are printed) for the diagnosis."""
    report = getattr(request.node, "rep_call", None)
    return report is not None and report.failed


def attempt_history(conn, task_id: int) -> list[tuple[str, str]]:
    """(outcome, worker_id) of each ended attempt, oldest first."""
    rows = conn.execute(
        "SELECT outcome::text AS outcome, worker_id FROM task_attempts WHERE task_id = %s ORDER BY id",
        (task_id,),
    ).fetchall()
    return [(r["outcome"], r["worker_id"]) for r in rows]


def noop_bodies(n: int, **fields) -> list[dict]:
    return [{"task_type": "noop", "task_input": i, "max_attempts": 10, **fields} for i in range(n)]


# --- processes dying -----------------------------------------------------------------------------


def test_kill_9_under_load(cluster, conn, settings):
    """Random task processes, and now and then a whole worker.py, SIGKILLed while thousands of
    short tasks flow: every task completes, none twice."""
    n = size(1500, 10_000)
    period = size(0.7, 2.0)
    http = cluster.start_api()
    for _ in range(3):
        cluster.start_worker()
    bodies = [{"task_type": "sleep", "task_input": {"seconds": 0.01}, "max_attempts": 20} for _ in range(n)]
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
        Report("kill -9 under load", faults=kills), conn, log.acknowledged, cluster.kills, settings
    )
    assert len(log.acknowledged) == n
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE status <> 'completed'").fetchone()["n"] == 0
    assert_passed(report, settings)


def test_poison_task_runs_exactly_max_attempts(cluster, conn, settings):
    n = size(300, 1000)
    http = cluster.start_api()
    cluster.start_worker()
    cluster.start_worker()
    poison = http.request(
        "POST", "/api/submit-task", {"task_type": "crash", "task_input": None, "max_attempts": 3}
    )
    log = submit_many(http, noop_bodies(n))
    poison_id = poison[2]["task_id"]
    report = judge(
        Report("poison task (crash, max_attempts=3)", faults=1),
        conn,
        [poison_id, *log.acknowledged],
        [],
        settings,
        planned_executions=n + 3,
    )
    row = task_row(conn, poison_id)
    attempts = conn.execute(
        "SELECT outcome::text AS outcome FROM task_attempts WHERE task_id = %s", (poison_id,)
    ).fetchall()
    assert row["status"] == "failed"
    assert [a["outcome"] for a in attempts] == ["crashed"] * 3
    assert "died" in row["error"]
    normal = conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND status = 'completed'", (log.acknowledged,)
    ).fetchone()["n"]
    assert normal == n
    assert_passed(report, settings)


def test_hung_task_is_stopped_at_its_timeout(cluster, conn, settings):
    http = cluster.start_api()
    cluster.start_worker("--concurrency", "1")
    hung = http.request(
        "POST", "/api/submit-task", {"task_type": "hang", "task_input": None, "timeout_seconds": 2}
    )[2]["task_id"]
    after = http.request("POST", "/api/submit-task", {"task_type": "noop", "task_input": None})[2]["task_id"]
    report = judge(Report("hung task (timeout 2 s)", faults=1), conn, [hung, after], [], settings)
    [attempt] = conn.execute(
        "SELECT outcome::text AS outcome, extract(epoch FROM finished_at - started_at) AS ran FROM task_attempts WHERE task_id = %s",
        (hung,),
    ).fetchall()
    assert attempt["outcome"] == "timed_out"
    assert 2 <= attempt["ran"] <= 2 + 5  # stopped within 5 s of its timeout
    assert task_row(conn, after)["status"] == "completed"  # the slot was reused
    report.notes = f"killed {float(attempt['ran']) - 2:.2f} s after its timeout"
    assert_passed(report, settings)


def test_frozen_worker_is_fenced_out(cluster, conn, settings):
    """SIGSTOP a worker past its lease, then SIGCONT: the task was taken over, and the frozen
    worker's late result is not written; exactly one result, from the newer attempt."""
    http = cluster.start_api()
    frozen = cluster.start_worker("--concurrency", "1")
    task_id = http.request("POST", "/api/submit-task", {"task_type": "sleep", "task_input": {"seconds": 1}})[
        2
    ]["task_id"]
    wait_until(lambda: task_row(conn, task_id)["status"] == "processing", message="processing")
    frozen_id = cluster.worker_id(frozen)
    os.kill(frozen.pid, signal.SIGSTOP)
    kill = Kill(frozen_id, cluster.db_now(), cluster.in_flight(frozen_id))
    cluster.kills.append(kill)
    rescuer = cluster.start_worker()
    wait_until(lambda: task_row(conn, task_id)["status"] == "completed", timeout=30, message="takeover")
    os.kill(frozen.pid, signal.SIGCONT)
    time.sleep(2)  # the thawed worker tries to write its stale result now
    report = judge(
        Report("frozen worker (SIGSTOP past lease)", faults=1), conn, [task_id], cluster.kills, settings
    )
    assert attempt_history(conn, task_id) == [
        ("lost", frozen_id),
        ("completed", cluster.worker_id(rescuer)),
    ]
    assert task_row(conn, task_id)["worker_id"] == cluster.worker_id(rescuer)
    assert frozen.poll() is None  # it carries on
    assert_passed(report, settings)


def test_graceful_stop_hands_back_and_exits_0(cluster, conn, settings):
    http = cluster.start_api()
    leaving = cluster.start_worker("--concurrency", "2", "--shutdown-grace", "0.5")
    log = submit_many(http, [{"task_type": "sleep", "task_input": {"seconds": 2}} for _ in range(4)])
    leaving_id = cluster.worker_id(leaving)
    wait_until(lambda: cluster.in_flight(leaving_id) == 2, message="two tasks running")
    cluster.kills.append(Kill(leaving_id, cluster.db_now(), cluster.in_flight(leaving_id)))
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(20) == 0
    assert cluster.in_flight(leaving_id) == 0
    cluster.start_worker()
    report = judge(
        Report("graceful stop (SIGTERM, grace 0.5 s)", faults=1),
        conn,
        log.acknowledged,
        cluster.kills,
        settings,
    )
    handed_back = conn.execute(
        "SELECT count(*) AS n FROM task_attempts WHERE outcome = 'handed_back'"
    ).fetchone()["n"]
    assert handed_back == 2
    report.notes = f"{handed_back} handed back"
    assert_passed(report, settings)


# --- the database misbehaving ---------------------------------------------------------------------


class PrivatePostgres:
    """A Postgres of our own (pgserver's binaries) that the test may stop, restart and expose on
    other addresses, without touching any server it did not start."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="skiplock-chaos-pg-"))
        self.pgdata = self.root / "pgdata"
        self.url = embedded.start(self.pgdata, database="skiplock")
        self.socket_dir = conninfo_to_dict(self.url)["host"]
        self.user = "pgserver" if os.geteuid() == 0 else None
        self.listen = ""

    def pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.user, timeout=30)

    def start(self) -> None:
        self.pg_ctl(
            "-w",
            "-o",
            f'-h "{self.listen}"',
            "-o",
            f"-k {self.socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )

    def stop(self) -> None:
        self.pg_ctl("-w", "stop", "-m", "fast")

    def listen_on(self, address: str, network: str) -> None:
        with open(self.pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {network} trust\n")
        self.listen = address
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.pg_ctl("-w", "stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


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


def test_postgres_restart_while_clients_submit(private_cluster, settings):
    cluster, pg = private_cluster
    http = cluster.start_api()
    cluster.start_worker()
    with SubmitLoop(http, {"task_type": "noop", "task_input": None, "max_attempts": 10}) as load:
        time.sleep(1)
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
            [],
            settings,
        )
        report.notes = f"answers {dict(sorted(load.log.codes.items()))}, slowest {load.log.max_latency:.2f} s"
    assert load.log.codes.get(503, 0) > 0  # it was down, and said so
    assert_only_202_and_503(load.log)
    assert_passed(report, settings)


def test_connections_killed_repeatedly(cluster, conn, settings):
    http = cluster.start_api()
    cluster.start_worker()
    cluster.start_worker()
    rounds = 0
    with SubmitLoop(
        http, {"task_type": "sleep", "task_input": {"seconds": 0.02}, "max_attempts": 10}
    ) as load:
        deadline = time.monotonic() + size(4, 15)
        while time.monotonic() < deadline:
            time.sleep(0.3)
            in_flight = conn.execute(
                "SELECT count(*) AS n FROM tasks WHERE status = 'processing'"
            ).fetchone()["n"]
            cluster.kills.append(Kill("*", cluster.db_now(), in_flight))
            cluster.terminate_connections()
            rounds += 1
    report = judge(
        Report("connections killed (pg_terminate_backend)", faults=rounds),
        conn,
        load.log.acknowledged,
        cluster.kills,
        settings,
    )
    report.notes = f"answers {dict(sorted(load.log.codes.items()))}"
    assert_only_202_and_503(load.log)
    assert_passed(report, settings)


def test_lost_wakeups_are_covered_by_polling(cluster, conn, settings):
    """Notifications never arrive (listener killed, then the trigger disabled): tasks still start
    within the poll interval."""
    poll = 0.5
    http = cluster.start_api()
    cluster.start_worker(poll_interval_seconds=poll)
    first = http.request("POST", "/api/submit-task", {"task_type": "noop", "task_input": None})[2]["task_id"]
    wait_until(lambda: task_row(conn, first)["status"] == "completed", message="warm up")
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'skiplock-listener'"
    ).fetchone()["n"]
    assert killed == 1
    conn.execute("ALTER TABLE tasks DISABLE TRIGGER tasks_notify_inserted")
    log = submit_many(http, noop_bodies(size(20, 100)), threads=1)
    report = judge(
        Report("lost wake-ups (listener killed, no NOTIFY)", faults=2), conn, log.acknowledged, [], settings
    )
    waits = conn.execute(
        "SELECT max(extract(epoch FROM started_at - created_at)) AS w FROM tasks WHERE id = ANY(%s)",
        (log.acknowledged,),
    ).fetchone()["w"]
    report.notes = f"slowest pickup {float(waits):.2f} s (poll {poll} s)"
    assert waits <= poll + 0.5
    assert_passed(report, settings)


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
    task_id = http.request(
        "POST", "/api/submit-task", {"task_type": "sleep", "task_input": {"seconds": 1.5}}
    )[2]["task_id"]
    wait_until(
        lambda: task_row(conn, task_id)["worker_id"] == remote_id,
        timeout=20,
        message="the remote worker to claim",
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
    later = submit_many(http, noop_bodies(5)).acknowledged
    report = judge(
        Report("worker host cut off (netns link down)", faults=1),
        conn,
        [task_id, *later],
        cluster.kills,
        settings,
        timeout=60,
    )
    assert attempt_history(conn, task_id) == [
        ("lost", remote_id),
        ("completed", cluster.worker_id(local)),
    ]
    assert {task_row(conn, t)["worker_id"] for t in later} == {remote_id}
    assert remote.poll() is None
    assert_passed(report, settings)


# --- other sessions in the database ----------------------------------------------------------------


def test_long_transaction_and_a_dba_row_lock(cluster, conn, database_url, settings):
    http = cluster.start_api()
    cluster.start_worker()
    locked_task = http.request(
        "POST", "/api/submit-task", {"task_type": "sleep", "task_input": {"seconds": 1}}
    )[2]["task_id"]
    wait_until(lambda: task_row(conn, locked_task)["status"] == "processing", message="processing")
    with psycopg.connect(database_url) as long_tx, psycopg.connect(database_url) as dba:
        long_tx.execute("SELECT txid_current()")  # a transaction left open (holds back vacuum)
        dba.execute("SELECT * FROM tasks WHERE id = %s FOR UPDATE", (locked_task,))  # a DBA's row lock
        others = submit_many(http, noop_bodies(size(300, 3000))).acknowledged
        not_done = wait_all_final(conn, others, timeout=60)
        assert not_done == 0, "the queue stopped flowing behind a locked row"
        assert task_row(conn, locked_task)["status"] == "processing"  # it cannot move while locked
        time.sleep(settings.lease_seconds)  # past its lease, while still locked
        dba.rollback()
        long_tx.rollback()
    report = judge(
        Report("long transaction + DBA row lock", faults=2), conn, [locked_task, *others], [], settings
    )
    assert task_row(conn, locked_task)["status"] == "completed"
    # Its lease lapsed while it was locked: it may have been rescued and run again once.
    report.in_flight_at_kills = 1
    report.verdict = (
        "PASS" if report.extra_executions <= 1 and report.lost == 0 and report.duplicated == 0 else "FAIL"
    )
    assert_passed(report, settings)
