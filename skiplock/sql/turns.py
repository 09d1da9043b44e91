"""Fair shares: the turn a task gets when it becomes runnable (weighted fair queueing).

Workers claim the runnable tasks of a priority lowest turn first. A flow is an owner's tasks in
one queue and priority (with fairness keys: one flow per key). A flow's new tasks are spaced by
(the owner's fairness keys with runnable tasks there) / (the owner's weight), starting after the
flow's last runnable task, and never before the queue's lowest turn: an owner that just arrived
starts level with the head of the queue, not behind another owner's backlog, and while several
owners have work each gets starts in proportion to its weight. Nothing is counted or stored per
owner: the lowest and last turns are the first entries of two indexes (tasks_runnable_queue_idx,
tasks_flow_idx); an empty queue starts from the priority's lowest turn in any queue.

Limits: tasks of one owner submitted concurrently may read the same last turn and share a turn
(ties go by id); a fairness key that appears while the owner's other keys have a backlog is
spaced by the new count of keys, the backlog keeps its spacing until it has run.
"""

from __future__ import annotations

# Fairness keys of one owner counted per queue and priority (a skip scan of tasks_flow_idx):
# past this many, the owner's keys are spaced as if it had this many.
MAX_COUNTED_FAIRNESS_KEYS = 64

_RUNNABLE = "t.status = 'pending' AND t.turn IS NOT NULL"


def turns(fresh: str) -> str:
    """CTEs giving turns to the rows of CTE `fresh` (columns n, owner, queue, priority, fkey:
    owner 0 for none, fkey '' for none; n orders the rows of one flow). Defines `turned` (n,
    turn). Reads only: the statement writes the turns."""
    return f"""flows AS (
        SELECT owner, queue, priority, fkey, count(*) AS size FROM {fresh} GROUP BY 1, 2, 3, 4
    ), placed AS (
        SELECT f.owner, f.queue, f.priority, f.fkey,
               greatest(
                   coalesce(
                       (SELECT t.turn FROM tasks t
                        WHERE {_RUNNABLE} AND t.queue = f.queue AND t.priority = f.priority
                        ORDER BY t.priority DESC, t.turn LIMIT 1),
                       (SELECT t.turn FROM tasks t
                        WHERE {_RUNNABLE} AND t.priority = f.priority
                        ORDER BY t.priority DESC, t.turn LIMIT 1),
                       0),
                   (SELECT t.turn FROM tasks t
                    WHERE {_RUNNABLE} AND coalesce(t.owner_key_id, 0) = f.owner AND t.queue = f.queue
                      AND t.priority = f.priority AND coalesce(t.fairness_key, '') = f.fkey
                    ORDER BY t.turn DESC LIMIT 1)
               ) AS base,
               greatest(1, (SELECT count(DISTINCT g.fkey) FROM flows g
                            WHERE g.owner = f.owner AND g.queue = f.queue AND g.priority = f.priority)
                           + coalesce(keys.n, 0))
               / coalesce((SELECT k.weight FROM api_keys k WHERE k.id = f.owner), 1) AS spacing
        FROM flows f
        LEFT JOIN LATERAL (
            -- the owner's other fairness keys with runnable tasks here (a skip scan)
            WITH RECURSIVE other AS (
                (SELECT coalesce(t.fairness_key, '') AS fkey, 1 AS depth FROM tasks t
                 WHERE {_RUNNABLE} AND coalesce(t.owner_key_id, 0) = f.owner AND t.queue = f.queue
                   AND t.priority = f.priority
                 ORDER BY coalesce(t.fairness_key, '') LIMIT 1)
                UNION ALL
                SELECT (SELECT coalesce(t.fairness_key, '') FROM tasks t
                        WHERE {_RUNNABLE} AND coalesce(t.owner_key_id, 0) = f.owner AND t.queue = f.queue
                          AND t.priority = f.priority AND coalesce(t.fairness_key, '') > other.fkey
                        ORDER BY coalesce(t.fairness_key, '') LIMIT 1),
                       other.depth + 1
                FROM other WHERE other.fkey IS NOT NULL AND other.depth < {MAX_COUNTED_FAIRNESS_KEYS}
            )
            SELECT count(*) FILTER (WHERE NOT EXISTS (
                       SELECT FROM flows g WHERE g.owner = f.owner AND g.queue = f.queue
                         AND g.priority = f.priority AND g.fkey = other.fkey)) AS n
            FROM other WHERE other.fkey IS NOT NULL
        ) keys ON true
    ), turned AS (
        SELECT r.n, p.base + p.spacing * row_number() OVER (
                   PARTITION BY r.owner, r.queue, r.priority, r.fkey ORDER BY r.n) AS turn
        FROM {fresh} r
        JOIN placed p USING (owner, queue, priority, fkey)
    )"""
