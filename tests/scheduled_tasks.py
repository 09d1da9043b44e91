"""A task module that declares a schedule next to its task type (tests/worker/test_schedules_worker.py
starts workers with it in SKIPLOCK_TASK_MODULES)."""

from skiplock.registry import schedule, task_type


@task_type("tick", timeout_seconds=5, max_attempts=1)
def tick(data, ctx):
    return {"tick": data}


schedule("every-second-tick", "tick", every_seconds=1, input={"from": "code"}, queue="ticks", overlap="allow")
