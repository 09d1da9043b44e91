"""The workflow steps a worker holds: what its writer needs at their end (their workflow, whether
other steps wait for them), known from the claim, so that their final write and the settling of
their dependents and workflow are one transaction without a lookup."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from skiplock.sql.claim import ClaimedTask
from skiplock.sql.rows import Connection
from skiplock.sql.workflows import StepEnded, TakeReleased, workflow_steps_ended


class HeldSteps:
    """Added to by the supervisor's thread (at claim), read and emptied by the writer's: each
    operation is one dict operation (atomic under the GIL)."""

    def __init__(self) -> None:
        self._steps: dict[int, StepEnded] = {}

    def add(self, task: ClaimedTask) -> None:
        if task.workflow_id is not None:
            self._steps[task.id] = StepEnded(task.id, task.workflow_id, task.has_dependents)

    def among(self, task_ids: Iterable[int]) -> set[int]:
        """Which of these tasks are held workflow steps."""
        return {i for i in task_ids if i in self._steps}

    def ended(
        self,
        db: Connection,
        ended: Collection[int],
        take: TakeReleased | None = None,
        *,
        completed: bool = False,
    ) -> None:
        """In the transaction that made them final: settle these steps' dependents and workflows
        (`take`: this worker takes released steps itself; `completed`: they all completed)."""
        steps = [self._steps[i] for i in ended if i in self._steps]
        if steps:
            workflow_steps_ended(db, steps, take, completed=completed)

    def forget(self, ended: Iterable[int]) -> None:
        """Steps whose end committed: nothing more of theirs to settle."""
        for i in ended:
            self._steps.pop(i, None)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._steps
