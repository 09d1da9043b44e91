"""The implementation module behind tests.heavy_declared_tasks, standing in for one that imports torch:
importing it anywhere but a worker's task process (the API, the supervisor, the forkserver) raises,
so a test that sees its tasks run proves where it was imported.

HEAVY_TASKS_HOOK_LOG (a file path): each process appends "setup <pid>" and "teardown <pid>" lines."""

import multiprocessing
import os

from skiplock.registry import process_setup, process_teardown

# What the worker's task processes are named (skiplock.worker.slots.ProcessSpawner.spawn).
TASK_PROCESS_PREFIX = "skiplock-worker-"

if not multiprocessing.current_process().name.startswith(TASK_PROCESS_PREFIX):
    raise RuntimeError(
        f"tests.heavy_impl_tasks imported outside a task process ({multiprocessing.current_process().name}, "
        f"pid {os.getpid()})"
    )

IMPORTED_BY = os.getpid()
_leaked: list[bytes] = []  # what allocate() keeps: a leak the memory limit must catch


def _record(event: str) -> None:
    path = os.environ.get("HEAVY_TASKS_HOOK_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {os.getpid()}\n")


@process_setup
def heavy_model() -> dict:
    """Stands in for loading a model once per process."""
    _record("setup")
    return {"loaded_by": os.getpid()}


@process_teardown
def release_heavy_model(resources) -> None:
    assert resources["heavy_model"]["loaded_by"] == os.getpid()  # else no "teardown" line
    _record("teardown")


def embed(data: dict, ctx) -> dict:
    return {
        "pid": os.getpid(),
        "parent_pid": os.getppid(),
        "imported_by": IMPORTED_BY,
        "model_loaded_by": ctx.resources["heavy_model"]["loaded_by"],
        "length": len(data["text"]),
    }


def allocate(data: dict, ctx) -> dict:
    _leaked.append(b"\x01" * (data["mb"] * 1024 * 1024))  # written, so resident
    return {"pid": os.getpid()}
