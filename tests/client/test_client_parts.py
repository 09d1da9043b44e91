"""The client's parts that need no server: Retry-After in both forms, the backoff, the event
stream parser, error bodies that are not the API's JSON; and what happens when nothing
answers (an HTTP status the API does not send here is played by httpx.MockTransport)."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from skiplock_client import AsyncClient, Client, Retry, ServerError, TransportError, Unavailable
from skiplock_client.retries import retry_after_seconds
from skiplock_client.sse import EventParser

from tests.helpers import free_port, run_async


def test_retry_after_in_seconds_or_an_http_date():
    assert retry_after_seconds("7") == 7.0
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_seconds(soon) <= 30
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert retry_after_seconds(past) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_backoff_is_capped_jittered_and_counted():
    policy = Retry(attempts=6, backoff=1.0, max_backoff=4.0, max_retry_after=10)
    for retry, ceiling in enumerate([1, 2, 4, 4, 4, 4]):
        assert ceiling / 2 <= policy.delay(retry) <= ceiling
    assert policy.delay(6) is None  # the retries are spent
    assert policy.delay(0, retry_after=9) == 9  # the server's word replaces the backoff
    assert policy.delay(0, retry_after=11) is None  # longer than the caller allows: raise now


def test_event_parser_follows_the_standard():
    parser = EventParser()
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "id: 1.pending.",
        "event: status",
        'data: {"a":',
        "data: 1}",
        "",
    ]
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    assert [(e.event, e.data, e.id) for e in events] == [("status", '{"a":\n1}', "1.pending.")]
    assert parser.retry_ms == 2000 and parser.last_id == "1.pending."


def answering(*responses: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.MockTransport(handle), seen


def test_503_is_retried_with_the_same_idempotency_key():
    later = format_datetime(datetime.now(UTC), usegmt=True)  # an HTTP-date: now, no wait
    body = {"code": 503, "status": "Service Unavailable", "message": "The database is unavailable"}
    task = {"task_id": 1, "status": "pending", "attempts": 0}
    transport, seen = answering(
        httpx.Response(503, json=body, headers={"Retry-After": later}),
        httpx.Response(503, json=body, headers={"Retry-After": "0"}),
        httpx.Response(202, json=task),
    )
    with Client("http://api.invalid", "sk_x", transport=transport) as client:
        assert client.submit("noop").id == 1
    assert len({r.headers["Idempotency-Key"] for r in seen}) == 1 and len(seen) == 3
    assert seen[0].headers["Authorization"] == "Bearer sk_x"

    transport, seen = answering(*[httpx.Response(503, json=body, headers={"Retry-After": "0"})] * 2)
    with (
        Client("http://api.invalid", transport=transport, retries=1) as client,
        pytest.raises(Unavailable) as down,
    ):
        client.list_tasks()
    assert down.value.body == body and down.value.attempts == 2


def test_an_answer_that_is_not_the_apis_json_still_raises_typed():
    transport, _ = answering(httpx.Response(502, text="<html>Bad Gateway</html>"))
    with Client("http://api.invalid", transport=transport) as client, pytest.raises(ServerError) as bad:
        client.get_task(1)
    assert (
        bad.value.status_code == 502 and bad.value.body["code"] == 502 and "Bad Gateway" in bad.value.message
    )


def test_nothing_listening_raises_transport_error_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"
    with (
        Client(url, retries=Retry(attempts=2, backoff=0.01)) as client,
        pytest.raises(TransportError) as down,
    ):
        client.retry(1)  # not safe to repeat, but a refused connection sent nothing: retried
    assert down.value.attempts == 3 and isinstance(down.value.__cause__, httpx.ConnectError)

    async def async_down():
        async with AsyncClient(url, retries=Retry(attempts=1, backoff=0.01)) as client:
            await client.list_tasks()

    with pytest.raises(TransportError) as async_error:
        run_async(async_down())
    assert async_error.value.attempts == 2


def test_the_async_client_has_every_method_of_the_sync_one():
    def public(cls) -> dict[str, inspect.Signature]:
        return {
            n: inspect.signature(f) for n, f in vars(cls).items() if callable(f) and not n.startswith("_")
        }

    sync, awaited = public(Client), public(AsyncClient)
    assert sync.pop("close") and awaited.pop("aclose")
    assert sync == {n: s.replace(return_annotation=sync[n].return_annotation) for n, s in awaited.items()}
    for name in awaited:
        method = getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name
