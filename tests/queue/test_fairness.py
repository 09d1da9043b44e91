"""Fair shares between owners (issue 16, point 1), in the engine: within a queue and priority the
claim takes tasks by turn (skiplock/sql/turns.py, task_turn_start), so an owner that arrives
behind another's backlog gets starts in proportion to its weight at once, an owner's fairness
keys rotate evenly within its share, priority stays strict, and a lone owner gets everything.

Shares are measured as a worker sees them: claims in batches (each batch started and completed,
as a worker would), the owner of every claimed task counted over a window of claims."""

from __future__ import annotations

from collections import Counter

import pytest

from skiplock.sql.fenced import AttemptRef, task_complete_many, task_start_many
from skiplock.sql.inserts import NewTask, task_insert, task_insert_many
from tests.helpers import add_key, admit, claim, task_row

BATCH = 20  # tasks per claim, as a worker with a few processes claims ahead
A_BACKLOG = 2_000
B_TASKS = 200
WINDOW = 200  # claims over which a share is measured
TOLERANCE = 0.10


def new_tasks(n: int, **fields) -> list[NewTask]:
    fields = {"task_type": "noop", "input_json": "null", "queue": "default", "priority": 0,
              "max_attempts": 3, "timeout_seconds": 30} | fields  # fmt: skip
    return [NewTask(**fields) for _ in range(n)]


def submit(conn, owner: int | None, n: int, chunk: int = 500, **fields) -> list[int]:
    """n tasks of `owner` in batches of `chunk` (as a client posting batches)."""
    ids = []
    for start in range(0, n, chunk):
        answers = task_insert_many(conn, new_tasks(min(chunk, n - start), **fields), owner_key_id=owner)
        ids += [a.id for a in answers]
    return ids


def submit_one_by_one(conn, owner: int | None, n: int, **fields) -> list[int]:
    """n tasks of `owner`, one submit each (the single insert's own statement)."""
    fields = {"queue": "default", "priority": 0} | fields
    return [
        task_insert(
            conn,
            task_type="noop",
            input=None,
            max_attempts=3,
            timeout_seconds=30,
            owner_key_id=owner,
            full_row=False,
            **fields,
        )["id"]
        for _ in range(n)
    ]


def run_claims(conn, n: int, batch: int = BATCH, worker_id: str = "w1") -> list[dict]:
    """Claim up to n tasks in batches, starting and completing each batch as a worker would;
    the claimed rows (id, owner, fairness key, priority) in claim order. Stops early when a
    claim comes back empty."""
    claimed: list[dict] = []
    while len(claimed) < n:
        tasks = claim(conn, worker_id=worker_id, limit=min(batch, n - len(claimed)))
        if not tasks:
            break
        refs = [AttemptRef(t.id, t.attempt) for t in tasks]
        assert task_start_many(conn, worker_id=worker_id, started_ago=dict.fromkeys(refs, 0)) == {
            r.task_id for r in refs
        }
        assert task_complete_many(conn, worker_id=worker_id, results=[(r, "null") for r in refs]) == {
            r.task_id for r in refs
        }
        rows = {
            r["id"]: r
            for r in conn.execute(
                "SELECT id, owner_key_id, fairness_key, priority FROM tasks WHERE id = ANY(%s)",
                ([t.id for t in tasks],),
            )
        }
        claimed += [rows[t.id] for t in tasks]
    return claimed


def owners(claimed: list[dict]) -> list[int | None]:
    return [r["owner_key_id"] for r in claimed]


@pytest.mark.parametrize(
    ("a_has_key", "b_weight", "b_share"),
    [
        pytest.param(True, 1.0, 0.5, id="weights 1:1"),
        pytest.param(True, 3.0, 0.75, id="weights 1:3"),
        pytest.param(False, 1.0, 0.5, id="no owner (auth off) is one owner"),
    ],
)
def test_a_newcomer_gets_its_weighted_share_at_once_behind_a_backlog(conn, a_has_key, b_weight, b_share):
    a = add_key(conn, "bulk importer") if a_has_key else None
    b = add_key(conn, "interactive", weight=b_weight)
    a_ids = submit(conn, a, A_BACKLOG)
    # Workers are busy with A's backlog when B arrives.
    assert set(owners(run_claims(conn, 100))) == {a}
    b_ids = submit_one_by_one(conn, b, B_TASKS // 2) + submit(conn, b, B_TASKS // 2, chunk=50)

    window = owners(run_claims(conn, WINDOW))
    assert len(window) == WINDOW
    share = window.count(b) / WINDOW
    assert abs(share - b_share) <= TOLERANCE, f"B got {share:.0%} of the starts, not {b_share:.0%}"
    # Spread over the window, not bunched: each quarter of it gives B its share too.
    quarters = [window[i : i + WINDOW // 4].count(b) / (WINDOW // 4) for i in range(0, WINDOW, WINDOW // 4)]
    assert all(abs(q - b_share) <= 0.2 for q in quarters), quarters

    # Work-conserving: B finishes long before A, then A gets every claim (full batches until
    # the queue is dry); nothing is lost or claimed twice.
    rest = owners(run_claims(conn, A_BACKLOG + B_TASKS))
    assert Counter(window + rest) == {a: A_BACKLOG - 100, b: B_TASKS}
    assert set(rest[-1000:]) == {a}
    statuses = conn.execute(
        "SELECT status::text, count(*) FROM tasks WHERE id = ANY(%s) GROUP BY 1", (a_ids + b_ids,)
    ).fetchall()
    assert statuses == [{"status": "completed", "count": A_BACKLOG + B_TASKS}]


def test_an_owners_tasks_keep_their_order_within_its_share(conn):
    a, b = add_key(conn, "a"), add_key(conn, "b")
    a_ids = submit(conn, a, 300)
    b_ids = submit_one_by_one(conn, b, 40)
    claimed = run_claims(conn, 340)
    assert [r["id"] for r in claimed if r["owner_key_id"] == a] == a_ids
    assert [r["id"] for r in claimed if r["owner_key_id"] == b] == b_ids


def test_fairness_keys_of_one_batch_rotate_evenly_within_the_owner(conn):
    """A client serving many customers sends its customer id as fairness_key: a batch of 30
    tasks for x, 20 for y, 10 for z (in that order) starts them in rotation, not x's first."""
    client = add_key(conn, "platform")
    batch = [
        *new_tasks(30, fairness_key="x"), *new_tasks(20, fairness_key="y"), *new_tasks(10, fairness_key="z"),
    ]  # fmt: skip
    task_insert_many(conn, batch, owner_key_id=client)
    keys = [r["fairness_key"] for r in run_claims(conn, 60, batch=7)]
    # Each round of the rotation starts one task of every key that has work.
    assert Counter(keys[:30]) == {"x": 10, "y": 10, "z": 10}
    assert Counter(keys[30:50]) == {"x": 10, "y": 10}
    assert keys[50:] == ["x"] * 10
    for start in range(0, 30, 3):
        assert sorted(keys[start : start + 3]) == ["x", "y", "z"], keys[:30]


def test_fairness_keys_share_only_their_owners_share(conn):
    """An owner with ten fairness keys gets no more of the workers than an owner with one."""
    many, one = add_key(conn, "many keys"), add_key(conn, "one key")
    tasks = [t for k in range(10) for t in new_tasks(40, fairness_key=f"customer-{k}")]
    task_insert_many(conn, tasks, owner_key_id=many)
    submit(conn, one, 400)
    window = owners(run_claims(conn, WINDOW))
    assert abs(window.count(one) / WINDOW - 0.5) <= TOLERANCE


def test_priority_stays_strict_across_owners_and_weights(conn):
    heavy = add_key(conn, "heavy", weight=1000)
    light = add_key(conn, "light")
    submit(conn, heavy, 500, priority=0)
    urgent = submit_one_by_one(conn, light, 30, priority=5)
    later = submit(conn, light, 30, priority=-1)
    claimed = run_claims(conn, 560)
    assert [r["id"] for r in claimed[:30]] == urgent
    assert {r["owner_key_id"] for r in claimed[30:530]} == {heavy}
    assert [r["id"] for r in claimed[530:]] == later
    assert [r["priority"] for r in claimed] == sorted((r["priority"] for r in claimed), reverse=True)


def test_a_lone_owner_gets_every_claim(conn):
    """Work-conserving: nobody else has work, so every claim is full until the queue is dry."""
    alone = add_key(conn, "alone", weight=0.01)
    ids = submit(conn, alone, 300)
    sizes = []
    for worker in ("w1", "w2", "w3") * 3:
        batch = claim(conn, worker_id=worker, limit=50)
        sizes.append(len(batch))
    assert sizes == [50] * 6 + [0] * 3
    claimed = conn.execute("SELECT id FROM tasks WHERE status = 'processing' ORDER BY id").fetchall()
    assert [r["id"] for r in claimed] == ids


def test_delayed_tasks_falling_due_join_the_rotation_at_its_head(conn):
    """Admission gives tasks that fell due their turns the same way: B's scheduled tasks do not
    queue behind A's backlog when their run_at comes."""
    a, b = add_key(conn, "a"), add_key(conn, "b")
    submit(conn, a, 1_000)
    scheduled = submit(conn, b, 100, delay_seconds=3600)
    assert {task_row(conn, i)["turn"] for i in scheduled} == {None}
    run_claims(conn, 100)
    conn.execute("UPDATE tasks SET run_at = now() - interval '1 second' WHERE id = ANY(%s)", (scheduled,))
    assert admit(conn).promoted == 100
    window = owners(run_claims(conn, 100))
    assert abs(window.count(b) / 100 - 0.5) <= TOLERANCE
