"""schema.sql against a real Postgres: it can be applied again and again (alone or at the same
time), it documents every object a DBA reads, its constraints are named and hold, and its
self-audit (task_invariant_violations) names each broken invariant. The query plans its indexes
are made for are checked in tests/queue/plans/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from skiplock.db import SCHEMA_PATH, apply_schema, connect
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_hand_back_many,
    task_start_many,
)
from skiplock.sql.fragments import PENDING_CHANNEL
from skiplock.sql.tasks import task_cancel
from skiplock.sql.workers import task_waiter_register
from tests.helpers import add_key, admit, insert_task, invariant_violations, new_database_name, task_row

TABLES = (
    "tasks",
    "task_attempts",
    "task_waiters",
    "task_workers",
    "api_keys",
    "api_key_buckets",
    "task_idempotency_keys",
    "task_queues",
    "task_throughput",
    "api_secrets",
    "task_watchers",
    "webhook_deliveries",
    "webhook_attempts",
    "webhook_secrets",
    "task_callback_secrets",
    "task_limits",
    "task_schedules",
    "task_schedule_fires",
    "workflows",
    "task_dependencies",
    "skiplock_schema",
)

# --- applying the schema -----------------------------------------------------------------------


def psql_apply(url: str) -> None:
    """Exactly what the header of schema.sql tells operators to run (url may be key=value)."""
    done = subprocess.run(
        [shutil.which("psql"), "-X", "-q", url, "-v", "ON_ERROR_STOP=1", "-f", str(SCHEMA_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    assert done.returncode == 0, done.stderr
    assert "ERROR" not in done.stderr, done.stderr


APPLIERS = [
    pytest.param(
        psql_apply,
        id="psql",
        marks=pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed"),
    ),
    pytest.param(apply_schema, id="apply_schema"),
]


def catalog(conn) -> dict:
    """Everything schema.sql defines, as the catalogs describe it."""
    queries_ = {
        "relations": """
            SELECT c.relname, c.relkind::text, c.reloptions::text,
                   obj_description(c.oid, 'pg_class') AS comment
            FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1""",
        "columns": """
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid) AS default, col_description(c.oid, a.attnum)
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY 1, 2""",
        "constraints": """
            SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
            FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
        "triggers": """
            SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
            WHERE NOT tgisinternal ORDER BY 1, 2""",
        "enums": """
            SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)::text AS labels
            FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid GROUP BY 1 ORDER BY 1""",
        "views": """
            SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1""",
    }
    return {name: conn.execute(q).fetchall() for name, q in queries_.items()}


@pytest.mark.parametrize("apply", APPLIERS)
def test_schema_applies_again_without_changing_anything(database_url, conn, apply):
    done = insert_task(conn, "greet", {"name": "Ada"})
    [task] = task_claim(conn, worker_id="w1", limit=1, lease_seconds=30)
    ref = AttemptRef(task.id, task.attempt)
    assert task_complete_many(conn, worker_id="w1", results=[(ref, '{"ok": 1}')]) == {done}
    waiting = insert_task(conn, "noop", [1, 2, 3], priority=7, delay_seconds=600)
    before = catalog(conn)
    tasks_before = conn.execute("SELECT * FROM tasks ORDER BY id").fetchall()
    attempts_before = conn.execute("SELECT * FROM task_attempts ORDER BY id").fetchall()
    assert len(tasks_before) == 2 and len(attempts_before) == 1

    apply(database_url)
    apply(database_url)

    assert catalog(conn) == before
    assert conn.execute("SELECT * FROM tasks ORDER BY id").fetchall() == tasks_before
    assert conn.execute("SELECT * FROM task_attempts ORDER BY id").fetchall() == attempts_before

    # And it still works: the insert trigger fires (the catalog above shows it is not doubled),
    # identity continues, the old rows are still claimable.
    with connect(database_url, role="test-listener") as listener:
        listener.execute(f"LISTEN {PENDING_CHANNEL}")
        listener.execute("LISTEN skiplock_test_marker")
        task_waiter_register(conn, worker_id="w-test")  # inserts notify only if someone waits
        new = insert_task(conn)
        conn.execute("NOTIFY skiplock_test_marker")  # delivered after the insert's notification
        notified = []
        for n in listener.notifies(timeout=10):
            notified.append(n.channel)
            if n.channel == "skiplock_test_marker":
                break
    assert notified == [PENDING_CHANNEL, "skiplock_test_marker"]
    assert new > waiting
    conn.execute("UPDATE tasks SET run_at = now() WHERE id = %s", (waiting,))
    admit(conn)  # it fell due: admission gives it its turn
    claimed = task_claim(conn, worker_id="w2", limit=5, lease_seconds=30)
    assert [t.id for t in claimed] == [waiting, new]
    assert task_row(conn, done)["result"] == {"ok": 1}


def test_identity_ids_of_an_older_schema_become_ranged_ids_numbering_on(database_url, conn):
    """A database from before ids were ranged per timeline (tasks.id and workflows.id identity
    columns): applying the schema converts them in place, and numbering goes on where it was."""
    for table in ("tasks", "workflows"):  # back to the older schema's columns, a few ids used
        conn.execute(
            sql.SQL(
                "ALTER TABLE {t} ALTER COLUMN id DROP DEFAULT; DROP SEQUENCE {s};"
                " ALTER TABLE {t} ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY;"
                " SELECT setval(pg_get_serial_sequence({name}, 'id'), 41)"
            ).format(t=sql.Identifier(table), s=sql.Identifier(f"{table}_id_seq"), name=sql.Literal(table))
        )
    assert insert_task(conn) == 42

    apply_schema(database_url)

    assert insert_task(conn) == 43
    assert conn.execute("INSERT INTO workflows DEFAULT VALUES RETURNING id").fetchone()["id"] == 42
    defaults = conn.execute(
        "SELECT c.relname, pg_get_expr(d.adbin, d.adrelid) AS expr, a.attidentity FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_attrdef d ON (d.adrelid, d.adnum) = (a.attrelid, a.attnum)"
        " WHERE c.relname IN ('tasks', 'workflows') AND a.attname = 'id' ORDER BY 1"
    ).fetchall()
    assert [(r["relname"], r["expr"], r["attidentity"]) for r in defaults] == [
        ("tasks", "(nextval('tasks_id_seq'::regclass) + skiplock_id_base())", ""),
        ("workflows", "(nextval('workflows_id_seq'::regclass) + skiplock_id_base())", ""),
    ]
    # Owned by their columns (dropped with the table), bounded to a timeline's range.
    owned = conn.execute(
        "SELECT s.relname, d.refobjid::regclass::text AS owner, q.seqmax FROM pg_class s"
        " JOIN pg_sequence q ON q.seqrelid = s.oid JOIN pg_depend d ON d.objid = s.oid AND d.deptype = 'a'"
        " WHERE s.relname IN ('tasks_id_seq', 'workflows_id_seq') ORDER BY 1"
    ).fetchall()
    assert [tuple(r.values()) for r in owned] == [
        ("tasks_id_seq", "tasks", 2**43 - 1),
        ("workflows_id_seq", "workflows", 2**43 - 1),
    ]


@pytest.fixture
def empty_database_url(server_url):
    """A database with nothing in it (not even the schema), dropped after the test."""
    name = new_database_name("empty")
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_concurrent_first_applications_queue_up(empty_database_url, database_url, conn):
    """Two deploys applying the schema to a new database at once must both succeed."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def deploy():
        try:
            start.wait(timeout=10)
            apply_schema(empty_database_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deploy, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    with connect(empty_database_url, role="test") as fresh:
        assert catalog(fresh) == catalog(conn)  # the same as one application (the template)


def test_schema_apply_behind_a_long_transaction_does_not_stall_inserts(database_url, conn):
    """A transaction that inserted a task and stays open holds a lock the DDL needs. Waiting for
    it, the apply would queue every later insert behind itself; it must back off instead."""
    done: list[BaseException | None] = []
    with connect(database_url, role="test-long-transaction") as holder:
        holder.execute("BEGIN")
        insert_task(holder)
        applying = threading.Thread(
            target=lambda: done.append(_capture(apply_schema, database_url, lock_timeout_seconds=0.2)),
            daemon=True,
        )
        applying.start()
        for _ in range(5):  # while the apply keeps trying
            insert_task(conn)  # lock_timeout is 5 s here: a stalled insert fails the test
        assert applying.is_alive(), "the apply cannot have finished: the long transaction is open"
        holder.execute("COMMIT")
    applying.join(timeout=60)
    assert done == [None]


def _capture(function, *args, **kwargs) -> BaseException | None:
    try:
        function(*args, **kwargs)
    except BaseException as exc:
        return exc
    return None


# --- documentation -----------------------------------------------------------------------------


def test_every_table_view_and_index_has_a_comment(conn):
    missing = conn.execute(
        """
        SELECT c.relkind::text AS kind, c.relname AS name FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'p', 'v', 'm', 'i')
          AND obj_description(c.oid, 'pg_class') IS NULL
        ORDER BY 2
        """
    ).fetchall()
    assert missing == []
    kinds = conn.execute(
        "SELECT relkind::text AS kind, count(*) AS n FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v', 'i') GROUP BY 1"
    ).fetchall()
    assert {k["kind"]: k["n"] for k in kinds}.keys() == {"r", "v", "i"}, "nothing was checked"


def test_primary_key_indexes_have_a_comment(conn):
    missing = conn.execute(
        """
        SELECT c.relname FROM pg_class c JOIN pg_constraint k ON k.conindid = c.oid
        WHERE c.relnamespace = 'public'::regnamespace AND obj_description(c.oid, 'pg_class') IS NULL
        """
    ).fetchall()
    assert missing == []


def test_every_table_column_has_a_comment(conn):
    columns = conn.execute(
        """
        SELECT c.relname AS table_name, a.attname AS column_name,
               col_description(c.oid, a.attnum) AS comment
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
          AND a.attnum > 0 AND NOT a.attisdropped
        """
    ).fetchall()
    assert {c["table_name"] for c in columns} == set(TABLES)
    assert [f"{c['table_name']}.{c['column_name']}" for c in columns if not c["comment"]] == []


def test_types_functions_and_triggers_have_comments(conn):
    missing = conn.execute(
        """
        SELECT 'type ' || typname AS what FROM pg_type
        WHERE typnamespace = 'public'::regnamespace AND typtype = 'e'
          AND obj_description(oid, 'pg_type') IS NULL
        UNION ALL
        SELECT 'function ' || proname FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace AND obj_description(oid, 'pg_proc') IS NULL
        UNION ALL
        SELECT 'trigger ' || tgname FROM pg_trigger
        WHERE NOT tgisinternal AND obj_description(oid, 'pg_trigger') IS NULL
        """
    ).fetchall()
    assert missing == []


def test_enum_comments_explain_every_value(conn):
    enums = conn.execute(
        """
        SELECT t.typname, obj_description(t.oid, 'pg_type') AS comment,
               array_agg(e.enumlabel::text ORDER BY e.enumsortorder) AS labels
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        WHERE t.typnamespace = 'public'::regnamespace GROUP BY t.oid, t.typname
        """
    ).fetchall()
    assert {e["typname"] for e in enums} == {
        *("task_status", "task_attempt_outcome", "api_key_role", "webhook_delivery_status")
    }
    for enum in enums:
        unexplained = [label for label in enum["labels"] if f"{label}:" not in enum["comment"]]
        assert unexplained == [], f"{enum['typname']} comment does not explain {unexplained}"


# --- constraints -------------------------------------------------------------------------------

# The name Postgres makes up for an unnamed constraint: table[_column...]_label[N].
_LABELS = {"c": "check", "f": "fkey", "u": "key", "x": "excl"}


def test_constraints_are_named(conn):
    constraints = conn.execute(
        """
        SELECT c.relname AS table_name, k.conname, k.contype::text AS contype,
               array(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
                     JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n
                     ORDER BY u.i) AS columns
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE k.connamespace = 'public'::regnamespace
        """
    ).fetchall()
    assert {k["table_name"] for k in constraints} == set(TABLES)
    generated = []
    for k in constraints:
        if k["contype"] == "p":
            continue  # table_pkey is the generated name and the conventional one alike
        table, label = k["table_name"], _LABELS.get(k["contype"], "")
        names = {table} | {f"{table}_{column}" for column in k["columns"]}
        names.add(f"{table}_{'_'.join(k['columns'])}")
        pattern = "|".join(re.escape(f"{n}_{label}") for n in names)
        if re.fullmatch(rf"(?:{pattern})\d*", k["conname"]):
            generated.append(k["conname"])
    assert generated == []


def _valid_task() -> dict:
    return {
        "task_type": "noop",
        "queue": "default",
        "input": Jsonb({"n": 1}),
        "status": "pending",
        "result": None,
        "progress": None,
        "attempts": 0,
        "max_attempts": 3,
        "timeout_seconds": 30,
        "worker_id": None,
        "lease_expires_at": None,
        "finished_at": None,
    }


def _insert_task_row(conn, row: dict) -> int:
    columns = list(row)
    statement = sql.SQL("INSERT INTO tasks ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(
            sql.SQL("{}::task_status").format(sql.Placeholder(c)) if c == "status" else sql.Placeholder(c)
            for c in columns
        ),
    )
    return conn.execute(statement, row).fetchone()["id"]


def _lease(now):
    return now + timedelta(minutes=5)


VALID_ROWS = {
    "pending": {},
    "processing": {"status": "processing", "attempts": 1, "worker_id": "w1", "lease_expires_at": _lease},
    "completed": {"status": "completed", "attempts": 1, "result": Jsonb([1]), "progress": 1, "finished_at": _lease},
    "failed": {"status": "failed", "attempts": 3, "finished_at": _lease, "worker_id": "w1"},
    "cancelled": {"status": "cancelled", "finished_at": _lease},
    "expired": {"status": "expired", "finished_at": _lease, "expires_at": _lease},
    "scheduling keys": {"fairness_key": "c" * 200, "concurrency_key": "k", "unique_key": "u", "turn": 1.5},
    "edges": {"progress": 0, "max_attempts": 1000, "attempts": 1000, "task_type": "a.b:c-d_E9", "queue": "Q"},
}  # fmt: skip

INVALID_ROWS = {
    "processing without lease": ({"status": "processing", "attempts": 1, "worker_id": "w1"}, "tasks_lease_iff_processing"),
    "processing without worker": ({"status": "processing", "attempts": 1, "lease_expires_at": _lease}, "tasks_lease_iff_processing"),
    "pending with a lease": ({"worker_id": "w1", "lease_expires_at": _lease}, "tasks_lease_iff_processing"),
    "completed with a lease": ({"status": "completed", "finished_at": _lease, "worker_id": "w1", "lease_expires_at": _lease}, "tasks_lease_iff_processing"),
    "result on a pending task": ({"result": Jsonb({"x": 1})}, "tasks_result_only_when_completed"),
    "result on a failed task": ({"status": "failed", "finished_at": _lease, "result": Jsonb(1)}, "tasks_result_only_when_completed"),
    "max_attempts 0": ({"max_attempts": 0}, "tasks_max_attempts_in_range"),
    "max_attempts 1001": ({"max_attempts": 1001, "attempts": 1}, "tasks_max_attempts_in_range"),
    "attempts above max_attempts": ({"attempts": 4}, "tasks_attempts_in_range"),
    "negative attempts": ({"attempts": -1}, "tasks_attempts_in_range"),
    "progress 2": ({"progress": 2}, "tasks_progress_is_fraction"),
    "negative progress": ({"progress": -0.1}, "tasks_progress_is_fraction"),
    "completed without finished_at": ({"status": "completed", "result": Jsonb(1)}, "tasks_finished_iff_final"),
    "cancelled without finished_at": ({"status": "cancelled"}, "tasks_finished_iff_final"),
    "pending with finished_at": ({"finished_at": _lease}, "tasks_finished_iff_final"),
    "timeout 0": ({"timeout_seconds": 0}, "tasks_timeout_positive"),
    "task_type with a space": ({"task_type": "bad type"}, "tasks_task_type_valid"),
    "empty task_type": ({"task_type": ""}, "tasks_task_type_valid"),
    "task_type of 101 characters": ({"task_type": "x" * 101}, "tasks_task_type_valid"),
    "queue with a slash": ({"queue": "a/b"}, "tasks_queue_valid"),
    "expired without finished_at": ({"status": "expired"}, "tasks_finished_iff_final"),
    "empty fairness_key": ({"fairness_key": ""}, "tasks_scheduling_keys_valid"),
    "concurrency_key of 201 characters": ({"concurrency_key": "k" * 201}, "tasks_scheduling_keys_valid"),
    "empty unique_key beside a valid key": ({"fairness_key": "f", "unique_key": ""}, "tasks_scheduling_keys_valid"),
}  # fmt: skip


def _resolve(now, overrides: dict) -> dict:
    return {k: v(now) if callable(v) else v for k, v in overrides.items()}


def test_valid_direct_inserts_are_accepted(conn):
    """The control group of the next test: rows in every state, and edge values, pass."""
    now = conn.execute("SELECT now()").fetchone()["now"]
    for case, overrides in VALID_ROWS.items():
        task_id = _insert_task_row(conn, _valid_task() | _resolve(now, overrides))
        assert task_row(conn, task_id)["status"] == overrides.get("status", "pending"), case
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == len(VALID_ROWS)


def test_check_constraints_reject_bad_direct_inserts(conn):
    now = conn.execute("SELECT now()").fetchone()["now"]
    wrong = {}  # case -> what happened instead of a CheckViolation of the expected constraint
    for case, (overrides, constraint) in INVALID_ROWS.items():
        try:
            _insert_task_row(conn, _valid_task() | _resolve(now, overrides))
            wrong[case] = "accepted"
        except psycopg.errors.CheckViolation as rejected:
            if rejected.diag.constraint_name != constraint:
                wrong[case] = f"rejected by {rejected.diag.constraint_name}, not {constraint}"
    assert wrong == {}
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


def test_check_constraints_reject_bad_updates(conn):
    task_id = insert_task(conn)
    with pytest.raises(psycopg.errors.CheckViolation) as rejected:
        conn.execute("UPDATE tasks SET status = 'processing', attempts = 1 WHERE id = %s", (task_id,))
    assert rejected.value.diag.constraint_name == "tasks_lease_iff_processing"
    with pytest.raises(psycopg.errors.CheckViolation) as rejected:
        conn.execute("UPDATE tasks SET status = 'completed', finished_at = now(), progress = 1.5 WHERE id = %s", (task_id,))  # fmt: skip
    assert rejected.value.diag.constraint_name == "tasks_progress_is_fraction"
    assert task_row(conn, task_id)["status"] == "pending"


LIMIT_COLUMNS = ("scope", "owner_key_id", "name", "max_running", "max_starts_per_second", "burst")

INVALID_LIMITS = {
    "unknown scope": (("tenant", 0, "x", 1, None, None), "task_limits_scope_valid"),
    "an owner on a type limit": (("type", 7, "noop", 1, None, None), "task_limits_owner_only_for_keys"),
    "empty name": (("key", 7, "", 1, None, None), "task_limits_name_valid"),
    "name of 201 characters": (("key", 7, "k" * 201, 1, None, None), "task_limits_name_valid"),
    "negative max_running": (("queue", 0, "q", -1, None, None), "task_limits_max_running_valid"),
    "zero rate": (("key", 7, "k", None, 0, None), "task_limits_rate_positive"),
    "burst without a rate": (("key", 7, "k", 3, None, 5), "task_limits_burst_with_rate"),
    "burst 0": (("key", 7, "k", None, 2, 0), "task_limits_burst_with_rate"),
}  # fmt: skip


def test_task_limits_constraints(conn):
    insert = f"INSERT INTO task_limits ({', '.join(LIMIT_COLUMNS)}) VALUES (%s, %s, %s, %s, %s, %s)"
    # The control group: a pause (0), a rate with its burst, a cap with no rate, each scope.
    for valid in [("key", 7, "gpu", 0, None, None), ("key", 7, "api", None, 2.5, 5),
                  ("type", 0, "noop", 3, None, None), ("queue", 0, "q", 1, 10, None)]:  # fmt: skip
        conn.execute(insert, valid)
    wrong = {}
    for case, (values, constraint) in INVALID_LIMITS.items():
        try:
            conn.execute(insert, values)
            wrong[case] = "accepted"
        except psycopg.errors.CheckViolation as rejected:
            if rejected.diag.constraint_name != constraint:
                wrong[case] = f"rejected by {rejected.diag.constraint_name}, not {constraint}"
    assert wrong == {}
    with pytest.raises(psycopg.errors.UniqueViolation) as rejected:
        conn.execute(insert, ("key", 7, "gpu", 5, None, None))
    assert rejected.value.diag.constraint_name == "task_limits_pkey"
    assert conn.execute("SELECT count(*) AS n FROM task_limits").fetchone()["n"] == 4


def test_key_weights_are_bounded(conn):
    assert conn.execute("SELECT weight FROM api_keys WHERE id = %s", (add_key(conn),)).fetchone() == {
        "weight": 1
    }
    add_key(conn, weight=1000)
    add_key(conn, weight=0.001)
    for weight in (0, -1, 1000.5):
        with pytest.raises(psycopg.errors.CheckViolation) as rejected:
            add_key(conn, weight=weight)
        assert rejected.value.diag.constraint_name == "api_keys_weight_in_range"


def test_unique_keys_are_unique_per_owner_among_unfinished_tasks_only(conn):
    """tasks_unique_idx, as a DBA inserting by hand meets it: one pending or processing task per
    owner (NULL is one owner) and unique_key; finished tasks and other owners do not count."""
    first = insert_task(conn, unique_key="nightly")
    with pytest.raises(psycopg.errors.UniqueViolation) as rejected:
        conn.execute("INSERT INTO tasks (task_type, input, unique_key) VALUES ('noop', 'null', 'nightly')")
    assert rejected.value.diag.constraint_name == "tasks_unique_idx"
    conn.execute(
        "INSERT INTO tasks (task_type, input, unique_key, owner_key_id) VALUES ('noop', 'null', 'nightly', 5)"
    )
    conn.execute("UPDATE tasks SET status = 'completed', finished_at = now() WHERE id = %s", (first,))
    conn.execute("INSERT INTO tasks (task_type, input, unique_key) VALUES ('noop', 'null', 'nightly')")
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE unique_key = 'nightly'").fetchone()["n"] == 3


def test_task_attempts_constraints(conn):
    task_id = insert_task(conn)
    insert = (
        "INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, finished_at) "
        "VALUES (%s, %s, 'w1', 'failed', now(), now() + %s::interval)"
    )
    conn.execute(insert, (task_id, 1, "0 s"))  # the valid row

    with pytest.raises(psycopg.errors.CheckViolation) as rejected:
        conn.execute(insert, (task_id, 0, "1 s"))
    assert rejected.value.diag.constraint_name == "task_attempts_attempt_positive"
    with pytest.raises(psycopg.errors.CheckViolation) as rejected:
        conn.execute(insert, (task_id, 2, "-1 s"))
    assert rejected.value.diag.constraint_name == "task_attempts_finished_after_start"
    with pytest.raises(psycopg.errors.ForeignKeyViolation) as rejected:
        conn.execute(insert, (task_id + 1000, 1, "1 s"))
    assert rejected.value.diag.constraint_name == "task_attempts_task_fkey"

    # The history goes with its task.
    conn.execute("DELETE FROM tasks WHERE id = %s", (task_id,))
    assert conn.execute("SELECT count(*) AS n FROM task_attempts").fetchone()["n"] == 0


# --- the self-audit (task_invariant_violations) -------------------------------------------------


def _claim_and_start_all(conn, worker_id: str = "w1") -> None:
    refs = [
        AttemptRef(t.id, t.attempt)
        for t in task_claim(conn, worker_id=worker_id, limit=100, lease_seconds=60)
    ]
    started = task_start_many(conn, worker_id=worker_id, started_ago=dict.fromkeys(refs, 0))
    assert started == {r.task_id for r in refs}


def test_invariant_audit_is_empty_on_a_healthy_queue(conn):
    done, failed, running, waiting, released, cancelled = (
        insert_task(conn, max_attempts=1) for _ in range(6)
    )
    refs = {
        t.id: AttemptRef(t.id, t.attempt) for t in task_claim(conn, worker_id="w1", limit=4, lease_seconds=60)
    }
    task_start_many(conn, worker_id="w1", started_ago={refs[done]: 0, refs[failed]: 0, refs[running]: 0})
    task_complete_many(conn, worker_id="w1", results=[(refs[done], "1")])
    task_fail_many(
        conn, worker_id="w1", backoff_base=1, backoff_max=1,
        failures=[AttemptFailure(failed, 1, "crashed", "died")],
    )  # fmt: skip
    task_hand_back_many(conn, worker_id="w1", refs=[refs[waiting]])  # released
    task_cancel(conn, cancelled)
    assert {task_row(conn, t)["status"] for t in (done, failed, running, waiting, released, cancelled)} == {
        "completed", "failed", "processing", "pending", "cancelled",
    }  # fmt: skip
    assert invariant_violations(conn) == set()


def test_invariant_audit_names_each_broken_invariant(conn):
    """Break each invariant by hand, as only a bug or a DBA's edit could (the constraints that
    forbid two of them are dropped first), and one more an hour ago, outside the audit window."""
    conn.execute("ALTER TABLE tasks DROP CONSTRAINT tasks_result_only_when_completed")
    conn.execute("ALTER TABLE tasks DROP CONSTRAINT tasks_lease_iff_processing")
    lapsed, mismatch, twice, result, leased, old = (insert_task(conn, max_attempts=3) for _ in range(6))
    _claim_and_start_all(conn)
    conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 minute' WHERE id = %s", (lapsed,))
    for task_id in (mismatch, twice, leased, old):
        task_complete_many(conn, worker_id="w1", results=[(AttemptRef(task_id, 1), "1")])
    conn.execute("UPDATE tasks SET attempts = 2 WHERE id = %s", (mismatch,))
    conn.execute(
        "INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at) "
        "SELECT task_id, 2, worker_id, outcome, started_at FROM task_attempts WHERE task_id = %s",
        (twice,),
    )
    conn.execute("UPDATE tasks SET result = '1' WHERE id = %s", (result,))  # processing, with a result
    conn.execute("UPDATE tasks SET lease_expires_at = now() + interval '1 minute' WHERE id = %s", (leased,))
    conn.execute(
        "UPDATE tasks SET attempts = 3, finished_at = now() - interval '1 hour' WHERE id = %s", (old,)
    )

    assert invariant_violations(conn) == {
        (lapsed, "lease_lapsed"),
        (mismatch, "attempts_mismatch"),
        (twice, "several_completions"),
        (twice, "attempts_mismatch"),
        (result, "result_not_completed"),
        (leased, "final_with_lease"),
    }
    # Past its lease by less than the slowest worker's rescue interval (+1 s) is not overdue yet.
    conn.execute(
        "INSERT INTO task_workers (worker_id, host, pid, version, concurrency, lease_seconds, "
        "rescue_interval_seconds, lock_key, session_pid) VALUES ('w9', 'h', 1, 't', 1, 30, 120, 1, 1)"
    )
    assert (lapsed, "lease_lapsed") not in invariant_violations(conn)
