"""AsyncClient: every method, awaited, against real gunicorn and worker.py (run in an event
loop of its own by each test: no pytest plugin). Tasks are submitted concurrently, as an asyncio service would."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from skiplock_client import (
    AsyncClient,
    Conflict,
    NewTask,
    NotFound,
    TaskFailed,
    Unauthorized,
    ValidationError,
)

from tests.helpers import run_async

# The client's side of HTTP: the same on every Postgres version (.ci/run runs it against one).
pytestmark = [pytest.mark.slow, pytest.mark.pg_agnostic]


def test_tasks(served):
    async def scenario():
        async with AsyncClient(served.base_url, served.token) as client:
            names = [f"a-{n}" for n in range(5)]
            submitted = await asyncio.gather(*(client.submit("greet", {"name": n}) for n in names))
            done = await asyncio.gather(
                *(client.wait(t.id, timeout=60, raise_on_failure=True) for t in submitted)
            )
            assert [t.result["greeting"] for t in done] == [f"Hello, {n}!" for n in names]
            first = submitted[0].id
            assert await client.result(first) == {"greeting": "Hello, a-0!", "attempt": 1}
            assert (await client.get_task(first)).input == {"name": "a-0"}
            assert [a.outcome for a in await client.attempts(first)] == ["completed"]
            assert str(first) in (await client.stream_token(first)).url

            queue = f"q{uuid.uuid4().hex[:10]}"
            batch = await client.submit_many(
                [NewTask("noop", n, queue=queue, delay_seconds=3600) for n in range(2)]
            )
            page = await client.list_tasks(queue=queue)
            assert [t.id for t in page.tasks] == batch.task_ids[::-1]
            assert (await client.cancel(batch.task_ids[0])).status == "cancelled"
            with pytest.raises(Conflict):
                await client.cancel(batch.task_ids[0])

            streamed = await client.submit("sleep", {"seconds": 0.5})
            events = [e async for e in client.events(streamed.id)]
            assert events[-1].task.status == "completed" and events[-1].is_last

            failing = await client.submit("fail", {"times": 3}, max_attempts=1)
            with pytest.raises(TaskFailed):
                await client.wait(failing.id, timeout=60, raise_on_failure=True)
            assert (await client.retry(failing.id)).status in ("pending", "processing")
            assert "greet" in {t["name"] for t in await client.task_types()}

            with pytest.raises(ValidationError) as refused:
                await client.submit("greet", {"nom": 1})
            assert "name" in refused.value.errors["json"]["task_input"]
            with pytest.raises(NotFound):
                await client.get_task(987654321)
        async with AsyncClient(served.base_url, "sk_wrong") as stranger:
            with pytest.raises(Unauthorized) as refused_key:
                await stranger.list_tasks()
            assert refused_key.value.body["code"] == 401

    run_async(scenario())


def test_workflows_and_schedules(served):
    async def scenario():
        async with AsyncClient(served.base_url, served.token) as client:
            workflow = await client.submit_workflow(chain=[NewTask("add", 4), NewTask("add", 5)])
            states = [e.state async for e in client.workflow_events(workflow.id)]
            assert states[-1] == "completed"
            assert (await client.get_workflow(workflow.id)).counts == {"completed": 2}
            assert (await client.workflow_stream_token(workflow.id)).token
            held = await client.submit_workflow(tasks=[NewTask("noop", ref="x", delay_seconds=3600)])
            assert (await client.cancel_workflow(held.id)).state == "cancelled"

            name = f"async-{uuid.uuid4().hex[:8]}"
            made = await client.create_schedule(name, NewTask("noop"), every_seconds=600, paused=True)
            assert name in [s.name for s in await client.list_schedules()]
            assert (await client.get_schedule(made.id)).every_seconds == 600
            assert (await client.update_schedule(made.id, every_seconds=900)).every_seconds == 900
            assert (await client.resume_schedule(made.id)).paused is False
            assert (await client.pause_schedule(made.id)).paused is True
            fire = await client.run_schedule(made.id)
            assert (await client.wait(fire.task_id, timeout=60)).status == "completed"
            await client.delete_schedule(made.id)
            with pytest.raises(NotFound):
                await client.get_schedule(made.id)

    run_async(scenario())
