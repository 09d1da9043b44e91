"""skiplock: a task queue whose only moving part is PostgreSQL (FOR UPDATE SKIP LOCKED)."""

__version__ = "0.2.0"  # the one place it is written: pyproject.toml reads it (project.dynamic)

# What a task's code raises to decide its own fate (imports nothing of the engine).
from skiplock.task_exceptions import NonRetryableError, RetryAfter

__all__ = ["NonRetryableError", "RetryAfter", "__version__"]
