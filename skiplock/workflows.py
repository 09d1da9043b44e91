"""Workflows' rules, once: what a workflow is (steps with refs, their dependencies and trigger
rules), the two shorthands (a chain, a batch with then / catch / finally), and the checks that
refuse a graph that cannot run: a duplicate or unknown ref, a cycle, too many steps. Pure
Python; the API and the CLI say a refusal in their words. Stored by skiplock/sql/workflow_store.py."""

from __future__ import annotations

import graphlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_STEPS = 10_000
TRIGGER_RULES = ("all_succeeded", "all_done", "any_failed")
# What a batch's callbacks wait for, by their Laravel names.
BATCH_CALLBACKS = {"then": "all_succeeded", "catch": "any_failed", "finally": "all_done"}


class WorkflowRefused(ValueError):
    """A workflow that cannot run; `where` names the part at fault (a ref, or a field)."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


@dataclass(frozen=True)
class Step:
    """One task of a workflow: its ref, the submit fields (as POST /api/tasks takes them), the
    refs it depends on and when it may start."""

    ref: str
    task: Any  # what the edge made of the submit (a Submission, or a dict)
    depends_on: tuple[str, ...] = ()
    trigger_rule: str = "all_succeeded"


@dataclass
class Graph:
    steps: list[Step] = field(default_factory=list)

    def order(self) -> list[Step]:
        """The steps, parents before children."""
        by_ref = {s.ref: s for s in self.steps}
        sorter = graphlib.TopologicalSorter({s.ref: s.depends_on for s in self.steps})
        return [by_ref[ref] for ref in sorter.static_order()]


def checked(steps: Sequence[Step]) -> Graph:
    """The steps as a graph that can run, or WorkflowRefused naming what cannot."""
    if not steps:
        raise WorkflowRefused("A workflow needs at least one task.", "tasks")
    if len(steps) > MAX_STEPS:
        raise WorkflowRefused(
            f"A workflow has at most {MAX_STEPS:,} tasks; this one has {len(steps):,}.", "tasks"
        )
    refs: set[str] = set()
    for step in steps:
        if step.ref in refs:
            raise WorkflowRefused(
                f"The ref {step.ref!r} names two tasks; refs are unique in a workflow.", step.ref
            )
        refs.add(step.ref)
    for step in steps:
        if step.trigger_rule not in TRIGGER_RULES:
            raise WorkflowRefused(
                f"Unknown trigger_rule {step.trigger_rule!r} (one of {', '.join(TRIGGER_RULES)}).", step.ref
            )
        for parent in step.depends_on:
            if parent not in refs:
                raise WorkflowRefused(
                    f"Task {step.ref!r} depends on {parent!r}, which no task of the workflow is.", step.ref
                )
        if len(set(step.depends_on)) != len(step.depends_on):
            raise WorkflowRefused(f"Task {step.ref!r} names a parent twice in depends_on.", step.ref)
    graph = Graph(list(steps))
    try:
        graph.order()
    except graphlib.CycleError as exc:
        cycle = list(exc.args[1])
        path = " -> ".join(reversed(cycle))
        raise WorkflowRefused(f"The dependencies form a cycle: {path}.", cycle[0]) from None
    return graph


def chain(tasks: Sequence[Any]) -> list[Step]:
    """A chain: each task after the previous one succeeded (refs step-1, step-2, ...)."""
    return [Step(f"step-{n + 1}", task, (f"step-{n}",) if n else ()) for n, task in enumerate(tasks)]


def batch(tasks: Sequence[Any], callbacks: dict[str, Any]) -> list[Step]:
    """A batch: tasks that run side by side (refs task-1, task-2, ...), then the optional
    callbacks `then` (all succeeded), `catch` (one failed) and `finally` (all final), each after
    every task of the batch (refs then, catch, finally)."""
    steps = [Step(f"task-{n + 1}", task) for n, task in enumerate(tasks)]
    parents = tuple(s.ref for s in steps)
    for name, rule in BATCH_CALLBACKS.items():
        if callbacks.get(name) is not None:
            steps.append(Step(name, callbacks[name], parents, rule))
    return steps
