"""Fair shares: the turn a task gets when it becomes runnable (weighted fair queueing).

Workers claim the runnable tasks of a priority lowest turn first. Where a flow's new tasks start
and how far apart is decided by the database function task_turn_start (schema.sql), once per
flow of a statement: an owner that just arrived starts level with the head of the queue, not
behind another owner's backlog, and while several owners have work each gets starts in
proportion to its weight. Nothing is counted or stored per owner.

Limits: tasks of one owner submitted concurrently may read the same last turn and share a turn
(ties go by id); a fairness key that appears while the owner's other keys have a backlog is
spaced by the new count of keys, the backlog keeps its spacing until it has run.
"""

from __future__ import annotations


def turns(fresh: str) -> str:
    """CTEs giving turns to the rows of CTE `fresh` (columns n, owner, queue, priority, fkey:
    owner 0 for none, fkey '' for none; n orders the rows of one flow). Defines `turned` (n,
    turn). Reads only: the statement writes the turns."""
    return f"""flows AS (
        SELECT owner, queue, priority, fkey FROM {fresh} GROUP BY 1, 2, 3, 4
    ), owner_keys AS (
        SELECT owner, queue, priority, array_agg(DISTINCT fkey) AS keys FROM {fresh} GROUP BY 1, 2, 3
    ), starts AS MATERIALIZED (  -- once per flow: inlined into `turned`, it ran once per row
        SELECT f.owner, f.queue, f.priority, f.fkey, s.base, s.spacing
        FROM flows f
        JOIN owner_keys o USING (owner, queue, priority)
        CROSS JOIN LATERAL task_turn_start(f.owner, f.queue, f.priority, f.fkey, o.keys) s
    ), turned AS (
        SELECT r.n, st.base + st.spacing * row_number() OVER (
                   PARTITION BY r.owner, r.queue, r.priority, r.fkey ORDER BY r.n) AS turn
        FROM {fresh} r
        JOIN starts st USING (owner, queue, priority, fkey)
    )"""
