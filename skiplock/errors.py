"""The domain's exceptions. Database errors are translated into these at the queries boundary."""


class SkiplockError(Exception):
    """Base of every error skiplock raises on purpose."""


class TaskNotFound(SkiplockError):
    def __init__(self, task_id: int):
        super().__init__(f"Task {task_id} does not exist.")
        self.task_id = task_id


class TaskGone(TaskNotFound):
    """The id was issued, but the task is no longer stored (pruned after its retention period)."""

    def __init__(self, task_id: int):
        SkiplockError.__init__(
            self, f"Task {task_id} no longer exists: finished tasks are deleted after the retention period."
        )
        self.task_id = task_id


class InvalidTransition(SkiplockError):
    """The task is not in a state that allows the requested change (e.g. cancel a completed task)."""

    def __init__(self, task_id: int, status: str, action: str, error: str | None = None):
        super().__init__(f"Task {task_id} is {status}; it cannot be {action}.")
        self.task_id = task_id
        self.status = status
        self.action = action
        self.error = error  # the task's latest error, for the client


class DatabaseUnavailable(SkiplockError):
    """Postgres could not be reached (down, restarting, connection killed, pool exhausted)."""


class UniqueTaken(SkiplockError):
    """A retry would make a second unfinished task with the same unique_key (of the same owner)."""

    def __init__(self, task_id: int):
        super().__init__(
            f"Task {task_id} cannot be retried: another unfinished task of this key has its unique_key."
        )
        self.task_id = task_id


class QuotaSlotTaken(SkiplockError):
    """A quota slot given to a submit or retry (tasks.quota_slot) was taken by another one
    meanwhile: nothing was stored; pick free slots again."""

    def __init__(self) -> None:
        super().__init__("a quota slot was taken by a concurrent submit")


class ScheduleNotFound(SkiplockError):
    def __init__(self, schedule_id: int):
        super().__init__(f"Schedule {schedule_id} does not exist.")
        self.schedule_id = schedule_id


class ScheduleNameTaken(SkiplockError):
    """Another schedule of the same owner has this name."""

    def __init__(self, name: str):
        super().__init__(f"A schedule named {name!r} exists already (names are unique per owner).")
        self.name = name


class ScheduleDeclaredInCode(SkiplockError):
    """A schedule declared in code is changed in code (workers write it at start); it can be
    paused, resumed and run now."""

    def __init__(self, schedule_id: int, action: str):
        super().__init__(
            f"Schedule {schedule_id} is declared in code: it cannot be {action} here (change the "
            "code; pause, resume and run now work)."
        )
        self.schedule_id = schedule_id


class WorkflowNotFound(SkiplockError):
    def __init__(self, workflow_id: int):
        super().__init__(f"Workflow {workflow_id} does not exist.")
        self.workflow_id = workflow_id
