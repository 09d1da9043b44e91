-- skiplock schema: the `tasks` table *is* the queue.
--
-- Apply (any number of times; every statement is idempotent):
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f schema.sql
--
-- This file is the documentation of the tables: every table, column, index and view has a
-- COMMENT. Read them in psql with \d+ tasks, \d+ task_attempts, \dv+.
--
-- Its version is in skiplock_schema (written by the last statement below). When you change this
-- file in a way the code depends on (a table, column, type value or function it uses), bump the
-- version there and SCHEMA_VERSION in skiplock/db.py together: the API (/readyz), the workers and
-- the CLI refuse a database whose schema is older than their code needs.
--
-- Life of a task:
--   pending --claim--> processing --start--> running --success--> completed
--      ^                  |                     |  \--cancel--> cancelled
--      |<--released-------'                     |--failure, attempts left--> pending (run_at = now() + backoff)
--      |   (never started: not counted)         `--failure, no attempts left--> failed
--      `----retry (API)---- failed / cancelled
-- A claim reserves a task for a worker (status processing, started_at NULL); the worker records
-- that it hands the task to a process (task_workers.in_hand) before it does, and stores its start
-- (started_at) once it has run 10 ms, or with its outcome. Only a started attempt is charged
-- against max_attempts: a task whose worker stops, dies or is cut off before handing it to a
-- process goes back to pending uncounted (a `released` attempt). A worker holds a lease on each
-- task (tasks.lease_expires_at) and renews it; a task whose lease expired, or whose worker's
-- database session ended (task_workers), is rescued: a lost attempt if it may have started
-- (started_at, or in_hand), released if not.
-- Every write a worker makes is fenced on (id, attempts, worker_id, status = 'processing'), so a
-- worker whose task was rescued, cancelled or handed to someone else updates 0 rows.
--
-- Runnable = pending with a turn (tasks.turn) and waiting on no limit: workers claim those,
-- highest priority first, then lowest turn (fair shares between owners, see tasks.turn). A
-- pending task without a turn is scheduled (run_at ahead) or in retry backoff: the workers'
-- admission (one at a time, advisory lock) gives it one when it falls due. A due task held by a
-- limit waits on it (tasks.waiting_on, task_limits) until admission finds room. A pending task
-- past its expires_at ends `expired`.

BEGIN;

-- Two applications of this file at once (e.g. two deploys) queue up instead of racing.
DO $$ BEGIN PERFORM pg_advisory_xact_lock(hashtext('skiplock.schema')); END $$;

DO $$
BEGIN
    CREATE TYPE task_status AS ENUM ('pending', 'processing', 'completed', 'failed', 'cancelled');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- Databases created before expiry existed get `expired` here. Like `released` below, the new
-- value cannot be used before this transaction commits: constraints compare status::text, and
-- the indexes on finished rows are keyed on finished_at instead of naming the final statuses.
ALTER TYPE task_status ADD VALUE IF NOT EXISTS 'expired';

COMMENT ON TYPE task_status IS
    'State of a task. pending: waiting to run (for the first time, for a retry after backoff, for its run_at, or for '
    'a concurrency or rate limit: see tasks.turn and tasks.waiting_on); '
    'processing: claimed by a worker that holds a lease on it; completed: finished with a result; '
    'failed: ran out of attempts (see error and task_attempts); cancelled: stopped by a client; '
    'expired: did not start before its expires_at, and never will.';

DO $$
BEGIN
    CREATE TYPE task_attempt_outcome AS ENUM (
        'completed', 'failed', 'timed_out', 'crashed', 'lost', 'cancelled', 'handed_back', 'released');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
-- Databases created before `released` existed get it here. The new value cannot be used before
-- this transaction commits, so the constraints and views below compare outcome::text.
ALTER TYPE task_attempt_outcome ADD VALUE IF NOT EXISTS 'released';
-- A task's own decisions (skiplock.task_exceptions): NonRetryableError, RetryAfter.
ALTER TYPE task_attempt_outcome ADD VALUE IF NOT EXISTS 'failed_for_good';
ALTER TYPE task_attempt_outcome ADD VALUE IF NOT EXISTS 'retry_requested';

COMMENT ON TYPE task_attempt_outcome IS
    'How one attempt ended. completed: returned a result; failed: raised an error; '
    'timed_out: ran past timeout_seconds and its process was killed; crashed: its process died (signal or exit); '
    'lost: its worker stopped renewing the lease (host died, frozen, cut off) and the task was rescued; '
    'cancelled: a client cancelled the task while it ran; '
    'handed_back: the worker shut down before the task finished and returned it to pending (not counted against max_attempts); '
    'released: claimed but never handed to a task process (its worker stopped, died or was cut off first, or a client cancelled it): '
    'back to pending, or cancelled, without counting an attempt; '
    'failed_for_good: the task raised NonRetryableError: failed with no more attempts, whatever max_attempts says; '
    'retry_requested: the task raised RetryAfter: pending again at the run_at it asked for; unless it asked to be '
    'charged, its max_attempts was raised by one so that this attempt does not count.';

-- Clients: every /api request names an API key (Authorization: Bearer <token>) unless auth is
-- off. Only the SHA-256 of a token is stored; its first 12 characters (prefix) are not secret
-- and name the key in lists and logs. Keys are revoked, never deleted: tasks name their owner.
DO $$
BEGIN
    CREATE TYPE api_key_role AS ENUM ('admin', 'client');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- Roles added since (ADD VALUE commits with the file; nothing below uses them, as a value
-- added in a transaction cannot be used in it).
ALTER TYPE api_key_role ADD VALUE IF NOT EXISTS 'viewer';
ALTER TYPE api_key_role ADD VALUE IF NOT EXISTS 'metrics';

COMMENT ON TYPE api_key_role IS
    'What a key may do. client: submit tasks and see, list, cancel, retry and wait on its own tasks only; '
    'admin: every task, and the keys themselves; viewer: read everything an admin reads (API and dashboard), change nothing; '
    'metrics: read GET /metrics only (a Prometheus scrape credential).';

CREATE TABLE IF NOT EXISTS api_keys (
    id              bigint       GENERATED ALWAYS AS IDENTITY,
    name            text         NOT NULL,
    role            api_key_role NOT NULL DEFAULT 'client',
    prefix          text         NOT NULL,
    token_sha256    bytea        NOT NULL,
    rate_per_second real,
    burst           integer,
    max_unfinished  integer,
    created_at      timestamptz  NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    last_used_at    timestamptz,
    CONSTRAINT api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT api_keys_prefix_unique UNIQUE (prefix),
    CONSTRAINT api_keys_token_unique UNIQUE (token_sha256),
    CONSTRAINT api_keys_name_valid CHECK (length(name) BETWEEN 1 AND 100),
    CONSTRAINT api_keys_token_is_sha256 CHECK (length(token_sha256) = 32),
    CONSTRAINT api_keys_rate_positive CHECK (rate_per_second > 0),
    CONSTRAINT api_keys_burst_with_rate CHECK (burst IS NULL OR (burst >= 1 AND rate_per_second IS NOT NULL)),
    CONSTRAINT api_keys_max_unfinished_positive CHECK (max_unfinished >= 1)
);

-- Keys created before fair shares existed get a weight of 1.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS weight real NOT NULL DEFAULT 1;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'api_keys'::regclass
                   AND conname = 'api_keys_weight_in_range') THEN
        ALTER TABLE api_keys ADD CONSTRAINT api_keys_weight_in_range CHECK (weight > 0 AND weight <= 1000);
    END IF;
END $$;

COMMENT ON TABLE api_keys IS
    'API keys of the clients (skiplock keys create, or POST /api/keys). A revoked key is refused within seconds by every API process.';
COMMENT ON COLUMN api_keys.id IS 'Key id, as in tasks.owner_key_id.';
COMMENT ON COLUMN api_keys.name IS 'What the key is for, in words (shown in lists).';
COMMENT ON COLUMN api_keys.role IS 'client, admin, viewer or metrics, see type api_key_role.';
COMMENT ON COLUMN api_keys.prefix IS 'First 12 characters of the token (skl_ + 8): not secret, names the key in lists and logs.';
COMMENT ON COLUMN api_keys.token_sha256 IS 'SHA-256 of the whole token; the token itself is shown once, when the key is created, and stored nowhere.';
COMMENT ON COLUMN api_keys.rate_per_second IS 'Requests per second the key may make on average (token bucket); NULL for no limit.';
COMMENT ON COLUMN api_keys.burst IS 'Requests the key may make at once (the bucket''s size); NULL means one second''s worth of rate_per_second.';
COMMENT ON COLUMN api_keys.max_unfinished IS 'Most tasks of this key that may be pending or processing at once; NULL for no cap.';
COMMENT ON COLUMN api_keys.weight IS 'Fair share of the workers (0 < weight <= 1000, default 1): while several keys have tasks waiting in one queue and priority, each gets starts in proportion to its weight (see tasks.turn).';
COMMENT ON COLUMN api_keys.created_at IS 'When the key was created.';
COMMENT ON COLUMN api_keys.revoked_at IS 'When the key was revoked; NULL while it is valid.';
COMMENT ON COLUMN api_keys.last_used_at IS 'About when the key was last used (written at most once a minute per API process).';
COMMENT ON INDEX api_keys_pkey IS 'One row per key.';
COMMENT ON INDEX api_keys_prefix_unique IS 'Finds a key by the prefix shown in lists (skiplock keys revoke skl_...).';
COMMENT ON INDEX api_keys_token_unique IS 'Serves authentication: the key of a presented token, by its digest.';

-- Token buckets of the keys with a rate limit: API processes take tokens from here in chunks, so
-- the limit holds across processes and hosts while the row is written a few times a second, not
-- once per request. Unlogged: a crash refills every bucket, which is harmless.
CREATE UNLOGGED TABLE IF NOT EXISTS api_key_buckets (
    key_id     bigint           NOT NULL,
    tokens     double precision NOT NULL,
    updated_at timestamptz      NOT NULL,
    granted    integer          NOT NULL DEFAULT 0,
    CONSTRAINT api_key_buckets_pkey PRIMARY KEY (key_id),
    CONSTRAINT api_key_buckets_key_fkey FOREIGN KEY (key_id) REFERENCES api_keys (id) ON DELETE CASCADE
) WITH (fillfactor = 50);

COMMENT ON TABLE api_key_buckets IS
    'Rate limits: the token bucket of each key with rate_per_second, shared by every API process (each takes tokens in chunks). Unlogged: refilled after a crash.';
COMMENT ON COLUMN api_key_buckets.key_id IS 'The key (api_keys.id).';
COMMENT ON COLUMN api_key_buckets.tokens IS 'Tokens left at updated_at (refilled at rate_per_second up to burst since).';
COMMENT ON COLUMN api_key_buckets.updated_at IS 'When tokens was computed (database clock).';
COMMENT ON COLUMN api_key_buckets.granted IS 'Tokens handed to the API process that wrote the row last.';
COMMENT ON INDEX api_key_buckets_pkey IS 'One bucket per key.';

-- Ids that never name two tasks (or two workflows), even across a failover that lost
-- acknowledged transactions: a standby promoted while asynchronous replication lagged has not
-- seen the last ids its primary handed out, and a sequence, replicated like any table, would hand
-- them out again (a client polling its id then reads another task). Promotion (and any
-- point-in-time recovery) starts a new timeline: each timeline numbers in a range of its own,
-- 2^43 ids wide. Timeline 1 numbers from 1 as always; timeline 2 from 2^43 + 1 on; ids keep
-- growing across failovers, and stay exact in JavaScript up to timeline 1024. The timeline is
-- the one the server writes WAL on (its current WAL file's name; 0.4 us a row).
CREATE OR REPLACE FUNCTION skiplock_id_base() RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT (('x' || left(pg_walfile_name(pg_current_wal_insert_lsn()), 8))::bit(32)::bigint - 1) << 43
$$;
COMMENT ON FUNCTION skiplock_id_base() IS
    'The first id of the current timeline''s range, less one: (timeline - 1) * 2^43. Task and workflow ids are nextval of their sequence plus this (see tasks.id).';

-- The numbering within a timeline's range, which it must never leave (MAXVALUE: 2^43 - 1).
CREATE SEQUENCE IF NOT EXISTS tasks_id_seq AS bigint MAXVALUE 8796093022207;
CREATE SEQUENCE IF NOT EXISTS workflows_id_seq AS bigint MAXVALUE 8796093022207;

CREATE TABLE IF NOT EXISTS tasks (
    id               bigint NOT NULL DEFAULT nextval('tasks_id_seq') + skiplock_id_base(),
    task_type        text        NOT NULL,
    queue            text        NOT NULL DEFAULT 'default',
    priority         integer     NOT NULL DEFAULT 0,
    status           task_status NOT NULL DEFAULT 'pending',
    input            jsonb       NOT NULL,
    result           jsonb,
    error            text,
    error_traceback  text,
    progress         real,
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 3,
    timeout_seconds  integer     NOT NULL DEFAULT 300,
    run_at           timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    worker_id        text,
    lease_expires_at timestamptz,
    owner_key_id     bigint,
    callback_url     text,
    CONSTRAINT tasks_pkey PRIMARY KEY (id),
    CONSTRAINT tasks_task_type_valid CHECK (task_type ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    CONSTRAINT tasks_queue_valid CHECK (queue ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    CONSTRAINT tasks_max_attempts_in_range CHECK (max_attempts BETWEEN 1 AND 1000),
    CONSTRAINT tasks_attempts_in_range CHECK (attempts BETWEEN 0 AND max_attempts),
    CONSTRAINT tasks_timeout_positive CHECK (timeout_seconds > 0),
    CONSTRAINT tasks_progress_is_fraction CHECK (progress BETWEEN 0 AND 1),
    CONSTRAINT tasks_result_only_when_completed CHECK (result IS NULL OR status = 'completed'),
    CONSTRAINT tasks_finished_iff_final CHECK (
        (finished_at IS NOT NULL) = (status::text IN ('completed', 'failed', 'cancelled', 'expired'))),
    CONSTRAINT tasks_lease_iff_processing CHECK (
        (status = 'processing') = (lease_expires_at IS NOT NULL AND worker_id IS NOT NULL)),
    -- Payloads are bounded at the API (1 MiB by default); this is the last line of defence for
    -- direct inserts. pg_column_size is the stored (compressed) size, so the check is cheap.
    CONSTRAINT tasks_input_bounded CHECK (pg_column_size(input) <= 16 * 1024 * 1024),
    CONSTRAINT tasks_result_bounded CHECK (pg_column_size(result) <= 16 * 1024 * 1024)
);

-- Tables created before API keys existed get the owner column (NULL: submitted with auth off).
-- No foreign key to api_keys: its check is a trigger per inserted row, which cost a quarter of
-- the batch insert rate; keys are never deleted, and task_invariant_violations reports an owner
-- that does not exist.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS owner_key_id bigint;
-- ... and the webhook column (NULL: no callback).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS callback_url text;
-- ... and the scheduling columns (fair shares, limits, unique tasks, expiry). A task of an older
-- table has no turn: the workers' admission gives it one (it is pending and due).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS fairness_key text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS concurrency_key text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS unique_key text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS expires_at timestamptz;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS turn double precision;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS waiting_on text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS limited boolean NOT NULL DEFAULT false;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS quota_slot integer;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS schedule_id bigint;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS scheduled_for timestamptz;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS workflow_id bigint;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS workflow_ref text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS trigger_rule text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS has_dependents boolean NOT NULL DEFAULT false;
-- ... and tracing (skiplock/tracing.py): NULL unless the submit was traced.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS trace_context jsonb;

-- Constraints added to an existing table are checked first: each ALTER takes an exclusive lock
-- (and a new CHECK scans the table), which a re-application must not take.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'tasks'::regclass
                   AND conname = 'tasks_finished_iff_final'
                   AND pg_get_constraintdef(oid) LIKE '%expired%') THEN
        ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_finished_iff_final;
        ALTER TABLE tasks ADD CONSTRAINT tasks_finished_iff_final CHECK (
            (finished_at IS NOT NULL) = (status::text IN ('completed', 'failed', 'cancelled', 'expired')));
    END IF;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'tasks'::regclass
                   AND conname = 'tasks_scheduling_keys_valid') THEN
        ALTER TABLE tasks ADD CONSTRAINT tasks_scheduling_keys_valid CHECK (
            length(fairness_key) BETWEEN 1 AND 200 AND length(concurrency_key) BETWEEN 1 AND 200
            AND length(unique_key) BETWEEN 1 AND 200);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'tasks'::regclass
                   AND conname = 'tasks_quota_slot_positive') THEN
        ALTER TABLE tasks ADD CONSTRAINT tasks_quota_slot_positive CHECK (quota_slot >= 1);
    END IF;
END $$;

-- Status changes touch the indexed status column and are never HOT; lease renewals and progress
-- updates are (no index covers those columns), and fillfactor leaves them room on the page.
-- The table churns fast, so vacuum and analyze it after a small fraction of changes rather than
-- the default 20%: dead tuples are what slows SKIP LOCKED scans on a busy queue.
ALTER TABLE tasks SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1
);

COMMENT ON TABLE tasks IS
    'The queue: one row per task submitted through the API (or inserted directly). Workers claim pending rows '
    'with SELECT ... FOR UPDATE SKIP LOCKED and write results back into the same row. History of every attempt '
    'is in task_attempts.';
COMMENT ON COLUMN tasks.id IS 'Task id, as returned to clients (task_id). Never names two tasks, failovers included: each timeline numbers in a range of its own (skiplock_id_base).';
COMMENT ON COLUMN tasks.task_type IS 'Name of the registered task type that runs this task (GET /api/task-types lists them).';
COMMENT ON COLUMN tasks.queue IS 'Queue name; a worker started with --queue only claims from its queues.';
COMMENT ON COLUMN tasks.priority IS 'Higher runs first; ties run oldest run_at first, then lowest id.';
COMMENT ON COLUMN tasks.status IS 'Current state, see type task_status.';
COMMENT ON COLUMN tasks.input IS 'task_input as submitted (JSON), validated against the task type''s schema at submit time.';
COMMENT ON COLUMN tasks.result IS 'JSON result of the successful attempt; NULL unless status = completed.';
COMMENT ON COLUMN tasks.error IS 'Message of the latest failed attempt (kept while a retry is pending, cleared on success).';
COMMENT ON COLUMN tasks.error_traceback IS 'Python traceback of the latest failed attempt, when there was one.';
COMMENT ON COLUMN tasks.progress IS 'Fraction 0..1 reported by the running attempt; NULL if the task type reports none. 1 when completed.';
COMMENT ON COLUMN tasks.attempts IS 'Attempts charged so far (counted against max_attempts): started ones, plus, while processing, the current one (which is uncharged again if it is released before it starts). Also the fencing token: writes from a worker must name the attempt they belong to.';
COMMENT ON COLUMN tasks.max_attempts IS 'After this many failed attempts the task is failed instead of retried. A manual retry raises it by one if needed, and so does a RetryAfter that asks not to be charged (task_attempts.outcome retry_requested).';
COMMENT ON COLUMN tasks.timeout_seconds IS 'An attempt running longer is killed and counts as a failed (timed_out) attempt.';
COMMENT ON COLUMN tasks.run_at IS 'Not claimed before this time: the requested run_at/delay, or the end of the retry backoff.';
COMMENT ON COLUMN tasks.created_at IS 'When the task was submitted (database clock).';
COMMENT ON COLUMN tasks.started_at IS 'When the current (or last) attempt started running in a task process (database clock). NULL while a claimed task waits in its worker to start, and before the first start.';
COMMENT ON COLUMN tasks.finished_at IS 'When the task reached completed, failed or cancelled; NULL otherwise.';
COMMENT ON COLUMN tasks.worker_id IS 'Worker (host:pid:random, see task_workers) that holds or last held the task.';
COMMENT ON COLUMN tasks.owner_key_id IS 'The API key that submitted the task (api_keys.id; not a foreign key, for the insert rate: keys are never deleted): a client key sees only its own tasks. NULL when submitted with auth off, or inserted by hand.';
COMMENT ON COLUMN tasks.callback_url IS 'Where skiplock POSTs the task once it is final (a webhook, see webhook_deliveries); NULL for none. Checked at submit: http(s), and no loopback, private or link-local address unless allow-listed.';
COMMENT ON COLUMN tasks.fairness_key IS 'Given at submit by a client that serves many end users (its customer id, say): within the owner''s fair share, its fairness keys take turns. NULL: one for the whole owner.';
COMMENT ON COLUMN tasks.concurrency_key IS 'Given at submit: the task counts against the concurrency and start-rate limit of (owner_key_id, concurrency_key) in task_limits (scope key). Scoped to the owner: another key''s tasks with the same string are another group. NULL: none.';
COMMENT ON COLUMN tasks.unique_key IS 'Given at submit: while a task of the same owner with this key is pending or processing, a submit with it creates nothing and answers that task (tasks_unique_idx decides). NULL: none.';
COMMENT ON COLUMN tasks.expires_at IS 'A task that has not started by then never starts: it ends expired (also instead of a retry whose backoff would end after it). NULL: never.';
COMMENT ON COLUMN tasks.turn IS 'Place in the fair rotation (weighted fair queueing): workers claim the runnable tasks of a priority lowest turn first, and admission admits the tasks waiting on a limit in the same order. A task gets one when it is due: at submit, or from the workers'' admission when it falls due. Each owner''s (and fairness key''s) tasks are spaced by (its fairness keys)/weight after its last one, never before the queue''s lowest runnable turn, so a new owner is not behind another''s backlog (task_turn_start). NULL: not due yet (scheduled, or in retry backoff); kept while processing.';
COMMENT ON COLUMN tasks.waiting_on IS 'While pending and due but held by a limit: the limit it waits for (key:<owner>:<concurrency_key>, type:<task_type>, queue:<queue>; task_limits), so admission finds it by limit. NULL otherwise. A pending task is runnable when it has a turn and waits on nothing.';
COMMENT ON COLUMN tasks.limited IS 'True once admitted under a limit (task_limits): while runnable or processing it holds one of the limit''s slots (tasks_limited_idx counts them).';
COMMENT ON COLUMN tasks.quota_slot IS 'For a task of a key with max_unfinished, submitted (or retried) while the cap was set: its slot, a number in 1..max_unfinished no other unfinished task of the key holds (tasks_quota_slot_idx); freed when the task is final. NULL otherwise. A cap is set when the key is created; one set or lowered later by hand counts the tasks already queued only as far as they hold slots (held slots are counted, free ones are taken from 1..max_unfinished).';
COMMENT ON COLUMN tasks.lease_expires_at IS 'While processing: the holder must renew before this time, or the task is rescued (sooner if the holder''s session ends, see task_workers). NULL otherwise.';

COMMENT ON COLUMN tasks.schedule_id IS 'The schedule (task_schedules.id) whose fire (or run now) created the task; NULL otherwise. No foreign key: a task outlives its schedule.';
COMMENT ON COLUMN tasks.workflow_id IS 'The workflow (workflows.id) the task is a step of; NULL for a task submitted alone.';
COMMENT ON COLUMN tasks.workflow_ref IS 'Its name within its workflow (the ref its dependents name it by, and the key of its result in their context).';
COMMENT ON COLUMN tasks.trigger_rule IS 'For a task with parents (task_dependencies): when it may start. all_succeeded: every parent completed; all_done: every parent final; any_failed: a parent failed or expired. Until then it is pending with run_at 9999-12-31 (waiting for its parents); when the rule can no longer hold it ends cancelled, its error naming the parent.';
COMMENT ON COLUMN tasks.has_dependents IS 'True if other tasks depend on it (task_dependencies.parent_id): the statement that makes it final also settles them. False for every other task, which pays nothing for workflows.';
COMMENT ON COLUMN tasks.trace_context IS 'OpenTelemetry: the submit request''s trace context (W3C: {"traceparent": ..., "tracestate": ...}), when the API has opentelemetry-api and the request was traced; its run spans are children of it (a retry''s are linked) and its webhooks carry it. NULL otherwise.';
COMMENT ON COLUMN tasks.scheduled_for IS 'For a task of a schedule: the fire time it was created for (task_schedule_fires.scheduled_for; run now: when it was asked).';

COMMENT ON INDEX tasks_pkey IS 'Serves task_get and the fenced writes (by id), and task_list (newest first, keyset on id).';

-- task_claim: the hot path. Only runnable rows (pending with a turn, waiting on no limit):
-- scheduled tasks and retries in backoff (no turn yet) and tasks waiting on a limit never enter it, so the claim is a walk of
-- its first entries however much waits elsewhere. Fair shares are in the order itself (turn).
DROP INDEX IF EXISTS tasks_claim_idx;
DROP INDEX IF EXISTS tasks_claim_queue_idx;
CREATE INDEX IF NOT EXISTS tasks_runnable_idx ON tasks (priority DESC, turn, id)
    WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL;
COMMENT ON INDEX tasks_runnable_idx IS 'Serves task_claim: runnable tasks (pending, with a turn, waiting on no limit) in claim order, highest priority, then lowest turn. Partial: only those.';

-- task_claim for workers of some queues (SKIPLOCK_QUEUES): one probe per queue, so a backlog in
-- other queues is never walked. `queue IS NOT NULL` is always true (NOT NULL column) but only a
-- query naming a queue implies it: the claim of every queue cannot pick this index (it did, with
-- statistics taken on an empty table: a bitmap scan and a sort of every pending row).
CREATE INDEX IF NOT EXISTS tasks_runnable_queue_idx ON tasks (queue, priority DESC, turn, id)
    WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL AND queue IS NOT NULL;
COMMENT ON INDEX tasks_runnable_queue_idx IS 'Serves task_claim for workers of some queues (per queue, runnable tasks in claim order) and the turn of a new task (the queue''s lowest turn). Partial: only runnable rows.';

-- The turn of a new runnable task: where its owner's (and fairness key's) runnable tasks end, and
-- which fairness keys the owner has runnable (a skip scan).
CREATE INDEX IF NOT EXISTS tasks_flow_idx
    ON tasks (coalesce(owner_key_id, 0), queue, priority, coalesce(fairness_key, ''), turn)
    WHERE status = 'pending' AND turn IS NOT NULL;
COMMENT ON INDEX tasks_flow_idx IS 'Serves the turn of new tasks: the last turn of an owner''s (and fairness key''s) due tasks (runnable or waiting on a limit) in a queue and priority, and the owner''s fairness keys there. Partial: only those.';

-- Admission: scheduled tasks (and retries in backoff), by when they fall due; and tasks waiting
-- on a limit, by limit in claim order. Neither is in the claim's index.
CREATE INDEX IF NOT EXISTS tasks_scheduled_idx ON tasks (run_at, id)
    WHERE status = 'pending' AND turn IS NULL;
COMMENT ON INDEX tasks_scheduled_idx IS 'Serves admission (tasks that fell due get a turn, and wait on a limit if one holds them) and task_next_due_in. Partial: pending tasks without a turn.';
CREATE INDEX IF NOT EXISTS tasks_waiting_idx ON tasks (waiting_on, priority DESC, turn, id)
    WHERE status = 'pending' AND waiting_on IS NOT NULL;
COMMENT ON INDEX tasks_waiting_idx IS 'Serves admission: per limit, the tasks waiting for it in the order they are admitted (priority, then the fair rotation: owners share a limit fairly too). Partial: only those.';
CREATE INDEX IF NOT EXISTS tasks_limited_idx ON tasks (id)
    WHERE limited AND turn IS NOT NULL AND status IN ('pending', 'processing');
COMMENT ON INDEX tasks_limited_idx IS 'Serves admission: the tasks holding a slot of a limit (admitted under one, runnable or processing). As many as the limits allow.';
CREATE INDEX IF NOT EXISTS tasks_key_slots_idx ON tasks (coalesce(owner_key_id, 0), concurrency_key)
    WHERE concurrency_key IS NOT NULL AND status IN ('pending', 'processing') AND (limited OR status = 'processing');
COMMENT ON INDEX tasks_key_slots_idx IS 'Serves admission after a worker''s tasks ended: the tasks holding (or about to hold) a slot of one concurrency key, counted by one probe per key freed instead of a scan of every slot.';

-- Unique tasks: one unfinished task per owner and unique_key. The index decides between
-- concurrent submits (the second waits for the first to commit, then conflicts).
CREATE UNIQUE INDEX IF NOT EXISTS tasks_unique_idx ON tasks (coalesce(owner_key_id, 0), unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'processing');
COMMENT ON INDEX tasks_unique_idx IS 'Unique tasks: at most one pending or processing task per owner (NULL counts as one) and unique_key. Partial: finished tasks free the key.';

-- Expiry: pending tasks with a deadline, soonest first.
CREATE INDEX IF NOT EXISTS tasks_expiry_idx ON tasks (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
COMMENT ON INDEX tasks_expiry_idx IS 'Serves task_expire: pending tasks with an expires_at, soonest first. Partial: only those.';

-- task_rescue: processing rows are few (what workers hold: running tasks plus, for short tasks, a
-- batch claimed ahead). Keyed on id, not lease_expires_at, so lease renewals do not touch an
-- index and stay HOT updates.
CREATE INDEX IF NOT EXISTS tasks_processing_idx ON tasks (id)
    WHERE status = 'processing';
COMMENT ON INDEX tasks_processing_idx IS 'Serves task_rescue, the tasks_running view and task_invariant_violations: tasks currently processing.';

-- task_prune: finished rows in the order they become prunable. Partial, so pending and running
-- rows never enter it (finished_at is set exactly when a task is final: tasks_finished_iff_final).
DROP INDEX IF EXISTS tasks_finished_idx;
CREATE INDEX IF NOT EXISTS tasks_finished_at_idx ON tasks (finished_at)
    WHERE finished_at IS NOT NULL;
COMMENT ON INDEX tasks_finished_at_idx IS 'Serves task_prune (retention: finished tasks, oldest first) and task_invariant_violations (recently finished tasks). Partial: only finished rows.';

-- Schedules with overlap skip: whether a task of the schedule is unfinished. Partial: other
-- tasks never enter it.
CREATE INDEX IF NOT EXISTS tasks_schedule_unfinished_idx ON tasks (schedule_id)
    WHERE schedule_id IS NOT NULL AND status IN ('pending', 'processing');
COMMENT ON INDEX tasks_schedule_unfinished_idx IS 'Serves overlap skip (task_schedules.overlap): the unfinished tasks of a schedule. Partial: only those.';

-- task_list for a client key (its own tasks, newest first). Partial: tasks submitted with auth
-- off (owner NULL) never enter it, so a deployment without keys pays nothing for it.
CREATE INDEX IF NOT EXISTS tasks_owner_idx ON tasks (owner_key_id, id)
    WHERE owner_key_id IS NOT NULL;
COMMENT ON INDEX tasks_owner_idx IS 'Serves task_list for a client key (its tasks, newest first) and task_owned_since (what a key submitted lately). Partial: only owned tasks.';

-- task_list for a client key and a status few of its tasks have (failed, cancelled, expired:
-- "my failed tasks"): without it, a key with none walked its whole history through
-- tasks_owner_idx. Partial: only tasks that ended so, a small part of any history. (Said as
-- "not pending, processing or completed": 'expired' is added to the enum in this very
-- transaction, and a cast to text is not immutable.)
CREATE INDEX IF NOT EXISTS tasks_owner_ended_idx ON tasks (owner_key_id, status, id)
    WHERE owner_key_id IS NOT NULL AND status NOT IN ('pending', 'processing', 'completed');
COMMENT ON INDEX tasks_owner_ended_idx IS 'Serves task_list for a client key filtered on failed, cancelled or expired (its tasks that ended so, newest first). Partial: only those.';

-- task_unfinished_count: a key's cap on unfinished tasks is checked against this when the key
-- may be near its cap (bounded by the cap; see api/limits.py). Pending and processing owned rows
-- only. (task_owned_since, the cheap count between two, uses tasks_owner_idx.)
CREATE INDEX IF NOT EXISTS tasks_owner_unfinished_idx ON tasks (owner_key_id)
    WHERE owner_key_id IS NOT NULL AND status IN ('pending', 'processing');
-- Quotas (api_keys.max_unfinished): each unfinished task of a capped key holds a slot number of
-- its own in 1..max_unfinished, so the key can never have more. The index decides between
-- concurrent submits without a lock (one waits only for another taking the same number), and a
-- task frees its slot by finishing.
CREATE UNIQUE INDEX IF NOT EXISTS tasks_quota_slot_idx ON tasks (owner_key_id, quota_slot)
    WHERE quota_slot IS NOT NULL AND status IN ('pending', 'processing');
COMMENT ON INDEX tasks_quota_slot_idx IS 'One unfinished task per (owner_key_id, quota_slot): api_keys.max_unfinished holds because slots are numbered 1..max_unfinished. Partial: unfinished tasks of capped keys only.';

COMMENT ON INDEX tasks_owner_unfinished_idx IS 'Serves task_unfinished_count (api_keys.max_unfinished): a key''s pending and processing tasks. Partial: only those.';

-- Idempotent submits: a client retrying a submit with the same Idempotency-Key gets the first
-- answer again instead of a second task. The unique index decides between concurrent requests:
-- the second waits for the first to commit, then finds its row.
CREATE TABLE IF NOT EXISTS task_idempotency_keys (
    owner_key_id    bigint,
    idempotency_key text        NOT NULL,
    request_sha256  bytea       NOT NULL,
    status_code     integer     NOT NULL,
    response        jsonb       NOT NULL,
    location        text,
    task_ids        bigint[]    NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT task_idempotency_keys_owner_fkey FOREIGN KEY (owner_key_id) REFERENCES api_keys (id),
    CONSTRAINT task_idempotency_keys_key_valid CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT task_idempotency_keys_sha256 CHECK (length(request_sha256) = 32)
);
CREATE UNIQUE INDEX IF NOT EXISTS task_idempotency_keys_unique
    ON task_idempotency_keys (coalesce(owner_key_id, 0), idempotency_key);
CREATE INDEX IF NOT EXISTS task_idempotency_keys_created_idx ON task_idempotency_keys (created_at);

COMMENT ON TABLE task_idempotency_keys IS
    'Submits made with an Idempotency-Key header, remembered for SKIPLOCK_IDEMPOTENCY_TTL_SECONDS (24 h) so that a retry gets the first answer. Deleted by the workers'' prune duty once expired.';
COMMENT ON COLUMN task_idempotency_keys.owner_key_id IS 'The key that made the request (keys are per owner); NULL with auth off.';
COMMENT ON COLUMN task_idempotency_keys.idempotency_key IS 'The client''s Idempotency-Key (1-255 characters).';
COMMENT ON COLUMN task_idempotency_keys.request_sha256 IS 'SHA-256 of the endpoint and the request body: the same key with another request is refused (422).';
COMMENT ON COLUMN task_idempotency_keys.status_code IS 'HTTP status of the first answer.';
COMMENT ON COLUMN task_idempotency_keys.response IS 'Body of the first answer, replayed as it was.';
COMMENT ON COLUMN task_idempotency_keys.location IS 'Location header of the first answer, if any.';
COMMENT ON COLUMN task_idempotency_keys.task_ids IS 'The tasks the first request created.';
COMMENT ON COLUMN task_idempotency_keys.created_at IS 'When the first request was answered.';
COMMENT ON INDEX task_idempotency_keys_unique IS 'One row per owner and key (a NULL owner counts as one): what makes a concurrent retry wait and replay instead of insert.';
COMMENT ON INDEX task_idempotency_keys_created_idx IS 'Serves idempotency_keys_prune: expired rows, oldest first.';

CREATE TABLE IF NOT EXISTS task_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    task_id     bigint               NOT NULL,
    attempt     integer              NOT NULL,
    worker_id   text                 NOT NULL,
    outcome     task_attempt_outcome NOT NULL,
    started_at  timestamptz,
    finished_at timestamptz          NOT NULL DEFAULT now(),
    error       text,
    CONSTRAINT task_attempts_pkey PRIMARY KEY (id),
    CONSTRAINT task_attempts_task_fkey FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE,
    CONSTRAINT task_attempts_attempt_positive CHECK (attempt >= 1),
    CONSTRAINT task_attempts_finished_after_start CHECK (finished_at >= started_at),
    CONSTRAINT task_attempts_started_unless_released CHECK (started_at IS NOT NULL OR outcome::text = 'released')
);

-- Tables created before attempts could be released (never started) get the same definition.
-- Checked first: each ALTER takes an exclusive lock, which a re-application must not take.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'task_attempts'::regclass
               AND attname = 'started_at' AND attnotnull) THEN
        ALTER TABLE task_attempts ALTER COLUMN started_at DROP NOT NULL;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'task_attempts'::regclass
                   AND conname = 'task_attempts_started_unless_released') THEN
        ALTER TABLE task_attempts ADD CONSTRAINT task_attempts_started_unless_released
            CHECK (started_at IS NOT NULL OR outcome::text = 'released');
    END IF;
END $$;

COMMENT ON TABLE task_attempts IS
    'History: one row per ended attempt of a task, written in the same statement that ends it. '
    'Count rows per task to see how often it ran; outcome says how each run ended.';
COMMENT ON COLUMN task_attempts.id IS 'Row id (insertion order).';
COMMENT ON COLUMN task_attempts.task_id IS 'The task (tasks.id); rows go when the task is deleted.';
COMMENT ON COLUMN task_attempts.attempt IS 'tasks.attempts during this attempt (1 = first). A handed_back or released attempt does not count, so the next one reuses its number.';
COMMENT ON COLUMN task_attempts.worker_id IS 'Worker (host:pid:random) that ran the attempt.';
COMMENT ON COLUMN task_attempts.outcome IS 'How the attempt ended, see type task_attempt_outcome.';
COMMENT ON COLUMN task_attempts.started_at IS 'When the attempt started running (database clock); NULL for a released attempt, which never started. For an attempt lost with its worker before its start was stored (a short task), when the worker last recorded it as in a process''s hands (task_workers.in_hand_at).';
COMMENT ON COLUMN task_attempts.finished_at IS 'When the attempt''s end was recorded (database clock).';
COMMENT ON COLUMN task_attempts.error IS 'Error message for every outcome but completed.';

COMMENT ON INDEX task_attempts_pkey IS 'Row identity of an attempt record.';

CREATE INDEX IF NOT EXISTS task_attempts_task_idx ON task_attempts (task_id, attempt);
COMMENT ON INDEX task_attempts_task_idx IS 'Serves task_attempts_list (a task''s history) and the cascade when tasks are deleted.';

-- task_failures: recent failed attempts, newest first. Partial: completed (and uncounted) attempts,
-- nearly all of them, never enter it, so a completion writes no entry here.
CREATE INDEX IF NOT EXISTS task_attempts_failures_idx ON task_attempts (finished_at)
    WHERE outcome IN ('failed', 'timed_out', 'crashed', 'lost');
COMMENT ON INDEX task_attempts_failures_idx IS 'Serves the task_failures view: failed, timed out, crashed and lost attempts, by when they ended. Partial: only those.';

-- Queues a DBA, the API, the CLI or the dashboard can pause: workers do not claim from a paused
-- queue (what runs finishes). A queue needs no row to exist: rows are made by the first pause.
CREATE TABLE IF NOT EXISTS task_queues (
    queue      text        NOT NULL,
    paused     boolean     NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text,
    CONSTRAINT task_queues_pkey PRIMARY KEY (queue),
    CONSTRAINT task_queues_queue_valid CHECK (queue ~ '^[A-Za-z0-9_.:-]{1,100}$')
);
COMMENT ON TABLE task_queues IS
    'Queue settings: paused queues are not claimed by any worker (within about a second; tasks already running finish). '
    'UPDATE task_queues SET paused = false WHERE queue = ''x'' resumes one by hand.';
COMMENT ON COLUMN task_queues.queue IS 'The queue (tasks.queue).';
COMMENT ON COLUMN task_queues.paused IS 'True: workers claim nothing from it.';
COMMENT ON COLUMN task_queues.changed_at IS 'When it was last paused or resumed.';
COMMENT ON COLUMN task_queues.changed_by IS 'Who did (an API key''s prefix, skiplock-cli, ...).';
COMMENT ON INDEX task_queues_pkey IS 'One row per queue.';

-- Limits on how many tasks of a group run at once and how fast they start, held across every
-- worker and host. A group is a concurrency key of one owner (scope key, set by that client), a
-- task type (scope type, declared with the type in code; workers write it at start) or a queue
-- (scope queue, set by an admin). Nothing here counts: a group's running tasks are derived from
-- the task rows (tasks.limited, tasks_limited_idx, plus what is processing) by the one admission
-- that runs at a time (advisory lock hashtext('skiplock.admission')), so a limit holds through
-- worker deaths, rescues, retries and cancels: a task that stops holding a slot frees it.
CREATE TABLE IF NOT EXISTS task_limits (
    scope                 text             NOT NULL,
    owner_key_id          bigint           NOT NULL DEFAULT 0,
    name                  text             NOT NULL,
    max_running           integer,
    max_starts_per_second real,
    burst                 integer,
    tokens                double precision,
    tokens_at             timestamptz,
    updated_at            timestamptz      NOT NULL DEFAULT now(),
    updated_by            text,
    CONSTRAINT task_limits_pkey PRIMARY KEY (scope, owner_key_id, name),
    CONSTRAINT task_limits_scope_valid CHECK (scope IN ('key', 'type', 'queue')),
    CONSTRAINT task_limits_owner_only_for_keys CHECK (scope = 'key' OR owner_key_id = 0),
    CONSTRAINT task_limits_name_valid CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT task_limits_max_running_valid CHECK (max_running >= 0),
    CONSTRAINT task_limits_rate_positive CHECK (max_starts_per_second > 0),
    CONSTRAINT task_limits_burst_with_rate CHECK (burst IS NULL OR (burst >= 1 AND max_starts_per_second IS NOT NULL))
);
COMMENT ON TABLE task_limits IS
    'Concurrency and start-rate limits (PUT /api/concurrency-limits/{key}, /api/queues/{q}/limit, @task(max_running=...)). '
    'SELECT * FROM task_limit_usage shows each with what runs and waits.';
COMMENT ON COLUMN task_limits.scope IS 'key: tasks of owner_key_id with tasks.concurrency_key = name; type: tasks of task_type name; queue: tasks of queue name.';
COMMENT ON COLUMN task_limits.owner_key_id IS 'For scope key, the owner (api_keys.id; 0 with auth off); 0 for the other scopes.';
COMMENT ON COLUMN task_limits.name IS 'The concurrency key, task type or queue.';
COMMENT ON COLUMN task_limits.max_running IS 'Most tasks of the group runnable-and-admitted or processing at once, across all workers; 0 holds them all (a pause); NULL: no cap.';
COMMENT ON COLUMN task_limits.max_starts_per_second IS 'Most starts per second on average across all workers (a token bucket); NULL: no rate limit.';
COMMENT ON COLUMN task_limits.burst IS 'Starts allowed at once (the bucket''s size); NULL: one second''s worth, at least 1.';
COMMENT ON COLUMN task_limits.tokens IS 'The bucket: starts it allows at tokens_at (written only by admission, a few times a second at most).';
COMMENT ON COLUMN task_limits.tokens_at IS 'When tokens was computed (database clock).';
COMMENT ON COLUMN task_limits.updated_at IS 'When the limit was last set.';
COMMENT ON COLUMN task_limits.updated_by IS 'Who set it (a key''s prefix, skiplock-cli, a worker for type limits).';
COMMENT ON INDEX task_limits_pkey IS 'One limit per scope, owner and name.';

-- Workflows: tasks that run after other tasks. A workflow row holds what is about the whole
-- (owner, callback); its steps are ordinary tasks (tasks.workflow_id), its edges rows of
-- task_dependencies. Nothing counts: whether a step may start is derived from its edges, each
-- written once when its parent ends (the parent's final status), under a lock on the step.
CREATE TABLE IF NOT EXISTS workflows (
    id            bigint      NOT NULL DEFAULT nextval('workflows_id_seq') + skiplock_id_base(),
    owner_key_id  bigint,
    name          text,
    callback_url  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    cancelled_at  timestamptz,
    finished_at   timestamptz,
    state         text,
    CONSTRAINT workflows_pkey PRIMARY KEY (id),
    CONSTRAINT workflows_name_valid CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT workflows_state_valid CHECK (state IN ('completed', 'failed', 'cancelled')),
    CONSTRAINT workflows_final_has_state CHECK ((finished_at IS NULL) = (state IS NULL))
);
CREATE INDEX IF NOT EXISTS workflows_owner_idx ON workflows (owner_key_id, id);
CREATE INDEX IF NOT EXISTS workflows_unfinished_idx ON workflows (id) WHERE finished_at IS NULL;
COMMENT ON TABLE workflows IS
    'Workflows (POST /api/workflows): tasks with dependencies, batches, chains. Their steps are tasks (tasks.workflow_id); '
    'SELECT status, count(*) FROM tasks WHERE workflow_id = 7 GROUP BY 1 shows one''s progress.';
COMMENT ON COLUMN workflows.id IS 'The workflow''s id (GET /api/workflows/{id}). Ranged per timeline, as tasks.id.';
COMMENT ON COLUMN workflows.owner_key_id IS 'The API key that submitted it and owns its tasks; NULL with auth off.';
COMMENT ON COLUMN workflows.name IS 'An optional label given at submit.';
COMMENT ON COLUMN workflows.callback_url IS 'Gets one signed webhook (workflow.completed, .failed or .cancelled) when every task is final.';
COMMENT ON COLUMN workflows.created_at IS 'When it was submitted.';
COMMENT ON COLUMN workflows.cancelled_at IS 'When POST /api/workflows/{id}/cancel cancelled its unfinished tasks.';
COMMENT ON COLUMN workflows.finished_at IS 'When its last task became final (set once, by the statement that saw it so, or by the workers'' sweep).';
COMMENT ON COLUMN workflows.state IS 'Once final: failed if a task failed or expired, cancelled if it was cancelled, else completed. NULL while a task is unfinished (derive the progress from its tasks).';
COMMENT ON INDEX workflows_pkey IS 'One row per workflow.';
COMMENT ON INDEX workflows_owner_idx IS 'Serves a key''s list of its workflows.';
COMMENT ON INDEX workflows_unfinished_idx IS 'Serves the workers'' sweep (workflows whose last task ended without their finish being seen). Partial: unfinished ones.';

-- Databases created before ids were ranged per timeline (skiplock_id_base): their identity
-- columns become the sequences above, numbering on from where the identity stopped.
DO $$
DECLARE
    t text;
    identity_seq text;
    last bigint;
    called boolean;
BEGIN
    FOREACH t IN ARRAY ARRAY['tasks', 'workflows'] LOOP
        IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = t::regclass AND attname = 'id' AND attidentity <> '') THEN
            identity_seq := pg_get_serial_sequence(t, 'id');
            EXECUTE format('SELECT last_value, is_called FROM %s', identity_seq) INTO last, called;
            EXECUTE format('ALTER TABLE %I ALTER COLUMN id DROP IDENTITY', t);  -- drops identity_seq
            EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I AS bigint MAXVALUE 8796093022207', t || '_id_seq');
            PERFORM setval(format('%I', t || '_id_seq'), last, called);
            EXECUTE format('ALTER TABLE %I ALTER COLUMN id SET DEFAULT nextval(%L) + skiplock_id_base()', t, t || '_id_seq');
        END IF;
        -- Dropped with its table. Only once: ALTER SEQUENCE waits for every transaction that
        -- took an id, and makes every new insert wait behind it.
        IF NOT EXISTS (SELECT FROM pg_depend WHERE objid = (t || '_id_seq')::regclass
                       AND refobjid = t::regclass AND deptype = 'a') THEN
            EXECUTE format('ALTER SEQUENCE %I OWNED BY %I.id', t || '_id_seq', t);
        END IF;
    END LOOP;
END $$;
COMMENT ON SEQUENCE tasks_id_seq IS 'Numbers tasks within the current timeline''s range: tasks.id = nextval + skiplock_id_base().';
COMMENT ON SEQUENCE workflows_id_seq IS 'Numbers workflows within the current timeline''s range: workflows.id = nextval + skiplock_id_base().';

CREATE TABLE IF NOT EXISTS task_dependencies (
    task_id       bigint NOT NULL,
    parent_id     bigint NOT NULL,
    CONSTRAINT task_dependencies_pkey PRIMARY KEY (task_id, parent_id),
    CONSTRAINT task_dependencies_task_fkey FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE,
    CONSTRAINT task_dependencies_parent_fkey FOREIGN KEY (parent_id) REFERENCES tasks (id) ON DELETE CASCADE,
    CONSTRAINT task_dependencies_not_self CHECK (task_id <> parent_id)
);
CREATE INDEX IF NOT EXISTS task_dependencies_parent_idx ON task_dependencies (parent_id);
COMMENT ON TABLE task_dependencies IS
    'Edges of workflows: task_id starts after parent_id, by its tasks.trigger_rule. Written once, with the workflow; what a '
    'step waits for is derived from its parents'' rows: SELECT d.parent_id, p.status FROM task_dependencies d JOIN tasks p '
    'ON p.id = d.parent_id WHERE d.task_id = 42.';
COMMENT ON COLUMN task_dependencies.task_id IS 'The dependent task (tasks.id).';
COMMENT ON COLUMN task_dependencies.parent_id IS 'The task it depends on (tasks.id; tasks.has_dependents is true for it).';
COMMENT ON INDEX task_dependencies_pkey IS 'One edge per task and parent; a task''s parents in order (walked newest first: is one unfinished?).';
COMMENT ON INDEX task_dependencies_parent_idx IS 'A parent''s dependents (settled when it ends).';

-- Workflow steps of an owner's workflow, and those still unfinished (the workflow's end).
CREATE INDEX IF NOT EXISTS tasks_workflow_idx ON tasks (workflow_id, id) WHERE workflow_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_workflow_unfinished_idx ON tasks (workflow_id)
    WHERE workflow_id IS NOT NULL AND status IN ('pending', 'processing');
COMMENT ON INDEX tasks_workflow_idx IS 'Serves GET /api/workflows/{id}: a workflow''s tasks. Partial: workflow steps only.';
COMMENT ON INDEX tasks_workflow_unfinished_idx IS 'Whether a workflow has unfinished tasks (its end): one probe. Partial: unfinished workflow steps only.';

-- Schedules: tasks submitted on a clock (cron in a timezone, or every N seconds), by whichever
-- worker is up. A fire is decided on the database clock: a worker locks a due schedule (FOR
-- UPDATE SKIP LOCKED), records the fire (task_schedule_fires, one row per schedule and time: the
-- primary key refuses a second), creates its task and moves next_fire_at on, in one transaction.
-- Nothing doubles when two hosts fire, and nothing depends on history being kept.
CREATE TABLE IF NOT EXISTS task_schedules (
    id            bigint      GENERATED ALWAYS AS IDENTITY,
    source        text        NOT NULL DEFAULT 'api',
    owner_key_id  bigint,
    name          text        NOT NULL,
    cron          text,
    every_seconds integer,
    timezone      text        NOT NULL DEFAULT 'UTC',
    task          jsonb       NOT NULL,
    missed        text        NOT NULL DEFAULT 'skip',
    missed_limit  integer     NOT NULL DEFAULT 100,
    overlap       text        NOT NULL DEFAULT 'allow',
    grace_seconds integer,
    paused        boolean     NOT NULL DEFAULT false,
    next_fire_at  timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    updated_by    text,
    CONSTRAINT task_schedules_pkey PRIMARY KEY (id),
    CONSTRAINT task_schedules_source_valid CHECK (source IN ('api', 'code')),
    CONSTRAINT task_schedules_code_unowned CHECK (source = 'api' OR owner_key_id IS NULL),
    CONSTRAINT task_schedules_name_valid CHECK (name ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    CONSTRAINT task_schedules_one_rule CHECK ((cron IS NULL) <> (every_seconds IS NULL)),
    CONSTRAINT task_schedules_every_positive CHECK (every_seconds >= 1),
    CONSTRAINT task_schedules_missed_valid CHECK (missed IN ('skip', 'run_once', 'run_all')),
    CONSTRAINT task_schedules_missed_limit_valid CHECK (missed_limit BETWEEN 1 AND 10000),
    CONSTRAINT task_schedules_overlap_valid CHECK (overlap IN ('allow', 'skip')),
    CONSTRAINT task_schedules_grace_positive CHECK (grace_seconds >= 1),
    CONSTRAINT task_schedules_task_has_type CHECK (jsonb_typeof(task -> 'task_type') = 'string')
);
CREATE UNIQUE INDEX IF NOT EXISTS task_schedules_name_idx ON task_schedules (source, coalesce(owner_key_id, 0), name);
CREATE INDEX IF NOT EXISTS task_schedules_due_idx ON task_schedules (next_fire_at) WHERE NOT paused;
COMMENT ON TABLE task_schedules IS
    'Schedules (POST /api/schedules, skiplock.registry.schedule in code). SELECT name, next_fire_at FROM task_schedules '
    'WHERE NOT paused ORDER BY next_fire_at shows what fires next; task_schedule_fires what fired.';
COMMENT ON COLUMN task_schedules.id IS 'The schedule''s id (GET /api/schedules/{id}).';
COMMENT ON COLUMN task_schedules.created_at IS 'When it was made (or first declared in code).';
COMMENT ON COLUMN task_schedules.updated_at IS 'When it was last changed, paused or resumed.';
COMMENT ON COLUMN task_schedules.source IS 'api: made through the API (owned by owner_key_id); code: declared next to the task types, written by each worker at start, owned by no key.';
COMMENT ON COLUMN task_schedules.owner_key_id IS 'The API key (api_keys.id) that owns it and its tasks (they count against its quota); NULL: code, or made with auth off.';
COMMENT ON COLUMN task_schedules.name IS 'Unique per source and owner; 1-100 letters, digits or _.:-.';
COMMENT ON COLUMN task_schedules.cron IS 'A cron expression (5 fields, or 6 with seconds first) read in timezone; NULL when every_seconds is set.';
COMMENT ON COLUMN task_schedules.every_seconds IS 'Fires at the multiples of this many seconds since the Unix epoch; NULL when cron is set.';
COMMENT ON COLUMN task_schedules.timezone IS 'IANA timezone of the cron expression. A time daylight saving skips runs at the end of the gap; a repeated one runs once when the hour field is fixed.';
COMMENT ON COLUMN task_schedules.task IS 'The task each fire submits: task_type, task_input, queue, priority, max_attempts, timeout_seconds and the optional submit fields (as POST /api/tasks).';
COMMENT ON COLUMN task_schedules.missed IS 'Fire times no host made within grace_seconds: skip (recorded as missed), run_once (the latest of them runs once), run_all (each of the latest missed_limit runs).';
COMMENT ON COLUMN task_schedules.missed_limit IS 'run_all: at most this many missed fire times run; older ones are recorded as missed.';
COMMENT ON COLUMN task_schedules.overlap IS 'allow: every fire creates a task; skip: a fire while a task of this schedule is unfinished creates none (recorded as skipped).';
COMMENT ON COLUMN task_schedules.grace_seconds IS 'A fire made this late (or less) is on time; later than that it is missed. NULL: 60 s, or the gap to the next fire time when that is shorter.';
COMMENT ON COLUMN task_schedules.paused IS 'True: it does not fire (run now still works); resumed, it fires from the next time after the resume, nothing missed.';
COMMENT ON COLUMN task_schedules.next_fire_at IS 'The next fire time (database clock) of a schedule no worker has fired yet; workers fire it when now() reaches it.';
COMMENT ON COLUMN task_schedules.updated_by IS 'Who made or last changed it (a key''s prefix, skiplock-cli, a worker for code schedules).';
COMMENT ON INDEX task_schedules_pkey IS 'One row per schedule (tasks.schedule_id, task_schedule_fires.schedule_id name it).';
COMMENT ON INDEX task_schedules_name_idx IS 'One schedule per source, owner and name.';
COMMENT ON INDEX task_schedules_due_idx IS 'Serves the workers'' due check (the earliest next_fire_at) and the fire round. Partial: paused schedules are not due.';

CREATE TABLE IF NOT EXISTS task_schedule_fires (
    schedule_id   bigint      NOT NULL,
    scheduled_for timestamptz NOT NULL,
    kind          text        NOT NULL,
    outcome       text        NOT NULL,
    task_id       bigint,
    reason        text,
    missed_count  integer,
    missed_until  timestamptz,
    fired_at      timestamptz NOT NULL DEFAULT now(),
    fired_by      text,
    CONSTRAINT task_schedule_fires_pkey PRIMARY KEY (schedule_id, scheduled_for),
    CONSTRAINT task_schedule_fires_schedule_fkey FOREIGN KEY (schedule_id) REFERENCES task_schedules (id) ON DELETE CASCADE,
    CONSTRAINT task_schedule_fires_kind_valid CHECK (kind IN ('on_time', 'catch_up', 'manual', 'missed')),
    CONSTRAINT task_schedule_fires_outcome_valid CHECK (outcome IN ('created', 'deduplicated', 'skipped', 'refused', 'missed'))
);
CREATE INDEX IF NOT EXISTS task_schedule_fires_fired_at_idx ON task_schedule_fires (fired_at);
COMMENT ON TABLE task_schedule_fires IS
    'What each schedule did at each fire time: a task created (or deduplicated), skipped, refused with its reason, or missed. '
    'Pruned with the finished tasks (retention). Exactly once is kept by task_schedules.next_fire_at and this primary key, not by the history.';
COMMENT ON COLUMN task_schedule_fires.schedule_id IS 'The schedule (task_schedules.id); its fires go with it when it is deleted.';
COMMENT ON COLUMN task_schedule_fires.missed_until IS 'For a missed row: the last fire time it stands for.';
COMMENT ON COLUMN task_schedule_fires.fired_at IS 'When the fire was made (database clock).';
COMMENT ON COLUMN task_schedule_fires.scheduled_for IS 'The fire time (run now: when it was asked; missed: the first of missed_count).';
COMMENT ON COLUMN task_schedule_fires.kind IS 'on_time, catch_up (a missed time run by the missed policy), manual (run now), missed (a record of fire times not run).';
COMMENT ON COLUMN task_schedule_fires.outcome IS 'created: task_id is new; deduplicated: task_id is the unfinished task that had the unique_key; skipped: overlap skip, a task of the schedule was unfinished; refused: not created, reason says why (quota, revoked key, the database); missed.';
COMMENT ON COLUMN task_schedule_fires.task_id IS 'The task created (tasks.id, with tasks.schedule_id and scheduled_for set), or the one deduplicated to, or the unfinished one an overlap skip waited for.';
COMMENT ON COLUMN task_schedule_fires.reason IS 'Why nothing was created (skipped, refused, missed), in words.';
COMMENT ON COLUMN task_schedule_fires.missed_count IS 'For a missed row: how many fire times it stands for, from scheduled_for to missed_until (a lower bound past 1,000).';
COMMENT ON COLUMN task_schedule_fires.fired_by IS 'The worker (task_workers.worker_id) or the key''s prefix (run now) that made it.';
COMMENT ON INDEX task_schedule_fires_pkey IS 'At most one fire per schedule and time: a second fire of the same time is refused (belt and braces to next_fire_at); also a schedule''s last fires, newest first.';
COMMENT ON INDEX task_schedule_fires_fired_at_idx IS 'Serves retention (oldest first) and the fires metrics (recent ones).';

-- Secrets the API processes and hosts share, made by the first that needs one: the keys that
-- sign the dashboard's session cookies and the event streams' tokens (every gunicorn process
-- must verify what another signed).
CREATE TABLE IF NOT EXISTS api_secrets (
    name       text        NOT NULL,
    value      bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT api_secrets_pkey PRIMARY KEY (name),
    CONSTRAINT api_secrets_long_enough CHECK (length(value) >= 32)
);
COMMENT ON TABLE api_secrets IS
    'Random secrets shared by every API process (made on first use): session is the key that signs dashboard sessions (deleting it logs everyone out), stream_token the key that signs event stream tokens (deleting it voids every token not yet used).';
COMMENT ON COLUMN api_secrets.name IS 'What the secret is for (session, stream_token).';
COMMENT ON COLUMN api_secrets.value IS 'The secret: random bytes.';
COMMENT ON COLUMN api_secrets.created_at IS 'When it was made.';
COMMENT ON INDEX api_secrets_pkey IS 'One secret per name.';

-- Throughput over time, for the dashboard's charts and for people: each worker adds what it
-- finished to the row of its minute, a few times a minute. Kept a day (the prune duty).
CREATE TABLE IF NOT EXISTS task_throughput (
    minute      timestamptz      NOT NULL,
    queue       text             NOT NULL,
    task_type   text             NOT NULL,
    worker_id   text             NOT NULL,
    completed   integer          NOT NULL DEFAULT 0,
    failed      integer          NOT NULL DEFAULT 0,
    run_seconds double precision NOT NULL DEFAULT 0,
    CONSTRAINT task_throughput_pkey PRIMARY KEY (minute, queue, task_type, worker_id)
);
COMMENT ON TABLE task_throughput IS
    'Attempts that ended, per minute, queue, task type and worker (written by the workers every few seconds; kept a day). '
    'SELECT minute, sum(completed), sum(failed) FROM task_throughput GROUP BY 1 ORDER BY 1 for a chart.';
COMMENT ON COLUMN task_throughput.minute IS 'The minute (database clock, truncated) the attempts ended in.';
COMMENT ON COLUMN task_throughput.queue IS 'Their queue.';
COMMENT ON COLUMN task_throughput.task_type IS 'Their task type.';
COMMENT ON COLUMN task_throughput.worker_id IS 'The worker that ran them.';
COMMENT ON COLUMN task_throughput.completed IS 'Attempts that completed.';
COMMENT ON COLUMN task_throughput.failed IS 'Attempts that failed, timed out or crashed (retried or not).';
COMMENT ON COLUMN task_throughput.run_seconds IS 'Their run time in total (divide by completed + failed for the mean).';
COMMENT ON INDEX task_throughput_pkey IS 'One row per minute, queue, task type and worker; serves the last hour''s chart (a range of minutes).';

-- Idle workers, so that inserts NOTIFY only when someone is waiting. NOTIFY takes a global
-- lock from the insert until its commit is flushed: concurrent inserting transactions then
-- commit one at a time (half the insert rate measured here). A worker registers when a claim
-- comes back short (the queue is dry) and leaves when one comes back full: under load it keeps
-- claiming without notifications, nobody is registered and inserts do not notify.
CREATE UNLOGGED TABLE IF NOT EXISTS task_waiters (
    worker_id text PRIMARY KEY,
    pid integer NOT NULL DEFAULT pg_backend_pid(),
    backend_start timestamptz,
    since timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE task_waiters IS
    'Workers idle and waiting for NOTIFY skiplock_task_pending (one row per worker; empty while every worker is busy). '
    'Unlogged: it is soft state, rebuilt by the workers; a row whose session is gone is deleted by any worker''s rescue duty.';
COMMENT ON COLUMN task_waiters.worker_id IS 'The waiting worker (as in tasks.worker_id).';
COMMENT ON COLUMN task_waiters.pid IS 'Backend pid of the worker''s session (pg_stat_activity.pid).';
COMMENT ON COLUMN task_waiters.backend_start IS
    'When that session started (pg_stat_activity.backend_start): with pid, names the session; a row whose session is gone is stale.';
COMMENT ON COLUMN task_waiters.since IS 'When the worker last registered as waiting.';
COMMENT ON INDEX task_waiters_pkey IS 'One row per worker.';

-- Live workers, so that a dead worker's tasks are taken back at once instead of when their leases
-- lapse. Each worker holds a session-level advisory lock (lock_key) on its listening connection
-- for as long as it lives: the lock goes with the session, so when a worker's process dies (the
-- kernel closes its sockets) any other worker's rescue duty can take it (pg_try_advisory_xact_lock)
-- and knows the worker is gone, whatever role either connects as. A worker whose connections
-- were only killed reconnects and takes a new lock within dead_worker_grace; a host that vanishes
-- without closing its connections keeps its session until TCP keepalives drop it (about a lease),
-- and its leases lapse first.
CREATE TABLE IF NOT EXISTS task_workers (
    worker_id               text        NOT NULL,
    host                    text        NOT NULL,
    pid                     integer     NOT NULL,
    version                 text        NOT NULL,
    queues                  text[],
    concurrency             integer     NOT NULL,
    lease_seconds           real        NOT NULL,
    rescue_interval_seconds real        NOT NULL,
    lock_key                bigint      NOT NULL,
    session_pid             integer     NOT NULL,
    started_at              timestamptz NOT NULL DEFAULT now(),
    connected_at            timestamptz NOT NULL DEFAULT now(),
    gone_at                 timestamptz,
    CONSTRAINT task_workers_pkey PRIMARY KEY (worker_id),
    CONSTRAINT task_workers_concurrency_positive CHECK (concurrency >= 1),
    CONSTRAINT task_workers_intervals_positive CHECK (lease_seconds > 0 AND rescue_interval_seconds > 0)
);

COMMENT ON TABLE task_workers IS
    'Running workers (worker.py), one row each, written when a worker connects and deleted when it stops. '
    'A row with gone_at set is a worker whose session ended: its tasks are rescued after dead_worker_grace, and the row is deleted once it holds none.';
COMMENT ON COLUMN task_workers.worker_id IS 'The worker (host:pid:random), as in tasks.worker_id.';
COMMENT ON COLUMN task_workers.host IS 'Host name of the machine it runs on.';
COMMENT ON COLUMN task_workers.pid IS 'Process id of worker.py on that host.';
COMMENT ON COLUMN task_workers.version IS 'skiplock version it runs.';
COMMENT ON COLUMN task_workers.queues IS 'Queues it claims from; NULL for every queue.';
COMMENT ON COLUMN task_workers.concurrency IS 'Task processes it runs (how many tasks can run at once).';
COMMENT ON COLUMN task_workers.lease_seconds IS 'Lease it takes on each task (renewed every third of it).';
COMMENT ON COLUMN task_workers.rescue_interval_seconds IS 'How often it looks for tasks to rescue (task_invariant_violations allows this much past a lease).';
COMMENT ON COLUMN task_workers.lock_key IS
    'Session-level advisory lock (pg_advisory_lock(lock_key)) its listening connection holds while it lives; free means its session is gone.';
COMMENT ON COLUMN task_workers.session_pid IS 'Backend pid of the session holding the lock (pg_stat_activity.pid).';
COMMENT ON COLUMN task_workers.started_at IS 'When it first registered.';
COMMENT ON COLUMN task_workers.connected_at IS 'When it last (re)connected and took its lock.';
COMMENT ON COLUMN task_workers.gone_at IS 'When another worker first found its lock free (its session ended); NULL while it lives.';
COMMENT ON INDEX task_workers_pkey IS 'One row per worker.';
-- Databases made before workers recorded what they serve get the column here.
ALTER TABLE task_workers ADD COLUMN IF NOT EXISTS task_types text[];
COMMENT ON COLUMN task_workers.task_types IS 'Task types it runs (its registry: built-in ones and SKIPLOCK_TASK_MODULES); a due task of a type no live worker runs waits forever (task_unserved_counts, skiplock health). NULL: a worker from before this column, counted as running every type.';
-- What a worker has handed to its task processes, written (committed) before it hands anything
-- over: the record that survives the worker, so that whatever dies when, an attempt that may have
-- started is never taken for one that did not (rescue, cancel, a pause or a limit's release read it).
ALTER TABLE task_workers ADD COLUMN IF NOT EXISTS in_hand bigint[];
ALTER TABLE task_workers ADD COLUMN IF NOT EXISTS in_hand_attempts integer[];
ALTER TABLE task_workers ADD COLUMN IF NOT EXISTS in_hand_at timestamptz;
COMMENT ON COLUMN task_workers.in_hand IS
    'Ids of the tasks it has handed to its task processes and whose outcomes it has not yet stored (their attempts: in_hand_attempts, position by position). '
    'Written before each hand-over: an attempt listed here may have started even while tasks.started_at is NULL '
    '(a short task''s start is stored with its outcome). Short tasks go to a process in batches of up to 20 ms of work, the next one '
    'shortly before the current one ends, so when the worker dies the tasks its processes had not reached yet are counted as started too. Entries of attempts that ended are stale and harmless. '
    'SELECT * FROM unnest(in_hand, in_hand_attempts) lists them.';
COMMENT ON COLUMN task_workers.in_hand_attempts IS 'The attempt number of each task in in_hand, at the same position.';
-- Rewritten by each hand-over (a few per second per worker while it drains short tasks): kept
-- inline up to a page rather than compressed and moved to TOAST at 2 kB (measured: 0.7 ms instead
-- of 1.6 ms for a record of 233 tasks).
ALTER TABLE task_workers SET (toast_tuple_target = 8160);
COMMENT ON COLUMN task_workers.in_hand_at IS 'When in_hand was written: a listed attempt started at the latest when the worker died or was cut off, and at the earliest about this long before.';

-- When the given attempt was handed to a task process, if its worker says it was (in_hand); NULL
-- otherwise. coalesce(tasks.started_at, this) is what rescues and cancellations take for its start.
CREATE OR REPLACE FUNCTION skiplock_handed_at(holder text, task_id bigint, attempt integer) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT least(w.in_hand_at, now()) FROM task_workers w  -- never after the reader's own now()
    WHERE w.worker_id = holder AND w.in_hand_attempts[array_position(w.in_hand, task_id)] = attempt
$$;
COMMENT ON FUNCTION skiplock_handed_at(text, bigint, integer) IS
    'When worker `holder` last recorded attempt `attempt` of task `task_id` as handed to a task process (task_workers.in_hand_at), or NULL if it has not: '
    'a processing attempt with started_at NULL and this NULL has certainly not started. '
    'Read it in a statement after the one that locked the task row FOR UPDATE: a hand-over in flight (it locks the row FOR KEY SHARE) is then committed and seen.';

-- Clients waiting on a task (a long-poll, an event stream), so that a statement changing a task
-- NOTIFYs skiplock_task_changed only when someone waits on it: NOTIFY serializes commits, and
-- nobody waits on most tasks. Each API process registers the tasks its clients wait on, once per
-- task, and fans one notification out to all of them.
CREATE UNLOGGED TABLE IF NOT EXISTS task_watchers (
    task_id bigint      NOT NULL,
    watcher text        NOT NULL,
    since   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT task_watchers_pkey PRIMARY KEY (task_id, watcher)
);
COMMENT ON TABLE task_watchers IS
    'Tasks some client waits on right now (a long-poll or an event stream), per API process. Statements that change a task NOTIFY skiplock_task_changed with its id only if it is here. '
    'Unlogged: soft state; rows older than the longest wait are deleted by the workers'' rescue duty.';
COMMENT ON COLUMN task_watchers.task_id IS 'The task waited on.';
COMMENT ON COLUMN task_watchers.watcher IS 'The API process whose clients wait (host:pid).';
COMMENT ON COLUMN task_watchers.since IS 'When it started waiting (refreshed while it waits).';
COMMENT ON INDEX task_watchers_pkey IS 'One row per task and API process; serves the announcement of changes (by task id).';

-- Wake idle workers when tasks arrive: once per INSERT statement (a batch notifies once), only
-- if a worker waits. Also fires for rows a DBA inserts by hand. Workers poll as a fallback.
--
-- No lost wake-up: the shared advisory lock is held until the insert commits. A worker going
-- idle registers (committed), then takes the same key exclusively (pg_try_advisory_xact_lock,
-- never waiting) before its last claim: if it gets the key, every insert that did not see its
-- row has committed and the claim sees the tasks; if not, it tries again shortly.
CREATE OR REPLACE FUNCTION tasks_notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('skiplock.task_waiters'));
    -- Outside READ COMMITTED the check would read the transaction's old snapshot and could
    -- miss a worker that registered since: notify unconditionally there (rare: DBA sessions).
    IF current_setting('transaction_isolation') <> 'read committed'
       OR EXISTS (SELECT FROM task_waiters) THEN
        PERFORM pg_notify('skiplock_task_pending', '');
    END IF;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION tasks_notify_inserted() IS
    'NOTIFY skiplock_task_pending once per statement that inserts tasks, if a worker waits (task_waiters); '
    'holds advisory key hashtext(''skiplock.task_waiters'') shared until commit (see schema.sql).';

CREATE OR REPLACE TRIGGER tasks_notify_inserted
    AFTER INSERT ON tasks FOR EACH STATEMENT EXECUTE FUNCTION tasks_notify_inserted();
COMMENT ON TRIGGER tasks_notify_inserted ON tasks IS 'Wakes waiting workers (channel skiplock_task_pending).';

-- Fair shares: where a flow's new runnable tasks start (weighted fair queueing; see tasks.turn).
-- A flow is an owner's tasks in one queue and priority with one fairness key ('' for none). Its
-- new tasks take turns base + spacing, base + 2 * spacing, ...: base is the flow's last due
-- task's turn (runnable or waiting on a limit), but never before the queue's lowest runnable
-- turn (its head: a newcomer is not put behind another owner's backlog, and a flow whose tasks
-- waited on a limit does not jump the queue), else the priority's lowest in any queue; spacing is the number of the owner's fairness keys runnable there (with batch_keys, the
-- keys a batch brings) over its weight (given, else read from api_keys). Index probes only, and
-- only those needed (COALESCE and CASE stop at the first answer): a flow with runnable tasks and
-- no fairness key costs two (its last task, its highest key: its last task being runnable, the
-- queue's head cannot be after it; its key being '' and taken, no key sorts before it). A single
-- SELECT, so the planner inlines it into the calling statement.
--
-- The spacing's rare case (the owner has several fairness keys runnable, or a batch brings keys):
-- a function of its own, not inlined, so the common statement's plan does not carry it (its
-- executor set-up was a measurable part of every submit).
CREATE OR REPLACE FUNCTION task_turn_keys(
    owner bigint, queue text, priority integer, fairness_key text, batch_keys text[], lo text, hi text)
RETURNS bigint LANGUAGE sql STABLE AS $$
SELECT CASE
    WHEN lo IS NULL OR lo = hi THEN  -- at most one key runnable: count it with the new ones
        (SELECT count(DISTINCT k) FROM unnest(batch_keys || fairness_key || lo) AS k WHERE k IS NOT NULL)
    ELSE  -- several keys runnable: a skip scan of them, capped at 64
        (SELECT count(*) FROM (
            (WITH RECURSIVE keys AS (
                SELECT lo AS k, 1 AS n
                UNION ALL
                SELECT (SELECT coalesce(t.fairness_key, '') FROM tasks t
                        WHERE t.status = 'pending' AND t.turn IS NOT NULL
                          AND coalesce(t.owner_key_id, 0) = task_turn_keys.owner
                          AND t.queue = task_turn_keys.queue AND t.priority = task_turn_keys.priority
                          AND coalesce(t.fairness_key, '') > keys.k
                        ORDER BY coalesce(t.fairness_key, '') LIMIT 1), keys.n + 1
                FROM keys WHERE keys.k IS NOT NULL AND keys.n < 64)
             SELECT k FROM keys WHERE k IS NOT NULL)
            UNION
            SELECT unnest(batch_keys || fairness_key)) AS every_key)
END
$$;
DROP FUNCTION IF EXISTS task_turn_start(bigint, text, integer, text, text[]);
CREATE OR REPLACE FUNCTION task_turn_start(
    owner bigint, queue text, priority integer, fairness_key text,
    batch_keys text[] DEFAULT '{}', weight real DEFAULT NULL)
RETURNS TABLE (base double precision, spacing double precision)
LANGUAGE sql STABLE AS $$
SELECT
    CASE WHEN last.runnable THEN last.turn  -- the queue's head is at or before it
    ELSE greatest(
        last.turn,
        coalesce(
            (SELECT t.turn FROM tasks t
             WHERE t.status = 'pending' AND t.turn IS NOT NULL AND t.waiting_on IS NULL
               AND t.queue = task_turn_start.queue AND t.priority = task_turn_start.priority
             ORDER BY t.priority DESC, t.turn LIMIT 1),
            (SELECT t.turn FROM tasks t
             WHERE t.status = 'pending' AND t.turn IS NOT NULL AND t.waiting_on IS NULL
               AND t.priority = task_turn_start.priority
             ORDER BY t.priority DESC, t.turn LIMIT 1),
            0))
    END,
    (SELECT CASE
         WHEN (m.lo IS NULL OR m.lo = task_turn_start.fairness_key) AND m.lo IS NOT DISTINCT FROM m.hi
              AND cardinality(task_turn_start.batch_keys) = 0 THEN 1
         ELSE task_turn_keys(task_turn_start.owner, task_turn_start.queue, task_turn_start.priority,
                             task_turn_start.fairness_key, task_turn_start.batch_keys, m.lo, m.hi)
     END
     FROM (SELECT
         CASE WHEN task_turn_start.fairness_key = '' AND last.turn IS NOT NULL THEN ''
         ELSE (SELECT coalesce(t.fairness_key, '') FROM tasks t
               WHERE t.status = 'pending' AND t.turn IS NOT NULL
                 AND coalesce(t.owner_key_id, 0) = task_turn_start.owner AND t.queue = task_turn_start.queue
                 AND t.priority = task_turn_start.priority
               ORDER BY coalesce(t.fairness_key, '') LIMIT 1) END AS lo,
         (SELECT coalesce(t.fairness_key, '') FROM tasks t
          WHERE t.status = 'pending' AND t.turn IS NOT NULL
            AND coalesce(t.owner_key_id, 0) = task_turn_start.owner AND t.queue = task_turn_start.queue
            AND t.priority = task_turn_start.priority
          ORDER BY coalesce(t.fairness_key, '') DESC LIMIT 1) AS hi
         OFFSET 0) m)
    / coalesce(task_turn_start.weight,
               CASE WHEN task_turn_start.owner <> 0
                    THEN (SELECT k.weight FROM api_keys k WHERE k.id = task_turn_start.owner) END,
               1)
FROM (SELECT 1) one
LEFT JOIN LATERAL (
    SELECT t.turn, t.waiting_on IS NULL AS runnable FROM tasks t
    WHERE t.status = 'pending' AND t.turn IS NOT NULL
      AND coalesce(t.owner_key_id, 0) = task_turn_start.owner AND t.queue = task_turn_start.queue
      AND t.priority = task_turn_start.priority
      AND coalesce(t.fairness_key, '') = task_turn_start.fairness_key
    ORDER BY t.turn DESC LIMIT 1) last ON true
$$;
COMMENT ON FUNCTION task_turn_keys(bigint, text, integer, text, text[], text, text) IS
    'Fair shares, for task_turn_start: how many fairness keys a flow''s owner has runnable in a queue and priority, with the new ones (lo, hi: its lowest and highest runnable key).';
COMMENT ON FUNCTION task_turn_start(bigint, text, integer, text, text[], real) IS
    'Fair shares: the base turn and the spacing of a flow''s new runnable tasks (owner 0 for none, fairness_key '''' for none). Used by submit and admission; also for rows inserted by hand.';

-- Views for people, not for the hot path (they scan).
CREATE OR REPLACE VIEW task_queue_summary AS
SELECT queue,
       task_type,
       count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS due,
       count(*) FILTER (WHERE status = 'pending' AND run_at > now())  AS scheduled,
       count(*) FILTER (WHERE status = 'processing')                  AS processing,
       count(*) FILTER (WHERE status = 'completed')                   AS completed,
       count(*) FILTER (WHERE status = 'failed')                      AS failed,
       count(*) FILTER (WHERE status = 'cancelled')                   AS cancelled,
       now() - min(run_at) FILTER (WHERE status = 'pending' AND run_at <= now()) AS oldest_due_wait,
       count(*) FILTER (WHERE status::text = 'expired')               AS expired,
       count(*) FILTER (WHERE status = 'pending' AND waiting_on IS NOT NULL) AS waiting_on_limit
FROM tasks
GROUP BY queue, task_type;
COMMENT ON VIEW task_queue_summary IS
    'Per queue and task type: how many tasks are due, scheduled for later, running and finished, and how long the oldest due task has waited. Scans tasks.';

CREATE OR REPLACE VIEW tasks_running AS
SELECT id, task_type, queue, worker_id, attempts, max_attempts, progress, started_at,
       now() - started_at          AS running_for,
       lease_expires_at,
       lease_expires_at < now()    AS lease_expired,
       started_at IS NOT NULL      AS started,
       started_at IS NOT NULL OR skiplock_handed_at(worker_id, id, attempts) IS NOT NULL AS in_process
FROM tasks
WHERE status = 'processing';
COMMENT ON COLUMN task_queue_summary.due IS 'Pending tasks whose run_at has come: waiting for a free worker.';
COMMENT ON COLUMN task_queue_summary.scheduled IS 'Pending tasks whose run_at is in the future (delayed, or in retry backoff).';
COMMENT ON COLUMN task_queue_summary.processing IS 'Tasks a worker holds now.';
COMMENT ON COLUMN task_queue_summary.completed IS 'Tasks finished with a result.';
COMMENT ON COLUMN task_queue_summary.failed IS 'Tasks that ran out of attempts.';
COMMENT ON COLUMN task_queue_summary.cancelled IS 'Tasks cancelled by a client.';
COMMENT ON COLUMN task_queue_summary.expired IS 'Tasks that expired before they started.';
COMMENT ON COLUMN task_queue_summary.waiting_on_limit IS 'Due tasks waiting for a concurrency or rate limit (see task_limit_usage).';
COMMENT ON COLUMN task_queue_summary.oldest_due_wait IS 'How long the longest-waiting due task has waited since its run_at.';
COMMENT ON COLUMN tasks_running.running_for IS 'Time since the current attempt started; NULL while it waits in its worker to start.';
COMMENT ON COLUMN tasks_running.started IS 'Its start is stored (started_at): it has run at least 10 ms. False while it waits in its worker, and while a short task runs (its start is stored with its outcome).';
COMMENT ON COLUMN tasks_running.in_process IS 'Started, or handed to a task process (task_workers.in_hand): counted as started if its worker dies now. False: it waits in its worker and goes back uncounted if the worker goes first.';
COMMENT ON COLUMN tasks_running.lease_expired IS 'True when the holder missed its renewal: the task will be rescued.';

COMMENT ON VIEW tasks_running IS
    'Tasks being processed now (started, or claimed and waiting in their worker to start), who holds them and whether their lease has lapsed (lease_expired rows are rescued by the next worker that checks).';

-- What holds each limit's slots now, counted in one pass (few rows: tasks_limited_idx,
-- tasks_processing_idx) and grouped three ways: read by task_limit_usage and by the workers'
-- admission (skiplock/sql/admission.py), so that what holds a slot is written once. Counted per
-- limit, the slots took a scan a limit: 1,000 limits took 600 ms, and the planner, which cannot
-- know how few rows a never-analyzed task_limits holds, costed those scans at over a million on
-- a big tasks table: enough for Postgres to JIT-compile the self-audit that reads
-- task_limit_usage (0.9 s a run instead of 4 ms).
CREATE OR REPLACE VIEW task_limit_held AS
WITH holding AS (
    SELECT coalesce(t.owner_key_id, 0) AS owner, t.concurrency_key, t.task_type, t.queue FROM tasks t
    WHERE (t.limited AND t.turn IS NOT NULL AND t.status IN ('pending', 'processing'))
       OR t.status = 'processing'
)
SELECT 'key' AS scope, owner AS owner_key_id, concurrency_key AS name, count(*) AS running
FROM holding WHERE concurrency_key IS NOT NULL GROUP BY owner, concurrency_key
UNION ALL
SELECT 'type', 0, task_type, count(*) FROM holding GROUP BY task_type
UNION ALL
SELECT 'queue', 0, queue, count(*) FROM holding GROUP BY queue;
COMMENT ON VIEW task_limit_held IS
    'Per limit that could hold tasks (scope, owner_key_id, name as in task_limits; 0 for no owner): how many tasks hold a slot now: processing, or admitted under a limit and waiting for a worker. A row per concurrency key, task type and queue with such tasks, limited or not.';

-- Limits for people: each with what holds its slots now (task_limit_held) and what waits for it,
-- per limit (tasks_waiting_idx leads with waiting_on).
CREATE OR REPLACE VIEW task_limit_usage AS
SELECT l.scope, l.owner_key_id, l.name, l.max_running, l.max_starts_per_second, l.burst,
       coalesce(h.running, 0) AS running,
       (SELECT count(*) FROM tasks t
        WHERE t.status = 'pending'
          AND t.waiting_on = CASE l.scope WHEN 'key' THEN 'key:' || l.owner_key_id || ':' || l.name
                                          ELSE l.scope || ':' || l.name END) AS waiting,
       l.updated_at, l.updated_by
FROM task_limits l
LEFT JOIN task_limit_held h ON h.scope = l.scope AND h.owner_key_id = l.owner_key_id AND h.name = l.name;
COMMENT ON VIEW task_limit_usage IS
    'Per limit (task_limits): its caps, how many of its tasks hold a slot now (running: admitted and runnable, or processing) and how many wait for one.';
COMMENT ON COLUMN task_limit_usage.running IS 'Tasks holding a slot: processing, or admitted under the limit and waiting for a worker. Never above max_running, except after the limit was lowered below what was already running.';
COMMENT ON COLUMN task_limit_usage.waiting IS 'Due tasks waiting for a slot or a start token of this limit.';

-- The queue's invariants, checked where they can break: tasks processing now (few, through
-- tasks_processing_idx) and tasks finished in the last 10 minutes (through tasks_finished_idx).
-- Older finished rows were checked while they were recent, so the cost does not grow with the
-- table: run it every minute. Each row is one broken invariant of one task; empty is healthy.
CREATE OR REPLACE VIEW task_invariant_violations AS
WITH slack AS (
    -- Past its lease, a task waits at most one rescue interval (of the slowest worker).
    SELECT make_interval(secs => coalesce(max(rescue_interval_seconds), 5) + 1) AS rescue
    FROM task_workers
), checked AS (
    SELECT id, status, attempts, result, lease_expires_at, worker_id, owner_key_id
    FROM tasks WHERE status = 'processing'
    UNION ALL
    SELECT id, status, attempts, result, lease_expires_at, worker_id, owner_key_id
    FROM tasks WHERE finished_at IS NOT NULL AND finished_at > now() - interval '10 minutes'
), history AS (
    SELECT c.*, h.charged, h.completions
    FROM checked c
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE a.outcome::text NOT IN ('handed_back', 'released')) AS charged,
               count(*) FILTER (WHERE a.outcome::text = 'completed') AS completions
        FROM task_attempts a WHERE a.task_id = c.id
    ) h
)
SELECT id AS task_id, status::text AS status, 'lease_lapsed' AS invariant,
       format('processing %s past its lease (worker %s): a rescue is overdue',
              date_trunc('second', now() - lease_expires_at), worker_id) AS detail
FROM history, slack
WHERE status = 'processing' AND lease_expires_at < now() - slack.rescue
UNION ALL
SELECT id, status::text, 'attempts_mismatch',
       format('attempts = %s but task_attempts charges %s%s', attempts, charged,
              CASE WHEN status = 'processing' THEN ' (plus the current one)' ELSE '' END)
FROM history
WHERE attempts <> charged + CASE WHEN status = 'processing' THEN 1 ELSE 0 END
UNION ALL
SELECT id, status::text, 'several_completions', format('%s completed attempts', completions)
FROM history WHERE completions > 1
UNION ALL
SELECT id, status::text, 'result_not_completed', 'a result on a task that is not completed'
FROM history WHERE result IS NOT NULL AND status <> 'completed'
UNION ALL
SELECT id, status::text, 'final_with_lease', format('%s but still leased to %s', status, worker_id)
FROM history WHERE status <> 'processing' AND lease_expires_at IS NOT NULL
UNION ALL
SELECT id, status::text, 'unknown_owner', format('owner_key_id %s is no API key', owner_key_id)
FROM history h
WHERE owner_key_id IS NOT NULL AND NOT EXISTS (SELECT FROM api_keys k WHERE k.id = h.owner_key_id)
UNION ALL
SELECT NULL, NULL, 'limit_exceeded',
       format('%s limit %s%s: %s running, max_running %s', u.scope, u.name,
              CASE WHEN u.scope = 'key' THEN format(' of key %s', u.owner_key_id) ELSE '' END,
              u.running, u.max_running)
FROM task_limit_usage u
WHERE u.running > u.max_running AND u.updated_at < now() - interval '1 minute';
COMMENT ON VIEW task_invariant_violations IS
    'Self-audit: one row per broken invariant of a task processing now or finished in the last 10 minutes (cheap: run it every minute). Empty when healthy.';
COMMENT ON COLUMN task_invariant_violations.task_id IS 'The task (tasks.id).';
COMMENT ON COLUMN task_invariant_violations.status IS 'Its status now.';
COMMENT ON COLUMN task_invariant_violations.invariant IS
    'Which one: lease_lapsed (processing past its lease plus a rescue interval), attempts_mismatch (tasks.attempts differs from the charged rows of task_attempts), '
    'several_completions (more than one completed attempt), result_not_completed, final_with_lease, unknown_owner (owner_key_id names no API key), '
    'limit_exceeded (more tasks hold slots of a limit than it allows, a minute after it was last set; task_id NULL).';
COMMENT ON COLUMN task_invariant_violations.detail IS 'What was found, in words.';

-- The queue's health in one row, for people, /metrics and the dashboard: cheap (statistics views,
-- a few index probes), so it may be read every few seconds.
CREATE OR REPLACE VIEW task_health AS
WITH RECURSIVE levels AS (
    -- The oldest due task: per distinct priority, the first entry of tasks_claim_idx.
    (SELECT priority FROM tasks WHERE status = 'pending' AND turn IS NOT NULL AND waiting_on IS NULL
     ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT t.priority FROM tasks t
            WHERE t.status = 'pending' AND t.turn IS NOT NULL AND t.waiting_on IS NULL
              AND t.priority < levels.priority
            ORDER BY t.priority DESC LIMIT 1)
    FROM levels WHERE levels.priority IS NOT NULL
), oldest_due AS (
    -- the head of each priority in claim order (tasks_runnable_idx), and the earliest scheduled
    SELECT least(min(first.run_at),
                 (SELECT min(t.run_at) FROM tasks t WHERE t.status = 'pending' AND t.turn IS NULL)) AS run_at
    FROM levels
    CROSS JOIN LATERAL (
        SELECT t.run_at FROM tasks t
        WHERE t.status = 'pending' AND t.turn IS NOT NULL AND t.waiting_on IS NULL
          AND t.priority = levels.priority
        ORDER BY t.priority DESC, t.turn LIMIT 1
    ) first
), holder AS (
    -- The session whose snapshot holds back vacuum the longest (this one aside).
    SELECT pid, usename, application_name, state, xact_start, age(backend_xmin) AS xmin_age
    FROM pg_stat_activity
    WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
    ORDER BY age(backend_xmin) DESC LIMIT 1
)
SELECT
    (SELECT round(n_dead_tup::numeric / greatest(1, n_live_tup + n_dead_tup), 4)
     FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass) AS tasks_dead_tuple_share,
    (SELECT greatest(last_autovacuum, last_vacuum) FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass)
        AS tasks_last_vacuum,
    (SELECT round(n_dead_tup::numeric / greatest(1, n_live_tup + n_dead_tup), 4)
     FROM pg_stat_user_tables WHERE relid = 'task_attempts'::regclass) AS attempts_dead_tuple_share,
    (SELECT greatest(last_autovacuum, last_vacuum) FROM pg_stat_user_tables WHERE relid = 'task_attempts'::regclass)
        AS attempts_last_vacuum,
    (SELECT now() - xact_start FROM holder) AS oldest_transaction_age,
    (SELECT xmin_age FROM holder) AS oldest_transaction_xmin_age,
    (SELECT pid FROM holder) AS oldest_transaction_pid,
    (SELECT format('%s (%s, %s)', usename, coalesce(nullif(application_name, ''), '?'), state) FROM holder)
        AS oldest_transaction_holder,
    (SELECT max(age(xmin)) FROM pg_replication_slots WHERE xmin IS NOT NULL) AS replication_slot_xmin_age,
    pg_notification_queue_usage() AS notification_queue_usage,
    (SELECT count(*) FROM tasks WHERE status = 'processing' AND lease_expires_at < now()) AS lapsed_leases,
    (SELECT now() - run_at FROM oldest_due WHERE run_at <= now()) AS oldest_due_wait,
    (SELECT count(*) FROM task_workers WHERE gone_at IS NULL) AS workers;
COMMENT ON VIEW task_health IS
    'One row: how the queue''s tables, vacuum, notifications, leases and backlog are doing. Cheap (statistics and index probes): read it every few seconds.';
COMMENT ON COLUMN task_health.tasks_dead_tuple_share IS 'Dead row versions in tasks, as a share of all (statistics): high means vacuum is behind, and claims walk over dead entries.';
COMMENT ON COLUMN task_health.tasks_last_vacuum IS 'When tasks was last vacuumed (auto or by hand).';
COMMENT ON COLUMN task_health.attempts_dead_tuple_share IS 'The same for task_attempts.';
COMMENT ON COLUMN task_health.attempts_last_vacuum IS 'The same for task_attempts.';
COMMENT ON COLUMN task_health.oldest_transaction_age IS 'Age of the transaction whose snapshot holds back vacuum the longest (NULL if none): minutes here mean dead rows pile up.';
COMMENT ON COLUMN task_health.oldest_transaction_xmin_age IS 'How many transaction ids its snapshot holds back.';
COMMENT ON COLUMN task_health.oldest_transaction_pid IS 'Its backend (pg_stat_activity.pid; pg_terminate_backend ends it).';
COMMENT ON COLUMN task_health.oldest_transaction_holder IS 'Who holds it: user (application, state).';
COMMENT ON COLUMN task_health.replication_slot_xmin_age IS 'Transaction ids held back by the oldest replication slot, if any (a stale slot also stops vacuum).';
COMMENT ON COLUMN task_health.notification_queue_usage IS 'pg_notification_queue_usage(): the share of the NOTIFY queue in use (near 1, NOTIFY fails).';
COMMENT ON COLUMN task_health.lapsed_leases IS 'Tasks processing past their lease (a rescue is due; persistently above 0 means no worker rescues).';
COMMENT ON COLUMN task_health.oldest_due_wait IS 'How long the task that has waited longest for a worker has waited since its run_at (NULL: none due).';
COMMENT ON COLUMN task_health.workers IS 'Workers alive (task_workers without gone_at).';

-- Webhooks. A task submitted with a callback_url gets a delivery (the outbox) in the very
-- statement that makes it final: no final state without its delivery, no delivery without a
-- final state. Workers send deliveries from a thread of their own, off the claim path; each try
-- is recorded in webhook_attempts. Signed per Standard Webhooks (webhook-id, webhook-timestamp,
-- webhook-signature: HMAC-SHA256) with the secret given at submit, else the key's.
DO $$
BEGIN
    CREATE TYPE webhook_delivery_status AS ENUM ('pending', 'delivered', 'dead');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

COMMENT ON TYPE webhook_delivery_status IS
    'State of a webhook delivery. pending: to be sent (next_attempt_at), possibly after failed tries; '
    'delivered: the receiver answered 2xx; dead: every allowed try failed (POST /api/webhooks/{id}/resend sends it again).';

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id               bigint                  GENERATED ALWAYS AS IDENTITY,
    task_id          bigint,
    workflow_id      bigint,
    owner_key_id     bigint,
    url              text                    NOT NULL,
    event            text                    NOT NULL,
    payload          jsonb                   NOT NULL,
    status           webhook_delivery_status NOT NULL DEFAULT 'pending',
    attempts         integer                 NOT NULL DEFAULT 0,
    max_attempts     integer,
    next_attempt_at  timestamptz             NOT NULL DEFAULT now(),
    sender           text,
    created_at       timestamptz             NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_status_code integer,
    last_error       text,
    CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (id),
    CONSTRAINT webhook_deliveries_task_fkey FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_workflow_fkey FOREIGN KEY (workflow_id) REFERENCES workflows (id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_one_subject CHECK ((task_id IS NULL) <> (workflow_id IS NULL)),
    CONSTRAINT webhook_deliveries_event_valid CHECK (event IN ('task.completed', 'task.failed', 'task.cancelled', 'task.expired',
                                                             'workflow.completed', 'workflow.failed', 'workflow.cancelled')),
    CONSTRAINT webhook_deliveries_delivered_iff_delivered_at CHECK ((status = 'delivered') = (delivered_at IS NOT NULL))
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'webhook_deliveries'::regclass
                   AND conname = 'webhook_deliveries_event_valid'
                   AND pg_get_constraintdef(oid) LIKE '%workflow.cancelled%') THEN
        ALTER TABLE webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_event_valid;
        ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_event_valid
            CHECK (event IN ('task.completed', 'task.failed', 'task.cancelled', 'task.expired',
                             'workflow.completed', 'workflow.failed', 'workflow.cancelled'));
    END IF;
    -- Workflows' webhooks (a delivery reports a task or a workflow).
    ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS workflow_id bigint;
    ALTER TABLE webhook_deliveries ALTER COLUMN task_id DROP NOT NULL;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'webhook_deliveries'::regclass
                   AND conname = 'webhook_deliveries_workflow_fkey') THEN
        ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_workflow_fkey
            FOREIGN KEY (workflow_id) REFERENCES workflows (id) ON DELETE CASCADE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'webhook_deliveries'::regclass
                   AND conname = 'webhook_deliveries_one_subject') THEN
        ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_one_subject
            CHECK ((task_id IS NULL) <> (workflow_id IS NULL));
    END IF;
END $$;
COMMENT ON TABLE webhook_deliveries IS
    'One row per webhook to send: a task that became final with a callback_url (the outbox). Deleted with its task (retention). '
    'SELECT status, count(*) FROM webhook_deliveries GROUP BY 1 for a summary; WHERE status = ''dead'' for the dead letters.';
COMMENT ON COLUMN webhook_deliveries.id IS 'Delivery id; the webhook-id header is ''msg_'' || id, the same on every try.';
COMMENT ON COLUMN webhook_deliveries.task_id IS 'The task it reports (NULL for a workflow''s).';
COMMENT ON COLUMN webhook_deliveries.workflow_id IS 'The workflow it reports (workflows.id; NULL for a task''s): sent once, when every task of the workflow is final.';
COMMENT ON COLUMN webhook_deliveries.owner_key_id IS 'The task''s owner (tasks.owner_key_id): its secret signs when the task has none of its own.';
COMMENT ON COLUMN webhook_deliveries.url IS 'Where it is POSTed (tasks.callback_url then).';
COMMENT ON COLUMN webhook_deliveries.event IS 'task.completed, task.failed, task.cancelled or task.expired; workflow.completed, workflow.failed or workflow.cancelled.';
COMMENT ON COLUMN webhook_deliveries.payload IS 'The JSON body, fixed when the task became final: {type, timestamp, data: the task as task-status shows it}.';
COMMENT ON COLUMN webhook_deliveries.status IS 'See type webhook_delivery_status.';
COMMENT ON COLUMN webhook_deliveries.attempts IS 'Tries started so far (see webhook_attempts).';
COMMENT ON COLUMN webhook_deliveries.max_attempts IS 'Tries allowed before it is dead; NULL: the workers'' SKIPLOCK_WEBHOOK_MAX_ATTEMPTS. A resend allows that many more.';
COMMENT ON COLUMN webhook_deliveries.next_attempt_at IS 'When it is due: now for a new one, after the backoff for a retry; while a worker sends it, the end of that worker''s lease on it (a worker that dies mid-send leaves it due again then).';
COMMENT ON COLUMN webhook_deliveries.sender IS 'The worker sending it (or that last sent it).';
COMMENT ON COLUMN webhook_deliveries.created_at IS 'When the task became final.';
COMMENT ON COLUMN webhook_deliveries.delivered_at IS 'When the receiver answered 2xx.';
COMMENT ON COLUMN webhook_deliveries.last_status_code IS 'HTTP status of the latest try (NULL: no answer).';
COMMENT ON COLUMN webhook_deliveries.last_error IS 'Why the latest try failed (NULL after a success).';
COMMENT ON INDEX webhook_deliveries_pkey IS 'By id (resend, the webhook-id).';

-- The senders' claim: due deliveries only (delivered and dead ones never enter the index).
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
COMMENT ON INDEX webhook_deliveries_due_idx IS 'Serves the senders'' claim of due deliveries, oldest due first.';
CREATE INDEX IF NOT EXISTS webhook_deliveries_task_idx ON webhook_deliveries (task_id);
COMMENT ON INDEX webhook_deliveries_task_idx IS 'A task''s deliveries (GET /api/tasks/{id}/webhooks), and the cascade when tasks are pruned.';

CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id bigint      NOT NULL,
    attempt     integer     NOT NULL,
    sender      text        NOT NULL,
    started_at  timestamptz NOT NULL,
    latency_ms  real,
    status_code integer,
    error       text,
    CONSTRAINT webhook_attempts_pkey PRIMARY KEY (delivery_id, attempt),
    CONSTRAINT webhook_attempts_delivery_fkey FOREIGN KEY (delivery_id)
        REFERENCES webhook_deliveries (id) ON DELETE CASCADE
);
COMMENT ON TABLE webhook_attempts IS 'Every try of every webhook delivery: who sent it, how long the receiver took, what it answered.';
COMMENT ON COLUMN webhook_attempts.delivery_id IS 'The delivery (webhook_deliveries.id).';
COMMENT ON COLUMN webhook_attempts.attempt IS 'Which try (1, 2, ...).';
COMMENT ON COLUMN webhook_attempts.sender IS 'The worker that sent it.';
COMMENT ON COLUMN webhook_attempts.started_at IS 'When the try began.';
COMMENT ON COLUMN webhook_attempts.latency_ms IS 'Milliseconds until the answer (or the failure).';
COMMENT ON COLUMN webhook_attempts.status_code IS 'HTTP status of the answer; NULL if there was none (refused, timed out, the sender died).';
COMMENT ON COLUMN webhook_attempts.error IS 'Why the try failed; NULL on a 2xx.';
COMMENT ON INDEX webhook_attempts_pkey IS 'A delivery''s tries in order.';

-- Signing secrets (Standard Webhooks "whsec_" + base64): one per API key (0: submitted with
-- auth off), made on first use; a task submitted with callback_secret has its own.
CREATE TABLE IF NOT EXISTS webhook_secrets (
    owner_key_id bigint      NOT NULL,
    secret       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_secrets_pkey PRIMARY KEY (owner_key_id)
);
COMMENT ON TABLE webhook_secrets IS 'The secret that signs a key''s webhooks (GET /api/webhooks/secret shows it to the key). Secret: grant it to nobody else.';
COMMENT ON COLUMN webhook_secrets.owner_key_id IS 'api_keys.id; 0 for tasks submitted with auth off.';
COMMENT ON COLUMN webhook_secrets.secret IS 'whsec_ + base64 of 32 random bytes.';
COMMENT ON COLUMN webhook_secrets.created_at IS 'When it was made.';
COMMENT ON INDEX webhook_secrets_pkey IS 'One secret per key.';

CREATE TABLE IF NOT EXISTS task_callback_secrets (
    task_id bigint NOT NULL,
    secret  text   NOT NULL,
    CONSTRAINT task_callback_secrets_pkey PRIMARY KEY (task_id),
    CONSTRAINT task_callback_secrets_task_fkey FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
COMMENT ON TABLE task_callback_secrets IS 'callback_secret given at submit: it signs this task''s webhooks instead of the key''s secret. Deleted with the task. Secret: grant it to nobody else.';
COMMENT ON COLUMN task_callback_secrets.task_id IS 'The task.';
COMMENT ON COLUMN task_callback_secrets.secret IS 'whsec_ + base64, as given.';
COMMENT ON INDEX task_callback_secrets_pkey IS 'The secret of a task, read when its webhook is sent.';

-- Recent failures, for people and the dashboard: through task_attempts_failures_idx, newest first.
CREATE OR REPLACE VIEW task_failures AS
SELECT a.task_id, t.task_type, t.queue, a.attempt, a.outcome::text AS outcome, a.worker_id,
       a.finished_at, a.error, t.status::text AS task_status
FROM task_attempts a
JOIN tasks t ON t.id = a.task_id
WHERE a.outcome IN ('failed', 'timed_out', 'crashed', 'lost')
  AND a.finished_at > now() - interval '24 hours'
ORDER BY a.finished_at DESC;
COMMENT ON VIEW task_failures IS
    'Failed, timed out, crashed and lost attempts of the last 24 hours, newest first, with their errors (the task''s traceback is tasks.error_traceback). Add LIMIT: it reads only what it returns.';
COMMENT ON COLUMN task_failures.task_id IS 'The task.';
COMMENT ON COLUMN task_failures.task_type IS 'Its type.';
COMMENT ON COLUMN task_failures.queue IS 'Its queue.';
COMMENT ON COLUMN task_failures.attempt IS 'Which attempt failed.';
COMMENT ON COLUMN task_failures.outcome IS 'failed, timed_out, crashed or lost.';
COMMENT ON COLUMN task_failures.worker_id IS 'The worker it ran on.';
COMMENT ON COLUMN task_failures.finished_at IS 'When the attempt ended.';
COMMENT ON COLUMN task_failures.error IS 'The error.';
COMMENT ON COLUMN task_failures.task_status IS 'The task''s status now (pending: it will be retried; failed: out of attempts).';

-- The schema's version, for the code to check (skiplock/db.py SCHEMA_VERSION) and for DBAs to
-- read: one row, written last, so it names a version only once all of the above is in place.
CREATE TABLE IF NOT EXISTS skiplock_schema (
    singleton  boolean     NOT NULL DEFAULT true,
    version    integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT skiplock_schema_pkey PRIMARY KEY (singleton),
    CONSTRAINT skiplock_schema_one_row CHECK (singleton),
    CONSTRAINT skiplock_schema_version_positive CHECK (version >= 1)
);
COMMENT ON TABLE skiplock_schema IS
    'The version of schema.sql applied to this database: one row. The API (/readyz), the workers and the CLI refuse a version older than their code needs (apply schema.sql again: skiplock schema apply); a newer one they accept with a warning (schema changes only add).';
COMMENT ON COLUMN skiplock_schema.singleton IS 'Always true: keeps the table to one row.';
COMMENT ON COLUMN skiplock_schema.version IS 'The schema version (bumped in schema.sql whenever the code comes to depend on a change). Never lowered: applying an older schema.sql leaves it.';
COMMENT ON COLUMN skiplock_schema.applied_at IS 'When schema.sql was last applied.';
COMMENT ON INDEX skiplock_schema_pkey IS 'One row.';
INSERT INTO skiplock_schema (version) VALUES (4)
ON CONFLICT (singleton) DO UPDATE
SET version = greatest(skiplock_schema.version, excluded.version), applied_at = now();

COMMIT;

-- Fresh statistics when there is data to describe. Not on a new, empty table: recording
-- "0 rows" would switch off the planner's "never analyzed, assume a few pages" guess and plan the
-- claim as a sequential scan until autovacuum analyzes the table.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM tasks) THEN
        ANALYZE tasks;
        ANALYZE task_attempts;
    END IF;
END $$;
