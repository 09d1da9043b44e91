"""`skiplock schedules` (create, list, show, pause, resume, run, delete) against a real Postgres,
through click's CliRunner: what the command says matches what the tables hold, and a refusal is
one line and an exit code, changing nothing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from skiplock.cli import main
from tests.helpers import assert_clean_exit, ok, table_rows


@pytest.fixture
def cli(database_url):
    """cli(*args) -> click's Result of `skiplock *args` against the test database."""
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args), env={"DATABASE_URL": database_url})


def schedules_in_db(conn) -> list[dict]:
    return conn.execute(
        "SELECT id, name, cron, every_seconds, timezone, paused, task FROM task_schedules"
    ).fetchall()


def test_create_list_show_pause_resume_run_delete(cli, conn):
    out = ok(
        cli("schedules", "create", "nightly", "noop", "--cron", "0 2 * * *", "--timezone", "Europe/Paris")
    )
    (row,) = schedules_in_db(conn)
    assert (row["name"], row["cron"], row["timezone"], row["task"]["task_type"]) == (
        "nightly",
        "0 2 * * *",
        "Europe/Paris",
        "noop",
    )
    assert "nightly" in out and "0 2 * * *" in out
    sid = str(row["id"])
    header, rows = table_rows(ok(cli("schedules", "list")))
    assert header[:3] == ["ID", "NAME", "SOURCE"] and rows[0][:3] == [sid, "nightly", "api"]
    shown = json.loads(ok(cli("schedules", "show", sid, "--json")))
    assert shown["id"] == row["id"] and len(shown["next_runs"]) == 5 and shown["last_fires"] == []
    ok(cli("schedules", "pause", sid))
    assert schedules_in_db(conn)[0]["paused"] is True
    ok(cli("schedules", "resume", sid))
    assert schedules_in_db(conn)[0]["paused"] is False
    fire = json.loads(ok(cli("schedules", "run", sid, "--json")))
    assert fire["outcome"] == "created" and fire["kind"] == "manual"
    task = conn.execute(
        "SELECT schedule_id, task_type FROM tasks WHERE id = %s", (fire["task_id"],)
    ).fetchone()
    assert task == {"schedule_id": row["id"], "task_type": "noop"}
    assert "created" in ok(cli("schedules", "show", sid))  # its last fire
    ok(cli("schedules", "delete", sid))
    assert schedules_in_db(conn) == []
    assert_clean_exit(cli("schedules", "show", sid), 1)


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--cron", "0 99 * * *"), 2, "cron"),
        (("--every", "5", "--cron", "* * * * *"), 2, "exactly one"),
        (("--cron", "* * * * *", "--timezone", "Moon/Base"), 2, "Moon/Base"),
    ],
)
def test_a_bad_rule_is_a_usage_error_and_makes_nothing(cli, conn, args, code, says):
    result = cli("schedules", "create", "bad", "noop", *args)
    assert_clean_exit(result, code)
    assert says in result.output and schedules_in_db(conn) == []


def test_an_unknown_type_is_refused_and_a_duplicate_name_says_so(cli, conn):
    result = cli("schedules", "create", "x", "no-such-type", "--every", "60")
    assert_clean_exit(result, 1)
    assert "no-such-type" in result.output and schedules_in_db(conn) == []
    ok(cli("schedules", "create", "x", "noop", "--every", "60"))
    again = cli("schedules", "create", "x", "noop", "--every", "60")
    assert_clean_exit(again, 1)
    assert "exists already" in again.output and len(schedules_in_db(conn)) == 1


def test_run_of_an_overlapping_schedule_exits_1_saying_why(cli, conn):
    ok(cli("schedules", "create", "single", "noop", "--every", "3600", "--overlap", "skip"))
    sid = str(schedules_in_db(conn)[0]["id"])
    ok(cli("schedules", "run", sid))
    result = cli("schedules", "run", sid)
    assert_clean_exit(result, 1)
    assert "overlap skip" in result.output
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 1
