"""The task type registry: built-ins, operators' modules, input validation, the crash switch."""

from __future__ import annotations

import pytest
from marshmallow import ValidationError

from skiplock.builtin_tasks import count_primes, describe_json, hash_chain
from skiplock.registry import TaskRegistry, TaskType, UnknownTaskType, load_registry
from skiplock.settings import Settings


class Ctx:
    task_id, attempt, max_attempts = 1, 1, 3

    def __init__(self):
        self.progress: list[float] = []

    def report_progress(self, fraction: float) -> None:
        self.progress.append(fraction)


def test_builtins_and_operator_modules_are_loaded():
    registry = load_registry(("tests.sample_tasks",), allow_crash=False)
    assert {"default", "primes", "hash_chain", "noop", "sleep", "fail", "greet", "hang"} <= set(
        registry.names()
    )
    assert "crash" not in registry
    assert "crash" in load_registry((), allow_crash=True)


def test_task_modules_come_from_the_environment():
    settings = Settings.from_env({"SKIPLOCK_TASK_MODULES": "tests.sample_tasks, json", "DATABASE_URL": "x"})
    assert settings.task_modules == ("tests.sample_tasks", "json")
    assert "greet" in load_registry(settings.task_modules)


def test_a_missing_module_fails_loudly():
    with pytest.raises(ModuleNotFoundError):
        load_registry(("no_such_module_for_skiplock",))


def test_unknown_type():
    with pytest.raises(UnknownTaskType):
        load_registry().get("nope")


def test_input_is_validated_and_defaults_applied():
    hashing = load_registry().get("hash_chain")
    assert hashing.load_input({"data": "x", "rounds": 2}) == {"data": "x", "rounds": 2, "algorithm": "sha256"}
    with pytest.raises(ValidationError) as err:
        hashing.load_input({"data": "x", "rounds": 0, "algorithm": "md5"})
    assert set(err.value.messages) == {"rounds", "algorithm"}


def test_a_name_cannot_be_registered_twice_with_different_functions():
    registry = TaskRegistry()
    first = load_registry().get("noop")
    registry.add(first)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(
            TaskType(name="noop", run=lambda v, c: None, input_field=first.input_field, description="")
        )


@pytest.mark.parametrize(
    ("limit", "count", "largest"),
    [
        (2, 0, None),
        (3, 1, 2),
        (10, 4, 7),
        (100, 25, 97),
        (1_000_000, 78498, 999983),
        (3_000_000, 216816, 2999999),
    ],
)
def test_primes_counts_known_values(limit, count, largest):
    ctx = Ctx()
    assert count_primes({"limit": limit}, ctx) == {"limit": limit, "count": count, "largest": largest}
    assert ctx.progress and ctx.progress[-1] == pytest.approx(1.0)


def test_hash_chain_matches_hashlib():
    import hashlib

    digest = b"abc"
    for _ in range(1000):
        digest = hashlib.sha256(digest).digest()
    ctx = Ctx()
    assert hash_chain({"data": "abc", "rounds": 1000, "algorithm": "sha256"}, ctx)["digest"] == digest.hex()
    assert ctx.progress == sorted(ctx.progress) and ctx.progress[-1] == 1.0


def test_default_task_describes_any_json():
    assert describe_json({"b": [1, 2, {"c": None}], "a": "x"}, Ctx()) | {"sha256": None} == {
        "kind": "object",
        "sha256": None,
        "canonical_bytes": len('{"a":"x","b":[1,2,{"c":null}]}'),
        "depth": 3,
        "leaves": 4,
        "keys": ["a", "b"],
    }
    assert describe_json(None, Ctx())["kind"] == "null"
    # Deterministic: the same JSON in another key order has the same digest.
    assert (
        describe_json({"a": 1, "b": 2}, Ctx())["sha256"] == describe_json({"b": 2, "a": 1}, Ctx())["sha256"]
    )
