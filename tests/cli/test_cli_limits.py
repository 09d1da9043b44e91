"""`skiplock limits` (set, list, delete) and the pause that holds when `skiplock pause` returns,
against a real Postgres (a fresh database per test), through click's CliRunner. Tasks are claimed
with the queue's own functions, as a worker would."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from skiplock import keys as key_admin
from skiplock.cli import main
from skiplock.sql.limits import limit_put
from tests.helpers import (
    WORKER,
    assert_clean_exit,
    claim_refs,
    history,
    insert_task,
    ok,
    table_rows,
    task_row,
)

SET_COLUMNS = [
    "SCOPE",
    "OWNER_KEY_ID",
    "NAME",
    "MAX_RUNNING",
    "MAX_STARTS_PER_SECOND",
    "BURST",
    "RUNNING",
    "WAITING",
]


@pytest.fixture
def cli(database_url):
    """cli(*args) -> click's Result of `skiplock *args` against the test database."""
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args), env={"DATABASE_URL": database_url})


def limits_in_db(conn) -> list[tuple]:
    return [
        (r["scope"], r["owner_key_id"], r["name"], r["max_running"], r["max_starts_per_second"], r["burst"])
        for r in conn.execute("SELECT * FROM task_limits ORDER BY scope, owner_key_id, name")
    ]


def test_set_list_and_delete_a_keys_concurrency_limit(cli, conn):
    key = key_admin.create_key(conn, name="tenant")
    owner = str(key["id"])
    for _ in range(3):
        insert_task(conn, "noop", concurrency_key="gpu", owner_key_id=key["id"])

    header, rows = table_rows(ok(cli("limits", "set", "gpu", "--owner", owner, "--max-running", "1")))
    assert header == SET_COLUMNS
    assert rows == [["key", owner, "gpu", "1", "-", "-", "1", "2"]]  # it holds: one slot, two wait
    assert limits_in_db(conn) == [("key", key["id"], "gpu", 1, None, None)]

    changed = json.loads(
        ok(
            cli(
                "--json",
                "limits",
                "set",
                "gpu",
                "--owner",
                owner,
                "--max-running",
                "2",
                "--rate",
                "5",
                "--burst",
                "3",
            )
        )
    )
    assert (changed["max_running"], changed["max_starts_per_second"], changed["burst"]) == (2, 5.0, 3)
    assert changed["updated_by"] == "skiplock-cli"
    ok(cli("limits", "set", "--queue", "reports", "--rate", "0.5"))
    limit_put(conn, scope="type", owner=0, name="sleep", max_running=4, by="worker")

    header, rows = table_rows(ok(cli("limits", "list")))
    assert header == [*SET_COLUMNS, "UPDATED_AT", "UPDATED_BY"]
    assert [r[:8] for r in rows] == [
        ["key", owner, "gpu", "2", "5", "3", "2", "1"],
        ["queue", "0", "reports", "-", "0.5", "-", "0", "0"],
        ["type", "0", "sleep", "4", "-", "-", "0", "0"],
    ]
    assert [r["name"] for r in json.loads(ok(cli("limits", "list", "--scope", "queue", "--json")))] == [
        "reports"
    ]
    assert [r["name"] for r in json.loads(ok(cli("limits", "list", "--owner", owner, "--json")))] == ["gpu"]
    assert json.loads(ok(cli("limits", "list", "--owner", "0", "--json"))) == []

    assert json.loads(ok(cli("--json", "limits", "delete", "gpu", "--owner", owner)))["deleted"] is True
    ok(cli("limits", "delete", "--queue", "reports"))
    assert limits_in_db(conn) == [("type", 0, "sleep", 4, None, None)]
    gone = cli("limits", "delete", "gpu", "--owner", owner)
    assert_clean_exit(gone, 1)
    assert "no limit" in gone.stderr
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE waiting_on IS NOT NULL").fetchone()["n"] == 0


def test_a_limit_set_holds_over_tasks_claimed_but_not_started(cli, conn):
    ids = [insert_task(conn, "noop", concurrency_key="mail") for _ in range(3)]
    claimed = claim_refs(conn, 3)
    _, rows = table_rows(ok(cli("limits", "set", "mail", "--max-running", "0")))  # owner 0: auth off
    assert rows == [["key", "0", "mail", "0", "-", "-", "0", "3"]]
    for ref in claimed:
        assert task_row(conn, ref.task_id)["status"] == "pending"
        assert history(conn, ref.task_id) == [(ref.attempt, WORKER, "released")]
    assert sorted(r.task_id for r in claimed) == ids


@pytest.mark.parametrize(
    "args, needle",
    [
        (("limits", "set", "--max-running", "1"), "one of them"),
        (("limits", "set", "k", "--queue", "q", "--max-running", "1"), "one of them"),
        (("limits", "set", "k"), "--max-running, --rate or both"),
        (("limits", "set", "k", "--max-running", "1", "--burst", "2"), "--burst needs --rate"),
        (("limits", "set", "--queue", "q", "--owner", "1", "--max-running", "1"), "--owner"),
        (("limits", "set", "k", "--max-running", "-1"), "--max-running"),
        (("limits", "set", "k", "--max-running", "1.5"), "--max-running"),
        (("limits", "set", "k", "--rate", "0"), "--rate"),
        (("limits", "set", "k", "--rate", "nan"), "--rate"),
        (("limits", "set", "k", "--rate", "1", "--burst", "0"), "--burst"),
        (("limits", "set", "k" * 201, "--max-running", "1"), "1 to 200"),
        (("limits", "set", "--queue", "bad name", "--max-running", "1"), "queue name"),
        (("limits", "list", "--scope", "queue", "--owner", "1"), "--owner"),
        (("limits", "list", "--scope", "other"), "--scope"),
        (("limits", "delete"), "one of them"),
    ],
)
def test_bad_usage_exits_2_and_changes_nothing(cli, conn, args, needle):
    result = cli(*args)
    assert_clean_exit(result, 2)
    assert needle in result.stderr, result.stderr
    assert limits_in_db(conn) == []


def test_a_limit_of_no_key_exits_1(cli, conn):
    result = cli("limits", "set", "gpu", "--owner", "999999", "--max-running", "1")
    assert_clean_exit(result, 1)
    assert "no API key 999999" in result.stderr
    assert limits_in_db(conn) == []


def test_pause_releases_the_queues_claimed_tasks_before_it_returns(cli, conn):
    held = [insert_task(conn, "noop", queue="drain") for _ in range(2)]
    other = insert_task(conn, "noop", queue="other")
    claim_refs(conn, 3)
    paused = json.loads(ok(cli("--json", "pause", "drain")))
    assert (paused["paused"], paused["released"]) == (True, 2)
    assert [task_row(conn, t)["status"] for t in held] == ["pending", "pending"]
    assert task_row(conn, other)["status"] == "processing"
    assert [history(conn, t)[0][2] for t in held] == ["released", "released"]
    # The queues listing shows the queue's limit and what waits on limits.
    ok(cli("limits", "set", "--queue", "drain", "--max-running", "1"))
    [drain] = [q for q in json.loads(ok(cli("--json", "queues"))) if q["queue"] == "drain"]
    assert (drain["due"], drain["waiting_on_limit"], drain["limit"]["max_running"]) == (2, 1, 1)
    header, rows = table_rows(ok(cli("queues")))
    shown = dict(zip(header, next(r for r in rows if r[0] == "drain"), strict=True))
    assert (shown["WAITING_ON_LIMIT"], shown["MAX_RUNNING"], shown["PAUSED"]) == ("1", "1", "yes")
