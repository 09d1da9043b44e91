"""Task types: a name, an input schema (marshmallow), defaults, and the function that runs it.

Operators add their own types in a module of theirs and point SKIPLOCK_TASK_MODULES at it:

    from marshmallow import Schema, fields
    from skiplock.registry import task_type

    class ResizeInput(Schema):
        url = fields.URL(required=True)

    @task_type("resize", input=ResizeInput, timeout_seconds=60, max_attempts=5)
    def resize(data, ctx):
        ctx.report_progress(0.5)
        return {"ok": True}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import marshmallow as ma

DEFAULT_TIMEOUT_SECONDS = 300
DEFAULT_MAX_ATTEMPTS = 3


class TaskContext(Protocol):
    """What a running task may know and do besides its input."""

    task_id: int
    attempt: int  # 1 for the first attempt
    max_attempts: int

    def report_progress(self, fraction: float) -> None: ...


# What runs a task: its loaded input and its context in, its result (any JSON) out.
TaskFunction = Callable[[Any, TaskContext], Any]


@dataclass(frozen=True)
class TaskType:
    name: str
    run: TaskFunction
    # Validates and loads task_input. A Nested field for object inputs, Raw for "any JSON".
    input_field: ma.fields.Field
    description: str
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    # Kills its own process (the crash diagnostic): registered only when explicitly allowed.
    dangerous: bool = False
    # Most tasks of this type running at once across every worker (task_limits, scope type;
    # written by each worker at start); None: no limit declared in code.
    max_running: int | None = None

    @property
    def input_schema(self) -> type[ma.Schema] | None:
        nested = getattr(self.input_field, "nested", None)
        return nested if isinstance(nested, type) and issubclass(nested, ma.Schema) else None

    def load_input(self, value: Any) -> Any:
        """Validate task_input; raises marshmallow.ValidationError naming what is wrong."""
        return self.input_field.deserialize(value)


class UnknownTaskType(KeyError):
    pass


class TaskRegistry:
    def __init__(self, types: Iterable[TaskType] = ()):
        self._types: dict[str, TaskType] = {t.name: t for t in types}

    def add(self, task: TaskType) -> None:
        if task.name in self._types and self._types[task.name].run is not task.run:
            raise ValueError(f"task type {task.name!r} is registered twice")
        self._types[task.name] = task

    def get(self, name: str) -> TaskType:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownTaskType(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[TaskType]:
        return iter(sorted(self._types.values(), key=lambda t: t.name))

    def names(self) -> list[str]:
        return sorted(self._types)


# Filled by @task_type as modules are imported; load_registry() picks what a process may run.
_DECLARED = TaskRegistry()


def task_type(
    name: str,
    *,
    input: type[ma.Schema] | ma.fields.Field | None = None,
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    description: str | None = None,
    dangerous: bool = False,
    max_running: int | None = None,
) -> Callable[[TaskFunction], TaskFunction]:
    """Declare a task type. `input` is a Schema class (object input) or a field; None accepts any
    JSON. `max_running` caps how many of its tasks run at once across all workers."""
    if max_running is not None and max_running < 0:
        raise ValueError("max_running must be 0 or more")
    field: ma.fields.Field
    if input is None:
        field = ma.fields.Raw(required=True, allow_none=True)
    elif isinstance(input, ma.fields.Field):
        field = input
    else:
        field = ma.fields.Nested(input, required=True)

    def decorator(fn: TaskFunction) -> TaskFunction:
        doc = (fn.__doc__ or "").strip()
        _DECLARED.add(
            TaskType(
                name=name,
                run=fn,
                input_field=field,
                description=description or (doc.splitlines()[0] if doc else name),
                timeout_seconds=timeout_seconds,
                max_attempts=max_attempts,
                dangerous=dangerous,
                max_running=max_running,
            )
        )
        return fn

    return decorator


BUILTIN_MODULE = "skiplock.builtin_tasks"


def load_registry(task_modules: Iterable[str] = (), *, allow_crash: bool = False) -> TaskRegistry:
    """Import the built-in and configured task modules and return the types this process runs."""
    for module in (BUILTIN_MODULE, *task_modules):
        importlib.import_module(module)
    return TaskRegistry(t for t in _DECLARED if allow_crash or not t.dangerous)
