"""What the statistics say of the queue's busiest tables (pg_stat_user_tables: no table is read),
for the dashboard's vacuum figures."""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

from skiplock.sql.rows import Connection


class DeadRowsRow(TypedDict):
    table: str
    live: int  # row versions alive (an estimate, as autovacuum's own)
    dead: int  # row versions dead and not yet vacuumed away
    last_vacuum: datetime | None  # by hand or autovacuum


def table_dead_rows(conn: Connection) -> list[DeadRowsRow]:
    """table_dead_rows: live and dead row versions of tasks and task_attempts (in that order),
    and when each was last vacuumed."""
    return conn.execute(
        """
        SELECT relname::text AS table, n_live_tup AS live, n_dead_tup AS dead,
               greatest(last_autovacuum, last_vacuum) AS last_vacuum
        FROM pg_stat_user_tables
        WHERE relid IN ('tasks'::regclass, 'task_attempts'::regclass)
        ORDER BY relid = 'tasks'::regclass DESC
        """
    ).fetchall()
