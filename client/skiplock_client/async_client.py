"""AsyncClient: the asyncio client, method for method the same as Client (client.py), awaited;
the streams are async iterators."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar

import httpx

from . import calls
from .calls import Call
from .errors import ApiError, TransportError, WaitTimeout, error_for
from .models import (
    Attempt,
    Batch,
    Fire,
    NewTask,
    Schedule,
    StreamToken,
    Task,
    TaskEvent,
    TaskPage,
    Workflow,
    WorkflowEvent,
)
from .options import DEFAULT_STREAM_TIMEOUT_SECONDS, DEFAULT_TIMEOUT_SECONDS, Options, default_headers
from .retries import Retry, delay_after_answer, delay_after_error
from .sse import EventParser, RawEvent

T = TypeVar("T")
TaskLike = NewTask | Mapping[str, Any]


class AsyncClient:
    """As Client, for asyncio: `async with AsyncClient(...) as client`, `await client.submit(...)`,
    `async for event in client.events(task_id)`. `transport`: an httpx async transport."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int | Retry = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT_SECONDS,
        headers: Mapping[str, str] | None = None,
    ):
        self._options = Options.of(timeout, stream_timeout, retries)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=default_headers(api_key, headers), transport=transport, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- tasks -----------------------------------------------------------------------------------

    async def submit(self, task_type: str, task_input: Any = None, *, idempotency_key: str | None = None,
               **options: Any) -> Task:  # fmt: skip
        """Submit a task (POST /api/tasks); `options` are NewTask's (queue, priority, delay_seconds,
        run_at, max_attempts, timeout_seconds, callback_url, unique_key, expires_at...). Retried
        safely: every try carries the same Idempotency-Key (made here unless given)."""
        return await self._run(calls.submit(NewTask(task_type, task_input, **options), idempotency_key))

    async def submit_many(self, tasks: Iterable[TaskLike], *, idempotency_key: str | None = None) -> Batch:
        """Submit up to 1,000 tasks at once (POST /api/tasks/batch): all are stored or none."""
        return await self._run(calls.submit_many(tasks, idempotency_key))

    async def get_task(self, task_id: int, *, wait: float | None = None) -> Task:
        """The task with its input and, while pending, what it waits for (waiting_for)."""
        return await self._run(calls.get_task(task_id, wait))

    async def result(self, task_id: int, *, wait: float | None = None) -> Any:
        """The result of a completed task; Conflict if it is not completed (yet)."""
        return await self._run(calls.result(task_id, wait))

    async def attempts(self, task_id: int) -> list[Attempt]:
        """The task's ended attempts, oldest first."""
        return await self._run(calls.attempts(task_id))

    async def list_tasks(self, *, status: str | None = None, task_type: str | None = None, queue: str | None = None,
                   before: int | None = None, limit: int | None = None) -> TaskPage:  # fmt: skip
        """A page of your tasks, newest first (next page: before=page.next_before)."""
        return await self._run(calls.list_tasks(status, task_type, queue, before, limit))

    async def wait(
        self, task_id: int, timeout: float | None = None, *, raise_on_failure: bool = False
    ) -> Task:
        """The task once final, long-polling (no busy loop). WaitTimeout after `timeout` seconds
        (None: no deadline); TaskFailed if raise_on_failure and it ended without a result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = calls.MAX_POLL_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())
            task = await self._run(calls.task_status(task_id, min(left, calls.MAX_POLL_SECONDS)))
            if task.is_final:
                return calls.finished(task, raise_on_failure)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(task, timeout or 0.0)

    async def events(self, task_id: int, *, last_event_id: str | None = None) -> AsyncIterator[TaskEvent]:
        """The task's changes as they happen (server-sent events), until it is final. A broken
        stream reconnects with Last-Event-ID: no change is seen twice, the final one never lost."""
        async for raw in self._stream(calls.task_events_path(task_id), last_event_id):
            event = TaskEvent.from_sse(raw.event, raw.data, raw.id)
            yield event
            if event.is_last:
                return

    async def stream_token(self, task_id: int, *, lifetime_seconds: int | None = None) -> StreamToken:
        """A short-lived token that opens this task's event stream from a browser, without an
        API key: hand its `url` to the page (`new EventSource(url)`)."""
        return await self._run(calls.stream_token("tasks", task_id, lifetime_seconds))

    async def cancel(self, task_id: int) -> Task:
        """Cancel a pending task, or stop a running one; Conflict if it is already final."""
        return await self._run(calls.cancel(task_id))

    async def retry(self, task_id: int) -> Task:
        """Run a failed, cancelled or expired task again."""
        return await self._run(calls.retry(task_id))

    async def task_types(self) -> list[dict[str, Any]]:
        """The task types the API accepts, with their input's JSON schema."""
        return await self._run(calls.task_types())

    # --- workflows -------------------------------------------------------------------------------

    async def submit_workflow(
        self,
        *,
        tasks: Iterable[TaskLike] | None = None,
        chain: Iterable[TaskLike] | None = None,
        batch: Iterable[TaskLike] | None = None,
        then: TaskLike | None = None,
        catch: TaskLike | None = None,
        finally_: TaskLike | None = None,
        name: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Workflow:
        """Submit a workflow: a graph (`tasks`, each NewTask with ref and depends_on), a `chain`,
        or a `batch` with then / catch / finally_. Retried safely, as submit() is."""
        return await self._run(calls.submit_workflow(
            tasks=tasks, chain=chain, batch=batch, then=then, catch=catch, finally_=finally_, name=name,
            callback_url=callback_url, idempotency_key=idempotency_key,
        ))  # fmt: skip

    async def get_workflow(self, workflow_id: int) -> Workflow:
        return await self._run(calls.get_workflow(workflow_id))

    async def cancel_workflow(self, workflow_id: int) -> Workflow:
        return await self._run(calls.cancel_workflow(workflow_id))

    async def workflow_events(
        self, workflow_id: int, *, last_event_id: str | None = None
    ) -> AsyncIterator[WorkflowEvent]:
        """The workflow's state and counts as they change, until it is final."""
        async for raw in self._stream(calls.workflow_events_path(workflow_id), last_event_id):
            event = WorkflowEvent(raw.event, raw.id, json.loads(raw.data))
            yield event
            if event.is_last:
                return

    async def workflow_stream_token(
        self, workflow_id: int, *, lifetime_seconds: int | None = None
    ) -> StreamToken:
        """As stream_token(), for the workflow's event stream."""
        return await self._run(calls.stream_token("workflows", workflow_id, lifetime_seconds))

    # --- schedules -------------------------------------------------------------------------------

    async def create_schedule(
        self,
        name: str,
        task: TaskLike,
        *,
        cron: str | None = None,
        every_seconds: int | None = None,
        timezone: str | None = None,
        paused: bool | None = None,
        **policies: Any,
    ) -> Schedule:
        """Make a schedule: `task` submitted at each time of its rule (cron in `timezone`, or
        every_seconds). `policies`: missed, missed_limit, overlap, grace_seconds."""
        rule = {
            "cron": cron,
            "every_seconds": every_seconds,
            "timezone": timezone,
            "paused": paused,
            **policies,
        }
        return await self._run(calls.create_schedule(name, task, rule))

    async def list_schedules(self) -> list[Schedule]:
        return await self._run(calls.list_schedules())

    async def get_schedule(self, schedule_id: int) -> Schedule:
        return await self._run(calls.get_schedule(schedule_id))

    async def update_schedule(self, schedule_id: int, **changes: Any) -> Schedule:
        """Change these fields (None sends null: cron=None with every_seconds=60 swaps the rule)."""
        return await self._run(calls.update_schedule(schedule_id, changes))

    async def delete_schedule(self, schedule_id: int) -> None:
        await self._run(calls.delete_schedule(schedule_id))

    async def pause_schedule(self, schedule_id: int) -> Schedule:
        return await self._run(calls.pause_schedule(schedule_id, True))

    async def resume_schedule(self, schedule_id: int) -> Schedule:
        return await self._run(calls.pause_schedule(schedule_id, False))

    async def run_schedule(self, schedule_id: int) -> Fire:
        """Fire the schedule now; Conflict (saying why) if that created no task."""
        return await self._run(calls.run_schedule(schedule_id))

    # --- the I/O ---------------------------------------------------------------------------------

    async def _run(self, call: Call[T]) -> T:
        try:
            response = await self._send(call, self._options.request_timeout(call.wait), stream=False)
        except ApiError as error:
            instead = call.recover(error) if call.recover and error.attempts > 1 else None
            if instead is None:
                raise
            return await self._run(instead)
        return call.read(response)

    async def _send(self, call: Call[Any], timeout: httpx.Timeout, *, stream: bool) -> httpx.Response:
        """The call's successful answer, after the retries its kind allows."""
        retry = 0
        while True:
            request = self._http.build_request(call.method, call.path, params=call.params, json=call.json,
                                               headers=call.headers, timeout=timeout)  # fmt: skip
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = delay_after_error(self._options.retry, retry, exc, call.repeat)
                if delay is None:
                    raise TransportError(f"{call.method} {call.path}: {exc!r}", attempts=retry + 1) from exc
            else:
                if response.is_success:
                    return response
                await response.aread()
                await response.aclose()
                delay = delay_after_answer(self._options.retry, retry, response)
                if delay is None:
                    raise error_for(response, attempts=retry + 1)
            retry += 1
            await asyncio.sleep(delay)

    async def _stream(self, path: str, last_event_id: str | None) -> AsyncIterator[RawEvent]:
        """A stream's events, reconnecting (Last-Event-ID) when it breaks or ends early, until the
        consumer stops (at the last event) or the API answers 204 (nothing more will come)."""
        breaks = 0
        while True:
            parser = EventParser(last_event_id)  # afresh: an event cut off by a break is not half kept
            headers = {"Accept": "text/event-stream"}
            if parser.last_id is not None:
                headers["Last-Event-ID"] = parser.last_id
            call: Call[None] = Call("GET", path, lambda r: None, headers=headers)
            response = await self._send(call, self._options.stream_read_timeout(), stream=True)
            failure: httpx.TransportError | None = None
            try:
                if response.status_code == 204:
                    return
                async for line in response.aiter_lines():
                    if (raw := parser.feed(line)) is not None:
                        breaks, last_event_id = 0, parser.last_id
                        yield raw
            except httpx.TransportError as exc:
                failure = exc
            finally:
                await response.aclose()
            delay = self._options.retry.delay(breaks)
            if delay is None:
                raise TransportError(
                    f"GET {path}: the stream broke {breaks + 1} times", attempts=breaks + 1
                ) from failure
            breaks += 1
            await asyncio.sleep(delay)
