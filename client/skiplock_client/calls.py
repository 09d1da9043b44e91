"""Every operation of the API as a Call: its request, what running it twice does (retries.Repeat),
and how its answer is read. Client and AsyncClient run the same Calls, each with its own I/O, so
an operation is written once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from .errors import ApiError, Conflict, TaskFailed
from .models import Attempt, Batch, Fire, NewTask, Schedule, StreamToken, Task, TaskPage, Workflow, task_json
from .retries import Repeat

T = TypeVar("T")
IDEMPOTENCY_HEADER = "Idempotency-Key"
# The longest ?wait= a long-poll asks for; wait() asks again until its own deadline. (The API
# allows 60 s; less keeps each request well inside proxies' idle timeouts.)
MAX_POLL_SECONDS = 30.0


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    repeat: Repeat = Repeat.SAFE
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    wait: float = 0.0  # a long-poll's wait, on top of the read timeout
    # An error after a retry that the first try's success explains (a cancel that found the
    # task cancelled): the call to make instead, or None to raise it.
    recover: Callable[[ApiError], Call[T] | None] | None = None


def _idempotency(key: str | None) -> dict[str, str]:
    """Made once per logical submit, sent on every try: a retried submit is answered by the API
    with the first try's answer, never a second task."""
    return {IDEMPOTENCY_HEADER: key if key is not None else uuid.uuid4().hex}


def _params(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _nothing(response: httpx.Response) -> None:
    return None


# --- tasks ---------------------------------------------------------------------------------------


def submit(task: NewTask, idempotency_key: str | None) -> Call[Task]:
    return Call("POST", "/api/tasks", lambda r: Task.from_json(r.json()), json=task.to_json(),
                headers=_idempotency(idempotency_key))  # fmt: skip


def submit_many(tasks: Iterable[NewTask | Mapping[str, Any]], idempotency_key: str | None) -> Call[Batch]:
    body = {"tasks": [task_json(t) for t in tasks]}
    return Call("POST", "/api/tasks/batch", lambda r: Batch.from_json(r.json()), json=body,
                headers=_idempotency(idempotency_key))  # fmt: skip


def get_task(task_id: int, wait: float | None = None) -> Call[Task]:
    return Call("GET", f"/api/tasks/{int(task_id)}", lambda r: Task.from_json(r.json()),
                params=_params(wait=wait), wait=wait or 0.0)  # fmt: skip


def task_status(task_id: int, wait: float | None = None) -> Call[Task]:
    """The task without its input (lighter for polling), with its result."""
    return Call("GET", f"/api/task-status/{int(task_id)}", lambda r: Task.from_json(r.json()),
                params=_params(wait=wait), wait=wait or 0.0)  # fmt: skip


def result(task_id: int, wait: float | None = None) -> Call[Any]:
    return Call("GET", f"/api/task-result/{int(task_id)}", lambda r: r.json()["result"],
                params=_params(wait=wait), wait=wait or 0.0)  # fmt: skip


def attempts(task_id: int) -> Call[list[Attempt]]:
    return Call(
        "GET", f"/api/tasks/{int(task_id)}/attempts", lambda r: [Attempt.from_json(a) for a in r.json()]
    )


def list_tasks(
    status: str | None, task_type: str | None, queue: str | None, before: int | None, limit: int | None
) -> Call[TaskPage]:
    params = _params(status=status, task_type=task_type, queue=queue, before=before, limit=limit)
    return Call("GET", "/api/tasks", lambda r: TaskPage.from_json(r.json()), params=params)


def cancel(task_id: int) -> Call[Task]:
    """Safe to repeat: a cancel whose first try cancelled the task is answered 409 `cancelled`,
    and then reads the task instead."""

    def already_cancelled(error: ApiError) -> Call[Task] | None:
        cancelled = isinstance(error, Conflict) and error.body.get("status") == "cancelled"
        return task_status(task_id) if cancelled else None

    return Call("POST", f"/api/tasks/{int(task_id)}/cancel", lambda r: Task.from_json(r.json()),
                recover=already_cancelled)  # fmt: skip


def retry(task_id: int) -> Call[Task]:
    """Unsafe to repeat: had the first try been run and the new attempt failed already, a second
    would run the task once more."""
    return Call("POST", f"/api/tasks/{int(task_id)}/retry", lambda r: Task.from_json(r.json()),
                repeat=Repeat.UNSAFE)  # fmt: skip


def task_types() -> Call[list[dict[str, Any]]]:
    return Call("GET", "/api/task-types", lambda r: list(r.json()))


def task_events_path(task_id: int) -> str:
    return f"/api/tasks/{int(task_id)}/events"


def stream_token(kind: str, id: int, lifetime_seconds: int | None) -> Call[StreamToken]:
    """Safe to repeat: another token for the same stream harms nothing."""
    return Call("POST", f"/api/{kind}/{int(id)}/stream-token", lambda r: StreamToken.from_json(r.json()),
                params=_params(lifetime_seconds=lifetime_seconds))  # fmt: skip


def finished(task: Task, raise_on_failure: bool) -> Task:
    """wait()'s answer for a final task."""
    if raise_on_failure and task.status != "completed":
        raise TaskFailed(task)
    return task


# --- workflows -----------------------------------------------------------------------------------


def submit_workflow(
    *,
    tasks: Iterable[NewTask | Mapping[str, Any]] | None,
    chain: Iterable[NewTask | Mapping[str, Any]] | None,
    batch: Iterable[NewTask | Mapping[str, Any]] | None,
    then: NewTask | Mapping[str, Any] | None,
    catch: NewTask | Mapping[str, Any] | None,
    finally_: NewTask | Mapping[str, Any] | None,
    name: str | None,
    callback_url: str | None,
    idempotency_key: str | None,
) -> Call[Workflow]:
    body: dict[str, Any] = _params(name=name, callback_url=callback_url)
    for shape, given in (("tasks", tasks), ("chain", chain), ("batch", batch)):
        if given is not None:
            body[shape] = [task_json(t) for t in given]
    for hook, one in (("then", then), ("catch", catch), ("finally", finally_)):
        if one is not None:
            body[hook] = task_json(one)
    return Call("POST", "/api/workflows", lambda r: Workflow.from_json(r.json()), json=body,
                headers=_idempotency(idempotency_key))  # fmt: skip


def get_workflow(workflow_id: int) -> Call[Workflow]:
    return Call("GET", f"/api/workflows/{int(workflow_id)}", lambda r: Workflow.from_json(r.json()))


def cancel_workflow(workflow_id: int) -> Call[Workflow]:
    """Safe to repeat: a cancelled workflow's cancel answers it as it is."""
    return Call("POST", f"/api/workflows/{int(workflow_id)}/cancel", lambda r: Workflow.from_json(r.json()))


def workflow_events_path(workflow_id: int) -> str:
    return f"/api/workflows/{int(workflow_id)}/events"


# --- schedules -----------------------------------------------------------------------------------


def _schedule_body(fields: Mapping[str, Any]) -> dict[str, Any]:
    body = dict(fields)
    if "task" in body and body["task"] is not None:
        body["task"] = task_json(body["task"])
    return body


def create_schedule(name: str, task: NewTask | Mapping[str, Any], rule: Mapping[str, Any]) -> Call[Schedule]:
    """Unsafe to repeat: a second try of a create that was stored answers 409 (its name is taken)."""
    body = _schedule_body({"name": name, "task": task, **_params(**rule)})
    return Call("POST", "/api/schedules", lambda r: Schedule.from_json(r.json()), json=body,
                repeat=Repeat.UNSAFE)  # fmt: skip


def list_schedules() -> Call[list[Schedule]]:
    return Call("GET", "/api/schedules", lambda r: [Schedule.from_json(s) for s in r.json()["schedules"]])


def get_schedule(schedule_id: int) -> Call[Schedule]:
    return Call("GET", f"/api/schedules/{int(schedule_id)}", lambda r: Schedule.from_json(r.json()))


def update_schedule(schedule_id: int, changes: Mapping[str, Any]) -> Call[Schedule]:
    """Safe to repeat: the same fields set to the same values."""
    return Call("PATCH", f"/api/schedules/{int(schedule_id)}", lambda r: Schedule.from_json(r.json()),
                json=_schedule_body(changes))  # fmt: skip


def delete_schedule(schedule_id: int) -> Call[None]:
    """Safe to repeat (a second try of a delete that was done answers 404: NotFound is raised)."""
    return Call("DELETE", f"/api/schedules/{int(schedule_id)}", _nothing)


def pause_schedule(schedule_id: int, paused: bool) -> Call[Schedule]:
    verb = "pause" if paused else "resume"
    return Call("POST", f"/api/schedules/{int(schedule_id)}/{verb}", lambda r: Schedule.from_json(r.json()))


def run_schedule(schedule_id: int) -> Call[Fire]:
    """Unsafe to repeat: each run-now fires once more."""
    return Call("POST", f"/api/schedules/{int(schedule_id)}/run", lambda r: Fire.from_json(r.json()),
                repeat=Repeat.UNSAFE)  # fmt: skip
