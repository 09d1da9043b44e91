"""The worker against a real Postgres: what it runs, in which order, and what happens when tasks
fail, hang, crash, get cancelled, or when the worker itself is stopped or killed."""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import replace

import psutil
import psycopg
import pytest

from skiplock.db import connect_worker
from skiplock.sql.admission import admission_try_lock
from skiplock.sql.claim import task_claim
from skiplock.sql.tasks import task_attempts_list, task_cancel
from skiplock.worker.supervisor import default_worker_id
from tests.helpers import insert_task, spawn_worker, task_row, wait_running, wait_until


def attempts_of(conn, task_id: int) -> list[dict]:
    return task_attempts_list(conn, task_id)


def wait_status(conn, task_id: int, *statuses: str, timeout: float = 20.0) -> dict:
    return wait_until(
        lambda: (row := task_row(conn, task_id))["status"] in statuses and row,
        timeout=timeout,
        message=f"task {task_id} to be {'/'.join(statuses)}",
    )


def child_pids(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


# --- running tasks ---------------------------------------------------------------------------


def test_runs_tasks_and_stores_results_and_history(conn, start_worker):
    default = insert_task(conn, "default", "Some input data")
    primes = insert_task(conn, "primes", {"limit": 100})
    greet = insert_task(conn, "greet", {"name": "Ada"})
    worker = start_worker()

    rows = {t: wait_status(conn, t, "completed") for t in (default, primes, greet)}

    assert rows[default]["result"]["words"] == 3
    assert rows[default]["result"]["reversed"] == "atad tupni emoS"
    assert rows[primes]["result"] == {"limit": 100, "count": 25, "largest": 97}
    assert rows[greet]["result"] == {"greeting": "Hello, Ada!", "attempt": 1}
    for task_id, row in rows.items():
        assert row["progress"] == 1
        assert row["lease_expires_at"] is None
        assert row["worker_id"] == worker.supervisor.worker_id
        assert row["started_at"] <= row["finished_at"]
        [attempt] = attempts_of(conn, task_id)
        assert attempt["outcome"] == "completed"
        assert attempt["worker_id"] == worker.supervisor.worker_id


def test_claims_by_priority_then_age(conn, start_worker):
    low_old = insert_task(conn, "stamp", priority=0)
    high = insert_task(conn, "stamp", priority=10)
    low_new = insert_task(conn, "stamp", priority=0)
    middle = insert_task(conn, "stamp", priority=5)
    start_worker(concurrency=1)

    ran_at = {t: wait_status(conn, t, "completed")["result"]["at"] for t in (low_old, high, low_new, middle)}
    assert sorted(ran_at, key=ran_at.get) == [high, middle, low_old, low_new]


def test_an_idle_worker_is_woken_by_new_tasks_not_by_its_poll(conn, start_worker):
    start_worker(poll_interval_seconds=60)
    wait_until(
        lambda: conn.execute("SELECT count(*) AS n FROM task_waiters").fetchone()["n"] == 1,
        message="the idle worker to register as waiting",
    )
    for _ in range(3):
        submitted = time.monotonic()
        task_id = insert_task(conn, "noop")
        wait_status(conn, task_id, "completed", timeout=30)
        assert time.monotonic() - submitted < 10, "picked up by the 60 s poll, not by NOTIFY"


def test_claims_nothing_until_its_processes_are_ready(conn, settings):
    """A process still importing its task modules cannot run anything: a task claimed for it
    would only sit under this worker's lease. (The module takes 2 s to import.) The worker is a
    real worker.py: task types are declared process-wide as their modules are imported, so an
    in-process worker would add this module's type to every app the test process builds later."""
    task_id = insert_task(conn, "after_slow_import")
    worker = spawn_worker(replace(settings, task_modules=(*settings.task_modules, "tests.slow_start_tasks")))
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert task_row(conn, task_id)["status"] == "pending", "claimed before any process was ready"
            time.sleep(0.05)
        row = wait_status(conn, task_id, "completed")
        assert row["result"] == "ran"
        assert row["attempts"] == 1
    finally:
        worker.terminate()
        assert worker.wait(30) == 0


def test_waits_for_run_at(conn, start_worker):
    task_id = insert_task(conn, "noop", delay_seconds=1.5)
    start_worker()
    time.sleep(0.8)
    assert task_row(conn, task_id)["status"] == "pending"
    row = wait_status(conn, task_id, "completed")
    assert row["started_at"] >= row["run_at"]


def started_late_by(conn, task_id: int) -> float:
    """Seconds between a task's run_at and its latest attempt's start (database clock)."""
    return conn.execute(
        "SELECT extract(epoch FROM started_at - run_at)::float8 AS s FROM tasks WHERE id = %s", (task_id,)
    ).fetchone()["s"]


def test_a_delayed_task_starts_when_due_not_at_the_next_poll(conn, start_worker):
    start_worker(poll_interval_seconds=60)
    wait_until(
        lambda: conn.execute("SELECT count(*) AS n FROM task_waiters").fetchone()["n"] == 1,
        message="the idle worker to register as waiting",
    )
    task_id = insert_task(conn, "noop", delay_seconds=1.0)
    wait_status(conn, task_id, "completed", timeout=30)
    assert 0 <= started_late_by(conn, task_id) < 1.0, "started by the 60 s poll, not when due"


def test_a_retry_starts_after_its_backoff_not_at_the_next_poll(conn, start_worker):
    # Backoff 1 s (+-25%), poll 60 s: without a due-time wake-up the retry would wait a minute.
    start_worker(poll_interval_seconds=60, retry_backoff_base_seconds=1.0, retry_backoff_max_seconds=1.0)
    task_id = insert_task(conn, "fail", {"times": 1})
    row = wait_status(conn, task_id, "completed", timeout=30)
    assert row["result"] == {"succeeded_on_attempt": 2}
    assert [a["outcome"] for a in attempts_of(conn, task_id)] == ["failed", "completed"]
    assert 0 <= started_late_by(conn, task_id) < 1.0, "retried by the 60 s poll, not when due"


def test_reports_progress_while_running(conn, start_worker):
    task_id = insert_task(conn, "sleep", {"seconds": 3})
    start_worker()
    seen = wait_until(
        lambda: (p := task_row(conn, task_id)["progress"]) is not None and 0 < p < 1 and p,
        message="partial progress",
    )
    assert 0 < seen < 1
    assert wait_status(conn, task_id, "completed")["progress"] == 1


def test_queue_filter(conn, start_worker):
    mine = insert_task(conn, "noop", queue="reports")
    other = insert_task(conn, "noop", queue="emails")
    start_worker(queues=("reports",))
    wait_status(conn, mine, "completed")
    time.sleep(0.5)
    assert task_row(conn, other)["status"] == "pending"


# --- failures ----------------------------------------------------------------------------------


def test_retries_with_backoff_then_succeeds(conn, start_worker):
    task_id = insert_task(conn, "fail", {"times": 2, "message": "flaky"}, max_attempts=3)
    start_worker(retry_backoff_base_seconds=0.2, retry_backoff_max_seconds=1)

    row = wait_status(conn, task_id, "completed")

    assert row["result"] == {"succeeded_on_attempt": 3}
    assert row["attempts"] == 3
    assert row["error"] is None
    history = attempts_of(conn, task_id)
    assert [a["outcome"] for a in history] == ["failed", "failed", "completed"]
    assert history[0]["error"] == "TaskFailed: flaky"
    # Exponential backoff: >= 0.75 * 0.2 s after the 1st failure, >= 0.75 * 0.4 s after the 2nd.
    gap1 = (history[1]["started_at"] - history[0]["finished_at"]).total_seconds()
    gap2 = (history[2]["started_at"] - history[1]["finished_at"]).total_seconds()
    assert gap1 >= 0.15
    assert gap2 >= 0.3


def test_fails_for_good_after_max_attempts(conn, start_worker):
    task_id = insert_task(conn, "fail", {"times": 10, "message": "always"}, max_attempts=2)
    start_worker()

    row = wait_status(conn, task_id, "failed")

    assert row["attempts"] == 2
    assert row["error"] == "TaskFailed: always"
    assert "Traceback" in row["error_traceback"]
    assert row["finished_at"] is not None
    assert [a["outcome"] for a in attempts_of(conn, task_id)] == ["failed", "failed"]


def test_invalid_stored_input_fails_the_attempt(conn, start_worker):
    # The API validates input; a row inserted by hand may not be valid.
    task_id = insert_task(conn, "primes", {"limit": "lots"}, max_attempts=1)
    start_worker()
    row = wait_status(conn, task_id, "failed")
    assert row["error"].startswith("ValidationError")


def test_unknown_task_type_is_left_for_a_worker_that_knows_it(conn, start_worker):
    unknown = insert_task(conn, "not_installed_here", {})
    known = insert_task(conn, "noop")
    start_worker()
    wait_status(conn, known, "completed")
    time.sleep(0.5)
    assert task_row(conn, unknown)["status"] == "pending"
    assert task_row(conn, unknown)["attempts"] == 0


def test_hung_task_is_killed_at_its_timeout_and_its_slot_reused(conn, start_worker):
    hung = insert_task(conn, "hang", timeout_seconds=1, max_attempts=1)
    start_worker(concurrency=1)
    row = wait_status(conn, hung, "failed", timeout=10)

    [attempt] = attempts_of(conn, hung)
    assert attempt["outcome"] == "timed_out"
    assert "timed out after 1 s" in row["error"]
    ran_for = (attempt["finished_at"] - attempt["started_at"]).total_seconds()
    assert 1 <= ran_for < 3
    after = insert_task(conn, "noop")
    wait_status(conn, after, "completed")


def test_crashing_task_fails_its_attempts_and_others_still_run(conn, start_worker):
    crash = insert_task(conn, "crash", None, max_attempts=2)
    normal = [insert_task(conn, "noop") for _ in range(20)]
    start_worker()

    row = wait_status(conn, crash, "failed")
    for task_id in normal:
        wait_status(conn, task_id, "completed")

    history = attempts_of(conn, crash)
    assert [a["outcome"] for a in history] == ["crashed", "crashed"]
    assert "killed by SIGSEGV" in row["error"]


def test_task_process_killed_from_outside_is_retried(conn, start_worker):
    task_id = insert_task(conn, "sleep", {"seconds": 30}, max_attempts=2)
    worker = start_worker(concurrency=1)
    wait_running(conn, task_id)
    [slot] = worker.supervisor.slots
    os.kill(slot.process.pid, signal.SIGKILL)

    wait_until(lambda: len(attempts_of(conn, task_id)) == 1, message="crashed attempt recorded")
    [attempt] = attempts_of(conn, task_id)
    assert attempt["outcome"] == "crashed"
    assert "SIGKILL" in attempt["error"]
    row = wait_running(conn, task_id)
    assert row["attempts"] == 2
    task_cancel(conn, task_id)


# --- cancellation ------------------------------------------------------------------------------


def test_cancelling_a_running_task_stops_it(conn, start_worker):
    long = insert_task(conn, "sleep", {"seconds": 60})
    worker = start_worker(concurrency=1)
    wait_running(conn, long)
    [slot] = worker.supervisor.slots
    pid_before = slot.process.pid

    task_cancel(conn, long)
    after = insert_task(conn, "pid")

    row = wait_status(conn, after, "completed", timeout=10)
    assert row["result"]["pid"] != pid_before  # the process that ran the sleep was replaced
    assert not psutil.pid_exists(pid_before) or psutil.Process(pid_before).status() == "zombie"
    assert task_row(conn, long)["status"] == "cancelled"
    assert [a["outcome"] for a in attempts_of(conn, long)] == ["cancelled"]


# --- leases ------------------------------------------------------------------------------------


def test_leases_are_renewed_for_tasks_longer_than_the_lease(conn, start_worker):
    # Lease 1 s, task 3 s, and a second worker running rescue duty all along.
    task_id = insert_task(conn, "sleep", {"seconds": 3})
    start_worker(lease_seconds=1.0)
    wait_running(conn, task_id)
    start_worker(lease_seconds=1.0, rescue_interval_seconds=0.2)

    row = wait_status(conn, task_id, "completed")

    assert row["attempts"] == 1
    assert [a["outcome"] for a in attempts_of(conn, task_id)] == ["completed"]


def test_results_waiting_to_be_written_keep_their_leases(conn, start_worker):
    """The result writer is busy with one slow write (a test trigger sleeps 3 s while task A is
    stored); task B finishes meanwhile and its result waits its turn, longer than the 1 s lease.
    Its lease must still be renewed: a rival worker's rescue duty must not run B again."""
    slow = insert_task(conn, "noop")
    waiting = insert_task(conn, "sleep", {"seconds": 0.3})
    conn.execute(
        f"""
        CREATE FUNCTION slow_completion() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id = {slow} AND NEW.status = 'completed' THEN PERFORM pg_sleep(3); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER slow_completion BEFORE UPDATE ON tasks
            FOR EACH ROW EXECUTE FUNCTION slow_completion();
        """
    )
    start_worker(lease_seconds=1.0)
    # Claimed, not necessarily marked started: the writer is stuck in the slow write.
    wait_status(conn, waiting, "processing")
    start_worker(lease_seconds=1.0, rescue_interval_seconds=0.2)

    for task_id in (slow, waiting):
        row = wait_status(conn, task_id, "completed", timeout=30)
        assert row["attempts"] == 1, f"task {task_id} ran again: {attempts_of(conn, task_id)}"
        assert [a["outcome"] for a in attempts_of(conn, task_id)] == ["completed"]


def test_worker_killed_mid_task_is_rescued_by_another_without_waiting_for_its_lease(
    conn, worker_process, start_worker, settings
):
    """SIGKILL closes the worker's connections: its session ends, and another worker's rescue
    duty takes its task back within a rescue interval (plus the grace for reconnections), long
    before the 30 s lease would lapse."""
    task_id = insert_task(conn, "sleep", {"seconds": 2})
    victim = worker_process("--concurrency", "1", lease_seconds=30)
    row = wait_running(conn, task_id)
    victim_id = row["worker_id"]
    children = child_pids(victim.pid)
    assert children, "the worker runs tasks in child processes"
    rescuer = start_worker(lease_seconds=30)
    wait_until(
        lambda: conn.execute("SELECT count(*) AS n FROM task_workers").fetchone()["n"] == 2,
        message="both workers registered",
    )

    killed_at = conn.execute("SELECT now() AS t").fetchone()["t"]
    victim.kill()  # SIGKILL: no chance to hand anything back
    victim.wait(5)
    # Its task processes die with it instead of finishing work nobody will record.
    wait_until(lambda: not any(psutil.pid_exists(p) for p in children), timeout=5, message="orphans to die")

    row = wait_status(conn, task_id, "completed", timeout=20)

    assert row["worker_id"] == rescuer.supervisor.worker_id
    history = attempts_of(conn, task_id)
    assert [(a["outcome"], a["worker_id"]) for a in history] == [
        ("lost", victim_id),
        ("completed", rescuer.supervisor.worker_id),
    ]
    assert "died" in history[0]["error"]
    rescued_after = (history[0]["finished_at"] - killed_at).total_seconds()
    assert rescued_after <= settings.rescue_interval_seconds + 1.0, rescued_after
    # Its registration is gone too, once it held nothing.
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) AS n FROM task_workers WHERE worker_id = %s", (victim_id,)
            ).fetchone()["n"]
            == 0
        ),
        message="the dead worker's row to be forgotten",
    )


def test_frozen_worker_is_fenced_out_after_takeover(conn, worker_process, start_worker):
    task_id = insert_task(conn, "sleep", {"seconds": 1.5}, max_attempts=3)
    # Frozen between two statements of a transaction (its admission, say: a few times in 40),
    # its session is ended after 5 x db_timeout (below); until then its locks are held.
    frozen = worker_process("--concurrency", "1", lease_seconds=1.0, db_timeout_seconds=0.5)
    wait_running(conn, task_id)
    frozen_id = task_row(conn, task_id)["worker_id"]
    os.kill(frozen.pid, signal.SIGSTOP)  # the supervisor freezes; its child keeps running
    try:
        rescuer = start_worker(lease_seconds=5.0)
        row = wait_status(conn, task_id, "completed", timeout=20)
        assert row["worker_id"] == rescuer.supervisor.worker_id
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Give the thawed worker time to try writing its stale result.
    time.sleep(1.5)
    final = task_row(conn, task_id)
    assert final["worker_id"] == rescuer.supervisor.worker_id
    assert final["attempts"] == 2
    outcomes = [(a["outcome"], a["worker_id"]) for a in attempts_of(conn, task_id)]
    assert outcomes == [("lost", frozen_id), ("completed", rescuer.supervisor.worker_id)]


def test_a_worker_stalled_inside_a_transaction_loses_its_session_and_its_locks(conn, settings, start_worker):
    """A worker frozen between two statements of its admission kept the admission lock, and
    with it every other worker's admissions (a delayed task, a retry, a limited task never got
    its turn), for as long as it stayed frozen. The server now ends such a session once it has
    sat in its transaction as long as a statement may run (5 x db_timeout)."""
    stalled = connect_worker(settings.database_url, timeout_seconds=0.2)  # ended after 1 s idle
    try:
        stalled.execute("BEGIN")
        assert admission_try_lock(stalled)
        task_id = insert_task(conn, "noop", delay_seconds=0.3)  # runnable once admission promotes it
        start_worker()
        assert wait_status(conn, task_id, "completed", timeout=15)["attempts"] == 1
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            stalled.execute("SELECT 1")
    finally:
        stalled.close()


# --- stopping ----------------------------------------------------------------------------------


def test_sigterm_lets_running_tasks_finish_and_exits_0(conn, worker_process):
    tasks = [insert_task(conn, "sleep", {"seconds": 1}) for _ in range(2)]
    later = [insert_task(conn, "noop", delay_seconds=3) for _ in range(3)]
    proc = worker_process("--concurrency", "2")
    for task_id in tasks:
        wait_running(conn, task_id)

    proc.send_signal(signal.SIGTERM)

    assert proc.wait(15) == 0
    for task_id in tasks:
        assert task_row(conn, task_id)["status"] == "completed"
    for task_id in later:  # no new claims after SIGTERM
        assert task_row(conn, task_id)["status"] == "pending"
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'processing'").fetchone()["n"] == 0


def test_sigterm_hands_back_tasks_that_outlive_the_grace_period(conn, worker_process):
    task_id = insert_task(conn, "sleep", {"seconds": 60})
    proc = worker_process("--concurrency", "1", "--shutdown-grace", "0.5")
    wait_running(conn, task_id)

    proc.send_signal(signal.SIGTERM)

    assert proc.wait(15) == 0
    row = task_row(conn, task_id)
    assert row["status"] == "pending"
    assert row["attempts"] == 0  # a handed-back attempt does not count
    assert row["lease_expires_at"] is None
    assert [a["outcome"] for a in attempts_of(conn, task_id)] == ["handed_back"]


def test_reconnects_after_its_connections_are_killed(conn, start_worker):
    first = insert_task(conn, "noop")
    start_worker()
    wait_status(conn, first, "completed")

    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'skiplock-%%' AND pid <> pg_backend_pid()"
    ).fetchone()["n"]
    assert killed >= 2  # the statement connection and the listener

    second = insert_task(conn, "noop")
    wait_status(conn, second, "completed", timeout=10)


def test_a_reconnected_worker_gives_back_at_once_what_it_holds_unknowingly(conn, start_worker):
    """A task the database shows as processing under a worker that knows nothing of it (after a
    failover that lost the last WAL, its outcome went to the old primary; here, a claim made in
    its name whose answer it never saw): once the worker has a new session, it ends the lease at
    once and the task runs, instead of waiting out the lease (30 s here)."""
    worker = start_worker(lease_seconds=30.0)
    warm = insert_task(conn, "noop")
    wait_status(conn, warm, "completed")
    with conn.transaction():  # the worker cannot claim it first: it is processing at commit
        task_id = insert_task(conn, "noop")
        [claimed] = task_claim(conn, worker_id=worker.supervisor.worker_id, limit=1, lease_seconds=30.0)
    assert claimed.id == task_id

    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'skiplock-%%' AND pid <> pg_backend_pid()"
    )

    row = wait_status(conn, task_id, "completed", timeout=10)
    assert row["attempts"] == 1  # it had not started: given back uncounted
    assert [a["outcome"] for a in attempts_of(conn, task_id)] == ["released", "completed"]


@pytest.mark.parametrize("bad", [["--concurrency", "0"]])
def test_cli_rejects_bad_options(settings, bad):
    from tests.helpers import spawn_worker

    proc = spawn_worker(settings, *bad, stderr=-1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"--concurrency" in err


def test_prunes_idempotency_keys_past_their_window(conn, start_worker):
    for key, age in (("old", "2 hours"), ("fresh", "1 second")):
        conn.execute(
            "INSERT INTO task_idempotency_keys (idempotency_key, request_sha256, status_code, response, task_ids, created_at) "
            "VALUES (%s, sha256(''), 202, '{}', '{}', now() - %s::interval)",
            (key, age),
        )
    start_worker(idempotency_ttl_seconds=3600, prune_interval_seconds=0.2)
    wait_until(
        lambda: (
            [r["idempotency_key"] for r in conn.execute("SELECT idempotency_key FROM task_idempotency_keys")]
            == ["fresh"]
        ),
        message="the expired key forgotten, the fresh one kept",
    )


def test_prunes_finished_tasks_past_retention_and_nothing_else(conn, start_worker):
    done = insert_task(conn, "noop")
    failed = insert_task(conn, "fail", {"times": 5}, max_attempts=1)
    later = insert_task(conn, "noop", delay_seconds=60)  # pending: never pruned
    start_worker(retention_seconds=1.0, prune_interval_seconds=0.2)
    wait_status(conn, done, "completed")
    wait_until(
        lambda: (
            conn.execute("SELECT count(*) AS n FROM tasks WHERE id = ANY(%s)", ([done, failed],)).fetchone()[
                "n"
            ]
            == 0
        ),
        message="finished tasks pruned",
    )
    assert task_row(conn, later)["status"] == "pending"
    assert conn.execute("SELECT count(*) AS n FROM task_attempts").fetchone()["n"] == 0


def test_a_busy_worker_does_not_spin(conn, worker_process):
    """With every process busy, and while stopping, the supervisor sleeps between events."""
    tasks = [insert_task(conn, "sleep", {"seconds": 4}) for _ in range(2)]
    proc = worker_process("--concurrency", "2")
    for task_id in tasks:
        wait_running(conn, task_id)
    supervisor = psutil.Process(proc.pid)

    def cpu_seconds_over(interval: float) -> float:
        before = sum(supervisor.cpu_times()[:2])
        time.sleep(interval)
        return sum(supervisor.cpu_times()[:2]) - before

    assert cpu_seconds_over(1.0) < 0.2  # busy: every process has a task
    proc.send_signal(signal.SIGTERM)
    assert cpu_seconds_over(1.0) < 0.2  # stopping: waiting out the grace period
    assert proc.wait(15) == 0


def test_cancelling_a_task_queued_behind_another_in_a_batch_stops_it(conn, start_worker):
    # Teach the worker that `stamp` is short, so that stamps travel in batches.
    warm = [insert_task(conn, "stamp") for _ in range(3)]
    worker = start_worker(concurrency=1)
    for task_id in warm:
        wait_status(conn, task_id, "completed")
    first = insert_task(conn, "sleep", {"seconds": 1})
    wait_running(conn, first)
    queued = [insert_task(conn, "stamp") for _ in range(3)]
    wait_until(lambda: all(task_row(conn, t)["status"] == "processing" for t in queued), message="claimed")
    task_cancel(conn, queued[1])
    for task_id in (first, queued[0], queued[2]):
        wait_status(conn, task_id, "completed")
    assert task_row(conn, queued[1])["status"] == "cancelled"
    # It never started: its attempt is released, not counted.
    assert [a["outcome"] for a in attempts_of(conn, queued[1])] == ["released"]
    assert task_row(conn, queued[1])["attempts"] == 0
    assert worker.supervisor.counters["fenced_out"] == 0  # it never ran, so nothing was written


def test_worker_ids_are_unique_even_for_the_same_host_and_pid():
    """Fencing trusts the worker id: two workers on one host network, each pid 1 in its own
    container, must not share one. Here: two ids drawn in one process."""
    first, second = default_worker_id(), default_worker_id()
    assert first != second
    assert first.rsplit(":", 1)[0] == second.rsplit(":", 1)[0] == f"{socket.gethostname()}:{os.getpid()}"
