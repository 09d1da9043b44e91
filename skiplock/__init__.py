"""skiplock: a task queue whose only moving part is PostgreSQL (FOR UPDATE SKIP LOCKED)."""
