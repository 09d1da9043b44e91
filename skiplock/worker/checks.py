"""The settings a worker refuses to run with, defined once for every way to start one
(`skiplock worker`, `python worker.py`, the Procfile and the systemd unit, which run those)."""

from __future__ import annotations

from skiplock.settings import Settings, task_process_problem


class WorkerRefused(ValueError):
    """These settings cannot run a worker (the message says why and what to change)."""


def check_worker_settings(settings: Settings) -> None:
    """Raises WorkerRefused if a worker cannot run with these settings."""
    if not settings.database_url:
        raise WorkerRefused("set DATABASE_URL (or pass it as `skiplock --database-url URL worker`)")
    if settings.database_pooler == "transaction":
        raise WorkerRefused(
            "a worker needs a session of its own (LISTEN, advisory locks): point DATABASE_URL "
            "straight at Postgres, or at a pooler in session mode (SKIPLOCK_DATABASE_POOLER=session)"
        )
    problem = task_process_problem(settings)  # settings given in code skip from_env's checks
    if problem:
        raise WorkerRefused(problem)
