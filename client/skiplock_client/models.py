"""What calls return: small dataclasses read from the API's JSON, each keeping the JSON it was read
from as `raw` (fields the API adds later are there before this client knows them), and NewTask,
a task to submit."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
# The options of a submit, as POST /api/tasks names them (see NewTask).
TASK_OPTIONS = (
    "queue", "priority", "delay_seconds", "run_at", "max_attempts", "timeout_seconds", "callback_url",
    "callback_secret", "fairness_key", "concurrency_key", "unique_key", "expires_at", "expires_in_seconds",
)  # fmt: skip


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass
class NewTask:
    """A task to submit: to submit_many, a workflow, a schedule. Options left None are the API's
    defaults (the task type's). `ref`, `depends_on` and `trigger_rule` place it in a workflow's
    graph (submit_workflow(tasks=...)) and go nowhere else."""

    task_type: str
    task_input: Any = None
    queue: str | None = None
    priority: int | None = None
    delay_seconds: float | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    timeout_seconds: int | None = None
    callback_url: str | None = None
    callback_secret: str | None = None
    fairness_key: str | None = None
    concurrency_key: str | None = None
    unique_key: str | None = None
    expires_at: datetime | None = None
    expires_in_seconds: float | None = None
    ref: str | None = None
    depends_on: list[str] | None = None
    trigger_rule: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"task_type": self.task_type, "task_input": self.task_input}
        for name in (*TASK_OPTIONS, "ref", "depends_on", "trigger_rule"):
            value = getattr(self, name)
            if value is not None:
                body[name] = _json_value(value)
        return body


def task_json(task: NewTask | Mapping[str, Any]) -> dict[str, Any]:
    """A task to send: a NewTask, or a mapping already in the API's words."""
    if isinstance(task, NewTask):
        return task.to_json()
    return {name: _json_value(value) for name, value in task.items()}


@dataclass
class Task:
    """A task as the API shows it. `input` and `waiting_for` come with get_task() only;
    `deduplicated` is true when a submit created nothing (an unfinished task had its unique_key)."""

    id: int
    status: str
    result: Any
    error: str | None
    progress: float | None
    attempts: int
    max_attempts: int | None
    task_type: str | None
    queue: str | None
    priority: int | None
    timeout_seconds: int | None
    created_at: datetime | None
    run_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    input: Any = None
    waiting_for: dict[str, Any] | None = None
    deduplicated: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Task:
        return cls(
            id=body["task_id"],
            status=body["status"],
            result=body.get("result"),
            error=body.get("error"),
            progress=body.get("progress"),
            attempts=body.get("attempts", 0),
            max_attempts=body.get("max_attempts"),
            task_type=body.get("task_type"),
            queue=body.get("queue"),
            priority=body.get("priority"),
            timeout_seconds=body.get("timeout_seconds"),
            created_at=_time(body.get("created_at")),
            run_at=_time(body.get("run_at")),
            started_at=_time(body.get("started_at")),
            finished_at=_time(body.get("finished_at")),
            input=body.get("task_input"),
            waiting_for=body.get("waiting_for"),
            deduplicated=bool(body.get("deduplicated", False)),
            raw=dict(body),
        )


@dataclass
class TaskPage:
    """A page of list_tasks(), newest first; pass next_before as `before` for the next one."""

    tasks: list[Task]
    next_before: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> TaskPage:
        return cls([Task.from_json(t) for t in body["tasks"]], body.get("next_before"), dict(body))


@dataclass
class Attempt:
    """An ended attempt of a task: who ran it, how it ended."""

    attempt: int
    worker_id: str | None
    outcome: str
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Attempt:
        return cls(
            attempt=body["attempt"],
            worker_id=body.get("worker_id"),
            outcome=body["outcome"],
            started_at=_time(body.get("started_at")),
            finished_at=_time(body.get("finished_at")),
            error=body.get("error"),
            raw=dict(body),
        )


@dataclass
class Batch:
    """submit_many(): the tasks' ids in the order given; per task, whether it was deduplicated."""

    task_ids: list[int]
    deduplicated: list[bool]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Batch:
        return cls(list(body["task_ids"]), list(body.get("deduplicated", [])), dict(body))


@dataclass
class TaskEvent:
    """An event of a task's stream: `status` or `progress` (with the task as it is then), or
    `gone` (the task was pruned while streamed: no task)."""

    event: str
    id: str | None
    task: Task | None
    data: dict[str, Any]

    @classmethod
    def from_sse(cls, event: str, data: str, id: str | None) -> TaskEvent:
        body = json.loads(data)
        return cls(event, id, Task.from_json(body) if event in ("status", "progress") else None, body)

    @property
    def is_last(self) -> bool:
        return self.event == "gone" or (self.task is not None and self.task.is_final)


@dataclass
class StreamToken:
    """A short-lived token that opens one task's or workflow's event stream without an API key:
    a backend mints it and hands `url` to its web page (`new EventSource(url)`)."""

    token: str
    expires_at: datetime | None
    url: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> StreamToken:
        return cls(body["token"], _time(body.get("expires_at")), body["url"], dict(body))


@dataclass
class Workflow:
    """A workflow: its state (running, then completed, failed or cancelled), its tasks' counts by
    status, and each task (ref, task_id, status, trigger_rule, depends_on, error) as a dict."""

    id: int
    name: str | None
    state: str
    counts: dict[str, int]
    tasks: list[dict[str, Any]]
    created_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_final(self) -> bool:
        return self.state != "running"

    def task_id(self, ref: str) -> int:
        """The id of the workflow's task with this ref."""
        return int(next(t["task_id"] for t in self.tasks if t["ref"] == ref))

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Workflow:
        return cls(
            id=body["workflow_id"],
            name=body.get("name"),
            state=body["state"],
            counts=dict(body.get("counts", {})),
            tasks=list(body.get("tasks", [])),
            created_at=_time(body.get("created_at")),
            finished_at=_time(body.get("finished_at")),
            raw=dict(body),
        )


@dataclass
class WorkflowEvent:
    """An event of a workflow's stream: `state` ({workflow_id, state, counts}) or `gone`."""

    event: str
    id: str | None
    data: dict[str, Any]

    @property
    def state(self) -> str | None:
        return self.data.get("state")

    @property
    def is_last(self) -> bool:
        return self.event == "gone" or self.state not in (None, "running")


@dataclass
class Schedule:
    """A schedule: its rule (cron in a timezone, or every_seconds), the task each fire submits (as
    a dict), whether it is paused, its next runs and last fires (as dicts)."""

    id: int
    name: str
    cron: str | None
    every_seconds: int | None
    timezone: str | None
    task: dict[str, Any]
    paused: bool
    next_fire_at: datetime | None
    next_runs: list[dict[str, Any]]
    last_fires: list[dict[str, Any]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Schedule:
        return cls(
            id=body["schedule_id"],
            name=body["name"],
            cron=body.get("cron"),
            every_seconds=body.get("every_seconds"),
            timezone=body.get("timezone"),
            task=dict(body.get("task") or {}),
            paused=bool(body.get("paused")),
            next_fire_at=_time(body.get("next_fire_at")),
            next_runs=list(body.get("next_runs", [])),
            last_fires=list(body.get("last_fires", [])),
            raw=dict(body),
        )


@dataclass
class Fire:
    """run_schedule(): the fire it made; outcome `created` (task_id: the new task) or
    `deduplicated` (task_id: the unfinished task with its unique_key)."""

    schedule_id: int
    outcome: str
    task_id: int | None
    scheduled_for: datetime | None
    reason: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Fire:
        return cls(
            schedule_id=body["schedule_id"],
            outcome=body["outcome"],
            task_id=body.get("task_id"),
            scheduled_for=_time(body.get("scheduled_for")),
            reason=body.get("reason"),
            raw=dict(body),
        )
