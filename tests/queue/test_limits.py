"""Concurrency and start-rate limits (issue 16, points 2 and 3), in the engine: task_limits set by
skiplock.sql.limits, held by admission (skiplock.sql.admission) and the claim. What holds a slot
is sampled from the rows after every step, two ways: the task_limit_usage view, and the rows
themselves (processing, or admitted under a limit and runnable). Never above the limit, through
claims by several workers, completions, failures and their retries, cancels, rescues, limits
lowered and removed."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from skiplock.db import connect
from skiplock.sql.admission import admission_try_lock, task_admit, task_waiting_orphans_free
from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import AttemptFailure, AttemptRef, task_fail_many, task_held_ids
from skiplock.sql.fragments import CANCEL_CHANNEL
from skiplock.sql.inserts import NewTask, task_insert_many
from skiplock.sql.limits import limit_delete, limit_get, limit_list, limit_put
from skiplock.sql.tasks import task_cancel
from skiplock.sql.workers import task_rescue
from tests.helpers import (
    add_key,
    admit,
    claim,
    complete,
    expire_lease,
    history,
    ids,
    invariant_violations,
    listening,
    make_due,
    received,
    start,
    task_row,
    wait_until,
)

# Backoffs short enough that a retry is due again within the test (it still needs admission).
QUICK = {"backoff_base": 0.001, "backoff_max": 0.001}


def submit(conn, owner: int | None, n: int, **fields) -> list[int]:
    fields = {"task_type": "noop", "input_json": "null", "queue": "default", "priority": 0,
              "max_attempts": 3, "timeout_seconds": 30} | fields  # fmt: skip
    return [a.id for a in task_insert_many(conn, [NewTask(**fields) for _ in range(n)], owner_key_id=owner)]


def holding(conn, where: str, params: tuple = ()) -> int:
    """Tasks matching `where` that hold a slot, from the rows: processing, or admitted under a
    limit and pending with a turn (runnable: a worker may claim it any moment)."""
    return conn.execute(
        f"""
        SELECT count(*) AS n FROM tasks
        WHERE ({where})
          AND (status = 'processing' OR (status = 'pending' AND limited AND turn IS NOT NULL))
        """,
        params,
    ).fetchone()["n"]


def key_holding(conn, owner: int, key: str) -> int:
    return holding(conn, "coalesce(owner_key_id, 0) = %s AND concurrency_key = %s", (owner, key))


def running(conn, scope: str, owner: int, name: str) -> int:
    return limit_get(conn, scope=scope, owner=owner, name=name)["running"]


def waiting_on(conn, task_ids: list[int]) -> set[str | None]:
    return {task_row(conn, i)["waiting_on"] for i in task_ids}


def admit_until_settled(conn, rounds: int = 5) -> None:
    """Admissions until one admits nothing more, as a worker's admitter runs them while tasks
    wait; fails the test if that takes more than `rounds`."""
    for _ in range(rounds):
        if not admit(conn).admitted:
            return
    pytest.fail(f"admission still admitting after {rounds} rounds")


def refs(tasks) -> list[AttemptRef]:
    return [AttemptRef(t.id, t.attempt) for t in tasks]


# --- a key's limit under a worker's every move ------------------------------------------------


def test_a_key_limit_is_never_exceeded_through_claims_finishes_failures_and_rescues(conn):
    owner = add_key(conn, "renderer")
    row = limit_put(conn, scope="key", owner=owner, name="gpu", max_running=3, by="test")
    assert (row["max_running"], row["running"], row["waiting"]) == (3, 0, 0)
    gpu = submit(conn, owner, 30, concurrency_key="gpu")
    free = submit(conn, owner, 10)  # no concurrency key: held by nothing
    # Due at submit, they wait on the limit until an admission admits what it allows.
    assert limit_get(conn, scope="key", owner=owner, name="gpu")["waiting"] == 30
    admit(conn)
    usage = limit_get(conn, scope="key", owner=owner, name="gpu")
    assert (usage["running"], usage["waiting"]) == (3, 27)

    rng = random.Random(16)
    workers = ["w1", "w2", "w3", "w4"]
    held: dict[str, list[AttemptRef]] = {w: [] for w in workers}
    peak, steps = 0, 0
    while steps < 600:
        steps += 1
        worker = rng.choice(workers)
        move = rng.random()
        if move < 0.4:
            claimed = claim(conn, worker_id=worker, limit=rng.randint(1, 5))
            for ref in refs(claimed):
                if rng.random() < 0.7:  # some wait in the worker's backlog, unstarted
                    assert start(conn, worker, ref) == {ref.task_id}
                held[worker].append(ref)
        elif held[worker]:
            ref = held[worker].pop(rng.randrange(len(held[worker])))
            if move < 0.75:
                done = complete(conn, worker, ref)
            elif move < 0.9:
                start(conn, worker, ref)
                failure = AttemptFailure(ref.task_id, ref.attempt, "failed", "boom")
                done = set(task_fail_many(conn, worker_id=worker, failures=[failure], **QUICK))
            else:  # the worker froze: its lease lapses and another worker rescues the task
                expire_lease(conn, ref.task_id)
                rescued = task_rescue(conn, limit=10, grace_seconds=0.5, **QUICK)
                done = {r["id"] for r in rescued}
            assert done == {ref.task_id}
        by_rows = key_holding(conn, owner, "gpu")
        by_view = running(conn, "key", owner, "gpu")
        assert by_rows == by_view <= 3, f"step {steps}: {by_rows} rows, {by_view} in the view"
        peak = max(peak, by_rows)
        if all(task_row(conn, i)["status"] in ("completed", "failed") for i in gpu):
            break
    assert all(task_row(conn, i)["status"] in ("completed", "failed") for i in gpu), (
        f"not done in {steps} steps"
    )
    assert peak == 3, "the limit was never full: the test did not test it"
    assert {task_row(conn, i)["status"] for i in free} <= {"completed", "failed", "processing", "pending"}
    assert running(conn, "key", owner, "gpu") == 0
    assert invariant_violations(conn) == set()
    # Failures and rescues happened, and their retries came back through admission.
    outcomes = {o for i in gpu for (_, _, o) in history(conn, i)}
    assert {"completed", "failed", "lost"} <= outcomes, outcomes


WORKERS = 4


def held_write(conn, worker_id: str, ref: AttemptRef, write) -> None:
    """A fenced write of one attempt, tried again while the row is only locked for a moment (a
    concurrent claim or admission checking it: the fence skips locked rows), as the supervisor
    does; fails the test if the worker no longer holds the attempt."""
    for _ in range(1000):
        if write(conn, worker_id, ref) == {ref.task_id}:
            return
        assert task_held_ids(conn, worker_id=worker_id, refs=[ref]) == {ref.task_id}, f"{ref} was taken away"
        time.sleep(0.001)
    pytest.fail(f"{ref} stayed locked")


def test_a_key_limit_holds_across_concurrent_workers(database_url, conn):
    """Four workers, each on its own connection, admit (one at a time, under the lock), claim,
    start and complete as fast as they can while a fifth connection samples what holds the
    key's slots: never above the limit, and every task runs exactly once."""
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="gpu", max_running=3)
    tasks = submit(conn, owner, 60, concurrency_key="gpu")
    stop = threading.Event()
    samples: list[int] = []
    errors: list[BaseException] = []

    def work(worker_id: str) -> None:
        try:
            with connect(database_url, role=worker_id) as c:
                while not stop.is_set():
                    batch = claim(c, worker_id=worker_id, limit=2)
                    for ref in refs(batch):
                        held_write(c, worker_id, ref, start)
                        held_write(c, worker_id, ref, complete)
                    if not batch:
                        time.sleep(0.002)  # nothing admitted for this worker now: poll again
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def sample() -> None:
        try:
            with connect(database_url, role="sampler") as c:
                while not stop.is_set():
                    samples.append(key_holding(c, owner, "gpu"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{n}",), daemon=True) for n in range(WORKERS)]
    threads.append(threading.Thread(target=sample, daemon=True))
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: errors or all(task_row(conn, i)["status"] == "completed" for i in tasks),
            timeout=60,
            message="every task to complete",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert len(samples) > 50 and max(samples) <= 3, Counter(samples)
    attempts = conn.execute(
        "SELECT count(*) AS n, count(DISTINCT task_id) AS tasks FROM task_attempts WHERE task_id = ANY(%s)",
        (tasks,),
    ).fetchone()
    assert attempts == {"n": 60, "tasks": 60}
    assert invariant_violations(conn) == set()


def test_a_key_limit_leaves_tasks_without_the_key_and_other_owners_alone(conn):
    owner, other = add_key(conn, "a"), add_key(conn, "b")
    limit_put(conn, scope="key", owner=owner, name="api", max_running=1)
    limited = submit(conn, owner, 3, concurrency_key="api")
    plain = submit(conn, owner, 2)
    same_string = submit(conn, other, 2, concurrency_key="api")  # another owner's group
    claimed = set(ids(claim(conn, limit=20)))
    assert claimed == {limited[0], *plain, *same_string}
    assert waiting_on(conn, limited[1:]) == {f"key:{owner}:api"}
    assert waiting_on(conn, plain + same_string) == {None}


def test_a_finished_or_cancelled_task_frees_its_slot_at_once(conn):
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="k", max_running=2)
    tasks = submit(conn, owner, 5, concurrency_key="k")
    first = claim(conn, limit=10)
    assert ids(first) == tasks[:2]
    assert claim(conn, limit=10) == []
    complete(conn, "w1", refs(first)[0])
    assert ids(claim(conn, limit=10)) == [tasks[2]]
    task_cancel(conn, tasks[1])  # processing, unstarted: released and cancelled
    assert ids(claim(conn, limit=10)) == [tasks[3]]
    task_cancel(conn, tasks[4])  # waiting: cancelled, holds nothing
    assert key_holding(conn, owner, "k") == running(conn, "key", owner, "k") == 2
    assert limit_get(conn, scope="key", owner=owner, name="k")["waiting"] == 0


def test_a_rescue_frees_the_slot_of_a_task_whose_worker_died(conn):
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="k", max_running=1)
    lost, nxt, _ = submit(conn, owner, 3, concurrency_key="k")
    [task] = claim(conn, worker_id="dead")
    assert task.id == lost
    start(conn, "dead", AttemptRef(lost, 1))
    expire_lease(conn, lost)
    # Past its lease but not rescued yet: it may still be running, so it still holds the slot.
    assert claim(conn) == []
    rescued = task_rescue(conn, limit=10, grace_seconds=0.5, backoff_base=60, backoff_max=60)
    assert [(r["id"], r["status"], r["outcome"]) for r in rescued] == [(lost, "pending", "lost")]
    assert ids(claim(conn, worker_id="alive")) == [nxt]
    assert running(conn, "key", owner, "k") == 1
    assert task_row(conn, lost)["turn"] is None  # in backoff: no slot, no turn


def test_a_retry_goes_back_through_admission_behind_what_waited(conn):
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="k", max_running=1)
    first, second = submit(conn, owner, 2, concurrency_key="k")
    [task] = claim(conn)
    assert task.id == first
    start(conn, "w1", AttemptRef(first, 1))
    failure = AttemptFailure(first, 1, "failed", "boom")
    assert task_fail_many(conn, worker_id="w1", failures=[failure], **QUICK) == {first: "pending"}
    make_due(conn, first)
    # The retry fell due: admission gives it a turn behind the task that waited, which gets the slot.
    assert ids(claim(conn)) == [second]
    row = task_row(conn, first)
    assert (row["status"], row["waiting_on"], row["limited"]) == ("pending", f"key:{owner}:k", False)
    assert row["turn"] > task_row(conn, second)["turn"]
    complete(conn, "w1", AttemptRef(second, 1))
    [again] = claim(conn)
    assert (again.id, again.attempt) == (first, 2)


def test_max_running_zero_holds_every_task_of_the_key(conn):
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="paused", max_running=0)
    tasks = submit(conn, owner, 5, concurrency_key="paused")
    assert claim(conn, limit=10) == []
    assert waiting_on(conn, tasks) == {f"key:{owner}:paused"}
    usage = limit_get(conn, scope="key", owner=owner, name="paused")
    assert (usage["running"], usage["waiting"]) == (0, 5)
    # Raised: what it allows is admitted before limit_put returns (no admission needed to claim).
    limit_put(conn, scope="key", owner=owner, name="paused", max_running=2)
    assert ids(task_claim(conn, worker_id="w1", limit=10, lease_seconds=30)) == tasks[:2]


def test_type_and_queue_limits_hold_across_owners_and_combine_with_key_limits(conn):
    a, b = add_key(conn, "a"), add_key(conn, "b")
    limit_put(conn, scope="type", owner=0, name="resize", max_running=2)
    limit_put(conn, scope="queue", owner=0, name="imports", max_running=1)
    resize = submit(conn, a, 3, task_type="resize") + submit(conn, b, 3, task_type="resize")
    imports = submit(conn, a, 2, queue="imports") + submit(conn, b, 2, queue="imports")
    plain = submit(conn, b, 2)
    claimed = set(ids(claim(conn, limit=50)))
    assert len(claimed & set(resize)) == 2
    assert len(claimed & set(imports)) == 1
    assert set(plain) <= claimed
    assert holding(conn, "task_type = 'resize'") == running(conn, "type", 0, "resize") == 2
    assert holding(conn, "queue = 'imports'") == running(conn, "queue", 0, "imports") == 1
    # Owners share a limit fairly too: each owner got one of the two resize slots.
    owners = {task_row(conn, i)["owner_key_id"] for i in claimed & set(resize)}
    assert owners == {a, b}

    # A task under its key's limit and its type's: the fuller one holds it.
    limit_put(conn, scope="key", owner=a, name="gpu", max_running=3)
    limit_put(conn, scope="type", owner=0, name="render", max_running=1)
    render = submit(conn, a, 3, task_type="render", concurrency_key="gpu")
    other = submit(conn, a, 3, task_type="noop", concurrency_key="gpu")
    # A task held by its type's limit moves to wait on it, letting the key's next task have the
    # slot at the next admission (a worker admits every 100 ms while tasks wait).
    admit_until_settled(conn)
    claimed = set(ids(claim(conn, limit=50)))
    assert len(claimed & set(render)) == 1
    assert len(claimed & set(other)) == 2  # the key's third slot is the render task's
    assert key_holding(conn, a, "gpu") == running(conn, "key", a, "gpu") == 3
    assert running(conn, "type", 0, "render") == 1
    assert {r["name"] for r in limit_list(conn)} == {"resize", "imports", "gpu", "render"}
    assert [r["name"] for r in limit_list(conn, scope="key", owner=a)] == ["gpu"]


def test_a_lowered_limit_takes_back_what_has_not_started(database_url, conn):
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="k", max_running=5)
    tasks = submit(conn, owner, 8, concurrency_key="k")
    admit(conn)
    claimed = claim(conn, worker_id="w1", limit=3)
    assert ids(claimed) == tasks[:3]
    started, *unstarted = refs(claimed)
    start(conn, "w1", started)
    runnable = tasks[3:5]  # admitted under the limit, not claimed
    assert {task_row(conn, i)["limited"] for i in runnable} == {True}

    with listening(database_url, CANCEL_CHANNEL) as listener:
        row = limit_put(conn, scope="key", owner=owner, name="k", max_running=1)
        told = received(conn, listener)
    assert (row["running"], row["waiting"]) == (1, 7)
    released = {r.task_id for r in unstarted}
    assert {int(i) for _, payload in told for i in payload.split(",")} == released
    for task_id in released:
        row = task_row(conn, task_id)
        assert (row["status"], row["attempts"], row["waiting_on"]) == ("pending", 0, f"key:{owner}:k")
        assert history(conn, task_id) == [(1, "w1", "released")]
    assert waiting_on(conn, runnable) == {f"key:{owner}:k"}
    assert task_row(conn, started.task_id)["status"] == "processing"  # what started runs on
    # The released tasks' worker is fenced out; nothing else can be claimed until the slot frees.
    assert start(conn, "w1", unstarted[0]) == set()
    assert claim(conn, limit=10) == []
    assert key_holding(conn, owner, "k") == 1
    complete(conn, "w1", started)
    assert len(claim(conn, limit=10)) == 1


def test_deleting_a_limit_admits_what_waited_on_it(conn):
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="k", max_running=0)
    tasks = submit(conn, owner, 4, concurrency_key="k")
    admit(conn)
    assert waiting_on(conn, tasks) == {f"key:{owner}:k"}
    assert limit_delete(conn, scope="key", owner=owner, name="k") is True
    assert limit_get(conn, scope="key", owner=owner, name="k") is None
    assert ids(task_claim(conn, worker_id="w1", limit=10, lease_seconds=30)) == tasks
    assert limit_delete(conn, scope="key", owner=owner, name="k") is False


@pytest.mark.parametrize("how", ["limit_delete", "by hand"])
def test_a_deleted_limit_still_leaves_the_tasks_other_limit_in_force(conn, how):
    """BUG (skiplock/sql/limits.py limit_delete, skiplock/sql/admission.py
    task_waiting_orphans_free): what waited on the deleted limit is made runnable outright
    (waiting_on = NULL with its turn), so a type or queue limit it is also under is bypassed:
    all 3 tasks of a type limited to 1 are claimed. Each should wait on its next limit instead
    (WAITING_ON again), for admission to admit what that one allows."""
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="k", max_running=0)
    limit_put(conn, scope="type", owner=0, name="slow", max_running=1)
    tasks = submit(conn, owner, 3, task_type="slow", concurrency_key="k")
    admit(conn)
    assert waiting_on(conn, tasks) == {f"key:{owner}:k"}
    if how == "limit_delete":
        limit_delete(conn, scope="key", owner=owner, name="k")
    else:  # a DBA deletes the row; the workers' admitter frees what waited on it
        conn.execute("DELETE FROM task_limits WHERE scope = 'key' AND name = 'k'")
        assert task_waiting_orphans_free(conn) == 3
    admit_until_settled(conn)
    assert len(claim(conn, limit=10)) == 1
    assert running(conn, "type", 0, "slow") == 1
    assert holding(conn, "task_type = 'slow'") == 1
    assert sum(task_row(conn, i)["waiting_on"] == "type:slow" for i in tasks) == 2


# --- start rates ----------------------------------------------------------------------------------

RATE = 20.0
RATE_SECONDS = 2.0


def test_a_start_rate_holds_over_time(conn):
    """max_starts_per_second 20 (burst: one second's worth): at any moment, the starts since the
    limit was set are at most burst + rate * elapsed; and the rate is used (no more than a few
    tokens are left unspent while tasks wait)."""
    owner = add_key(conn)
    tasks = submit(conn, owner, 200, concurrency_key="api")
    began = time.monotonic()
    row = limit_put(conn, scope="key", owner=owner, name="api", max_running=None, max_starts_per_second=RATE)
    assert (row["max_starts_per_second"], row["burst"]) == (RATE, None)
    burst = RATE
    started = 0
    samples = []
    while (elapsed := time.monotonic() - began) < RATE_SECONDS:
        batch = claim(conn, limit=100)
        for ref in refs(batch):
            complete(conn, "w1", ref)
        started += len(batch)
        elapsed = time.monotonic() - began
        assert started <= burst + RATE * elapsed, f"{started} starts after {elapsed:.2f} s"
        samples.append((elapsed, started))
        time.sleep(0.01)  # pacing of the claim loop, as a worker's admission interval
    assert started >= burst + RATE * (elapsed - 0.5) * 0.5, samples
    assert started < len(tasks)
    waiting = limit_get(conn, scope="key", owner=owner, name="api")["waiting"]
    assert waiting == len(tasks) - started
    # Out of tokens, admission says when the next one is due.
    done = admit(conn)
    assert done.waiting == 1
    assert done.refill_in is None or 0 < done.refill_in <= 1 / RATE + 1e-6


def test_a_rate_limit_and_max_running_hold_together(conn):
    owner = add_key(conn)
    limit_put(conn, scope="key", owner=owner, name="k", max_running=2, max_starts_per_second=1000)
    submit(conn, owner, 10, concurrency_key="k")
    assert len(claim(conn, limit=10)) == 2
    assert claim(conn, limit=10) == []


@pytest.mark.parametrize("scope", ["key", "type", "queue"])
def test_limit_rows_report_running_and_waiting(conn, scope):
    owner = add_key(conn) if scope == "key" else 0
    name = {"key": "k", "type": "noop", "queue": "default"}[scope]
    limit_put(conn, scope=scope, owner=owner, name=name, max_running=2, by="tester")
    submit(conn, owner or None, 5, concurrency_key="k")
    claim(conn, limit=1)
    admit(conn)
    row = limit_get(conn, scope=scope, owner=owner, name=name)
    assert (row["running"], row["waiting"], row["updated_by"]) == (2, 3, "tester")


def admit_freed(conn, groups: set[str]):
    """The admission a worker runs right after its ended tasks' outcomes are written: under
    the limits those tasks held only (task_admit's `freed`)."""
    with conn.transaction():
        assert admission_try_lock(conn)
        return task_admit(conn, freed=groups)


@pytest.mark.parametrize("other", ["none", "type limit", "start rate"])
def test_an_admission_of_freed_slots_fills_them_and_never_more(conn, other):
    """After a worker's tasks end it admits under their limits only (one statement when only
    key limits with max_running apply; the general admission of those limits otherwise): each
    freed slot is filled by the key's next waiting task, a full key admits nothing, and no limit
    that applies (the task type's, a start rate) is passed over."""
    owner = add_key(conn)
    rate = {"max_starts_per_second": 1000.0, "burst": 1000} if other == "start rate" else {}
    limit_put(conn, scope="key", owner=owner, name="gpu", max_running=3, **rate)
    limit_put(conn, scope="key", owner=owner, name="cpu", max_running=2)
    if other == "type limit":
        limit_put(conn, scope="type", owner=0, name="render", max_running=4)
    gpu = submit(conn, owner, 12, concurrency_key="gpu", task_type="render")
    cpu = submit(conn, owner, 8, concurrency_key="cpu", task_type="render")
    groups = {f"key:{owner}:gpu", f"key:{owner}:cpu"}
    admit(conn)
    type_cap = 4 if other == "type limit" else 5
    assert key_holding(conn, owner, "gpu") + key_holding(conn, owner, "cpu") == min(5, type_cap)
    # Nothing ended: nothing to fill.
    assert admit_freed(conn, groups).admitted == 0
    completed = 0
    for _ in range(30):
        batch = task_claim(conn, worker_id="w1", limit=10, lease_seconds=30)
        if not batch:
            break
        for ref in refs(batch):
            complete(conn, "w1", ref)
            completed += 1
        done = admit_freed(conn, groups)
        gpu_now, cpu_now = key_holding(conn, owner, "gpu"), key_holding(conn, owner, "cpu")
        assert gpu_now <= 3 and cpu_now <= 2
        assert holding(conn, "task_type = 'render'") <= type_cap
        assert done.admitted == gpu_now + cpu_now, "a freed slot was left empty"
    assert completed == len(gpu) + len(cpu), "the tasks did not all run by admissions of freed slots"
    assert invariant_violations(conn) == set()


def test_a_pause_or_limit_waits_for_this_databases_transactions_only(database_url, empty_database_url, conn):
    """The barrier before a pause or a limit takes effect waits for older transactions: those
    of this database, which may write tasks unseen; not those of another database on the same
    server (they held every pause up to the 5 s timeout)."""
    from skiplock.sql.limits import wait_for_older_transactions
    from tests.helpers import insert_task

    with connect(empty_database_url, role="test") as elsewhere, elsewhere.transaction():
        elsewhere.execute("SELECT pg_current_xact_id()")  # a transaction with an id, open
        insert_task(conn)  # and a later one that commits (see below)
        started = time.monotonic()
        assert wait_for_older_transactions(conn, timeout=3.0) is True
        assert time.monotonic() - started < 1.0
    with connect(database_url, role="test") as here, here.transaction():
        here.execute("SELECT pg_current_xact_id()")
        # A later transaction commits (a snapshot lists as running only the transactions below
        # the newest finished one: an idle server's only open transaction is not listed).
        insert_task(conn)
        assert wait_for_older_transactions(conn, timeout=0.5) is False  # still running: waited for
