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

A type whose code is heavy (torch, a model) is declared apart from it: the declaration module (light:
schemas and names) is what the API, the supervisor and the forkserver import; the function named by
`run` ("module:function") is imported only in task processes (docs/heavy-tasks.md):

    task_type("embed", input=EmbedInput, run="myapp.models:embed")

@process_setup / @process_teardown functions run once in each task process, when it starts and when
it exits normally; what a setup returns is `ctx.resources[<its name>]` in every task.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    parents: dict[str, Any]  # a workflow step's parents' results, by ref ({} for other tasks)

    @property
    def resources(self) -> Mapping[str, Any]:
        """What this process's @process_setup functions returned, by function name."""
        ...

    def report_progress(self, fraction: float) -> None: ...


# What runs a task: its loaded input and its context in, its result (any JSON) out.
TaskFunction = Callable[[Any, TaskContext], Any]


class LazyFunction:
    """A task function named "module:function", imported on first call (or by resolve()): only
    a task process calls it, so only a task process imports its module."""

    def __init__(self, target: str):
        module, _, attribute = target.partition(":")
        if (
            not module
            or not attribute
            or not all(part.isidentifier() for part in (*module.split("."), *attribute.split(".")))
        ):
            raise ValueError(f"run={target!r}: expected 'module:function', e.g. 'myapp.models:embed'")
        self.target = target
        self._function: TaskFunction | None = None

    def resolve(self) -> TaskFunction:
        """Import the module and find the function (ImportError or AttributeError if missing)."""
        if self._function is None:
            module, _, attribute = self.target.partition(":")
            found: Any = importlib.import_module(module)
            for name in attribute.split("."):
                found = getattr(found, name)
            if not callable(found):
                raise TypeError(f"run={self.target!r} is not a function")
            self._function = found
        return self._function

    def __call__(self, data: Any, ctx: TaskContext) -> Any:
        return self.resolve()(data, ctx)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LazyFunction) and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)

    def __repr__(self) -> str:
        return f"LazyFunction({self.target!r})"


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
    def __init__(self, types: Iterable[TaskType] = (), schedules: Iterable[DeclaredSchedule] = ()):
        self._types: dict[str, TaskType] = {t.name: t for t in types}
        # Schedules declared in code, with their task type's defaults (see schedule()).
        self.schedules: tuple[DeclaredSchedule, ...] = tuple(schedules)

    def add(self, task: TaskType) -> None:
        # The same declaration seen again is no conflict (a "module:function" compares by name).
        if task.name in self._types and self._types[task.name].run != task.run:
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

    def lazy_functions(self) -> list[LazyFunction]:
        """The functions declared by "module:function" (a task process imports them as it starts)."""
        return [t.run for t in self if isinstance(t.run, LazyFunction)]


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
    run: str | None = None,
) -> Callable[[TaskFunction], TaskFunction]:
    """Declare a task type. `input` is a Schema class (object input) or a field; None accepts any
    JSON. `max_running` caps how many of its tasks run at once across all workers. `run`
    ("module:function"): the type is declared at once, its function imported only where it runs
    (a task process), not by the API; otherwise decorate the function."""
    if max_running is not None and max_running < 0:
        raise ValueError("max_running must be 0 or more")
    field: ma.fields.Field
    if input is None:
        field = ma.fields.Raw(required=True, allow_none=True)
    elif isinstance(input, ma.fields.Field):
        field = input
    else:
        field = ma.fields.Nested(input, required=True)

    def declare(fn: TaskFunction, doc: str) -> None:
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

    if run is not None:
        declare(LazyFunction(run), "")

        def already_declared(fn: TaskFunction) -> TaskFunction:
            raise TypeError(f"task type {name!r} names its function with run=; do not also decorate one")

        return already_declared

    def decorator(fn: TaskFunction) -> TaskFunction:
        declare(fn, (fn.__doc__ or "").strip())
        return fn

    return decorator


# A task process's hooks: a setup's result goes into ctx.resources under the function's name.
ProcessSetup = Callable[[], Any]
ProcessTeardown = Callable[[Mapping[str, Any]], None]
_SETUPS: dict[str, ProcessSetup] = {}
_TEARDOWNS: dict[str, ProcessTeardown] = {}


def process_setup(fn: ProcessSetup) -> ProcessSetup:
    """Run `fn()` once in each task process, after it starts and before its first task (load a
    model once); what it returns is `ctx.resources["<fn name>"]` in every task of that process.
    Declare it in an implementation module (imported only in task processes) or the declaration
    module; a setup that raises keeps the process from taking tasks (docs/heavy-tasks.md)."""
    _check_unique(_SETUPS, fn)
    _SETUPS[fn.__name__] = fn
    return fn


def process_teardown(fn: ProcessTeardown) -> ProcessTeardown:
    """Run `fn(resources)` once when a task process exits normally (the worker stops, or the
    process is recycled); not when it is killed (a crash, a timeout, the end of the grace period)."""
    _check_unique(_TEARDOWNS, fn)
    _TEARDOWNS[fn.__name__] = fn
    return fn


def _check_unique(hooks: Mapping[str, Callable[..., Any]], fn: Callable[..., Any]) -> None:
    """Hooks are known by their function's name (a setup's is its key in ctx.resources)."""
    known = hooks.get(fn.__name__)
    if known is not None and known.__module__ != fn.__module__:
        raise ValueError(f"two process hooks are named {fn.__name__!r} ({known.__module__}, {fn.__module__})")


def process_hooks() -> tuple[dict[str, ProcessSetup], dict[str, ProcessTeardown]]:
    """The setups and teardowns declared so far (by name), in declaration order."""
    return dict(_SETUPS), dict(_TEARDOWNS)


@dataclass(frozen=True)
class DeclaredSchedule:
    """A schedule declared in code (schedule()): written by each worker at start, owned by no key."""

    name: str
    task_type: str
    cron: str | None = None
    every_seconds: int | None = None
    timezone: str = "UTC"
    input: Any = None
    queue: str = "default"
    priority: int = 0
    missed: str = "skip"
    missed_limit: int = 100
    overlap: str = "allow"
    grace_seconds: int | None = None
    # More submit fields of its tasks (max_attempts, timeout_seconds, concurrency_key, unique_key,
    # fairness_key, expires_in_seconds, callback_url): the task type's defaults where not given.
    options: tuple[tuple[str, Any], ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()  # the task type's, filled in by load_registry

    def task_spec(self) -> dict[str, Any]:
        """Its tasks as task_schedules.task stores them."""
        return {
            "task_type": self.task_type, "task_input": self.input, "queue": self.queue,
            "priority": self.priority, **dict(self.defaults), **dict(self.options),
        }  # fmt: skip


_SCHEDULE_OPTIONS = (
    "max_attempts", "timeout_seconds", "concurrency_key", "unique_key", "fairness_key", "expires_in_seconds",
    "callback_url",
)  # fmt: skip
_DECLARED_SCHEDULES: dict[str, DeclaredSchedule] = {}


def schedule(
    name: str,
    task_type: str,
    *,
    cron: str | None = None,
    every_seconds: int | None = None,
    timezone: str = "UTC",
    input: Any = None,
    queue: str = "default",
    priority: int = 0,
    missed: str = "skip",
    missed_limit: int = 100,
    overlap: str = "allow",
    grace_seconds: int | None = None,
    **options: Any,
) -> None:
    """Declare a schedule next to the task types, e.g.
    schedule("nightly-report", "report", cron="0 2 * * *", timezone="Europe/Paris", overlap="skip").
    Its rule is checked here (a bad one fails the import); workers write it at start."""
    from skiplock.schedules import MISSED_POLICIES, OVERLAP_POLICIES, Rule

    Rule(cron=cron, every_seconds=every_seconds, timezone=timezone)  # raises ScheduleRefused
    unknown = sorted(set(options) - set(_SCHEDULE_OPTIONS))
    if unknown:
        raise TypeError(f"schedule {name!r}: unknown option(s) {', '.join(unknown)}")
    if missed not in MISSED_POLICIES or overlap not in OVERLAP_POLICIES:
        raise ValueError(
            f"schedule {name!r}: missed is one of {MISSED_POLICIES}, overlap one of {OVERLAP_POLICIES}"
        )
    _DECLARED_SCHEDULES[name] = DeclaredSchedule(
        name=name, task_type=task_type, cron=cron, every_seconds=every_seconds, timezone=timezone,
        input=input, queue=queue, priority=priority, missed=missed, missed_limit=missed_limit,
        overlap=overlap, grace_seconds=grace_seconds, options=tuple(sorted(options.items())),
    )  # fmt: skip


BUILTIN_MODULE = "skiplock.builtin_tasks"


def load_registry(task_modules: Iterable[str] = (), *, allow_crash: bool = False) -> TaskRegistry:
    """Import the built-in and configured task modules and return the types this process runs."""
    for module in (BUILTIN_MODULE, *task_modules):
        importlib.import_module(module)
    types = [t for t in _DECLARED if allow_crash or not t.dangerous]
    return TaskRegistry(types, [_with_defaults(s) for s in _DECLARED_SCHEDULES.values()])


def _with_defaults(declared: DeclaredSchedule) -> DeclaredSchedule:
    """A declared schedule whose task type's schema accepts its input, with the type's
    max_attempts and timeout_seconds; a schedule of an unknown type or a refused input fails the
    start (as a bad rule fails the import)."""
    try:
        task = _DECLARED.get(declared.task_type)
    except UnknownTaskType:
        raise ValueError(f"schedule {declared.name!r}: unknown task type {declared.task_type!r}") from None
    try:
        task.load_input(declared.input)
    except ma.ValidationError as exc:
        raise ValueError(f"schedule {declared.name!r}: its input is refused: {exc.messages}") from None
    defaults = (("max_attempts", task.max_attempts), ("timeout_seconds", task.timeout_seconds))
    return dataclasses.replace(declared, defaults=defaults)
