"""skiplock: a task queue whose only moving part is PostgreSQL (FOR UPDATE SKIP LOCKED)."""

__version__ = "0.2.0"  # the one place it is written: pyproject.toml reads it (project.dynamic)
