"""The `skiplock` command's task and operator commands (submit, status, result, list, retry,
cancel, queues, pause, resume, prune, health, schema apply, worker) against a real Postgres.

Most run in-process through click's CliRunner. What must be refused before the database is
touched runs against an unreachable database: a command that tried to connect would exit 3.
A real worker (tests/conftest.py's start_worker) runs `submit --wait` and obeys `pause`; the
installed script runs as a subprocess, `skiplock worker` included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

from skiplock.cli import main
from skiplock.db import connect
from skiplock.sql.claim import task_claim
from skiplock.sql.operations import task_queues_paused
from skiplock.sql.tasks import task_cancel
from tests.helpers import (
    ROOT,
    SCRIPT,
    STATUS_FIELDS,
    UNREACHABLE_DB,
    assert_clean_exit,
    free_port,
    insert_task,
    new_database_name,
    ok,
    settings_env,
    table_rows,
    task_row,
    wait_until,
)

# The same on every Postgres version: CI runs it against one Postgres only (.ci/run).
pytestmark = pytest.mark.pg_agnostic

# The test task types (greet: {"name"}, max_attempts 2, timeout 10 s) next to the built-in ones.
TASK_ENV = {"SKIPLOCK_TASK_MODULES": "tests.sample_tasks", "SKIPLOCK_ALLOW_CRASH": "0"}


def invoke(database_url: str, *args: str, env: dict | None = None, input: str | None = None):
    return CliRunner().invoke(
        main, list(args), env={"DATABASE_URL": database_url, **TASK_ENV, **(env or {})}, input=input
    )


@pytest.fixture
def cli(database_url):
    """cli(*args, env=None, input=None) -> click's Result of `skiplock *args` on the test database."""
    return lambda *args, **kw: invoke(database_url, *args, **kw)


def offline(*args: str, env: dict | None = None):
    """`skiplock *args` against a database that cannot be reached."""
    return invoke(UNREACHABLE_DB, *args, env=env)


def refused(result, code: int, *needles: str) -> str:
    """Ended with `code`, nothing on stdout, one line on stderr naming what was wrong."""
    assert_clean_exit(result, code)
    assert result.stdout == ""
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("skiplock: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def submit_json(cli, *args: str) -> dict:
    return json.loads(ok(cli("--json", "submit", *args)))


def finish(conn, task_id: int, status: str = "completed", result=None, error: str | None = None) -> None:
    """End a task by hand, as a worker would have."""
    conn.execute(
        "UPDATE tasks SET status = %s::task_status, result = %s, error = %s, finished_at = now() WHERE id = %s",
        (status, psycopg.types.json.Jsonb(result) if result is not None else None, error, task_id),
    )


# --- submit ------------------------------------------------------------------------------------


def test_submit_stores_the_task_with_the_types_defaults(cli, conn):
    out = ok(cli("submit", "greet", '{"name": "Ada"}'))
    header, rows = table_rows(out)
    assert header == [
        "TASK_ID",
        "TASK_TYPE",
        "QUEUE",
        "STATUS",
        "PRIORITY",
        "ATTEMPTS",
        "MAX_ATTEMPTS",
        "RUN_AT",
    ]
    (row,) = rows
    stored = task_row(conn, int(row[0]))
    assert row[1:7] == ["greet", "default", "pending", "0", "0", "2"]
    assert (stored["input"], stored["queue"], stored["priority"]) == ({"name": "Ada"}, "default", 0)
    assert (stored["max_attempts"], stored["timeout_seconds"], stored["owner_key_id"]) == (2, 10, None)


def test_submit_with_every_option_and_json(cli, conn):
    created = submit_json(
        cli, "greet", '{"name": "Bo"}', "--queue", "reports", "--priority", "7", "--delay", "60",
        "--max-attempts", "5", "--timeout", "99",
    )  # fmt: skip
    assert set(created) == STATUS_FIELDS
    assert (created["status"], created["queue"], created["priority"]) == ("pending", "reports", 7)
    stored = task_row(conn, created["task_id"])
    assert (stored["max_attempts"], stored["timeout_seconds"]) == (5, 99)
    assert 59 <= (stored["run_at"] - stored["created_at"]).total_seconds() <= 61
    # '-' reads the input from stdin; the JSON flag may follow the subcommand.
    piped = json.loads(ok(cli("submit", "default", "-", "--json", input='{"from": ["stdin"]}')))
    assert task_row(conn, piped["task_id"])["input"] == {"from": ["stdin"]}


VALID = ("greet", '{"name": "x"}')


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("greet", "{name: Ada}"), 2, "not JSON"),
        (("default", "hello"), 2, "quote a string"),
        (("default", "NaN"), 2, "NaN is not JSON"),
        (("default", "[1e400]"), 1, "finite"),
        (("default", '"a\\u0000b"'), 1, "NUL"),
        (("default", "[" * 150 + "]" * 150), 1, "nested deeper than 100"),
        (
            ("nosuchtype", "{}"),
            1,
            "unknown task type 'nosuchtype'; known types: add, clock, default, fail, greet",
        ),
        (("crash", "null"), 1, "unknown task type 'crash'"),  # registered only with SKIPLOCK_ALLOW_CRASH=1
        (("greet", '{"name": ""}'), 1, "refused by greet's schema"),
        (("greet", "{}"), 1, "Missing data for required field"),
        (("greet", '{"name": "x", "extra": 1}'), 1, "Unknown field"),
        (("primes", '{"limit": "ten"}'), 1, "refused by primes's schema"),
        (("sleep", "[]"), 1, "Invalid input type"),
        ((*VALID, "--queue", "no spaces"), 2, None),
        ((*VALID, "--priority", "1000001"), 2, None),
        ((*VALID, "--priority", "high"), 2, None),
        ((*VALID, "--delay", "-1"), 2, None),
        ((*VALID, "--max-attempts", "0"), 2, None),
        ((*VALID, "--max-attempts", "101"), 2, None),
        ((*VALID, "--timeout", "0"), 2, None),
        ((*VALID, "--wait-timeout", "0"), 2, None),
        (("greet",), 2, None),
    ],
    ids=lambda v: " ".join(v)[:40] if isinstance(v, tuple) else str(v),
)
def test_submit_refuses_bad_input_before_touching_the_database(args, code, needle):
    result = offline("submit", *args)
    if code == 1:
        refused(result, 1, needle)
    else:
        assert_clean_exit(result, 2)
        assert result.stdout == "" and "Error" in result.stderr
        assert needle is None or needle in result.stderr


def test_submit_follows_the_task_settings_of_the_environment():
    # Control: a valid input does try the database (so the refusals above came before it).
    refused(offline("submit", *VALID), 3, "cannot reach the database")
    refused(offline("submit", "crash", "null", env={"SKIPLOCK_ALLOW_CRASH": "1"}), 3)
    result = offline("submit", "noop", "null", env={"SKIPLOCK_TASK_MODULES": "no_such_module"})
    assert_clean_exit(result, 2)
    assert "no_such_module" in result.stderr and "Traceback" not in result.output
    assert_clean_exit(offline("submit", "noop", "null", env={"SKIPLOCK_RETENTION_SECONDS": "soon"}), 2)


# --- status, result, list ----------------------------------------------------------------------


def test_status_and_result_through_a_tasks_life(cli, conn):
    task_id = submit_json(cli, "greet", '{"name": "Cy"}')["task_id"]
    shown = ok(cli("status", str(task_id)))
    assert {line.split()[0]: line.split()[1:] for line in shown.splitlines()}["status"] == ["pending"]
    status = json.loads(ok(cli("status", str(task_id), "--json")))
    assert set(status) == STATUS_FIELDS and status["status"] == "pending" and status["result"] is None
    refused(cli("result", str(task_id)), 1, f"task {task_id} is pending: it has no result yet")

    finish(conn, task_id, result={"greeting": "Hello, Cy!"})
    assert json.loads(ok(cli("result", str(task_id)))) == {"greeting": "Hello, Cy!"}
    assert json.loads(ok(cli("--json", "result", str(task_id)))) == {
        "task_id": task_id,
        "result": {"greeting": "Hello, Cy!"},
    }
    assert json.loads(ok(cli("--json", "status", str(task_id))))["result"] == {"greeting": "Hello, Cy!"}

    failed = insert_task(conn, "greet", {"name": "Di"})
    finish(conn, failed, "failed", error="boom\n  on two lines")
    refused(cli("result", str(failed)), 1, f"task {failed} failed: boom on two lines")
    assert json.loads(ok(cli("--json", "status", str(failed))))["error"] == "boom\n  on two lines"
    cancelled = insert_task(conn, "noop")
    ok(cli("cancel", str(cancelled)))
    refused(cli("--json", "result", str(cancelled)), 1, "was cancelled")


def test_unknown_and_pruned_ids_exit_1_with_one_line(cli, conn):
    gone = insert_task(conn, "noop")
    conn.execute("DELETE FROM tasks WHERE id = %s", (gone,))
    for command in ("status", "result", "retry", "cancel"):
        refused(cli(command, "999999"), 1, "Task 999999 does not exist.")
        refused(cli("--json", command, str(gone)), 1, f"Task {gone} no longer exists", "retention period")


def test_list_filters_and_pages(cli, conn):
    assert ok(cli("list")).strip() == "(none)"
    assert json.loads(ok(cli("list", "--json"))) == {"tasks": [], "next_before": None}
    ids = [
        insert_task(conn, "noop", queue="mail"),
        insert_task(conn, "greet", {"name": "a"}, queue="mail"),
        insert_task(conn, "noop", queue="reports"),
        insert_task(conn, "noop", queue="mail"),
    ]
    ok(cli("cancel", str(ids[3])))
    header, rows = table_rows(ok(cli("list")))
    assert header[:4] == ["TASK_ID", "TASK_TYPE", "QUEUE", "STATUS"] and header[-2:] == [
        "CREATED_AT",
        "FINISHED_AT",
    ]
    assert [int(r[0]) for r in rows] == ids[::-1]

    def listed(*args: str) -> list[int]:
        return [t["task_id"] for t in json.loads(ok(cli("--json", "list", *args)))["tasks"]]

    assert listed("--queue", "mail") == [ids[3], ids[1], ids[0]]
    assert listed("--type", "greet") == [ids[1]]
    assert listed("--status", "cancelled") == [ids[3]]
    assert listed("--status", "pending", "--queue", "mail", "--type", "noop") == [ids[0]]
    page = json.loads(ok(cli("--json", "list", "--limit", "2")))
    assert [t["task_id"] for t in page["tasks"]] == [ids[3], ids[2]] and page["next_before"] == ids[2]
    assert set(page["tasks"][0]) == STATUS_FIELDS
    assert listed("--limit", "2", "--before", str(page["next_before"])) == [ids[1], ids[0]]
    result = cli("list", "--limit", "3")
    assert len(table_rows(ok(result))[1]) == 3 and f"--before {ids[1]}" in result.stderr
    assert json.loads(ok(cli("--json", "list", "--before", str(ids[0]))))["next_before"] is None


# --- retry, cancel -----------------------------------------------------------------------------


def test_cancel_and_retry_and_their_wrong_states(cli, conn):
    task_id = insert_task(conn, "noop")
    header, rows = table_rows(ok(cli("cancel", str(task_id))))
    assert header[:4] == ["TASK_ID", "TASK_TYPE", "QUEUE", "STATUS"] and rows[0][3] == "cancelled"
    assert task_row(conn, task_id)["status"] == "cancelled"
    refused(cli("cancel", str(task_id)), 1, f"Task {task_id} is cancelled; it cannot be cancelled.")

    retried = json.loads(ok(cli("--json", "retry", str(task_id))))
    assert (retried["task_id"], retried["status"]) == (task_id, "pending")
    assert task_row(conn, task_id)["status"] == "pending"
    refused(cli("retry", str(task_id)), 1, f"Task {task_id} is pending; it cannot be retried.")
    finish(conn, task_id, result=1)
    refused(cli("--json", "cancel", str(task_id)), 1, "is completed; it cannot be cancelled")
    assert task_row(conn, task_id)["status"] == "completed"


# --- queues, pause, resume ---------------------------------------------------------------------


def test_queues_pause_and_resume(cli, conn):
    assert ok(cli("queues")).strip() == "(none)"
    insert_task(conn, "noop", queue="mail")
    insert_task(conn, "noop", queue="mail", delay_seconds=600)
    header, rows = table_rows(ok(cli("queues")))
    assert header == [
        "QUEUE", "PAUSED", "DUE", "WAITING_ON_LIMIT", "SCHEDULED", "RESERVED", "RUNNING",
        "OLDEST_DUE_WAIT_SECONDS", "EXPIRED_LAST_HOUR", "MAX_RUNNING",
    ]  # fmt: skip
    assert rows[0][:7] == ["mail", "no", "1", "0", "1", "0", "0"]
    assert rows[0][-2:] == ["0", "-"]

    header, rows = table_rows(ok(cli("pause", "mail")))
    assert header == ["QUEUE", "PAUSED", "CHANGED_AT", "CHANGED_BY", "RELEASED"]
    assert (rows[0][:2], rows[0][3:]) == (["mail", "yes"], ["skiplock-cli", "0"])
    paused = json.loads(ok(cli("--json", "pause", "idle")))  # a queue needs no tasks to be paused
    assert (paused["queue"], paused["paused"], paused["changed_by"]) == ("idle", True, "skiplock-cli")
    assert task_queues_paused(conn) == ["idle", "mail"]
    summary = {q["queue"]: q for q in json.loads(ok(cli("queues", "--json")))}
    assert (summary["mail"]["paused"], summary["mail"]["due"], summary["idle"]["paused"]) == (True, 1, True)

    resumed = json.loads(ok(cli("resume", "mail", "--json")))
    assert (resumed["paused"], "notified" in resumed) == (False, False)
    assert task_queues_paused(conn) == ["idle"]


def test_pause_stops_a_real_worker_and_resume_restarts_it(cli, conn, start_worker):
    worker = start_worker()
    ok(cli("pause", "slow"))
    # The worker reads the paused queues at its claims, at most once a second.
    wait_until(lambda: "slow" in worker.supervisor.queues.paused, timeout=10, message="the pause seen")
    held = submit_json(cli, "noop", "null", "--queue", "slow")["task_id"]
    passed = submit_json(cli, "noop", "null")["task_id"]
    wait_until(lambda: task_row(conn, passed)["status"] == "completed", message="the other queue served")
    time.sleep(0.5)  # several polls (0.2 s) and claims later
    assert task_row(conn, held)["status"] == "pending"

    ok(cli("resume", "slow"))
    resumed_at = time.monotonic()
    wait_until(lambda: task_row(conn, held)["status"] == "completed", timeout=10, message="the resumed queue")
    assert time.monotonic() - resumed_at < 5  # within a paused-queue refresh (1 s), not a timeout


# --- submit --wait -----------------------------------------------------------------------------


def test_submit_wait_prints_the_result_of_a_real_worker(cli, conn, database_url, start_worker):
    start_worker()
    result = cli("submit", "greet", '{"name": "Ada"}', "--wait", "--wait-timeout", "30")
    assert json.loads(ok(result)) == {"greeting": "Hello, Ada!", "attempt": 1}
    final = json.loads(ok(cli("--json", "submit", "greet", '{"name": "Bo"}', "--wait")))
    assert (final["status"], final["result"]["greeting"], final["attempts"]) == ("completed", "Hello, Bo!", 1)

    failed = cli("submit", "fail", '{"times": 5, "message": "no luck"}', "--max-attempts", "1", "--wait")
    line = refused(failed, 1, "failed: TaskFailed: no luck")
    task_id = int(line.split()[2])
    assert task_row(conn, task_id)["status"] == "failed"
    failed_json = cli("--json", "submit", "fail", '{"message": "again"}', "--max-attempts", "1", "--wait")
    assert_clean_exit(failed_json, 1)
    ended = json.loads(failed_json.stdout)  # the task as it ended, for scripts
    assert (ended["status"], ended["error"], ended["result"]) == ("failed", "TaskFailed: again", None)

    slow = cli("submit", "sleep", '{"seconds": 30}', "--wait-timeout", "0.5")
    line = refused(slow, 4, "after 0.5 s; it carries on")
    slow_id = int(line.split()[2])
    assert task_row(conn, slow_id)["status"] in ("pending", "processing")
    ok(cli("cancel", str(slow_id)))  # the worker stops it

    def cancel_when_submitted():
        with connect(database_url, role="test") as other:
            found = wait_until(
                lambda: other.execute(
                    "SELECT id FROM tasks WHERE status = 'pending' AND run_at > now() + interval '30 s'"
                ).fetchone(),
                message="the delayed task",
            )
            task_cancel(other, found["id"])

    canceller = threading.Thread(target=cancel_when_submitted)
    canceller.start()
    cancelled = cli("submit", "noop", "null", "--delay", "60", "--wait", "--wait-timeout", "20")
    canceller.join()
    refused(cancelled, 1, "was cancelled")


# --- prune -------------------------------------------------------------------------------------


def test_prune_deletes_only_old_finished_tasks_in_batches(cli, conn):
    conn.execute(
        """
        INSERT INTO tasks (task_type, input, status, finished_at)
        SELECT 'noop', 'null', 'completed', now() - interval '2 days' FROM generate_series(1, 2100)
        """
    )
    old_failed = insert_task(conn, "noop")
    old_cancelled = insert_task(conn, "noop")
    recent = insert_task(conn, "noop")
    scheduled = insert_task(conn, "noop", delay_seconds=3600)
    processing = insert_task(conn, "noop")
    conn.execute("INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error) "
                 "VALUES (%s, 1, 'w', 'failed', now() - interval '2 days', 'x')", (old_failed,))  # fmt: skip
    finish(conn, old_failed, "failed", error="x")
    finish(conn, old_cancelled, "cancelled")
    finish(conn, recent, result=1)
    conn.execute(
        "UPDATE tasks SET finished_at = now() - interval '2 days' WHERE id IN (%s, %s)",
        (old_failed, old_cancelled),
    )
    (claimed,) = task_claim(conn, worker_id="w", limit=1, lease_seconds=30)
    assert claimed.id == processing
    for age in ("2 days", "1 minute"):
        conn.execute(
            "INSERT INTO task_idempotency_keys (idempotency_key, request_sha256, status_code, response, task_ids, created_at) "
            "VALUES (%s, %s, 202, 'null', '{}', now() - %s::interval)",
            (age, bytes(32), age),
        )

    # The default: SKIPLOCK_RETENTION_SECONDS (7 days) keeps what finished 2 days ago.
    header, rows = table_rows(ok(cli("prune")))
    assert header == ["TASKS_PRUNED", "IDEMPOTENCY_KEYS_PRUNED", "OLDER_THAN_SECONDS"]
    assert rows == [["0", "1", "604800"]]  # the key older than its 24 h went
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 2105

    pruned = json.loads(ok(cli("--json", "prune", "--older-than", "3600")))
    assert pruned == {"tasks_pruned": 2102, "idempotency_keys_pruned": 0, "older_than_seconds": 3600.0}
    left = {r["id"] for r in conn.execute("SELECT id FROM tasks").fetchall()}
    assert left == {recent, scheduled, processing}
    assert (
        conn.execute("SELECT count(*) AS n FROM task_attempts WHERE task_id = %s", (old_failed,)).fetchone()[
            "n"
        ]
        == 0
    )

    # Retention off means keep forever, not "older than 0 s"; --older-than 0 insists.
    kept = cli("--json", "prune", env={"SKIPLOCK_RETENTION_SECONDS": "0"})
    assert json.loads(ok(kept))["tasks_pruned"] == 0 and "retention is off" in kept.stderr
    assert json.loads(ok(cli("prune", "--older-than", "0", "--json")))["tasks_pruned"] == 1
    assert {r["id"] for r in conn.execute("SELECT id FROM tasks").fetchall()} == {scheduled, processing}


def test_prune_paces_itself_and_refuses_a_duty_out_of_range(cli, conn):
    conn.execute(
        "INSERT INTO tasks (task_type, input, status, finished_at)"
        " SELECT 'noop', 'null', 'completed', now() - interval '2 days' FROM generate_series(1, 2500)"
    )
    refused = cli("prune", "--duty", "0")
    assert refused.exit_code == 2 and "--duty" in refused.stderr, refused.stderr
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 2500
    paced = json.loads(ok(cli("--json", "prune", "--older-than", "3600", "--duty", "0.5")))
    assert paced["tasks_pruned"] == 2500
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


# --- health ------------------------------------------------------------------------------------


def test_health_exits_1_on_violations_or_lapsed_leases(cli, conn):
    out = ok(cli("health"))
    fields = {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines()}
    assert (fields["healthy"], fields["invariant_violations"], fields["lapsed_leases"]) == ("yes", "0", "0")
    healthy = json.loads(ok(cli("--json", "health")))
    assert (healthy["healthy"], healthy["problems"], healthy["workers"]) == (True, [], 0)

    # attempts says 1, but no attempt was ever recorded: the self-audit sees it.
    audited = insert_task(conn, "noop")
    conn.execute(
        "UPDATE tasks SET status = 'completed', attempts = 1, finished_at = now() WHERE id = %s", (audited,)
    )
    result = cli("--json", "health")
    refused_line = result.stderr.strip()
    assert_clean_exit(result, 1)
    report = json.loads(result.stdout)
    assert (report["healthy"], report["invariant_violations"], report["lapsed_leases"]) == (False, 1, 0)
    assert refused_line.startswith("skiplock: unhealthy: 1 invariant violation(s)")
    conn.execute("DELETE FROM tasks WHERE id = %s", (audited,))
    ok(cli("health"))

    lapsed = insert_task(conn, "noop")
    task_claim(conn, worker_id="ghost", limit=1, lease_seconds=30)
    conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 hour' WHERE id = %s", (lapsed,))
    result = cli("health")
    assert_clean_exit(result, 1)
    assert "1 task(s) processing past their lease" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert json.loads(cli("health", "--json").stdout)["lapsed_leases"] == 1


# --- schema apply ------------------------------------------------------------------------------


def test_schema_apply_on_an_empty_database(server_url):
    name = new_database_name("cli")
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(server_url, dbname=name)
    try:
        refused(invoke(url, "status", "1"), 1, "is schema.sql applied? skiplock schema apply")
        assert ok(invoke(url, "schema", "apply")).strip() == "applied schema.sql"
        assert (
            json.loads(ok(invoke(url, "schema", "apply", "--json")))["applied"] is True
        )  # again: idempotent
        refused(invoke(url, "status", "1"), 1, "Task 1 does not exist.")
        created = json.loads(ok(invoke(url, "--json", "submit", "noop", "null")))
        assert created["task_id"] == 1
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- every command: --json, usage, the database ------------------------------------------------


def test_json_output_parses_everywhere(cli, conn):
    task_id = submit_json(cli, "noop", "null")["task_id"]
    finish(conn, task_id, result={"ok": True})
    other = str(insert_task(conn, "noop"))
    commands = [
        ["status", str(task_id)], ["result", str(task_id)], ["list"], ["cancel", other], ["retry", other],
        ["queues"], ["pause", "q"], ["resume", "q"], ["prune"], ["health"], ["schema", "apply"],
        ["keys", "list"], ["submit", "noop", "null"],
    ]  # fmt: skip
    for before in (True, False):  # cancel then retry, twice
        for command in commands:
            result = cli(*(["--json", *command] if before else [*command, "--json"]))
            json.loads(ok(result))
            assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "abc"],
        ["status", "0"],
        ["status", str(2**63)],
        ["result", "-1"],
        ["retry", "1", "2"],
        ["cancel", "x"],
        ["list", "--status", "bogus"],
        ["list", "--limit", "0"],
        ["list", "--limit", "1001"],
        ["list", "--before", "0"],
        ["list", "--queue", "a b"],
        ["list", "--type", "x/y"],
        ["pause"],
        ["pause", "bad name"],
        ["resume", "x" * 101],
        ["prune", "--older-than", "-1"],
        ["prune", "--older-than", "soon"],
        ["schema"],
        ["schema", "drop"],
        ["worker", "--concurrency", "0"],
        ["worker", "--queue", "no good"],
        ["worker", "--metrics-port", "70000"],
        ["worker", "--log-level", "loud"],
        ["submit"],
        ["wait", "1"],
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2_before_touching_the_database(args):
    result = offline(*args)
    assert_clean_exit(result, 2)
    assert result.stdout == "" and ("Usage:" in result.stderr or "Error" in result.stderr)


@pytest.mark.parametrize("args", [["status", "1"], ["schema", "apply"], ["worker"], ["prune"]], ids=" ".join)
def test_without_a_database_url_it_is_a_usage_error(args):
    result = CliRunner().invoke(main, args, env={"DATABASE_URL": None})
    assert_clean_exit(result, 2)
    assert "DATABASE_URL" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["status", "1"],
        ["--json", "result", "1"],
        ["list"],
        ["retry", "1"],
        ["cancel", "1"],
        ["queues"],
        ["pause", "q"],
        ["resume", "q", "--json"],
        ["prune"],
        ["health"],
        ["schema", "apply"],
        ["submit", "noop", "null", "--wait"],
    ],
    ids=" ".join,
)
def test_an_unreachable_database_exits_3_with_one_line(args):
    refused(offline(*args), 3, "cannot reach the database")


def test_help_documents_the_commands_and_exit_codes():
    out = ok(CliRunner().invoke(main, ["--help"]))
    commands = out[out.index("Commands:") :].split("Exit codes:")[0]
    for command in ("submit", "status", "result", "list", "retry", "cancel", "queues", "pause", "resume",
                    "prune", "health", "schema", "worker", "keys"):  # fmt: skip
        assert f"\n  {command} " in commands, command
        ok(CliRunner().invoke(main, [command, "--help"]))
    codes = out[out.index("Exit codes:") :]
    for line in ("0  done", "1  not found, refused", "2  bad usage", "3  the database could not be reached",
                 "4  submit --wait"):  # fmt: skip
        assert line in codes, line
    from skiplock import cli

    for line in ("0  done", "1  not found", "2  bad usage", "3  the database could not be reached"):
        assert line in cli.__doc__


# --- the installed command, and `skiplock worker` ----------------------------------------------


def test_the_installed_script_runs_a_worker_and_waits_for_its_result(settings, conn, tmp_path):
    env = settings_env(settings)
    port = free_port()

    def run(*args: str, database_url: str = settings.database_url) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), *args], cwd=ROOT, env={**env, "DATABASE_URL": database_url},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(SCRIPT), "worker", "--concurrency", "1", "-q", "cli", "--metrics-port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        done = run("submit", "greet", '{"name": "Sub"}', "--queue", "cli", "--wait", "--wait-timeout", "60")
        assert done.returncode == 0, (done.stderr, (tmp_path / "worker.log").read_text())
        assert json.loads(done.stdout) == {"greeting": "Hello, Sub!", "attempt": 1}
        (registered,) = conn.execute("SELECT queues, concurrency FROM task_workers").fetchall()
        assert (registered["queues"], registered["concurrency"]) == (["cli"], 1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert b"skiplock_tasks_started" in answer.read()

        unknown = run("status", "424242")
        assert (unknown.returncode, unknown.stdout) == (1, "")
        assert unknown.stderr.strip() == "skiplock: Task 424242 does not exist."
        down = run("--json", "list", database_url=UNREACHABLE_DB)
        assert down.returncode == 3 and down.stdout == "" and len(down.stderr.strip().splitlines()) == 1
        assert "Traceback" not in down.stderr + unknown.stderr + done.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        log.close()
    assert code == 0, (tmp_path / "worker.log").read_text()
    assert conn.execute("SELECT count(*) AS n FROM task_workers").fetchone()["n"] == 0
    assert os.path.getsize(tmp_path / "worker.log") > 0  # it logs (--log-level INFO)
