"""The sync client's workflows (submit in each shape, get, events, cancel) and schedules (create,
list, get, patch, pause, resume, run now, delete) against real gunicorn and worker.py."""

from __future__ import annotations

import uuid

import pytest
from skiplock_client import Client, Conflict, NewTask, NotFound, Schedule, ValidationError, Workflow

# The client's side of HTTP: the same on every Postgres version (.ci/run runs it against one).
pytestmark = [pytest.mark.slow, pytest.mark.pg_agnostic]


def test_chain_runs_in_order_and_its_events_end_final(client: Client):
    workflow = client.submit_workflow(chain=[NewTask("add", 1), NewTask("add", 2)], name="sum")
    assert isinstance(workflow, Workflow) and workflow.name == "sum"
    assert [t["ref"] for t in workflow.tasks] == ["step-1", "step-2"]

    events = list(client.workflow_events(workflow.id))
    assert events[-1].state == "completed" and events[-1].is_last
    assert all(e.event == "state" and e.data["workflow_id"] == workflow.id for e in events)
    done = client.get_workflow(workflow.id)
    assert done.state == "completed" and done.counts == {"completed": 2}
    assert client.result(done.task_id("step-2")) == 3  # 2 + its parent's 1


def test_batch_with_then(client: Client):
    workflow = client.submit_workflow(batch=[NewTask("add", 1), {"task_type": "add", "task_input": 2}],
                                      then=NewTask("add", 10))  # fmt: skip
    assert client.wait(workflow.task_id("then"), timeout=60, raise_on_failure=True).result == 13
    assert client.get_workflow(workflow.id).state == "completed"


def test_graph_cancel_and_another_keys_view(client: Client, served):
    workflow = client.submit_workflow(
        tasks=[
            NewTask("noop", None, ref="first", delay_seconds=3600),
            NewTask("noop", None, ref="second", depends_on=["first"], trigger_rule="all_done"),
        ],
        idempotency_key=f"wf-{uuid.uuid4().hex}",
    )
    assert workflow.state == "running" and not workflow.is_final
    with Client(served.base_url, served.other_token) as other, pytest.raises(NotFound):
        other.get_workflow(workflow.id)
    cancelled = client.cancel_workflow(workflow.id)
    assert cancelled.state == "cancelled" and cancelled.counts == {"cancelled": 2}
    assert client.cancel_workflow(workflow.id).state == "cancelled"  # again: the same answer
    assert [e.state for e in client.workflow_events(workflow.id)] == ["cancelled"]


def test_workflow_refusals_name_the_problem(client: Client):
    with pytest.raises(ValidationError) as cycle:
        client.submit_workflow(tasks=[NewTask("noop", ref="a", depends_on=["b"]),
                                      NewTask("noop", ref="b", depends_on=["a"])])  # fmt: skip
    assert "tasks" in cycle.value.errors["json"]


def test_schedule_lifecycle(client: Client):
    name = f"nightly-{uuid.uuid4().hex[:8]}"
    made = client.create_schedule(name, NewTask("greet", {"name": "cron"}), every_seconds=3600, paused=True)
    assert isinstance(made, Schedule)
    assert (made.name, made.every_seconds, made.paused) == (name, 3600, True)
    assert made.task["task_type"] == "greet" and made.task["task_input"] == {"name": "cron"}
    assert made.id in [s.id for s in client.list_schedules()]
    assert client.get_schedule(made.id).name == name

    changed = client.update_schedule(made.id, every_seconds=None, cron="0 9 * * 1", timezone="Europe/Paris")
    assert (changed.cron, changed.every_seconds, changed.timezone) == ("0 9 * * 1", None, "Europe/Paris")
    assert client.resume_schedule(made.id).paused is False
    assert client.pause_schedule(made.id).paused is True

    fire = client.run_schedule(made.id)  # paused or not, run now fires
    assert fire.outcome == "created" and fire.schedule_id == made.id
    task = client.wait(fire.task_id, timeout=60, raise_on_failure=True)
    assert task.result["greeting"] == "Hello, cron!"

    with pytest.raises(Conflict) as taken:
        client.create_schedule(name, {"task_type": "noop", "task_input": None}, every_seconds=60)
    assert name in taken.value.message
    with pytest.raises(ValidationError) as bad_rule:
        client.create_schedule(f"{name}-x", NewTask("noop"), cron="not a cron")
    assert "cron" in bad_rule.value.errors["json"]

    assert client.delete_schedule(made.id) is None
    with pytest.raises(NotFound):
        client.get_schedule(made.id)
