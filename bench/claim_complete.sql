-- pgbench baseline for drain: claim 10 runnable rows with SKIP LOCKED and mark them done, in one
-- statement, against skiplock's own tasks table (same indexes and constraints), in the claim's
-- order (tasks_runnable_idx: priority, then turn; see skiplock/sql/claim.py).
WITH next AS (
    SELECT id FROM tasks
    WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL AND run_at <= now()
    ORDER BY priority DESC, turn, id
    LIMIT 10
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t
SET status = 'completed', attempts = 1, worker_id = 'pgbench', started_at = now(),
    finished_at = now(), result = 'null', progress = 1
FROM next WHERE t.id = next.id;
