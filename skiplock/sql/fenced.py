"""A worker's writes to the tasks it holds, each *fenced*: it matches on (id, attempts, worker_id,
status = 'processing'), so a worker whose task was rescued, cancelled or re-claimed updates 0 rows
instead of clobbering the newer attempt."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from skiplock.sql.fragments import (
    ANNOUNCED,
    BACKOFF_RETRY_AT,
    HOOK_COLUMNS,
    NOW_FINAL,
    PENDING_CHANNEL,
    announce,
    outbox,
    retry_error,
    retry_or_fail,
    storable_text,
)
from skiplock.sql.rows import Connection


class AttemptRef(NamedTuple):
    """Names one attempt of one task: what a fenced write must match. A tuple: the supervisor
    makes and hashes several per task (a frozen dataclass cost it 3x the time)."""

    task_id: int
    attempt: int


@dataclass(frozen=True)
class AttemptFailure:
    task_id: int
    attempt: int
    # A task_attempt_outcome other than completed/handed_back/released: failed_for_good ends the
    # task whatever attempts are left; retry_requested retries it in retry_in_seconds.
    outcome: str
    error: str
    traceback: str | None = None
    retry_in_seconds: float | None = None  # retry_requested: the delay the task asked for
    charge_attempt: bool = True  # retry_requested: False raises max_attempts by one


# The largest max_attempts the table allows (tasks_max_attempts_in_range): an uncounted retry
# that would go past it counts after all.
MAX_ATTEMPTS_CEILING = 1000

# task_fail_many's rules, per failure r: retry when the task asked (r.retry_in), else after the
# backoff; an uncounted retry raises max_attempts by one (the attempt number still advances, so
# the fence stays a strictly increasing token); give up on a failed_for_good, or once the
# (possibly raised) max_attempts is used up.
_RAISE = f"(NOT r.charge AND t.max_attempts < {MAX_ATTEMPTS_CEILING})::int"
_FAILURE_RETRY_AT = (
    f"CASE WHEN r.retry_in IS NULL THEN {BACKOFF_RETRY_AT} ELSE now() + make_interval(secs => r.retry_in) END"
)
_GIVE_UP = f"r.outcome::text = 'failed_for_good' OR t.attempts >= t.max_attempts + {_RAISE}"


# The fence every worker write goes through: the rows (id, attempt) in `refs` that this worker
# still holds, locked for the statement. SKIP LOCKED: a row someone else has locked (a DBA's
# session, a cancel in flight) is left out rather than waited for, so one locked row never stalls
# a worker's whole batch; task_held_ids tells such rows from rows that are no longer ours.
#
# Rows are reached by primary key, one probe per ref: the LATERAL subquery makes that the only
# plan. Joined plainly, a batch of ~1,000 refs on a table of ~100k rows was planned as a scan of
# the whole table (the filter below looks very selective to the planner): 250 ms instead of
# 20. `status::text` keeps the planner off tasks_processing_idx: between vacuums that partial
# index fills with entries of rows that are no longer processing.
_HELD = """
    held AS (
        SELECT t.id, t.attempts FROM refs r
        CROSS JOIN LATERAL (
            SELECT t.id, t.attempts FROM tasks t
            WHERE t.id = r.id AND t.attempts = r.attempt AND t.worker_id = %(worker_id)s
              AND t.status::text = 'processing'
            FOR UPDATE OF t SKIP LOCKED
        ) t
    )"""


def _ref_params(worker_id: str, refs: Sequence[AttemptRef], **extra: Any) -> dict[str, Any]:
    """The parameters of a fenced write of these attempts. Its arrays go in binary (%b): the text
    format quotes each element with a regex, 6x the time, per task of a full drain."""
    return {
        "ids": [r.task_id for r in refs],
        "attempts": [r.attempt for r in refs],
        "worker_id": worker_id,
        **extra,
    }


def _started_ago(
    refs: Sequence[AttemptRef], started_ago: Mapping[AttemptRef, float] | None
) -> list[float | None]:
    """Per ref, seconds since its process started it (None: not known here, or never started)."""
    started_ago = started_ago or {}
    return [started_ago.get(ref) for ref in refs]


# When an attempt started, on the database clock: the worker sends how long ago (measured on its
# own monotonic clock), never a time of its own, so a worker whose clock is off changes nothing.
# A start already recorded is kept.
_STARTED_AT = "coalesce(t.started_at, now() - make_interval(secs => coalesce(r.started_ago, 0)))"


def in_hand_arrays(
    refs: Iterable[AttemptRef | tuple[int, int]], without: Collection[int] = ()
) -> tuple[list[int], list[int]]:
    """task_workers.in_hand and in_hand_attempts for these attempts: one entry per task, its
    newest attempt (array_position finds the first entry of an id), none for `without`."""
    newest: dict[int, int] = {}
    for task_id, attempt in refs:
        if task_id not in without and attempt > newest.get(task_id, 0):
            newest[task_id] = attempt
    return list(newest), list(newest.values())


def record_in_hand(passed: str, where: str = "TRUE") -> str:
    """SQL: the CTE `recorded`, this worker's record (task_workers.in_hand) rewritten as the
    attempts of CTE `passed` (id, attempts) and %(kept_ids)s/%(kept_attempts)s (one entry per task:
    in_hand_arrays), if `where` holds. Shared by task_hand_over and the claim's hand-over."""
    return f"""recorded AS (
    UPDATE task_workers
    SET (in_hand, in_hand_attempts) = (
            SELECT array_agg(id), array_agg(attempts) FROM (  -- one pass: the arrays stay aligned
                SELECT id, attempts FROM {passed}
                UNION ALL
                SELECT * FROM unnest(%(kept_ids)b::bigint[], %(kept_attempts)b::int[])
            ) listed),
        in_hand_at = now()
    WHERE worker_id = %(worker_id)s AND {where}
    RETURNING 1
)"""


# task_hand_over's statement: the handed rows still this worker's, each locked FOR KEY SHARE until
# the commit (SKIP LOCKED: one a cancel, a rescue or a release holds is not passed), and the record.
TASK_HAND_OVER_SQL = f"""
WITH handed AS (
    SELECT t.id, t.attempts FROM unnest(%(ids)b::bigint[], %(attempts)b::int[]) AS r(id, attempt)
    CROSS JOIN LATERAL (  -- one primary-key probe per ref, as in _HELD
        SELECT t.id, t.attempts FROM tasks t
        WHERE t.id = r.id AND t.attempts = r.attempt AND t.worker_id = %(worker_id)s
          AND t.status::text = 'processing'
        FOR KEY SHARE OF t SKIP LOCKED
    ) t
), {record_in_hand("handed")}
SELECT id, attempts FROM handed
WHERE EXISTS (SELECT FROM recorded) AND set_config('synchronous_commit', 'off', true) = 'off'
"""


def task_hand_over(
    conn: Connection, *, worker_id: str, handing: Sequence[AttemptRef], kept: Iterable[AttemptRef]
) -> set[AttemptRef]:
    """task_hand_over: record, before they go to task processes, that this worker hands over
    `handing` and still has `kept` in hand (sent earlier, outcome not yet stored):
    task_workers.in_hand becomes those. Returns the attempts of `handing` it may send: those it
    still holds and no other session has locked (none if it has no row). One statement, for the
    worker's autocommit connection; it commits with synchronous_commit off (as the claim does):
    only a crash of the server itself can lose it.

    Each handed row is locked FOR KEY SHARE until the commit. A cancel, a rescue or a release
    locks the row FOR UPDATE and reads in_hand in a later statement: it either waits for this
    commit and sees the hand-over, or holds the row first and this skips it (neither passed nor
    recorded)."""
    handing = list(handing)
    kept_ids, kept_attempts = in_hand_arrays(kept, without={ref.task_id for ref in handing})
    rows = conn.execute(
        TASK_HAND_OVER_SQL,
        _ref_params(worker_id, handing, kept_ids=kept_ids, kept_attempts=kept_attempts),
    ).fetchall()
    return {AttemptRef(r["id"], r["attempts"]) for r in rows}


def task_held_ids(conn: Connection, *, worker_id: str, refs: Iterable[AttemptRef]) -> set[int]:
    """task_held_ids: which of these attempts this worker still holds (a plain read: takes no
    lock, waits for none). After a fenced write skipped rows, tells "locked, try again later"
    from "no longer ours"."""
    refs = list(refs)
    if not refs:
        return set()
    rows = conn.execute(
        """
        SELECT t.id FROM unnest(%(ids)b::bigint[], %(attempts)b::int[]) AS r(id, attempt)
        CROSS JOIN LATERAL (  -- one primary-key probe per ref, as in _HELD
            SELECT t.id FROM tasks t
            WHERE t.id = r.id AND t.attempts = r.attempt AND t.worker_id = %(worker_id)s
              AND t.status::text = 'processing'
            LIMIT 1  -- one row per id anyway; it keeps the planner from flattening this into a join
        ) t
        """,
        _ref_params(worker_id, refs),
    ).fetchall()
    return {r["id"] for r in rows}


def task_start_many(conn: Connection, *, worker_id: str, started_ago: Mapping[AttemptRef, float]) -> set[int]:
    """task_start_many: record that these attempts started running (seconds ago), which charges
    them: from now on a rescue counts them as lost, not released. Returns the ids still held
    (whether or not their start was already recorded)."""
    refs = list(started_ago)
    if not refs:
        return set()
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[], %(started_ago)b::float8[])
                AS r(id, attempt, started_ago)
        ), {_HELD}, marked AS (
            UPDATE tasks t SET started_at = {_STARTED_AT}
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id AND t.started_at IS NULL
        )
        SELECT id FROM held
        """,
        _ref_params(worker_id, refs, started_ago=_started_ago(refs, started_ago)),
    ).fetchall()
    return {r["id"] for r in rows}


def task_complete_many(
    conn: Connection,
    *,
    worker_id: str,
    results: Iterable[tuple[AttemptRef, str]],
    started_ago: Mapping[AttemptRef, float] | None = None,
) -> set[int]:
    """task_complete_many: store results (JSON text) of attempts this worker still holds and log
    the attempts; returns the ids written. Ids missing from the answer were fenced out (or were
    locked by another session: see task_held_ids). An attempt whose start was not recorded yet
    (a short task) gets it from started_ago."""
    results = list(results)
    if not results:
        return set()
    refs = [ref for ref, _ in results]
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[], %(results)b::text[]::jsonb[],
                                 %(started_ago)b::float8[])
                AS r(id, attempt, result, started_ago)
        ), {_HELD}, completed AS (
            UPDATE tasks t
            SET status = 'completed', result = r.result, error = NULL, error_traceback = NULL,
                progress = 1, finished_at = now(), lease_expires_at = NULL, started_at = {_STARTED_AT}
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id, t.attempts, t.started_at, {HOOK_COLUMNS}
        ), logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at)
            SELECT id, attempts, %(worker_id)s, 'completed', started_at FROM completed
        ), {outbox("completed")}, {announce("completed", "true")}
        SELECT id FROM completed WHERE {ANNOUNCED}
        """,
        _ref_params(
            worker_id,
            refs,
            results=[result for _, result in results],
            started_ago=_started_ago(refs, started_ago),
        ),
    ).fetchall()
    return {r["id"] for r in rows}


def task_fail_many(
    conn: Connection,
    *,
    worker_id: str,
    failures: Iterable[AttemptFailure],
    backoff_base: float,
    backoff_max: float,
    started_ago: Mapping[AttemptRef, float] | None = None,
) -> dict[int, str]:
    """task_fail_many: end attempts that failed (raised, timed out, crashed, or ended by the task's
    own NonRetryableError or RetryAfter): retry (after the backoff, or when the task asked) or fail
    for good; log the attempts. Returns {id: new status} for the attempts still held."""
    failures = list(failures)
    if not failures:
        return {}
    refs = [AttemptRef(f.task_id, f.attempt) for f in failures]
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[],
                                 %(outcomes)b::text[]::task_attempt_outcome[], %(errors)b::text[],
                                 %(tracebacks)b::text[], %(started_ago)b::float8[],
                                 %(retry_in)b::float8[], %(charge)b::bool[])
                AS r(id, attempt, outcome, error, traceback, started_ago, retry_in, charge)
        ), {_HELD}, ended AS (
            UPDATE tasks t
            SET {retry_or_fail(_FAILURE_RETRY_AT, _GIVE_UP)},
                error = {retry_error("r.error", _FAILURE_RETRY_AT, _GIVE_UP)}, error_traceback = r.traceback,
                max_attempts = t.max_attempts + {_RAISE}, started_at = {_STARTED_AT}
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id, t.attempts, t.started_at, t.status, r.outcome, r.error, {HOOK_COLUMNS}
        ), logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
            SELECT id, attempts, %(worker_id)s, outcome, started_at, error FROM ended
        ), {outbox("ended")}, {announce("ended", NOW_FINAL)}
        SELECT id, status::text AS status FROM ended WHERE {ANNOUNCED}
        """,
        _ref_params(
            worker_id,
            refs,
            outcomes=[f.outcome for f in failures],
            errors=[storable_text(f.error) for f in failures],
            tracebacks=[storable_text(f.traceback) for f in failures],
            started_ago=_started_ago(refs, started_ago),
            retry_in=[f.retry_in_seconds for f in failures],
            charge=[f.charge_attempt for f in failures],
            backoff_base=backoff_base,
            backoff_max=backoff_max,
        ),
    ).fetchall()
    return {r["id"]: r["status"] for r in rows}


def task_hand_back_many(
    conn: Connection,
    *,
    worker_id: str,
    refs: Iterable[AttemptRef],
    started_ago: Mapping[AttemptRef, float] | None = None,
) -> set[int]:
    """task_hand_back_many: a stopping worker returns tasks to pending, due now, in one statement
    and uncounted: handed_back if a process had started them (started_ago, or a recorded start),
    released if they never started. The next attempt reuses the number: safe for fencing because
    only an exiting worker hands back (after killing its processes), and the next claim is made
    under another worker_id."""
    refs = list(refs)
    if not refs:
        return set()
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[], %(started_ago)b::float8[])
                AS r(id, attempt, started_ago)
        ), {_HELD}, returned AS (
            UPDATE tasks t
            SET status = 'pending', attempts = t.attempts - 1, lease_expires_at = NULL,
                progress = NULL,
                started_at = CASE WHEN r.started_ago IS NULL THEN t.started_at ELSE {_STARTED_AT} END
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id, r.attempt, t.started_at
        ), logged AS (
            INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, started_at, error)
            SELECT id, attempt, %(worker_id)s,
                   CASE WHEN started_at IS NULL THEN 'released' ELSE 'handed_back' END::task_attempt_outcome,
                   started_at,
                   CASE WHEN started_at IS NULL THEN 'worker shut down before starting it'
                        ELSE 'worker shut down' END
            FROM returned
        ), {announce("returned", "false")}
        SELECT id, pg_notify(%(channel)s, '') AS notified FROM returned WHERE {ANNOUNCED}
        """,
        _ref_params(worker_id, refs, started_ago=_started_ago(refs, started_ago), channel=PENDING_CHANNEL),
    ).fetchall()
    return {r["id"] for r in rows}


def task_leases_disown(conn: Connection, *, worker_id: str, keep: Iterable[AttemptRef]) -> int:
    """task_leases_disown: end now the leases of the tasks the database says this worker holds
    but that are not among `keep` (all it knows of: held, running, outcomes not yet stored), so
    that the next rescue round takes them back at once rather than when the lease lapses.
    Returns how many. Called on each new session: after a failover that lost the last WAL, the
    new primary still shows as processing the tasks whose outcomes the worker wrote to the old
    one (and a claim whose answer a dropped connection lost is in the same state). A row another
    session has locked right now is skipped: its lease lapses as it would have."""
    keep = list(keep)
    rows = conn.execute(
        """
        WITH unknown AS (
            SELECT t.id FROM tasks t
            WHERE t.status = 'processing' AND t.worker_id = %(worker_id)s
              AND (t.id, t.attempts) NOT IN (
                  SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[]))
            FOR UPDATE OF t SKIP LOCKED
        )
        UPDATE tasks t SET lease_expires_at = now()
        FROM unknown u WHERE t.id = u.id
        RETURNING t.id
        """,
        _ref_params(worker_id, keep),
    ).fetchall()
    return len(rows)


def task_progress_many(
    conn: Connection, *, worker_id: str, progress: Iterable[tuple[AttemptRef, float]]
) -> None:
    """task_progress_many: record reported progress of attempts this worker still holds."""
    progress = list(progress)
    if not progress:
        return
    conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[], %(values)b::real[])
                AS r(id, attempt, progress)
        ), {_HELD}, progressed AS (
            UPDATE tasks t SET progress = r.progress
            FROM refs r JOIN held h ON h.id = r.id AND h.attempts = r.attempt
            WHERE t.id = r.id
            RETURNING t.id
        ), {announce("progressed", "false")}
        SELECT count(*) FROM progressed WHERE {ANNOUNCED}
        """,
        _ref_params(worker_id, [ref for ref, _ in progress], values=[value for _, value in progress]),
    )


def task_lease_renew(
    conn: Connection, *, worker_id: str, refs: Iterable[AttemptRef], lease_seconds: float
) -> set[int]:
    """task_lease_renew: extend the leases this worker still holds; returns their ids. A task
    missing from the answer was cancelled or rescued (its attempt must be abandoned), or is
    locked by another session right now (task_held_ids tells which)."""
    refs = list(refs)
    if not refs:
        return set()
    rows = conn.execute(
        f"""
        WITH refs AS (
            SELECT * FROM unnest(%(ids)b::bigint[], %(attempts)b::int[]) AS r(id, attempt)
        ), {_HELD}
        UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => %(lease)s)
        FROM held h
        WHERE t.id = h.id
        RETURNING t.id
        """,
        _ref_params(worker_id, refs, lease=lease_seconds),
    ).fetchall()
    return {r["id"] for r in rows}
