"""The `skiplock` command (skiplock.cli:main): API keys from the command line, against a real
Postgres (a fresh database per test). Most tests run it in-process through click's CliRunner;
a few run the installed console script and `python -m skiplock.cli` as operators would.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from skiplock import keys as key_admin
from skiplock.cli import main
from skiplock.tokens import new_token
from tests.helpers import ROOT, SCRIPT, UNREACHABLE_DB, assert_clean_exit, ok, table_rows

# The same on every Postgres version: CI runs it against one Postgres only (.ci/run).
pytestmark = pytest.mark.pg_agnostic

TOKEN = re.compile(r"skl_[0-9A-Za-z]{32}")
LIST_COLUMNS = [
    "ID", "PREFIX", "NAME", "ROLE", "RATE_PER_SECOND", "BURST", "MAX_UNFINISHED", "WEIGHT", "CREATED_AT",
    "LAST_USED_AT",
]  # fmt: skip


@pytest.fixture
def cli(database_url):
    """cli(*args, env=None) -> click's Result of `skiplock *args` against the test database."""
    runner = CliRunner()

    def run(*args: str, env: dict | None = None):
        return runner.invoke(main, list(args), env={"DATABASE_URL": database_url, **(env or {})})

    return run


def key_rows(conn) -> list[dict]:
    return conn.execute("SELECT *, role::text AS role FROM api_keys ORDER BY id").fetchall()


# --- keys create -------------------------------------------------------------------------------


def test_create_prints_the_token_once_on_its_own_line(cli, conn):
    result = cli("keys", "create", "--name", "ops")
    out = ok(result)
    tokens = TOKEN.findall(result.output)
    assert len(tokens) == 1, result.output  # once, in everything printed
    token = tokens[0]
    token_lines = [line for line in out.splitlines() if token in line]
    assert len(token_lines) == 1
    assert re.fullmatch(rf"(token:\s*)?{token}", token_lines[0].strip()), token_lines[0]
    assert "once" in result.stderr  # the warning goes to stderr, not into what a script captures
    (row,) = key_rows(conn)
    assert (row["name"], row["role"], row["prefix"]) == ("ops", "client", token[:12])
    assert bytes(row["token_sha256"]) == hashlib.sha256(token.encode()).digest()
    assert (row["rate_per_second"], row["burst"], row["max_unfinished"], row["revoked_at"]) == (None,) * 4
    # The table shows the key's prefix, not its secret.
    header, rows = table_rows(out.replace(token_lines[0], ""))
    assert header[:4] == ["ID", "PREFIX", "NAME", "ROLE"]
    assert rows[0][:4] == [str(row["id"]), token[:12], "ops", "client"]


def test_create_with_every_option(cli, conn):
    out = ok(
        cli(
            "keys",
            "create",
            "--name",
            "batch",
            "--admin",
            "--rate",
            "2.5",
            "--burst",
            "10",
            "--max-unfinished",
            "7",
        )
    )
    (row,) = key_rows(conn)
    assert (row["name"], row["role"], row["rate_per_second"], row["burst"], row["max_unfinished"]) == (
        "batch",
        "admin",
        2.5,
        10,
        7,
    )
    assert TOKEN.search(out)
    # A rate without a burst: one second's worth, decided by the API (stored NULL).
    ok(cli("keys", "create", "--name", "rated", "--rate", "3"))
    assert key_rows(conn)[1]["burst"] is None and key_rows(conn)[1]["rate_per_second"] == 3


def test_create_json_is_one_document_with_the_token(cli, conn):
    result = cli("--json", "keys", "create", "--name", "script", "--rate", "1", "--burst", "2")
    created = json.loads(ok(result))  # stdout is exactly one JSON document
    assert TOKEN.fullmatch(created["token"])
    (row,) = key_rows(conn)
    assert created["id"] == row["id"] and created["prefix"] == created["token"][:12]
    assert {k: created[k] for k in ("name", "role", "rate_per_second", "burst", "max_unfinished")} == {
        "name": "script",
        "role": "client",
        "rate_per_second": 1.0,
        "burst": 2,
        "max_unfinished": None,
    }
    assert "token_sha256" not in created
    assert bytes(row["token_sha256"]) == hashlib.sha256(created["token"].encode()).digest()
    assert result.output.count(created["token"]) == 1


def test_json_may_follow_the_subcommand(cli, conn):
    """`skiplock keys list --json` and `skiplock keys create ... --json`, as scripts write them."""
    listed = cli("keys", "list", "--json")
    assert json.loads(ok(listed)) == []
    created = json.loads(ok(cli("keys", "create", "--name", "late flag", "--json")))
    assert TOKEN.fullmatch(created["token"])


def test_created_tokens_work_against_the_api(cli, auth_client):
    client = json.loads(ok(cli("--json", "keys", "create", "--name", "client")))["token"]
    admin = json.loads(ok(cli("--json", "keys", "create", "--name", "root", "--admin")))["token"]
    response = auth_client.post(
        "/api/submit-task", json={"task_input": "from the cli"}, headers={"Authorization": f"Bearer {client}"}
    )
    assert response.status_code == 202, response.get_json()
    assert auth_client.get("/api/keys", headers={"Authorization": f"Bearer {client}"}).status_code == 403
    keys = auth_client.get("/api/keys", headers={"Authorization": f"Bearer {admin}"})
    assert keys.status_code == 200
    assert [k["name"] for k in keys.get_json()] == ["client", "root"]


def test_a_limited_key_made_by_the_cli_is_limited(cli, auth_client):
    token = json.loads(
        ok(cli("--json", "keys", "create", "--name", "slow", "--rate", "0.5", "--burst", "2"))
    )["token"]
    codes = [
        auth_client.get("/api/tasks", headers={"Authorization": f"Bearer {token}"}).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]


# --- keys list ---------------------------------------------------------------------------------


def test_list_is_a_table_without_tokens(cli, conn):
    made = [key_admin.create_key(conn, name=n, role=r) for n, r in [("alpha", "client"), ("beta", "admin")]]
    key_admin.create_key(conn, name="gamma", rate_per_second=5, burst=9, max_unfinished=3)
    result = cli("keys", "list")
    out = ok(result)
    header, rows = table_rows(out)
    assert header == LIST_COLUMNS
    assert [r[:4] for r in rows[:2]] == [
        [str(made[0]["id"]), made[0]["prefix"], "alpha", "client"],
        [str(made[1]["id"]), made[1]["prefix"], "beta", "admin"],
    ]
    assert rows[2][2:8] == ["gamma", "client", "5", "9", "3", "1"]  # weight 1 unless set
    for key in made:
        assert key["token"] not in result.output and key["token"][12:] not in result.output


def test_list_json_has_no_tokens_nor_digests(cli, conn):
    made = key_admin.create_key(conn, name="alpha")
    result = cli("--json", "keys", "list")
    listed = json.loads(ok(result))
    assert [k["id"] for k in listed] == [made["id"]]
    assert set(listed[0]) == {
        "id", "name", "role", "prefix", "rate_per_second", "burst", "max_unfinished", "weight",
        "created_at", "revoked_at", "last_used_at",
    }  # fmt: skip
    assert made["token"] not in result.output
    assert made["token"][12:] not in result.output


def test_list_hides_revoked_keys_unless_all(cli, conn):
    kept = key_admin.create_key(conn, name="kept")
    gone = key_admin.create_key(conn, name="gone")
    key_admin.revoke_key(conn, key_id=gone["id"])
    _, rows = table_rows(ok(cli("keys", "list")))
    assert [r[2] for r in rows] == ["kept"]
    header, rows = table_rows(ok(cli("keys", "list", "--all")))
    assert header == [*LIST_COLUMNS, "REVOKED_AT"]
    assert [r[2] for r in rows] == ["kept", "gone"]
    assert rows[0][-1] == "-" and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[1][-1])
    everything = json.loads(ok(cli("--json", "keys", "list", "--all")))
    assert [(k["id"], k["revoked_at"] is None) for k in everything] == [
        (kept["id"], True),
        (gone["id"], False),
    ]


def test_list_of_no_keys(cli):
    assert ok(cli("keys", "list")).strip() == "(none)"
    assert json.loads(ok(cli("--json", "keys", "list"))) == []


# --- weights ---------------------------------------------------------------------------------------


def test_a_key_is_created_with_a_weight_and_an_admin_changes_it(cli, conn):
    created = json.loads(ok(cli("--json", "keys", "create", "--name", "big", "--weight", "3")))
    assert created["weight"] == 3.0 and TOKEN.fullmatch(created["token"])
    plain = json.loads(ok(cli("--json", "keys", "create", "--name", "plain")))
    assert plain["weight"] == 1.0
    assert [r["weight"] for r in key_rows(conn)] == [3.0, 1.0]

    header, rows = table_rows(ok(cli("keys", "set-weight", str(plain["id"]), "0.1")))
    assert header == ["ID", "PREFIX", "NAME", "WEIGHT"]
    assert rows == [[str(plain["id"]), plain["prefix"], "plain", "0.1"]]  # as set, not 0.100000001
    listed = {k["name"]: k["weight"] for k in json.loads(ok(cli("--json", "keys", "list")))}
    assert listed == {"big": 3.0, "plain": 0.1}
    header, rows = table_rows(ok(cli("keys", "list")))
    assert [r[header.index("WEIGHT")] for r in rows] == ["3", "0.1"]
    assert json.loads(ok(cli("keys", "set-weight", str(created["id"]), "1000", "--json")))["weight"] == 1000


def test_weights_out_of_range_or_of_no_key_are_refused(cli, conn):
    made = key_admin.create_key(conn, name="k")
    for weight in ("0", "-1", "1000.5", "abc", "nan"):
        assert_clean_exit(cli("keys", "create", "--name", "x", "--weight", weight), 2)
        assert_clean_exit(cli("keys", "set-weight", str(made["id"]), weight), 2)
    missing = cli("keys", "set-weight", "999999", "2")
    assert_clean_exit(missing, 1)
    assert "no API key 999999" in missing.stderr
    assert [(r["name"], r["weight"]) for r in key_rows(conn)] == [("k", 1.0)]


# --- keys revoke -------------------------------------------------------------------------------


def revoked_ids(conn) -> set[int]:
    return {r["id"] for r in conn.execute("SELECT id FROM api_keys WHERE revoked_at IS NOT NULL").fetchall()}


def test_revoke_by_id_prefix_or_whole_token(cli, conn, auth_client, subtests):
    keys = {how: key_admin.create_key(conn, name=how) for how in ("id", "prefix", "token")}
    bystander = key_admin.create_key(conn, name="bystander")
    for how, key in keys.items():
        with subtests.test(how=how):
            argument = {"id": str(key["id"]), "prefix": key["prefix"], "token": key["token"]}[how]
            result = cli("keys", "revoke", argument)
            out = ok(result)
            assert key["prefix"] in out
            assert key["token"] not in result.output
            header, rows = table_rows(out)
            assert header == ["ID", "PREFIX", "NAME", "REVOKED_AT"]
            assert rows[0][:3] == [str(key["id"]), key["prefix"], how]
            response = auth_client.get("/api/tasks", headers={"Authorization": f"Bearer {key['token']}"})
            assert response.status_code == 401
    assert revoked_ids(conn) == {k["id"] for k in keys.values()}
    assert bystander["id"] not in revoked_ids(conn)


def test_revoking_again_is_a_no_op_that_succeeds(cli, conn):
    key = key_admin.create_key(conn, name="twice")
    first = json.loads(ok(cli("--json", "keys", "revoke", str(key["id"]))))
    second = json.loads(ok(cli("--json", "keys", "revoke", key["prefix"])))
    assert first["revoked_at"] and second["revoked_at"] == first["revoked_at"]
    assert first["id"] == second["id"] == key["id"]


def test_revoking_an_unknown_key_exits_1(cli, conn, subtests):
    key = key_admin.create_key(conn, name="untouched")
    for argument in ["999999", str(2**63 - 1), "skl_zzzzzzzz", new_token().token]:
        with subtests.test(argument=argument):
            result = cli("keys", "revoke", argument)
            assert_clean_exit(result, 1)
            assert result.stdout == ""
            assert "no API key" in result.stderr
    assert revoked_ids(conn) == set()
    assert key_rows(conn)[0]["id"] == key["id"]


# --- usage and the database --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "create"],
        ["keys", "create", "--name", "x", "--burst", "5"],
        ["keys", "create", "--name", "x", "--rate", "0"],
        ["keys", "create", "--name", "x", "--rate", "fast"],
        ["keys", "create", "--name", "x", "--rate", "1", "--burst", "0"],
        ["keys", "create", "--name", "x", "--max-unfinished", "0"],
        ["keys", "create", "--name", "x", "--bogus"],
        ["keys", "create", "--name", ""],
        ["keys", "create", "--name", "x" * 101],
        ["keys", "create", "--name", "x", "--max-unfinished", "3000000000"],
        ["keys", "create", "--name", "x", "--rate", "1", "--burst", "3000000000"],
        ["keys", "revoke"],
        ["keys", "revoke", "abc"],
        ["keys", "revoke", "-5"],
        ["keys", "revoke", "1", "2"],
        ["keys", "rotate"],
        ["nothing"],
    ],
    ids=lambda args: " ".join(a if len(a) < 20 else a[:8] + "..." for a in args),
)
def test_bad_usage_exits_2_and_changes_nothing(cli, conn, args):
    key_admin.create_key(conn, name="existing")
    result = cli(*args)
    assert_clean_exit(result, 2)
    assert result.stdout == ""
    assert "Usage:" in result.stderr or "Error" in result.stderr
    assert len(key_rows(conn)) == 1 and revoked_ids(conn) == set()


def test_without_a_database_url_it_is_a_usage_error(cli):
    result = cli("keys", "list", env={"DATABASE_URL": None})
    assert_clean_exit(result, 2)
    assert "DATABASE_URL" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "list"],
        ["keys", "create", "--name", "x"],
        ["keys", "revoke", "1"],
        ["--json", "keys", "list"],
    ],
)
def test_an_unreachable_database_exits_3_with_one_line(cli, args):
    result = cli(*args, env={"DATABASE_URL": UNREACHABLE_DB})
    assert_clean_exit(result, 3)
    assert result.stdout == ""
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("skiplock: ") and "database" in lines[0]


def test_the_database_url_option_overrides_the_environment(cli, database_url, conn):
    ok(
        cli(
            "--database-url",
            database_url,
            "keys",
            "create",
            "--name",
            "opt",
            env={"DATABASE_URL": UNREACHABLE_DB},
        )
    )
    assert [r["name"] for r in key_rows(conn)] == ["opt"]


# --- the installed command ---------------------------------------------------------------------


def run_command(command: list[str], database_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_installed_skiplock_script(database_url, conn):
    assert SCRIPT.exists(), f"{SCRIPT} is missing: `make` installs the project's console script"
    created = run_command([str(SCRIPT), "--json", "keys", "create", "--name", "installed"], database_url)
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    assert [(r["name"], r["prefix"]) for r in key_rows(conn)] == [("installed", token[:12])]

    listed = run_command([str(SCRIPT), "keys", "list"], database_url)
    assert listed.returncode == 0 and "installed" in listed.stdout and token not in listed.stdout

    revoked = run_command([str(SCRIPT), "keys", "revoke", token], database_url)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked_ids(conn) == {key_rows(conn)[0]["id"]}

    down = run_command([str(SCRIPT), "keys", "list"], UNREACHABLE_DB)
    assert down.returncode == 3
    assert down.stdout == "" and "Traceback" not in down.stderr
    assert len(down.stderr.strip("\n").splitlines()) == 1, down.stderr


def test_python_m_skiplock_cli(database_url, conn):
    result = run_command([sys.executable, "-m", "skiplock.cli", "keys", "revoke", "42"], database_url)
    assert result.returncode == 1, result.stderr
    assert "no API key 42" in result.stderr and "Traceback" not in result.stderr
    helped = run_command([sys.executable, "-m", "skiplock.cli", "keys", "--help"], database_url)
    assert helped.returncode == 0
    assert all(command in helped.stdout for command in ("create", "list", "revoke"))
