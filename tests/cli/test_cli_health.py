"""`skiplock health` flags due tasks no live worker runs: their type is in no live worker's
registry (task_workers.task_types, written by worker.py at start), or their queue in no live
worker's queues. Workers on record hold a session's advisory lock (tests/live_workers.py); one
test starts a real worker.py to see what it registers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from skiplock.cli import main
from tests.helpers import assert_clean_exit, insert_task, wait_until
from tests.live_workers import serving_worker

pytestmark = pytest.mark.pg_agnostic


@pytest.fixture
def health(database_url):
    """health() -> (exit code, the --json report, stderr) of `skiplock --json health`."""

    def run() -> tuple[int, dict, str]:
        result = CliRunner().invoke(main, ["--json", "health"], env={"DATABASE_URL": database_url})
        assert "Traceback" not in result.output
        return result.exit_code, json.loads(result.stdout), result.stderr

    return run


def test_due_tasks_of_a_type_no_live_worker_runs_make_it_unhealthy(health, database_url, conn):
    insert_task(conn, "resize")
    insert_task(conn, "resize")
    insert_task(conn, "noop")
    with serving_worker(database_url, conn, ["noop", "greet"]):
        code, report, stderr = health()
        assert code == 1
        assert report["unserved"] == [{"task_type": "resize", "queue": "default", "tasks": 2}]
        assert (report["healthy"], report["unserved_tasks"], report["workers"]) == (False, 2, 1)
        [line] = stderr.strip().splitlines()
        assert line.startswith("skiplock: unhealthy: 2 due task(s) of type 'resize' in queue 'default'")
        assert "SKIPLOCK_TASK_MODULES" in line
        with serving_worker(database_url, conn, ["resize"]):  # a second worker runs it
            code, report, _ = health()
            assert (code, report["unserved"], report["healthy"]) == (0, [], True)


def test_the_people_format_counts_them_too(database_url, conn):
    insert_task(conn, "resize")
    with serving_worker(database_url, conn, ["noop"]):
        result = CliRunner().invoke(main, ["health"], env={"DATABASE_URL": database_url})
    assert_clean_exit(result, 1)
    fields = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert fields["unserved_tasks"] == ["1"] and fields["healthy"] == ["no"]


def test_a_queue_no_live_worker_claims_from_counts_as_unserved(health, database_url, conn):
    insert_task(conn, "noop", queue="default")
    insert_task(conn, "noop", queue="mail")
    with serving_worker(database_url, conn, ["noop"], queues=["mail"]):
        code, report, _ = health()
    assert code == 1
    assert report["unserved"] == [{"task_type": "noop", "queue": "default", "tasks": 1}]


def test_only_due_runnable_tasks_count(health, database_url, conn):
    """A task scheduled for later is not stuck (yet); a finished one never is."""
    insert_task(conn, "resize", delay_seconds=3600)
    finished = insert_task(conn, "resize")
    conn.execute("UPDATE tasks SET status = 'cancelled', finished_at = now() WHERE id = %s", (finished,))
    with serving_worker(database_url, conn, ["noop"]):
        code, report, _ = health()
    assert (code, report["unserved"]) == (0, [])


def test_a_worker_that_recorded_no_types_counts_as_running_every_type(health, database_url, conn):
    """Workers started before task types were recorded (the column NULL) raise no false alarm."""
    insert_task(conn, "resize")
    with serving_worker(database_url, conn, None):
        code, report, _ = health()
    assert (code, report["unserved"]) == (0, [])


def test_a_dead_worker_serves_nothing(health, database_url, conn):
    """Its session ended (the process died) and nobody has marked it gone yet: not live."""
    insert_task(conn, "resize")
    with serving_worker(database_url, conn, ["resize"]) as dead:
        pass
    assert conn.execute("SELECT gone_at FROM task_workers WHERE worker_id = %s", (dead,)).fetchone() == {
        "gone_at": None
    }
    with serving_worker(database_url, conn, ["noop"]):
        code, report, _ = health()
    assert report["unserved"] == [{"task_type": "resize", "queue": "default", "tasks": 1}]
    assert code == 1


def test_with_no_live_worker_at_all_the_count_is_workers_zero_not_per_type(health, conn):
    insert_task(conn, "resize")
    code, report, _ = health()
    assert (code, report["unserved"], report["workers"]) == (0, [], 0)


def test_worker_py_registers_the_task_types_it_runs(health, worker_process, conn):
    worker_process(queues=("only-here",))
    wait_until(lambda: conn.execute("SELECT count(*) AS n FROM task_workers").fetchone()["n"] == 1)
    row = conn.execute("SELECT task_types, queues FROM task_workers").fetchone()
    assert {"noop", "greet"} <= set(row["task_types"])  # built-in, and tests.sample_tasks'
    assert row["queues"] == ["only-here"]
    insert_task(conn, "resize", queue="only-here")  # a type no module declares
    insert_task(conn, "greet", {"name": "x"}, queue="elsewhere")  # a queue it does not claim from
    code, report, _ = health()
    assert code == 1
    assert report["unserved"] == [
        {"task_type": "greet", "queue": "elsewhere", "tasks": 1},
        {"task_type": "resize", "queue": "only-here", "tasks": 1},
    ]


def test_a_worker_with_other_task_modules_registers_them(worker_process, conn):
    worker_process(task_modules=())  # the built-in types only
    wait_until(lambda: conn.execute("SELECT count(*) AS n FROM task_workers").fetchone()["n"] == 1)
    types = conn.execute("SELECT task_types FROM task_workers").fetchone()["task_types"]
    assert "noop" in types and "greet" not in types
