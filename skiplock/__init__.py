"""skiplock: a task queue whose only moving part is PostgreSQL (FOR UPDATE SKIP LOCKED)."""

__version__ = "0.2.0"
