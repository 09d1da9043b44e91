"""Safe retries against real gunicorn: a submit whose answer is lost is sent again with the same
Idempotency-Key and creates one task; a call that is not safe to repeat is not repeated; a cancel
whose first try was done answers the task; a broken event stream resumes with Last-Event-ID; a
429 (rate limit, quota) waits its Retry-After, and raises RateLimited with the body when the
retries are spent."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from skiplock_client import Client, NewTask, RateLimited, Retry, TransportError

from skiplock.db import connect

from .proxy import flaky_proxy

# The client's side of HTTP: the same on every Postgres version (.ci/run runs it against one).
pytestmark = [pytest.mark.slow, pytest.mark.pg_agnostic]


class Recording(httpx.HTTPTransport):
    """A real transport that notes each exchange: (sent, answered, status, request headers,
    Retry-After)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[float, float, int, httpx.Headers, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = super().handle_request(request)
        self.log.append((sent, time.monotonic(), response.status_code, request.headers,
                         response.headers.get("retry-after")))  # fmt: skip
        return response


def tasks_named(database_url: str, name: str) -> int:
    with connect(database_url, role="test") as conn:
        return conn.execute("SELECT count(*) AS n FROM tasks WHERE input->>'name' = %s", (name,)).fetchone()[
            "n"
        ]


def test_a_submit_whose_answer_was_lost_creates_one_task(served, client):
    name = f"once-{uuid.uuid4().hex[:8]}"
    with flaky_proxy(served.base_url, drop_answers=1) as proxy, Client(proxy.url, served.token) as flaky:
        task = flaky.submit("greet", {"name": name})
        assert len(proxy.requests) == 2  # the first try's answer was dropped: tried again
        keys = {proxy.header(0, "Idempotency-Key"), proxy.header(1, "Idempotency-Key")}
        assert len(keys) == 1 and None not in keys  # one key, made once for the call
    assert tasks_named(served.database_url, name) == 1
    assert client.get_task(task.id).input == {"name": name}

    batch_name = f"batch-{uuid.uuid4().hex[:8]}"
    with flaky_proxy(served.base_url, drop_answers=1) as proxy, Client(proxy.url, served.token) as flaky:
        batch = flaky.submit_many([NewTask("greet", {"name": batch_name}) for _ in range(3)])
        assert len(proxy.requests) == 2
    assert tasks_named(served.database_url, batch_name) == 3 and len(set(batch.task_ids)) == 3


def test_a_retry_whose_answer_was_lost_is_not_repeated(served, client):
    task = client.submit("fail", {"times": 9}, max_attempts=1)
    assert client.wait(task.id, timeout=60).status == "failed"
    with flaky_proxy(served.base_url, drop_answers=1) as proxy, Client(proxy.url, served.token) as flaky:
        with pytest.raises(TransportError) as lost:
            flaky.retry(task.id)
        assert len(proxy.requests) == 1  # not safe to repeat: raised, not sent again
    assert lost.value.attempts == 1 and isinstance(lost.value.__cause__, httpx.TransportError)
    assert client.wait(task.id, timeout=60).status == "failed"
    assert len(client.attempts(task.id)) == 2  # the one retry that was made ran once


def test_a_cancel_whose_answer_was_lost_answers_the_cancelled_task(served, client):
    task = client.submit("noop", None, delay_seconds=3600)
    with flaky_proxy(served.base_url, drop_answers=1) as proxy, Client(proxy.url, served.token) as flaky:
        cancelled = flaky.cancel(task.id)
        # The cancel, again (409: cancelled by the first), then the task read.
        assert [h.split(b" ")[:2] for h in proxy.requests] == [
            [b"POST", f"/api/tasks/{task.id}/cancel".encode()],
            [b"POST", f"/api/tasks/{task.id}/cancel".encode()],
            [b"GET", f"/api/task-status/{task.id}".encode()],
        ]
    assert cancelled.id == task.id and cancelled.status == "cancelled"


def test_a_broken_stream_resumes_from_its_last_event(served, client):
    task = client.submit("sleep", {"seconds": 2})
    first_event = rb"event: status\ndata: [^\n]*\n\n"
    with (
        flaky_proxy(served.base_url, cut_after=first_event) as proxy,
        Client(proxy.url, served.token) as flaky,
    ):
        events = list(flaky.events(task.id))
        assert proxy.cut == 1 and len(proxy.requests) >= 2
        assert proxy.header(0, "Last-Event-ID") is None
        assert proxy.header(1, "Last-Event-ID") == events[0].id  # resumed after what it saw
    assert events[-1].task.status == "completed"
    assert len({e.id for e in events}) == len(events)  # no state twice


def test_rate_limited_calls_wait_their_retry_after(served):
    token = served.new_key(rate_per_second=0.25, burst=1)  # a token every 4 s
    with Client(served.base_url, token, retries=0) as impatient, pytest.raises(RateLimited) as refused:
        for _ in range(3):  # the first spends the one token; the next is refused at once
            impatient.list_tasks()
    error = refused.value
    assert error.body["code"] == 429 and "Rate limit" in error.message and error.retry_after >= 1

    recording = Recording()
    with Client(served.base_url, token, transport=recording) as patient:
        for _ in range(3):  # each call spends the token it waited for: the next one is refused
            patient.list_tasks()
            if 429 in [status for _, _, status, _, _ in recording.log]:
                break
    statuses = [status for _, _, status, _, _ in recording.log]
    assert 429 in statuses and statuses[-1] == 200
    for (_, answered, status, _, retry_after), (sent, *_) in zip(
        recording.log, recording.log[1:], strict=False
    ):
        if status == 429:  # the next try waited as long as the API asked
            assert sent - answered >= float(retry_after)


def test_quota_refusals_are_retried_with_one_key_then_raised_with_the_body(served):
    token = served.new_key(max_unfinished=1)
    recording = Recording()
    with Client(
        served.base_url, token, retries=Retry(attempts=2, max_retry_after=5), transport=recording
    ) as c:
        c.submit("noop", None, delay_seconds=3600)  # holds the key's one slot
        with pytest.raises(RateLimited) as refused:
            c.submit("noop", None, delay_seconds=3600)
    assert refused.value.attempts == 3 and "at most 1 unfinished" in refused.value.message
    refusals = recording.log[1:]
    assert [status for _, _, status, _, _ in refusals] == [429, 429, 429]
    assert len({headers["idempotency-key"] for _, _, _, headers, _ in refusals}) == 1
