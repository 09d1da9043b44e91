"""What a worker has handed to its task processes (task_hand_over, task_workers.in_hand), and
how rescues, cancellations and releases read it: an attempt in a worker's hands may have started,
so none of them takes it for one that did not (the history never hides a run), while an attempt
still waiting in its worker goes back uncounted."""

from __future__ import annotations

import threading

import psycopg
import pytest

from skiplock.db import connect
from skiplock.sql.fenced import AttemptRef, task_hand_over
from skiplock.sql.limits import release_unstarted
from skiplock.sql.tasks import task_attempts_list, task_cancel
from skiplock.sql.workers import task_workers_mark_gone
from tests.helpers import claim, expire_lease, insert_many, rescue, task_row, wait_until
from tests.queue.test_rescue import live_worker, register


def refs_of(tasks) -> list[AttemptRef]:
    return [AttemptRef(t.id, t.attempt) for t in tasks]


def in_hand(conn, worker_id: str) -> dict[int, int]:
    rows = conn.execute(
        "SELECT h.id, h.attempt FROM task_workers w, unnest(w.in_hand, w.in_hand_attempts) AS h(id, attempt) "
        "WHERE w.worker_id = %s",
        (worker_id,),
    ).fetchall()
    return {r["id"]: r["attempt"] for r in rows}


@pytest.fixture
def worker(conn) -> str:
    """A registered worker row (its session is not needed here)."""
    register(conn, "w1", 1, conn.info.backend_pid)
    return "w1"


def test_a_hand_over_lists_what_the_worker_holds_and_passes_only_its_own(conn, worker):
    a, b, c, other = insert_many(conn, 4)
    mine = refs_of(claim(conn, worker_id=worker, limit=3))
    claim(conn, worker_id="w2", limit=1)
    ra, rb, rc = mine

    assert task_hand_over(conn, worker_id=worker, handing=[ra, rb], kept=[]) == {ra, rb}
    assert in_hand(conn, worker) == {a: 1, b: 1}
    # The next one lists what it sends and what is still in hand; a's outcome was stored.
    assert task_hand_over(conn, worker_id=worker, handing=[rc], kept=[rb]) == {rc}
    assert in_hand(conn, worker) == {b: 1, c: 1}
    # Not ours (another worker's task, an attempt we do not hold): neither passed nor listed.
    assert (
        task_hand_over(conn, worker_id=worker, handing=[AttemptRef(other, 1), AttemptRef(a, 2)], kept=[])
        == set()
    )
    assert in_hand(conn, worker) == {}
    # Nothing passes for a worker without a row (it has not registered).
    assert task_hand_over(conn, worker_id="ghost", handing=[rc], kept=[]) == set()


def test_a_dead_workers_attempts_in_hand_are_lost_and_counted_the_rest_released(database_url, conn):
    handed, waiting = insert_many(conn, 2)
    with live_worker(database_url, conn, "dead:1"):
        refs = refs_of(claim(conn, worker_id="dead:1", limit=2))
        task_hand_over(conn, worker_id="dead:1", handing=refs[:1], kept=[])
        handed_at = conn.execute("SELECT in_hand_at FROM task_workers WHERE worker_id = 'dead:1'").fetchone()[
            "in_hand_at"
        ]
    assert task_workers_mark_gone(conn) == ["dead:1"]

    assert rescue(conn, grace_seconds=0) == {handed: "pending", waiting: "pending"}

    [lost] = task_attempts_list(conn, handed)
    assert (lost["outcome"], lost["started_at"]) == ("lost", handed_at)
    assert task_row(conn, handed)["attempts"] == 1  # counted
    [released] = task_attempts_list(conn, waiting)
    assert (released["outcome"], released["started_at"]) == ("released", None)
    assert task_row(conn, waiting)["attempts"] == 0


def test_a_lapsed_lease_counts_an_attempt_in_hand_as_started(conn, worker):
    task_id, stale = insert_many(conn, 2)
    ref, stale_ref = refs_of(claim(conn, worker_id=worker, limit=2))
    task_hand_over(conn, worker_id=worker, handing=[ref], kept=[])
    expire_lease(conn, task_id)
    expire_lease(conn, stale)
    # An entry of another attempt of the same task is stale: it proves nothing about this one.
    conn.execute(
        "UPDATE task_workers SET in_hand = in_hand || %s::bigint, in_hand_attempts = in_hand_attempts || %s::int "
        "WHERE worker_id = %s",
        (stale, stale_ref.attempt + 1, worker),
    )

    assert rescue(conn) == {task_id: "pending", stale: "pending"}
    assert [a["outcome"] for a in task_attempts_list(conn, task_id)] == ["lost"]
    assert [a["outcome"] for a in task_attempts_list(conn, stale)] == ["released"]


def test_a_cancel_counts_an_attempt_in_hand_as_started(conn, worker):
    handed, waiting = insert_many(conn, 2)
    refs = refs_of(claim(conn, worker_id=worker, limit=2))
    task_hand_over(conn, worker_id=worker, handing=refs[:1], kept=[])

    task_cancel(conn, handed)
    task_cancel(conn, waiting)

    [cancelled] = task_attempts_list(conn, handed)
    assert cancelled["outcome"] == "cancelled" and cancelled["started_at"] is not None
    assert task_row(conn, handed)["attempts"] == 1
    assert [a["outcome"] for a in task_attempts_list(conn, waiting)] == ["released"]
    assert task_row(conn, waiting)["attempts"] == 0


def test_a_release_leaves_attempts_in_hand_to_run(conn, worker):
    """A queue's pause (or a limit taking back its slots) releases what workers have claimed and
    not started: not what they have handed to a process, which may be running."""
    handed, waiting = insert_many(conn, 2)
    refs = refs_of(claim(conn, worker_id=worker, limit=2))
    task_hand_over(conn, worker_id=worker, handing=refs[:1], kept=[])

    with conn.transaction():
        released = release_unstarted(
            conn, match="t.queue = %(name)s", params={"name": "default", "channel": "x", "group": None}
        )

    assert released == 1
    assert task_row(conn, handed)["status"] == "processing"
    assert task_row(conn, waiting)["status"] == "pending"


def test_a_hand_over_skips_a_task_a_cancel_has_locked(database_url, conn, worker):
    (task_id,) = insert_many(conn, 1)
    [ref] = refs_of(claim(conn, worker_id=worker, limit=1))
    with connect(database_url, role="test-client") as client, client.transaction():
        client.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
        # The worker does not wait for the cancel: it keeps the task back, unsent, for now.
        assert task_hand_over(conn, worker_id=worker, handing=[ref], kept=[]) == set()
        assert in_hand(conn, worker) == {}
        task_cancel(client, task_id)
    assert [a["outcome"] for a in task_attempts_list(conn, task_id)] == ["released"]


def test_a_cancel_that_waited_for_a_hand_over_sees_it(database_url, conn, worker):
    """The hand-over holds its rows until it commits; a cancel waiting on one then decides in a
    later snapshot, which sees the hand-over: the attempt is cancelled as started."""
    (task_id,) = insert_many(conn, 1)
    [ref] = refs_of(claim(conn, worker_id=worker, limit=1))
    outcome: list[object] = []

    def cancel() -> None:
        with connect(database_url, role="test-client") as client:
            try:
                task_cancel(client, task_id)
                outcome.append("done")
            except psycopg.Error as exc:  # pragma: no cover - reported by the assertion below
                outcome.append(exc)

    with conn.transaction():
        assert task_hand_over(conn, worker_id=worker, handing=[ref], kept=[]) == {ref}
        canceller = threading.Thread(target=cancel)
        canceller.start()
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE NOT l.granted AND a.datname = current_database()"
                ).fetchone()["n"]
                > 0
            ),
            message="the cancel to wait for the hand-over",
        )
    canceller.join(10)
    assert outcome == ["done"]
    [cancelled] = task_attempts_list(conn, task_id)
    assert cancelled["outcome"] == "cancelled"
    assert task_row(conn, task_id)["attempts"] == 1


def test_a_claim_can_record_its_tasks_as_handed_over(conn, worker):
    """An idle worker sends what it claims at once: its claim writes the hand-over itself (one
    round trip less from a submit to its start), keeping what the worker had in hand."""
    first, second, third = insert_many(conn, 3)
    [ref] = refs_of(claim(conn, worker_id=worker, limit=1))
    task_hand_over(conn, worker_id=worker, handing=[ref], kept=[])

    plain = claim(conn, worker_id=worker, limit=1)
    assert [t.in_hand for t in plain] == [False]
    assert in_hand(conn, worker) == {first: 1}  # a plain claim leaves the record alone

    # It takes three and sends the first two at once: those are recorded, the third waits.
    more = insert_many(conn, 2)
    fused = claim(conn, worker_id=worker, limit=3, hand_over=2, in_hand=[(first, 1)])
    assert [(t.id, t.in_hand) for t in fused] == [(third, True), (more[0], True), (more[1], False)]
    assert in_hand(conn, worker) == {first: 1, third: 1, more[0]: 1}
    assert second not in in_hand(conn, worker)

    # Without a row for the worker nothing is recorded, and the tasks say so.
    (fourth,) = insert_many(conn, 1)
    [ghost] = claim(conn, worker_id="ghost", limit=1, hand_over=1)
    assert (ghost.id, ghost.in_hand) == (fourth, False)
