"""Workflows through the API (issue 17, points 2-3): a graph, a chain and a batch submitted by the
real Flask app, stored all or nothing; a cycle or an unknown ref is a 422 naming it and stores
nothing; each step is an ordinary task of the caller's; GET shows the state and each step; cancel
ends it; another key sees nothing of it. Steps are run with the engine's own functions, as a
worker runs them."""

from __future__ import annotations

import json

import pytest

from skiplock.sql.claim import task_claim
from skiplock.sql.fenced import (
    AttemptFailure,
    AttemptRef,
    task_complete_many,
    task_fail_many,
    task_start_many,
)
from skiplock.sql.workflows import workflow_tasks_ended
from tests.helpers import BACKOFF, admit, assert_error

URL = "/api/workflows"
NOOP = {"task_type": "noop", "task_input": None}


def rows(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def run_all_due(conn, *, fail: set[int] = frozenset()) -> list[int]:
    """Claim what is runnable and end it (completed, or failed for ids in `fail`), as a worker's
    writer does. Returns the ids run."""
    admit(conn)
    claimed = task_claim(conn, worker_id="w", limit=100, lease_seconds=60)
    for task in claimed:
        ref = AttemptRef(task.id, task.attempt)
        task_start_many(conn, worker_id="w", started_ago={ref: 0})
        with conn.transaction():
            if task.id in fail:
                failure = AttemptFailure(task.id, task.attempt, "failed", "boom", None)
                ended = set(task_fail_many(conn, worker_id="w", failures=[failure], **{**BACKOFF}))
            else:
                ended = task_complete_many(conn, worker_id="w", results=[(ref, json.dumps({"ran": task.id}))])
            workflow_tasks_ended(conn, ended)
    return [t.id for t in claimed]


@pytest.fixture
def bob(new_key, as_key):
    return as_key(new_key(name="bob"))


def test_a_graph_is_stored_and_runs_in_order(alice, conn):
    body = {
        "name": "thumbnails",
        "tasks": [
            {"ref": "resize-1", **NOOP},
            {"ref": "resize-2", **NOOP},
            {"ref": "zip", **NOOP, "depends_on": ["resize-1", "resize-2"]},
            {"ref": "mail", "task_type": "greet", "task_input": {"name": "Ada"}, "depends_on": ["zip"]},
        ],
    }
    response = alice.post(URL, json=body)
    assert response.status_code == 201, response.get_json()
    made = response.get_json()
    assert response.headers["Location"].endswith(f"/api/workflows/{made['workflow_id']}")
    assert (made["name"], made["state"], made["counts"]) == ("thumbnails", "running", {"pending": 4})
    steps = {t["ref"]: t for t in made["tasks"]}
    assert (
        steps["zip"]["depends_on"] == ["resize-1", "resize-2"]
        and steps["mail"]["trigger_rule"] == "all_succeeded"
    )
    # each step is an ordinary task of alice's
    assert alice.get(f"/api/tasks/{steps['zip']['task_id']}").get_json()["status"] == "pending"
    order = []
    for _ in range(4):
        order.append(sorted(run_all_due(conn)))
    ids = {ref: t["task_id"] for ref, t in steps.items()}
    assert order == [sorted([ids["resize-1"], ids["resize-2"]]), [ids["zip"]], [ids["mail"]], []]
    done = alice.get(f"{URL}/{made['workflow_id']}").get_json()
    assert (done["state"], done["counts"]) == ("completed", {"completed": 4})


@pytest.mark.parametrize(
    ("tasks", "where", "says"),
    [
        (
            [{"ref": "a", **NOOP, "depends_on": ["b"]}, {"ref": "b", **NOOP, "depends_on": ["a"]}],
            None,
            "cycle",
        ),
        ([{"ref": "a", **NOOP, "depends_on": ["nowhere"]}], "a", "'nowhere'"),
        ([{"ref": "a", **NOOP}, {"ref": "a", **NOOP}], "a", "names two tasks"),
        ([{**NOOP}], None, "needs a ref"),
        ([{"ref": "a", "task_type": "greet", "task_input": {"nom": 1}}], None, "name"),
        ([{"ref": "a", **NOOP, "unique_key": "k"}], None, "Unknown field"),
    ],
)
def test_a_graph_that_cannot_run_is_a_422_naming_it_and_stores_nothing(alice, conn, tasks, where, says):
    body = assert_error(alice.post(URL, json={"tasks": tasks}), 422)
    text = json.dumps(body["errors"])
    assert says in text, body
    if where is not None:
        assert where in body["errors"]["json"]["tasks"], body
    assert rows(conn, "workflows") == 0 and rows(conn, "tasks") == 0 and rows(conn, "task_dependencies") == 0


def test_a_chain_and_a_batch_need_no_graph(alice, conn):
    chain = alice.post(URL, json={"chain": [NOOP, NOOP, NOOP]}).get_json()
    assert [(t["ref"], t["depends_on"]) for t in chain["tasks"]] == [
        ("step-1", []), ("step-2", ["step-1"]), ("step-3", ["step-2"]),
    ]  # fmt: skip
    batch = alice.post(
        URL, json={"batch": [NOOP, NOOP], "then": NOOP, "catch": NOOP, "finally": NOOP}
    ).get_json()
    shown = {t["ref"]: (t["trigger_rule"], t["depends_on"]) for t in batch["tasks"]}
    assert shown == {
        "task-1": (None, []), "task-2": (None, []),
        "then": ("all_succeeded", ["task-1", "task-2"]), "catch": ("any_failed", ["task-1", "task-2"]),
        "finally": ("all_done", ["task-1", "task-2"]),
    }  # fmt: skip
    assert_error(alice.post(URL, json={"chain": [NOOP], "then": NOOP}), 422)
    assert_error(alice.post(URL, json={"chain": [NOOP], "batch": [NOOP]}), 422)
    assert_error(alice.post(URL, json={"chain": [{**NOOP, "ref": "x"}]}), 422)


def test_a_failed_batch_runs_catch_and_finally_and_cancels_then_saying_why(alice, conn):
    once = {**NOOP, "max_attempts": 1}  # its failure is final
    made = alice.post(
        URL, json={"batch": [NOOP, once], "then": NOOP, "catch": NOOP, "finally": NOOP}
    ).get_json()
    ids = {t["ref"]: t["task_id"] for t in made["tasks"]}
    run_all_due(conn, fail={ids["task-2"]})
    run_all_due(conn)
    view = alice.get(f"{URL}/{made['workflow_id']}").get_json()
    steps = {t["ref"]: t for t in view["tasks"]}
    assert (
        steps["then"]["status"] == "cancelled"
        and f"task {ids['task-2']} (task-2) ended failed" in steps["then"]["error"]
    )
    assert steps["catch"]["status"] == steps["finally"]["status"] == "completed"
    assert view["state"] == "failed"
    # the step's own endpoint says the same
    assert "task-2" in alice.get(f"/api/tasks/{ids['then']}").get_json()["error"]


def test_cancel_ends_every_unfinished_step(alice, conn):
    made = alice.post(URL, json={"chain": [NOOP, NOOP, NOOP]}).get_json()
    run_all_due(conn)
    view = alice.post(f"{URL}/{made['workflow_id']}/cancel").get_json()
    assert view["state"] == "cancelled" and view["counts"] == {"completed": 1, "cancelled": 2}
    assert run_all_due(conn) == []


def test_another_keys_workflow_answers_as_one_that_does_not_exist(alice, bob, conn):
    made = alice.post(URL, json={"chain": [NOOP, NOOP]}).get_json()
    wid = made["workflow_id"]
    for method, url in (("get", f"{URL}/{wid}"), ("post", f"{URL}/{wid}/cancel")):
        mine = assert_error(bob.open(method, url), 404)
        missing = assert_error(bob.open(method, url.replace(str(wid), str(wid + 99))), 404)
        assert mine["message"].replace(str(wid), "N") == missing["message"].replace(str(wid + 99), "N")
    for task in made["tasks"]:
        assert_error(bob.get(f"/api/tasks/{task['task_id']}"), 404)
    assert alice.get(f"{URL}/{wid}").get_json()["state"] == "running"


def test_a_workflow_counts_whole_against_the_quota(new_key, as_key, conn):
    capped = as_key(new_key(name="capped", max_unfinished=3))
    assert_error(capped.post(URL, json={"chain": [NOOP] * 4}), 429)
    assert rows(conn, "tasks") == 0 and rows(conn, "workflows") == 0
    assert capped.post(URL, json={"chain": [NOOP] * 3}).status_code == 201
    assert_error(capped.post(URL, json={"chain": [NOOP]}), 429)


def test_a_workflow_streams_its_state_until_it_is_final(alice, bob, conn):
    made = alice.post(URL, json={"chain": [NOOP, NOOP]}).get_json()
    url = f"{URL}/{made['workflow_id']}/events"
    assert_error(bob.get(url), 404)
    response = alice.get(url, buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    chunks = (c.decode() if isinstance(c, bytes) else c for c in response.response)
    assert next(chunks).startswith("retry:")
    first = next(chunks)
    assert "event: state" in first and '"state": "running"' in first and '"pending": 2' in first
    run_all_due(conn)
    run_all_due(conn)
    rest = "".join(chunks)  # the stream ends after the final state
    last = rest.strip().split("\n\n")[-1]
    assert '"state": "completed"' in last and '"completed": 2' in last
    last_id = next(line for line in last.splitlines() if line.startswith("id: "))[4:]
    assert alice.get(url, headers={"Last-Event-ID": last_id}).status_code == 204
