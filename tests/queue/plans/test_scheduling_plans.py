"""Query plans of the scheduling statements (issue 16, point 8) on a big queue: a million finished
tasks, 100,000 runnable ones over 1,000 owners and 1,000 concurrency keys, tasks waiting on 1,000
key limits (most full), scheduled tasks and tasks past their expiry. EXPLAIN (ANALYZE, BUFFERS) of
the very statements the query functions send (tests.helpers.Explain: each write runs once, in a
transaction rolled back after the test), which must reach rows through the partial index made for
them and read buffers in proportion to what they return, never to the backlog or the history:
the claim (both forms) walks tasks_runnable_idx / tasks_runnable_queue_idx in claim order without
sorting the backlog; admission promotes through tasks_scheduled_idx, finds waiting tasks through
tasks_waiting_idx and slots through tasks_limited_idx and tasks_processing_idx; a submit finds its
turn by a few probes of tasks_flow_idx.

The database is built once for the module (INSERT ... SELECT generate_series, turns set as
admission would have given them) and every test leaves it as it found it."""

from __future__ import annotations

import pytest

from skiplock.db import connect
from skiplock.sql.admission import admission_lock, task_admit
from skiplock.sql.claim import task_claim, task_claim_statement
from skiplock.sql.inserts import NewTask, task_insert, task_insert_many
from tests.helpers import Explain, cloned_database, indexes_used, plan_nodes, seq_scanned

FINISHED = 1_000_000
OWNERS = 1_000
KEYS = 1_000  # concurrency keys of the runnable tasks, one set per owner
RUNNABLE = 100_000
QUEUES = 5
LIMITED_GROUPS = 1_000  # key limits: (owner o, 'lim'), max_running 5
MAX_RUNNING = 5
OPEN_GROUPS = 100  # of which this many have 2 slots free
WAITING_PER_GROUP = 20
SCHEDULED = 50_000
DUE = 500  # of the scheduled ones, fallen due (admission gives them turns)
EXPIRED = 200  # runnable tasks past their expires_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big(server_url, template_db):
    with cloned_database(server_url, template_db, "sched") as url, connect(url, role="test") as conn:
        _fill(conn)
        yield conn


@pytest.fixture
def db(big):
    """The big database in a transaction rolled back after the test (what it wrote is undone)."""
    with big.transaction(force_rollback=True):
        yield big


def _fill(conn) -> None:
    # A fill, not a statement under test: its millions of rows may take longer than the bound
    # a skiplock session puts on one statement (on a busy CI machine they did).
    conn.execute("SET statement_timeout = 0")
    conn.execute(
        "INSERT INTO api_keys (name, prefix, token_sha256, weight) "
        "SELECT 'owner ' || g, 'skl_' || lpad(g::text, 8, '0'), sha256(g::text::bytea), 1 + g %% 3 "
        "FROM generate_series(1, %s) g",
        (OWNERS,),
    )
    # History: finished tasks of every owner, with the keys the live tasks use (the partial
    # indexes must keep them out).
    conn.execute("SET session_replication_role = replica")  # no notify trigger per statement
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, status, result, progress, attempts, worker_id,
                           owner_key_id, concurrency_key, unique_key, run_at, created_at, started_at,
                           finished_at)
        SELECT 'noop', 'q' || g %% %(queues)s, 'null', 'completed', 'null', 1, 1, 'w1',
               1 + g %% %(owners)s, 'ck' || g %% %(keys)s, 'u' || g, now() - interval '2 days',
               now() - interval '2 days', now() - interval '2 days', now() - interval '1 day'
        FROM generate_series(1, %(n)s) g
        """,
        {"n": FINISHED, "queues": QUEUES, "owners": OWNERS, "keys": KEYS},
    )
    # Runnable: owner o's k-th task of a queue and priority has turn k / weight (its flow's
    # spacing), as submits and admission give them.
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, priority, owner_key_id, concurrency_key, turn, expires_at)
        SELECT 'noop', 'q' || g %% %(queues)s, 'null', (g / %(owners)s) %% 2, 1 + g %% %(owners)s,
               'ck' || (g / 7) %% %(keys)s, (g / %(owners)s + 1)::float8 / (1 + (1 + g %% %(owners)s) %% 3),
               CASE WHEN g <= %(expired)s THEN now() - interval '1 minute'
                    WHEN g %% 10 = 0 THEN now() + interval '1 day' END
        FROM generate_series(1, %(n)s) g
        """,
        {"n": RUNNABLE, "queues": QUEUES, "owners": OWNERS, "keys": KEYS, "expired": EXPIRED},
    )
    # Key limits: every group holds MAX_RUNNING slots (processing, started) but OPEN_GROUPS hold
    # 2 fewer; WAITING_PER_GROUP wait on each.
    conn.execute(
        "INSERT INTO task_limits (scope, owner_key_id, name, max_running) SELECT 'key', g, 'lim', %s "
        "FROM generate_series(1, %s) g",
        (MAX_RUNNING, LIMITED_GROUPS),
    )
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, status, attempts, worker_id, lease_expires_at,
                           started_at, owner_key_id, concurrency_key, turn, limited)
        SELECT 'noop', 'q0', 'null', 'processing', 1, 'w2', now() + interval '1 hour', now(), o, 'lim', s, true
        FROM generate_series(1, %(groups)s) o, generate_series(1, %(max)s) s
        WHERE o > %(open)s OR s <= %(max)s - 2
        """,
        {"groups": LIMITED_GROUPS, "max": MAX_RUNNING, "open": OPEN_GROUPS},
    )
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, owner_key_id, concurrency_key, turn, waiting_on)
        SELECT 'noop', 'q0', 'null', o, 'lim', 100 + s, 'key:' || o || ':lim'
        FROM generate_series(1, %s) o, generate_series(1, %s) s
        """,
        (LIMITED_GROUPS, WAITING_PER_GROUP),
    )
    # Scheduled (no turn yet), DUE of them fallen due.
    conn.execute(
        """
        INSERT INTO tasks (task_type, queue, input, owner_key_id, run_at)
        SELECT 'noop', 'q' || g %% %(queues)s, 'null', 1 + g %% %(owners)s,
               now() + CASE WHEN g <= %(due)s THEN -interval '1 second' ELSE make_interval(secs => g) END
        FROM generate_series(1, %(n)s) g
        """,
        {"n": SCHEDULED, "due": DUE, "queues": QUEUES, "owners": OWNERS},
    )
    conn.execute("SET session_replication_role = DEFAULT")
    conn.execute("VACUUM ANALYZE tasks")
    conn.execute("VACUUM ANALYZE task_limits")
    conn.execute("VACUUM ANALYZE api_keys")
    conn.execute("RESET statement_timeout")


def buffers(plan: dict) -> int:
    return plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)


def reads_tasks_unlimited(node: dict) -> bool:
    """Whether rows of tasks reach this node without passing a Limit."""
    return any(
        child.get("Relation Name") == "tasks"
        or (child["Node Type"] != "Limit" and reads_tasks_unlimited(child))
        for child in node.get("Plans", ())
    )


def sorts_of_tasks(plan: dict) -> list[dict]:
    return [n for n in plan_nodes(plan) if n["Node Type"] == "Sort" and reads_tasks_unlimited(n)]


def test_the_queue_is_as_big_as_described(big):
    counts = big.execute(
        """
        SELECT count(*) FILTER (WHERE status = 'completed') AS finished,
               count(*) FILTER (WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL) AS runnable,
               count(DISTINCT owner_key_id) FILTER (WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL) AS owners,
               count(DISTINCT concurrency_key) FILTER (WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL) AS keys,
               count(*) FILTER (WHERE waiting_on IS NOT NULL) AS waiting,
               count(*) FILTER (WHERE status = 'pending' AND turn IS NULL) AS scheduled
        FROM tasks
        """
    ).fetchone()
    assert counts == {
        "finished": FINISHED, "runnable": RUNNABLE, "owners": OWNERS, "keys": KEYS,
        "waiting": LIMITED_GROUPS * WAITING_PER_GROUP, "scheduled": SCHEDULED,
    }  # fmt: skip
    usage = big.execute(
        "SELECT count(*) FILTER (WHERE running = %s) AS full, count(*) FILTER (WHERE running = %s) AS open "
        "FROM task_limit_usage",
        (MAX_RUNNING, MAX_RUNNING - 2),
    ).fetchone()
    assert usage == {"full": LIMITED_GROUPS - OPEN_GROUPS, "open": OPEN_GROUPS}


# --- the claim ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queues", "types", "index"),
    [
        (None, None, "tasks_runnable_idx"),
        (None, ["noop"], "tasks_runnable_idx"),
        (["q1"], None, "tasks_runnable_queue_idx"),
        (["q1", "q3", "q4"], ["noop"], "tasks_runnable_queue_idx"),
    ],
)
def test_the_claim_walks_the_runnable_index_in_claim_order(db, queues, types, index):
    statement, queue_params = task_claim_statement(queues)
    params = {"types": types, "limit": 100, "worker_id": "w1", "lease": 30.0} | queue_params
    [row] = db.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params, prepare=False
    ).fetchall()
    plan = row["QUERY PLAN"][0]["Plan"]
    assert "tasks" not in seq_scanned(plan), plan
    scans = [n for n in plan_nodes(plan) if n.get("Index Name") == index]
    assert scans and all(n["Node Type"] == "Index Scan" for n in scans), plan
    assert sorts_of_tasks(plan) == [], plan
    # 100 rows claimed (locked and updated: heap, pkey and the indexes the update touches); the
    # expired tasks at the head are skipped. A walk of the backlog reads thousands of pages.
    assert buffers(plan) < 5_000, plan
    claimed = next(n for n in plan_nodes(plan) if n["Node Type"] == "ModifyTable")
    assert claimed["Actual Rows"] == 100


def test_the_claim_takes_the_head_of_the_rotation(db):
    claimed = task_claim(db, worker_id="w1", limit=50, lease_seconds=30)
    assert len(claimed) == 50
    rows = db.execute(
        "SELECT id, priority, turn, owner_key_id FROM tasks WHERE id = ANY(%s)", ([t.id for t in claimed],)
    ).fetchall()
    # Priority 1 first; the lowest turns of it (weight 3 owners' first tasks come first).
    assert {r["priority"] for r in rows} == {1}
    head = db.execute(
        "SELECT max(turn) AS t FROM (SELECT turn FROM tasks WHERE status = 'pending' AND turn IS NOT NULL "
        "AND waiting_on IS NULL AND priority = 1 AND (expires_at IS NULL OR expires_at > now()) "
        "ORDER BY turn, id LIMIT 1) h"
    ).fetchone()["t"]
    assert max(r["turn"] for r in rows) <= head + 1
    assert len({r["owner_key_id"] for r in rows}) > 10, "one owner's backlog came first"


# --- admission ------------------------------------------------------------------------------------


def _admission_plans(db) -> tuple[list[tuple[str, dict]], object]:
    explain = Explain(db, analyze=True, rows=True)
    with db.transaction():
        admission_lock(db)
        done = task_admit(explain)
    return list(zip(explain.statements, explain.plans, strict=True)), done


def _plan_with(plans: list[tuple[str, dict]], marker: str) -> dict:
    found = [plan for statement, plan in plans if marker in statement]
    assert len(found) == 1, f"{len(found)} statements contain {marker!r}"
    return found[0]


def test_an_admission_reads_what_it_moves_through_its_indexes(db):
    plans, done = _admission_plans(db)
    assert (done.expired, done.promoted, done.admitted) == (EXPIRED, DUE, 2 * OPEN_GROUPS)
    assert done.waiting == 1
    for statement, plan in plans:
        assert "tasks" not in seq_scanned(plan), (statement, plan)
        assert sorts_of_tasks(plan) == [], (statement, plan)

    expire = _plan_with(plans, "expires_at <= now()")
    assert "tasks_expiry_idx" in indexes_used(expire), expire
    promote = _plan_with(plans, "turn IS NULL AND run_at <= now()")
    assert {"tasks_scheduled_idx", "tasks_flow_idx"} <= indexes_used(promote), promote
    assert indexes_used(promote) <= {
        "tasks_scheduled_idx", "tasks_flow_idx", "tasks_runnable_queue_idx", "tasks_runnable_idx", "tasks_pkey",
    }, promote  # fmt: skip
    # The limits with a free slot, from the slots held (task_limits itself is read whole: a
    # limit per row, far fewer than tasks).
    slots = _plan_with(plans, "LEFT JOIN task_limit_held")
    assert indexes_used(slots) - {"task_limits_pkey"} == {"tasks_limited_idx", "tasks_processing_idx"}, slots
    candidates = _plan_with(plans, "LIMIT w.n")
    # (task_limits_pkey: whether a candidate's own key has a limit, one probe each)
    assert "tasks_waiting_idx" in indexes_used(candidates), candidates
    assert indexes_used(candidates) <= {"tasks_waiting_idx", "task_limits_pkey"}, candidates
    admit = _plan_with(plans, "SET waiting_on = NULL, limited = true")
    assert indexes_used(admit) == {"tasks_pkey"}, admit

    # Due tasks are read off the head of tasks_scheduled_idx: the DUE that fell due, never the
    # 49,500 scheduled behind them.
    [due] = [n for n in plan_nodes(promote) if n.get("Index Name") == "tasks_scheduled_idx"]
    assert (due["Actual Rows"], due["Actual Loops"]) == (DUE, 1), promote
    # Each in proportion to what it moves: the slots read are the 5,000 processing tasks (one
    # entry and heap row each, neighbours sharing pages); the rest, pages per row moved. A
    # promoted task here is a flow of its own (500 owners): its turn's probes (about 50 pages
    # measured) and its new index entries (about 25).
    assert buffers(expire) < 50 * EXPIRED + 100, expire
    assert buffers(promote) < 100 * DUE + 100, promote
    assert buffers(slots) < 2 * LIMITED_GROUPS * MAX_RUNNING, slots
    assert buffers(candidates) < 20 * 2 * OPEN_GROUPS + 100, candidates
    # An admitted task: a primary-key probe, and its new entries in the indexes it enters now
    # (runnable, limited, ...): about 33 pages measured.
    assert buffers(admit) < 45 * 2 * OPEN_GROUPS + 100, admit


def test_a_second_admission_with_nothing_to_do_is_cheap(db):
    with db.transaction():
        admission_lock(db)
        task_admit(db)
    plans, done = _admission_plans(db)
    assert (done.expired, done.promoted, done.admitted) == (0, 0, 0)
    # Every limit with waiting tasks is full now: nothing is asked of tasks_waiting_idx.
    assert not any("LIMIT w.n" in statement for statement, _ in plans)
    for statement, plan in plans:
        assert "tasks" not in seq_scanned(plan), (statement, plan)
    # The slots (5,000 processing rows) dominate. The probes for expired and due tasks read a
    # page per task the first admission moved (in this same transaction their old index entries
    # cannot be marked dead yet), never the scheduled tasks that are not due.
    assert buffers(_plan_with(plans, "expires_at <= now()")) < EXPIRED + 20
    assert buffers(_plan_with(plans, "turn IS NULL AND run_at <= now()")) < DUE + 20


def test_an_admission_of_freed_slots_probes_only_their_keys(db):
    """What a worker runs after its tasks' outcomes are written: the keys they held (the 100 with
    free slots, and as many full ones), one statement that counts each key's slots by a probe of
    tasks_key_slots_idx and takes its first waiting tasks from tasks_waiting_idx: in proportion to
    the keys named, never the 5,000 slots held by the other 900 keys."""
    freed = {f"key:{o}:lim" for o in range(1, 2 * OPEN_GROUPS + 1)}
    explain = Explain(db, analyze=True, rows=True)
    with db.transaction():
        admission_lock(db)
        done = task_admit(explain, freed=freed)
    assert done.admitted == 2 * OPEN_GROUPS  # the open keys' free slots, nothing of the full ones
    [plan] = explain.plans
    assert "tasks" not in seq_scanned(plan), plan
    assert sorts_of_tasks(plan) == [], plan
    assert {"tasks_key_slots_idx", "tasks_waiting_idx"} <= indexes_used(plan), plan
    assert indexes_used(plan) <= {
        "tasks_key_slots_idx",
        "tasks_waiting_idx",
        "task_limits_pkey",
        "tasks_pkey",
    }, plan
    # Per key named: its limit, its slots, its first waiting tasks; per task admitted its new
    # index entries (as the full admission's admit).
    assert buffers(plan) < 20 * len(freed) + 45 * 2 * OPEN_GROUPS, plan


# --- a submit's turn ------------------------------------------------------------------------------


def _insert_plans(db, submit) -> list[dict]:
    explain = Explain(db, analyze=True, rows=True)
    submit(explain)
    return explain.plans


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="plain"),
        pytest.param({"fairness_key": "customer-7"}, id="fairness key"),
        pytest.param({"concurrency_key": "lim"}, id="under a full key limit"),
        pytest.param({"unique_key": "u-new"}, id="unique key"),
    ],
)
def test_a_submit_finds_its_turn_by_probes_of_the_flow_index(db, fields):
    owner = 17  # has a backlog of its own in queue q1
    [plan] = _insert_plans(
        db,
        lambda c: task_insert(
            c,
            task_type="noop",
            input=None,
            queue="q1",
            priority=0,
            max_attempts=3,
            timeout_seconds=30,
            owner_key_id=owner,
            **fields,
        ),
    )
    assert "tasks" not in seq_scanned(plan), plan
    assert sorts_of_tasks(plan) == [], plan
    assert "tasks_flow_idx" in indexes_used(plan), plan
    assert indexes_used(plan) <= {
        "tasks_flow_idx",
        "tasks_runnable_queue_idx",
        "tasks_runnable_idx",
        "tasks_unique_idx",
    }, plan
    # A few probes of a few pages each, and the new row's index entries.
    assert buffers(plan) < 150, plan
    row = db.execute(
        "SELECT turn, waiting_on FROM tasks WHERE owner_key_id = %s ORDER BY id DESC LIMIT 1", (owner,)
    ).fetchone()
    last = db.execute(
        "SELECT max(turn) AS t FROM tasks WHERE owner_key_id = %s AND queue = 'q1' AND priority = 0 "
        "AND status = 'pending' AND turn IS NOT NULL AND id < (SELECT max(id) FROM tasks)",
        (owner,),
    ).fetchone()["t"]
    if "fairness_key" not in fields:
        assert row["turn"] > last  # after the owner's own backlog
    if "concurrency_key" in fields:
        assert row["waiting_on"] == f"key:{owner}:lim"


def test_a_batch_of_many_owners_probes_once_per_flow(db):
    tasks = [
        NewTask(
            task_type="noop",
            input_json="null",
            queue=f"q{n % QUEUES}",
            priority=0,
            max_attempts=3,
            timeout_seconds=30,
            fairness_key=f"c{n % 4}",
        )
        for n in range(200)
    ]
    [plan] = _insert_plans(db, lambda c: task_insert_many(c, tasks, owner_key_id=42))
    assert "tasks" not in seq_scanned(plan), plan
    assert sorts_of_tasks(plan) == [], plan
    assert "tasks_flow_idx" in indexes_used(plan), plan
    # 20 flows (5 queues x 4 fairness keys), a few probes each (about 50 pages), and 200 new
    # rows with their index entries (about 20 pages each).
    assert buffers(plan) < 200 * 25 + 20 * 100, plan
    probes = [n for n in plan_nodes(plan) if n.get("Index Name") == "tasks_flow_idx"]
    assert probes and max(n["Actual Loops"] for n in probes) <= 20, "a probe per task, not per flow"
