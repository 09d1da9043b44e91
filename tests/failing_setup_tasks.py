"""A task module whose per-process setup always fails (a model file that is not there): the worker
must say so in one line, back off, and charge no task."""

from skiplock.registry import process_setup, task_type


@process_setup
def broken_model() -> None:
    raise FileNotFoundError("model file /models/missing.bin not found")


@task_type("needs_broken_model")
def needs_broken_model(data, ctx) -> str:
    return "ran"
