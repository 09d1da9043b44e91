"""The sync client's task operations against real gunicorn and worker.py: submit one and many,
get, result, attempts, list, wait, events, cancel, retry; and the typed errors each failure
raises, carrying the API's error body."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from skiplock_client import (
    Attempt,
    BadRequest,
    Client,
    Conflict,
    NewTask,
    NotFound,
    Task,
    TaskFailed,
    Unauthorized,
    ValidationError,
    WaitTimeout,
)

# The client's side of HTTP: the same on every Postgres version (.ci/run runs it against one).
pytestmark = [pytest.mark.slow, pytest.mark.pg_agnostic]

LATER = {"delay_seconds": 3600}  # stays pending: nothing runs it while the test looks


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


def test_submit_wait_result_get_attempts(client: Client):
    name = marker()
    task = client.submit("greet", {"name": name}, priority=5)
    assert isinstance(task, Task)
    assert (task.task_type, task.priority, task.deduplicated) == ("greet", 5, False)
    assert task.raw["task_id"] == task.id

    done = client.wait(task.id, timeout=60, raise_on_failure=True)
    assert done.status == "completed" and done.is_final
    assert done.result == {"greeting": f"Hello, {name}!", "attempt": 1}
    assert client.result(task.id) == done.result

    got = client.get_task(task.id)
    assert got.input == {"name": name} and got.finished_at is not None
    (attempt,) = client.attempts(task.id)
    assert isinstance(attempt, Attempt)
    assert (attempt.attempt, attempt.outcome, attempt.error) == (1, "completed", None)


def test_submit_options_unique_key_and_idempotency_key(client: Client):
    run_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    unique = marker()
    first = client.submit("noop", None, run_at=run_at, unique_key=unique, queue="client-q")
    assert first.run_at == run_at and first.queue == "client-q" and first.status == "pending"
    again = client.submit("noop", None, unique_key=unique)
    assert again.deduplicated and again.id == first.id

    key = marker()
    one = client.submit("noop", {"n": 1}, idempotency_key=key, **LATER)
    replayed = client.submit("noop", {"n": 1}, idempotency_key=key, **LATER)
    assert replayed.id == one.id
    with pytest.raises(ValidationError) as refused:  # the same key for another request
        client.submit("noop", {"n": 2}, idempotency_key=key, **LATER)
    assert "Idempotency-Key" in refused.value.errors["headers"]
    with pytest.raises(BadRequest) as bad:
        client.submit("noop", None, idempotency_key='not "quoted" inside')
    assert bad.value.status_code == 400 and "Idempotency-Key" in bad.value.message


def test_submit_many_and_list_pages(client: Client, served):
    queue = f"q{uuid.uuid4().hex[:10]}"
    batch = client.submit_many(
        [NewTask("noop", {"n": n}, queue=queue, **LATER) for n in range(3)]
        + [{"task_type": "noop", "task_input": {"n": 3}, "queue": queue, "delay_seconds": 3600}]
    )
    assert len(batch.task_ids) == 4 and batch.deduplicated == [False] * 4

    seen: list[int] = []
    page = client.list_tasks(queue=queue, limit=3)
    seen += [t.id for t in page.tasks]
    assert page.next_before is not None
    page = client.list_tasks(queue=queue, limit=3, before=page.next_before)
    seen += [t.id for t in page.tasks]
    assert page.next_before is None
    assert seen == sorted(batch.task_ids, reverse=True)  # newest first, every one once
    assert client.list_tasks(queue=queue, status="completed").tasks == []

    with Client(served.base_url, served.other_token) as other:  # another key sees none of them
        assert other.list_tasks(queue=queue).tasks == []
        with pytest.raises(NotFound):
            other.get_task(batch.task_ids[0])


def test_wait_deadline_cancel_and_conflicts(client: Client):
    task = client.submit("noop", None, **LATER)
    with pytest.raises(WaitTimeout) as late:
        client.wait(task.id, timeout=0.5)
    assert late.value.task.status == "pending" and late.value.task.id == task.id
    assert client.get_task(task.id).waiting_for["reason"] == "run_at"

    with pytest.raises(Conflict) as early:
        client.result(task.id)
    assert early.value.body["status"] == "pending" and early.value.retry_after is not None

    cancelled = client.cancel(task.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(Conflict) as twice:  # a first try that found it cancelled: the API's 409
        client.cancel(task.id)
    assert twice.value.body["status"] == "cancelled" and twice.value.body["task_id"] == task.id


def test_failed_task_raises_and_retry_runs_it_again(client: Client):
    task = client.submit("fail", {"times": 5, "message": "hopeless input"}, max_attempts=1)
    with pytest.raises(TaskFailed) as failed:
        client.wait(task.id, timeout=60, raise_on_failure=True)
    assert failed.value.task.status == "failed" and "hopeless input" in failed.value.task.error
    assert [a.outcome for a in client.attempts(task.id)] == ["failed"]
    with pytest.raises(Conflict) as no_result:
        client.result(task.id)
    assert no_result.value.body["status"] == "failed"

    again = client.retry(task.id)
    assert again.status in ("pending", "processing")
    assert client.wait(task.id, timeout=60).status == "failed"  # without raise_on_failure: the task
    assert len(client.attempts(task.id)) == 2


def test_events_until_final_then_resume_gets_nothing(client: Client):
    task = client.submit("sleep", {"seconds": 0.6})
    events = list(client.events(task.id))
    assert events[0].event == "status" and events[-1].task.status == "completed"
    assert [e.is_last for e in events] == [False] * (len(events) - 1) + [True]
    assert len({e.id for e in events}) == len(events)  # each state once
    assert {e.event for e in events} <= {"status", "progress"}
    assert list(client.events(task.id, last_event_id=events[-1].id)) == []  # 204: nothing more


def test_task_types(client: Client):
    types = {t["name"]: t for t in client.task_types()}
    assert "greet" in types and "name" in types["greet"]["input_schema"]["properties"]


def test_invalid_input_is_a_validation_error_carrying_the_body(client: Client):
    queue = f"q{uuid.uuid4().hex[:10]}"
    with pytest.raises(ValidationError) as refused:
        client.submit("greet", {"nom": "Ada"}, queue=queue)
    error = refused.value
    assert error.status_code == 422 and error.body["code"] == 422
    assert error.body["status"] == "Unprocessable Entity" and error.message
    assert "name" in error.errors["json"]["task_input"]
    with pytest.raises(ValidationError) as unknown:
        client.submit("no-such-type", None, queue=queue)
    assert "no-such-type" in str(unknown.value.errors["json"]["task_type"])
    assert client.list_tasks(queue=queue).tasks == []  # nothing was created


def test_missing_task_and_bad_keys(client: Client, make_client):
    with pytest.raises(NotFound) as missing:
        client.get_task(987654321)
    assert missing.value.body["code"] == 404 and "987654321" in missing.value.message
    for key in ("sk_not_a_key", None):
        with pytest.raises(Unauthorized) as refused:
            make_client(api_key=key).list_tasks()
        assert refused.value.status_code == 401 and refused.value.body["code"] == 401


def test_stream_tokens_open_one_stream_without_the_key(client: Client):
    task = client.submit("greet", {"name": "browser"})
    client.wait(task.id, timeout=60)
    token = client.stream_token(task.id, lifetime_seconds=60)
    assert token.token in token.url and token.expires_at is not None
    opened = httpx.get(token.url, timeout=30)  # as a browser's EventSource would: no Authorization
    assert opened.status_code == 200 and '"status": "completed"' in opened.text

    workflow = client.submit_workflow(chain=[NewTask("add", 1)])
    streamed = httpx.get(client.workflow_stream_token(workflow.id).url, timeout=30)
    assert streamed.status_code == 200 and "event: state" in streamed.text
