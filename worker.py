"""Run a skiplock worker: a supervisor and N task processes claiming from Postgres.

    DATABASE_URL=postgresql://... python worker.py --concurrency 4 --queue default

The same command as `skiplock worker` (skiplock/cli/worker.py): the same options, help, refusals
and exit codes. Every option can also be set in the environment (SKIPLOCK_CONCURRENCY,
SKIPLOCK_QUEUES, ...). Run several of these, on as many hosts as you like, against one database.
"""

from __future__ import annotations

from skiplock.cli.worker import run_standalone

if __name__ == "__main__":
    run_standalone()
