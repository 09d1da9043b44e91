"""The submit rules (skiplock/submission.py), defined once: what they decide, and that both edges
(the API's schemas, the CLI's options) take their bounds from them. No database: these are the
rules themselves; tests/api and tests/cli drive them through each edge."""

from __future__ import annotations

import math

import click
import pytest
from marshmallow import fields, validate

from skiplock import submission
from skiplock.cli import tasks as cli_tasks
from skiplock.registry import TaskRegistry, TaskType
from skiplock.submission import (
    InputNotStorable,
    InputRefused,
    StorageProblem,
    UnknownType,
    checked_type,
    is_name,
    prepare,
    storage_problem,
)


class CountingRegistry(TaskRegistry):
    """A registry that counts its look-ups."""

    def __init__(self, *types: TaskType):
        super().__init__(types)
        self.lookups = 0

    def get(self, name: str) -> TaskType:
        self.lookups += 1
        return super().get(name)


def registry() -> CountingRegistry:
    def run(value, ctx):
        return value

    return CountingRegistry(
        TaskType("any", run, fields.Raw(required=True, allow_none=True), "any JSON", 60, 3),
        TaskType("short", run, fields.String(required=True, validate=validate.Length(max=3)), "text", 5, 2),
    )


def nested(depth: int) -> list:
    """A list `depth` levels deep: [[...[]...]]."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, "two", None, 2.5]}, None),
        ("a\x00b", StorageProblem.NUL),
        ({"a\x00": 1}, StorageProblem.NUL),  # keys too
        ([math.inf], StorageProblem.NOT_FINITE),
        ({"x": math.nan}, StorageProblem.NOT_FINITE),
        (nested(100), None),  # exactly the limit
        (nested(101), StorageProblem.TOO_DEEP),
    ],
)
def test_storage_problems(value, problem):
    assert storage_problem(value) is problem


def test_a_storage_check_of_any_depth_does_not_recurse():
    assert storage_problem(nested(100_000)) is StorageProblem.TOO_DEEP


def test_names():
    assert is_name("default") and is_name("a.b:c-d_9") and is_name("x" * 100)
    for bad in ("", "x" * 101, "a b", "é", "default\n", "a/b"):
        assert not is_name(bad), bad


def test_prepare_looks_the_type_up_once_and_fills_its_defaults():
    types = registry()
    new = prepare(types, task_type="short", task_input="abc", queue="q", priority=5)
    assert types.lookups == 1
    assert (new.max_attempts, new.timeout_seconds) == (2, 5)
    assert new.columns() == {
        "task_type": "short", "queue": "q", "priority": 5, "max_attempts": 2, "timeout_seconds": 5,
        "run_at": None, "delay_seconds": None, "callback_url": None, "callback_secret": None,
        "fairness_key": None, "concurrency_key": None, "unique_key": None, "expires_at": None,
        "expires_in_seconds": None,
    }  # fmt: skip
    asked = prepare(types, task_type="short", task_input="abc", max_attempts=9, timeout_seconds=1)
    assert (asked.max_attempts, asked.timeout_seconds, asked.queue, asked.priority) == (9, 1, "default", 0)


def test_refusals_in_order_unknown_type_then_its_schema_then_storage():
    types = registry()
    with pytest.raises(UnknownType) as unknown:
        checked_type(types, "nope", "a\x00")
    assert (unknown.value.field, unknown.value.known) == ("task_type", ["any", "short"])
    with pytest.raises(InputRefused) as refused:
        checked_type(types, "short", "a\x00cd")  # too long, and a NUL: the schema speaks first
    assert refused.value.field == "task_input"
    assert refused.value.messages == ["Longer than maximum length 3."]
    with pytest.raises(InputNotStorable) as unstorable:
        checked_type(types, "any", {"deep": "a\x00"})
    assert unstorable.value.problem is StorageProblem.NUL


def test_each_edge_words_a_refusal_as_before():
    from api.schemas import refusal_message

    unknown = UnknownType("nope", ["a", "b"])
    assert refusal_message(unknown) == "Unknown task type 'nope'; known types: a, b."
    assert cli_tasks.refusal(unknown) == "unknown task type 'nope'; known types: a, b"
    schema = InputRefused("greet", {"name": ["Missing data for required field."]})
    assert refusal_message(schema) == {"name": ["Missing data for required field."]}
    assert cli_tasks.refusal(schema) == (
        'the input is refused by greet\'s schema: {"name": ["Missing data for required field."]}'
    )
    api_words = {
        StorageProblem.NUL: "Text may not contain NUL (\\u0000) characters.",
        StorageProblem.NOT_FINITE: "Numbers must be finite (NaN and Infinity are not JSON).",
        StorageProblem.TOO_DEEP: "Nested deeper than 100 levels.",
    }
    cli_words = {
        StorageProblem.NUL: "the input is refused: text may not contain NUL (\\u0000) characters",
        StorageProblem.NOT_FINITE: "the input is refused: numbers must be finite",
        StorageProblem.TOO_DEEP: "the input is refused: nested deeper than 100 levels",
    }
    for problem in StorageProblem:
        assert refusal_message(InputNotStorable(problem)) == api_words[problem]
        assert cli_tasks.refusal(InputNotStorable(problem)) == cli_words[problem]


def _range(validators) -> tuple:
    (bounds,) = [v for v in validators if isinstance(v, validate.Range)]
    return bounds.min, bounds.max


def test_the_api_and_the_cli_take_their_bounds_from_the_rules():
    from api.schemas import SubmitTaskSchema, TaskListArgsSchema

    api = SubmitTaskSchema().fields
    options = {p.name: p for p in cli_tasks.submit.params}

    def cli_range(name: str) -> tuple:
        kind = options[name].type
        assert isinstance(kind, (click.IntRange, click.FloatRange))
        return kind.min, kind.max

    assert _range(api["priority"].validators) == cli_range("priority")
    assert cli_range("priority") == (-submission.PRIORITY_LIMIT, submission.PRIORITY_LIMIT)
    assert _range(api["max_attempts"].validators) == cli_range("max_attempts") == (1, submission.MAX_ATTEMPTS)
    assert (
        _range(api["timeout_seconds"].validators)
        == cli_range("timeout_seconds")
        == (1, submission.MAX_TIMEOUT_SECONDS)
    )
    assert (
        _range(api["delay_seconds"].validators)
        == cli_range("delay_seconds")
        == (0, submission.MAX_DELAY_SECONDS)
    )
    statuses = {p.name: p for p in cli_tasks.list_tasks.params}["state"].type
    assert isinstance(statuses, click.Choice)
    assert tuple(statuses.choices) == submission.STATUSES
    (one_of,) = TaskListArgsSchema().fields["status"].validators
    assert isinstance(one_of, validate.OneOf)
    assert tuple(one_of.choices) == submission.STATUSES
