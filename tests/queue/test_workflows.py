"""Workflows (issue 17, points 2-4), in the engine: a graph checked before it is stored (unknown
refs, cycles), stored in one transaction; a step starts only when its trigger rule holds, in the
transaction that ended its last parent (no sweep needed, even when two parents end at once in two
transactions); a rule that can no longer hold cancels the step with its reason, and cascades; a
retry re-arms what a failure cancelled; the workflow ends once, with one webhook; a step's code
gets its parents' results; the sweep settles what a DBA's hand-made change left behind."""

from __future__ import annotations

import json
import threading

import pytest

from skiplock.db import connect
from skiplock.sql.claim import task_claim, task_claim_released
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_start_many,
)
from skiplock.sql.inserts import NewTask
from skiplock.sql.limits import limit_put
from skiplock.sql.operations import task_queue_set_paused
from skiplock.sql.tasks import task_cancel, task_retry
from skiplock.sql.workflow_store import workflow_cancel, workflow_get, workflow_insert
from skiplock.sql.workflows import (
    BLOCKED_RUN_AT,
    StepEnded,
    workflow_steps_ended,
    workflow_tasks_ended,
    workflows_sweep,
)
from skiplock.workflows import Step, WorkflowRefused, batch, chain, checked
from tests.helpers import BACKOFF, admit

W = "wf-worker"


def new_task(spec: dict) -> NewTask:
    return NewTask(spec.get("task_type", "noop"), json.dumps(spec.get("input")), spec.get("queue", "default"), 0,
                   spec.get("max_attempts", 1), 30, expires_in_seconds=spec.get("expires_in_seconds"))  # fmt: skip


def store(conn, steps, **kw) -> tuple[int, dict[str, int]]:
    return workflow_insert(conn, checked(steps), new_task, **kw)


def status(conn, task_id: int) -> dict:
    return conn.execute(
        "SELECT status::text AS status, run_at, turn, error FROM tasks WHERE id = %s", (task_id,)
    ).fetchone()


def runnable(conn, task_id: int) -> bool:
    row = status(conn, task_id)
    return row["status"] == "pending" and row["turn"] is not None and row["run_at"] < BLOCKED_RUN_AT


def blocked(conn, task_id: int) -> bool:
    row = status(conn, task_id)
    return row["status"] == "pending" and row["turn"] is None and row["run_at"] == BLOCKED_RUN_AT


def end(conn, task_id: int, *, ok: bool = True, result=None, worker: str = W):
    """Claim the task (it must be runnable), run it and end it, as a worker's writer does: the
    final write and the settling of its dependents and workflow in one transaction."""
    held = conn.__dict__.setdefault("held_by_test", {})  # claimed, not ended yet
    if task_id not in held:
        admit(conn)
        held.update({t.id: t for t in task_claim(conn, worker_id=worker, limit=100, lease_seconds=60)})
    assert task_id in held, f"task {task_id} was not claimable: {status(conn, task_id)}"
    claimed = [held.pop(task_id)]
    ref = AttemptRef(task_id, claimed[0].attempt)
    task_start_many(conn, worker_id=worker, started_ago={ref: 0})
    with conn.transaction():
        if ok:
            written = task_complete_many(conn, worker_id=worker, results=[(ref, json.dumps(result))])
        else:
            failure = AttemptFailure(task_id, ref.attempt, "failed", "boom", None)
            written = set(task_fail_many(conn, worker_id=worker, failures=[failure], **BACKOFF))
        workflow_tasks_ended(conn, written)
    return claimed[0]


# --- the graph's checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "where", "says"),
    [
        ([Step("a", {}), Step("a", {})], "a", "names two tasks"),
        ([Step("a", {}, ("ghost",))], "a", "'ghost'"),
        ([Step("a", {}, ("c",)), Step("b", {}, ("a",)), Step("c", {}, ("b",))], None, "cycle"),
        ([Step("a", {}, ("a",))], "a", "cycle"),
        ([], "tasks", "at least one"),
        ([Step(f"s{n}", {}) for n in range(10_001)], "tasks", "at most 10,000"),
        ([Step("a", {}), Step("b", {}, ("a",), "sometimes")], "b", "trigger_rule"),
    ],
)
def test_a_graph_that_cannot_run_is_refused_naming_where(steps, where, says):
    with pytest.raises(WorkflowRefused, match=says) as refused:
        checked(steps)
    if where is not None:
        assert refused.value.where == where


def test_a_cycle_is_named_as_a_path():
    with pytest.raises(WorkflowRefused) as refused:
        checked([Step("a", {}, ("c",)), Step("b", {}, ("a",)), Step("c", {}, ("b",)), Step("d", {})])
    path = str(refused.value).split(": ", 1)[1]
    assert set(path.rstrip(".").split(" -> ")) == {"a", "b", "c"}


# --- stored, started, ended -------------------------------------------------------------------


def test_a_workflow_is_stored_whole_with_its_roots_runnable_and_the_rest_waiting(conn):
    wid, ids = store(conn, [Step("a", {}), Step("b", {}), Step("c", {}, ("a", "b")), Step("d", {}, ("c",))])
    assert runnable(conn, ids["a"]) and runnable(conn, ids["b"])
    assert blocked(conn, ids["c"]) and blocked(conn, ids["d"])
    rows = conn.execute(
        "SELECT workflow_ref, trigger_rule, has_dependents FROM tasks WHERE workflow_id = %s ORDER BY id",
        (wid,),
    ).fetchall()
    assert {r["workflow_ref"]: (r["trigger_rule"], r["has_dependents"]) for r in rows} == {
        "a": (None, True), "b": (None, True), "c": ("all_succeeded", True), "d": ("all_succeeded", False),
    }  # fmt: skip
    edges = conn.execute("SELECT task_id, parent_id FROM task_dependencies ORDER BY 1, 2").fetchall()
    assert [(e["task_id"], e["parent_id"]) for e in edges] == [
        (ids["c"], ids["a"]), (ids["c"], ids["b"]), (ids["d"], ids["c"]),
    ]  # fmt: skip
    assert workflow_get(conn, wid)["state"] == "running"


def test_a_chain_runs_step_after_step_each_released_by_the_previous_ones_end(conn):
    wid, ids = store(conn, chain([{"input": n} for n in range(5)]))
    for n in range(1, 6):
        ref = f"step-{n}"
        assert runnable(conn, ids[ref])
        if n < 5:
            assert blocked(conn, ids[f"step-{n + 1}"])
        claimed = end(conn, ids[ref], result={"n": n})
        assert claimed.parents == (None if n == 1 else {f"step-{n - 1}": {"n": n - 1}})
    view = workflow_get(conn, wid)
    assert view["state"] == "completed" and view["counts"] == {"completed": 5}
    assert view["finished_at"] is not None


def test_a_step_gets_its_parents_results_by_ref(conn):
    _, ids = store(conn, [Step("x", {}), Step("y", {}), Step("sum", {}, ("x", "y"))])
    end(conn, ids["x"], result=2)
    end(conn, ids["y"], result={"v": 3})
    claimed = end(conn, ids["sum"])
    assert claimed.parents == {"x": 2, "y": {"v": 3}}
    assert claimed.workflow_id is not None


def test_a_failure_cancels_what_needed_it_naming_it_and_runs_catch_and_finally(conn):
    steps = batch([{}, {}], {"then": {}, "catch": {}, "finally": {}})
    steps.append(Step("after-then", {}, ("then",)))
    wid, ids = store(conn, steps)
    end(conn, ids["task-1"])
    end(conn, ids["task-2"], ok=False)
    then = status(conn, ids["then"])
    assert then["status"] == "cancelled"
    assert (
        then["error"].startswith("upstream: task ")
        and f"task {ids['task-2']} (task-2) ended failed" in then["error"]
    )
    after = status(conn, ids["after-then"])
    assert after["status"] == "cancelled" and f"task {ids['then']} (then) ended cancelled" in after["error"]
    assert runnable(conn, ids["catch"]) and runnable(conn, ids["finally"])
    end(conn, ids["catch"])
    assert workflow_get(conn, wid)["state"] == "running"
    end(conn, ids["finally"])
    view = workflow_get(conn, wid)
    assert view["state"] == "failed"
    assert view["counts"] == {"completed": 3, "failed": 1, "cancelled": 2}


def test_catch_is_cancelled_when_nothing_failed(conn):
    wid, ids = store(conn, batch([{}, {}], {"then": {}, "catch": {}}))
    end(conn, ids["task-1"])
    assert blocked(conn, ids["catch"]) and blocked(conn, ids["then"])
    end(conn, ids["task-2"])
    assert status(conn, ids["catch"])["status"] == "cancelled"
    assert "none failed" in status(conn, ids["catch"])["error"]
    end(conn, ids["then"])
    assert workflow_get(conn, wid)["state"] == "completed"


def test_two_last_parents_ending_at_once_release_their_child_exactly_once(database_url, conn):
    for _ in range(15):
        _, ids = store(conn, [Step("a", {}), Step("b", {}), Step("join", {}, ("a", "b"))])
        refs = {}
        admit(conn)
        for task in task_claim(conn, worker_id=W, limit=10, lease_seconds=60):
            refs[task.id] = AttemptRef(task.id, task.attempt)
        barrier = threading.Barrier(2)

        def finish(task_id: int, ref: AttemptRef, barrier: threading.Barrier) -> None:
            with connect(database_url, role="test") as c, c.transaction():
                barrier.wait()
                written = task_complete_many(c, worker_id=W, results=[(ref, "null")])
                workflow_tasks_ended(c, written)

        threads = [threading.Thread(target=finish, args=(ids[r], refs[ids[r]], barrier)) for r in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert runnable(conn, ids["join"]), status(conn, ids["join"])  # released without a sweep
        end(conn, ids["join"])


def test_a_retry_of_the_failed_step_re_arms_what_its_failure_cancelled(conn):
    wid, ids = store(conn, chain([{}, {}, {}]))
    end(conn, ids["step-1"], ok=False)
    assert [status(conn, ids[r])["status"] for r in ("step-2", "step-3")] == ["cancelled", "cancelled"]
    assert workflow_get(conn, wid)["state"] == "failed"
    task_retry(conn, ids["step-1"])
    assert blocked(conn, ids["step-2"]) and blocked(conn, ids["step-3"])
    assert workflow_get(conn, wid)["state"] == "running"
    for ref in ("step-1", "step-2", "step-3"):
        end(conn, ids[ref])
    assert workflow_get(conn, wid)["state"] == "completed"


def test_cancelling_a_step_settles_its_dependents_and_a_workflow_cancel_ends_it(conn):
    wid, ids = store(conn, [Step("a", {}), Step("b", {}, ("a",)), Step("c", {}, ("a",), "all_done")])
    task_cancel(conn, ids["a"])
    assert status(conn, ids["b"])["status"] == "cancelled" and runnable(conn, ids["c"])
    wid2, _ = store(conn, chain([{}, {}, {}]))
    view = workflow_cancel(conn, wid2)
    assert view["state"] == "cancelled" and view["counts"] == {"cancelled": 3}
    assert workflow_get(conn, wid)["state"] == "running"


def test_a_workflow_with_a_callback_gets_one_webhook_when_final(conn):
    wid, ids = store(conn, chain([{}, {}]), callback_url="https://example.com/hook")
    end(conn, ids["step-1"])
    assert (
        conn.execute(
            "SELECT count(*) AS n FROM webhook_deliveries WHERE workflow_id = %s", (wid,)
        ).fetchone()["n"]
        == 0
    )
    end(conn, ids["step-2"])
    (hook,) = conn.execute(
        "SELECT event, payload, task_id FROM webhook_deliveries WHERE workflow_id = %s", (wid,)
    ).fetchall()
    assert hook["event"] == "workflow.completed" and hook["task_id"] is None
    assert hook["payload"]["data"] == {
        "workflow_id": wid,
        "name": None,
        "state": "completed",
        "counts": {"completed": 2},
    }
    workflows_sweep(conn)  # nothing left for the net: no second webhook
    assert (
        conn.execute(
            "SELECT count(*) AS n FROM webhook_deliveries WHERE workflow_id = %s", (wid,)
        ).fetchone()["n"]
        == 1
    )


def test_the_sweep_settles_what_a_dbas_change_left_behind(conn):
    wid, ids = store(conn, chain([{}, {}]))
    conn.execute("UPDATE tasks SET status = 'completed', finished_at = now() WHERE id = %s", (ids["step-1"],))
    assert blocked(conn, ids["step-2"])
    assert workflows_sweep(conn)[0] >= 1
    assert runnable(conn, ids["step-2"])
    conn.execute("UPDATE tasks SET status = 'completed', finished_at = now() WHERE id = %s", (ids["step-2"],))
    workflows_sweep(conn)
    assert workflow_get(conn, wid)["state"] == "completed"


def test_a_step_that_expires_while_waiting_settles_its_own_dependents(conn):
    _, ids = store(
        conn,
        [Step("a", {}), Step("b", {"expires_in_seconds": 0.01}, ("a",)), Step("c", {}, ("b",), "all_done")],
    )
    conn.execute("UPDATE tasks SET expires_at = now() - interval '1 second' WHERE id = %s", (ids["b"],))
    admit(conn)  # expires b
    assert status(conn, ids["b"])["status"] == "expired"
    assert runnable(conn, ids["c"])


def test_tasks_outside_workflows_pay_nothing(conn):
    from tests.helpers import insert_task

    task_id = insert_task(conn, "noop")
    row = conn.execute(
        "SELECT workflow_id, has_dependents, trigger_rule FROM tasks WHERE id = %s", (task_id,)
    ).fetchone()
    assert row == {"workflow_id": None, "has_dependents": False, "trigger_rule": None}
    claimed = end(conn, task_id)
    assert claimed.workflow_id is None and claimed.parents is None


def test_settling_leaves_the_callers_plan_cache_mode_as_it_was(conn):
    _, ids = store(conn, chain([{}, {}]))
    end(conn, ids["step-1"])  # claimed and ended in the helper's own transaction
    admit(conn)
    (task,) = [t for t in task_claim(conn, worker_id=W, limit=10, lease_seconds=60) if t.id == ids["step-2"]]
    with conn.transaction():
        conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")  # as a worker's session has it
        written = task_complete_many(conn, worker_id=W, results=[(AttemptRef(task.id, task.attempt), "null")])
        workflow_tasks_ended(conn, written)
        mode = conn.execute("SELECT current_setting('plan_cache_mode') AS m").fetchone()["m"]
    assert mode == "force_custom_plan"


# --- an idle worker takes the steps its writes release (skiplock.worker.handoff) ----------------


def end_and_take(conn, task_id: int, *, room: int = 1, queues=None, task_types=None, fail_after=False):
    """end() with the releasing worker taking what it can of the released steps in the same
    transaction (task_claim_released), as an idle worker's writer does; returns the tasks taken."""
    [claimed] = task_claim(conn, worker_id=W, limit=1, lease_seconds=60)
    assert claimed.id == task_id
    ref = AttemptRef(task_id, claimed.attempt)
    taken: list = []

    def take(released: list[int]) -> int:
        got = task_claim_released(
            conn,
            ids=released,
            worker_id=W,
            limit=room,
            lease_seconds=60,
            queues=queues,
            task_types=task_types,
        )
        taken.extend(got)
        return len(got)

    with conn.transaction():
        written = task_complete_many(conn, worker_id=W, results=[(ref, "null")])
        workflow_steps_ended(conn, [StepEnded(task_id, claimed.workflow_id, claimed.has_dependents)], take)
        if fail_after:
            raise RuntimeError("the write failed after the taking")
    assert written == {task_id}
    return taken


def test_the_releasing_worker_takes_its_released_step_with_its_parents_results(conn):
    workflow_id, ids = store(conn, [Step("a", {}), Step("b", {}, ("a",)), Step("c", {}, ("b",))])
    conn.execute("INSERT INTO task_waiters (worker_id) VALUES ('someone idle')")
    with connect(conn.info.dsn, role="listener") as listener:
        listener.execute("LISTEN skiplock_task_pending")
        taken = end_and_take(conn, ids["a"])
        assert [(t.id, t.workflow_id, t.has_dependents, t.parents) for t in taken] == [
            (ids["b"], workflow_id, True, {"a": None})
        ]
        row = conn.execute(
            "SELECT status::text AS status, worker_id, attempts, lease_expires_at > now() AS leased FROM tasks WHERE id = %s",
            (ids["b"],),
        ).fetchone()
        assert row == {"status": "processing", "worker_id": W, "attempts": 1, "leased": True}
        # Taken, so nobody else was woken for it.
        assert [n.payload for n in listener.notifies(timeout=0.3)] == []
    assert workflow_get(conn, workflow_id)["state"] == "running"


@pytest.mark.parametrize(
    "why",
    ["another queue", "another task type", "its queue paused", "waiting on a limit", "the write rolled back"],
)
def test_a_released_step_the_worker_may_not_take_stays_for_the_others(conn, why):
    _, ids = store(conn, [Step("a", {}), Step("b", {"task_type": "greet", "queue": "mail"}, ("a",))])
    conn.execute("INSERT INTO task_waiters (worker_id) VALUES ('someone idle')")
    options: dict = {}
    if why == "another queue":
        options["queues"] = ["default"]
    elif why == "another task type":
        options["task_types"] = ["noop"]
    elif why == "its queue paused":
        task_queue_set_paused(conn, queue="mail", paused=True, by="test")
    elif why == "waiting on a limit":
        limit_put(conn, scope="type", owner=0, name="greet", max_running=0)
    elif why == "the write rolled back":
        options["fail_after"] = True
    with connect(conn.info.dsn, role="listener") as listener:
        listener.execute("LISTEN skiplock_task_pending")
        if why == "the write rolled back":
            with pytest.raises(RuntimeError):
                end_and_take(conn, ids["a"], **options)
            assert blocked(conn, ids["b"])
            assert status(conn, ids["a"])["status"] == "processing"  # its end undone too
            return
        assert end_and_take(conn, ids["a"], room=5, **options) == []
        assert [n.payload for n in listener.notifies(timeout=1)][:1] == ["runnable"]  # the others woken
    row = status(conn, ids["b"])
    assert row["status"] == "pending" and row["run_at"] < BLOCKED_RUN_AT
