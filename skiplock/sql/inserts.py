"""Submitting tasks: the INSERT statements (one task, the hot path; a batch), unique_key
deduplication and quota slots (tasks.quota_slot)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from skiplock.errors import QuotaSlotTaken
from skiplock.sql.fragments import TASK_COLUMNS, WAITING_ON
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.tasks import SubmittedRow, task_get
from skiplock.sql.turns import turns


@dataclass(frozen=True)
class NewTask:
    """One task to submit (task_insert, task_insert_many)."""

    task_type: str
    input_json: str  # JSON text, already validated
    queue: str
    priority: int
    max_attempts: int
    timeout_seconds: int
    run_at: datetime | None = None
    delay_seconds: float | None = None
    callback_url: str | None = None
    callback_secret: str | None = None
    fairness_key: str | None = None
    concurrency_key: str | None = None
    unique_key: str | None = None
    expires_at: datetime | None = None
    expires_in_seconds: float | None = None  # from the database's now(), instead of expires_at
    quota_slot: int | None = None  # of its owner's max_unfinished (tasks.quota_slot)
    trace_context: str | None = None  # JSON text: the submit's trace context (skiplock.tracing)


@dataclass(frozen=True)
class Inserted:
    """A task a submit answers with: new, or (deduplicated) the unfinished task that already had
    the submit's unique_key."""

    id: int
    deduplicated: bool = False


# A submitted task's unique_key may be freed (its task finished) between the insert that met it
# and the look-up of that task: the insert is tried again, this often at most.
_UNIQUE_RETRIES = 5
# Tasks whose quota slot was taken are inserted again with other slots, this often at most.
_SLOT_RETRIES = 5

# Where a new task starts. Due: it gets its turn (fair shares, skiplock/sql/turns.py), and is
# runnable at once unless a limit holds it (task_limits): then it waits on it (waiting_on) for
# the workers' admission, in the same fair order. Not due yet: scheduled, no turn until it
# falls due. A limit set after this
# statement's snapshot is caught by the limit's own statement (limits_apply), which waits for
# older transactions before it takes back what they made runnable.
_INSERT_TEMPLATE = f"""
WITH src AS (
    SELECT r.*, coalesce(r.run_at, now()) + make_interval(secs => coalesce(r.delay, 0)) AS due_at
    FROM unnest(%(types)b::text[], %(inputs)b::text[]::jsonb[], %(queues)b::text[], %(priorities)b::int[],
                %(max_attempts)b::int[], %(timeouts)b::int[], %(run_ats)b::timestamptz[],
                %(delays)b::float8[], %(callback_urls)b::text[], %(fairness_keys)b::text[],
                %(concurrency_keys)b::text[], %(unique_keys)b::text[], %(expires_ats)b::timestamptz[],
                %(expires_ins)b::float8[], %(quota_slots)b::int[], %(trace_contexts)b::text[]::jsonb[])
        WITH ORDINALITY AS r(task_type, input, queue, priority, max_attempts, timeout_seconds, run_at,
                             delay, callback_url, fairness_key, concurrency_key, unique_key, expires_at,
                             expires_in, quota_slot, trace_context, n)
), gated AS (
    SELECT s.*, s.due_at <= now() AS due,
           CASE WHEN s.due_at <= now() THEN {WAITING_ON} END AS waiting_on
    FROM (SELECT src.*, %(owner0)s::bigint AS owner0 FROM src) s
), fresh AS (
    SELECT n, %(owner0)s::bigint AS owner, queue, priority, coalesce(fairness_key, '') AS fkey
    FROM gated WHERE due
), {turns("fresh")}
INSERT INTO tasks (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at,
                   owner_key_id, callback_url, fairness_key, concurrency_key, unique_key, expires_at,
                   turn, waiting_on, quota_slot, trace_context)
SELECT g.task_type, g.input, g.queue, g.priority, g.max_attempts, g.timeout_seconds, g.due_at,
       %(owner)s, g.callback_url, g.fairness_key, g.concurrency_key, g.unique_key,
       coalesce(g.expires_at, now() + make_interval(secs => g.expires_in)), tr.turn, g.waiting_on,
       g.quota_slot, g.trace_context
FROM gated g LEFT JOIN turned tr ON tr.n = g.n
ORDER BY g.n
-- tasks_unique_idx: a task whose unique_key an unfinished task of the owner has (or an earlier
-- task of this batch) is not inserted; a concurrent insert of the key is waited for first. The
-- same for tasks_quota_slot_idx: a slot another unfinished task holds (the caller tries again).
ON CONFLICT DO NOTHING
RETURNING {{returning}}"""


_INSERT_IDS = _INSERT_TEMPLATE.format(returning="id, unique_key, quota_slot")

# One task (the hot path): the same rules as _INSERT_TEMPLATE, as a statement small enough to
# plan in a fraction of a millisecond (the batch form took 1-2 ms to plan, more than to run).
_INSERT_ONE_TEMPLATE = f"""
INSERT INTO tasks (task_type, input, queue, priority, max_attempts, timeout_seconds, run_at,
                   owner_key_id, callback_url, fairness_key, concurrency_key, unique_key, expires_at,
                   turn, waiting_on, quota_slot, trace_context)
SELECT s.task_type, %(input)s::jsonb, s.queue, s.priority, %(max_attempts)s, %(timeout_seconds)s, s.due_at,
       %(owner)s, %(callback_url)s, s.fairness_key, s.concurrency_key, %(unique_key)s,
       coalesce(%(expires_at)s::timestamptz, now() + make_interval(secs => %(expires_in)s::float8)),
       CASE WHEN s.due_at <= now() THEN
           (SELECT b.base + b.spacing
            FROM task_turn_start(s.owner0, s.queue, s.priority, coalesce(s.fairness_key, '')) b)
       END,
       g.waiting_on, %(quota_slot)s::int, %(trace_context)s::jsonb
FROM (SELECT %(task_type)s::text AS task_type, %(queue)s::text AS queue, %(priority)s::int AS priority,
             %(owner0)s::bigint AS owner0, %(fairness_key)s::text AS fairness_key,
             %(concurrency_key)s::text AS concurrency_key,
             coalesce(%(run_at)s::timestamptz, now()) + make_interval(secs => coalesce(%(delay)s::float8, 0)) AS due_at) s
CROSS JOIN LATERAL (SELECT CASE WHEN s.due_at <= now() THEN {WAITING_ON} END AS waiting_on) g
{{conflict}}
RETURNING {{returning}}"""
# ON CONFLICT only with a unique_key or a quota slot: a speculative insertion costs more than a
# plain one.
_INSERT_ONE = {
    (full_row, may_conflict): _INSERT_ONE_TEMPLATE.format(
        returning=f"{TASK_COLUMNS}, unique_key" if full_row else "id, status::text AS status, unique_key",
        conflict="ON CONFLICT DO NOTHING" if may_conflict else "",
    )
    for full_row in (False, True)
    for may_conflict in (False, True)
}


def _insert_one_params(task: NewTask, owner_key_id: int | None) -> dict[str, Any]:
    return {
        "owner": owner_key_id,
        "owner0": owner_key_id or 0,
        "task_type": task.task_type,
        "input": task.input_json,
        "queue": task.queue,
        "priority": task.priority,
        "max_attempts": task.max_attempts,
        "timeout_seconds": task.timeout_seconds,
        "run_at": task.run_at,
        "delay": task.delay_seconds,
        "callback_url": task.callback_url,
        "fairness_key": task.fairness_key,
        "concurrency_key": task.concurrency_key,
        "unique_key": task.unique_key,
        "expires_at": task.expires_at,
        "expires_in": task.expires_in_seconds,
        "quota_slot": task.quota_slot,
        "trace_context": task.trace_context,
    }


def _insert_params(tasks: Sequence[NewTask], owner_key_id: int | None) -> dict[str, Any]:
    return {
        "owner": owner_key_id,
        "owner0": owner_key_id or 0,
        "types": [t.task_type for t in tasks],
        "inputs": [t.input_json for t in tasks],
        "queues": [t.queue for t in tasks],
        "priorities": [t.priority for t in tasks],
        "max_attempts": [t.max_attempts for t in tasks],
        "timeouts": [t.timeout_seconds for t in tasks],
        "run_ats": [t.run_at for t in tasks],
        "delays": [t.delay_seconds for t in tasks],
        "callback_urls": [t.callback_url for t in tasks],
        "fairness_keys": [t.fairness_key for t in tasks],
        "concurrency_keys": [t.concurrency_key for t in tasks],
        "unique_keys": [t.unique_key for t in tasks],
        "expires_ats": [t.expires_at for t in tasks],
        "expires_ins": [t.expires_in_seconds for t in tasks],
        "quota_slots": [t.quota_slot for t in tasks],
        "trace_contexts": [t.trace_context for t in tasks],
    }


def task_insert_many(
    conn: Connection,
    tasks: Sequence[NewTask],
    *,
    owner_key_id: int | None = None,
    more_slots: Callable[[int], list[int]] | None = None,
) -> list[Inserted]:
    """task_insert_many: enqueue a batch in one statement (all or nothing, one NOTIFY); answers
    the tasks in the order given. A task whose unique_key an unfinished task of the owner already
    has (or an earlier task of the batch) is not inserted: it is answered with that task's id,
    deduplicated. Callback secrets are stored in the same transaction: call it inside one (a
    plain autocommit connection gets one here).

    Tasks with quota slots (tasks.quota_slot) whose slot another task took are inserted again
    with slots from `more_slots(n)` (in the caller's transaction, which keeps those inserted),
    a few times at most; raises QuotaSlotTaken if it has no more (or none is given).

    Arrays go in binary (%b): psycopg's text format quotes every element with a regex, which
    cost the API more CPU per batch than Postgres spent storing it."""
    if not tasks:
        return []
    has_secrets = any(t.callback_secret is not None for t in tasks)
    may_retry = any(t.unique_key is not None for t in tasks)
    with conn.transaction() if has_secrets else nullcontext():
        for _ in range(_UNIQUE_RETRIES):
            # A round that must be done again is undone first (a savepoint, or a transaction of
            # its own): its other tasks were inserted and would be inserted twice.
            with conn.transaction() if may_retry else nullcontext():
                rows = conn.execute(_INSERT_IDS, _insert_params(tasks, owner_key_id)).fetchall()
                if more_slots is not None:
                    tasks, rows = _slots_taken_again(conn, tasks, rows, owner_key_id, more_slots)
                answers = _answers(conn, tasks, rows, owner_key_id)
                if answers is None and may_retry:
                    raise psycopg.Rollback()  # leaves the `with`, undone
            if answers is not None:
                break
        else:
            raise RuntimeError("a unique_key kept being freed and taken again while submitting")
        secrets = [
            (a.id, t.callback_secret)
            for a, t in zip(answers, tasks, strict=True)
            if t.callback_secret is not None and not a.deduplicated
        ]
        if secrets:
            conn.execute(
                "INSERT INTO task_callback_secrets (task_id, secret) SELECT * FROM unnest(%s::bigint[], %s::text[])",
                ([i for i, _ in secrets], [secret for _, secret in secrets]),
            )
    return answers


def _slots_taken_again(
    conn: Connection,
    tasks: Sequence[NewTask],
    rows: list[Any],
    owner_key_id: int | None,
    more_slots: Callable[[int], list[int]],
) -> tuple[Sequence[NewTask], list[Any]]:
    """Insert again, with other slots, the tasks without a unique_key whose quota slot was
    taken (random slots of a key far from its cap meet a held one now and then: one row, not
    the batch, pays for it). A skipped task with a unique_key is left to _answers (a duplicate,
    or QuotaSlotTaken)."""
    for _ in range(_SLOT_RETRIES):
        inserted = {r["quota_slot"] for r in rows}
        lost = [
            i
            for i, t in enumerate(tasks)
            if t.quota_slot is not None and t.quota_slot not in inserted and t.unique_key is None
        ]
        if not lost:
            break
        slots = more_slots(len(lost))
        if len(slots) < len(lost):
            raise QuotaSlotTaken()
        renewed = list(tasks)
        for i, slot in zip(lost, slots, strict=True):
            renewed[i] = dataclasses.replace(tasks[i], quota_slot=slot)
        tasks = renewed
        rows = (
            rows
            + conn.execute(_INSERT_IDS, _insert_params([tasks[i] for i in lost], owner_key_id)).fetchall()
        )
    return tasks, rows


def _answers(
    conn: Connection, tasks: Sequence[NewTask], rows: list[Any], owner_key_id: int | None
) -> list[Inserted] | None:
    """Each task's answer, in order: the inserted rows are the tasks that were not skipped, in
    order (identity values follow the insertion order); a skipped task is the unfinished task
    with its unique_key. None if such a task finished meanwhile (insert again). Raises
    QuotaSlotTaken if a task was skipped for its quota slot (nothing of the batch may stay)."""
    if any(t.quota_slot is not None for t in tasks):
        return _answers_by_slot(conn, tasks, rows, owner_key_id)
    new_ids = iter(sorted(r["id"] for r in rows))
    inserted_keys = {r["unique_key"] for r in rows if r["unique_key"] is not None}
    taken: dict[str, int] = {}
    answers: list[Inserted | str] = []
    for task in tasks:
        key = task.unique_key
        if key is None or (key in inserted_keys and key not in taken):
            answers.append(Inserted(next(new_ids)))
            if key is not None:
                taken[key] = answers[-1].id  # type: ignore[union-attr]
        else:
            answers.append(key)
    return _deduplicated(conn, answers, taken, owner_key_id)


def _answers_by_slot(
    conn: Connection, tasks: Sequence[NewTask], rows: list[Any], owner_key_id: int | None
) -> list[Inserted] | None:
    """_answers for a batch of a key with a quota: every task that may be new has a slot of its
    own, so the rows say which task each is; one without a slot was expected to be a duplicate."""
    by_slot = {r["quota_slot"]: r["id"] for r in rows}
    if None in by_slot:
        raise QuotaSlotTaken()  # its unique_key was free after all: it needs a slot
    taken = {r["unique_key"]: r["id"] for r in rows if r["unique_key"] is not None}
    answers: list[Inserted | str] = []
    for task in tasks:
        new_id = by_slot.get(task.quota_slot)
        if new_id is not None:
            answers.append(Inserted(new_id))
        elif task.unique_key is None:
            raise QuotaSlotTaken()
        else:
            answers.append(task.unique_key)
    answer = _deduplicated(conn, answers, taken, owner_key_id)
    if answer is None:  # a task skipped for its slot, not its unique_key
        raise QuotaSlotTaken()
    return answer


def _deduplicated(
    conn: Connection, answers: list[Inserted | str], taken: dict[str, int], owner_key_id: int | None
) -> list[Inserted] | None:
    """The answers with each skipped task (its unique_key) as the unfinished task that has the
    key; None if there is none (it finished meanwhile)."""
    missing = sorted({a for a in answers if isinstance(a, str) and a not in taken})
    if missing:
        taken.update(_unfinished_with(conn, owner_key_id, missing))
        if any(key not in taken for key in missing):
            return None
    return [a if isinstance(a, Inserted) else Inserted(taken[a], deduplicated=True) for a in answers]


def _unfinished_with(conn: Connection, owner_key_id: int | None, keys: Sequence[str]) -> dict[str, int]:
    """The owner's unfinished task with each of these unique_keys that one has (tasks_unique_idx)."""
    rows = conn.execute(
        """
        SELECT id, unique_key FROM tasks
        WHERE coalesce(owner_key_id, 0) = %(owner)s AND unique_key = ANY(%(keys)s::text[])
          AND status IN ('pending', 'processing')
        """,
        {"owner": owner_key_id or 0, "keys": list(keys)},
    )
    return {r["unique_key"]: r["id"] for r in rows}


def task_unique_keys_taken(conn: Connection, *, owner_key_id: int | None, keys: Sequence[str]) -> set[str]:
    """task_unique_keys_taken: which of these unique_keys an unfinished task of the owner has: the
    tasks of a submit with them will be deduplicated (a quota counts only the others)."""
    return set(_unfinished_with(conn, owner_key_id, keys)) if keys else set()


def task_insert(
    conn: Connection,
    *,
    task_type: str,
    input: Any,
    queue: str,
    priority: int,
    max_attempts: int,
    timeout_seconds: int,
    run_at: datetime | None = None,
    delay_seconds: float | None = None,
    owner_key_id: int | None = None,
    full_row: bool = True,
    callback_url: str | None = None,
    callback_secret: str | None = None,
    fairness_key: str | None = None,
    concurrency_key: str | None = None,
    unique_key: str | None = None,
    expires_at: datetime | None = None,
    expires_in_seconds: float | None = None,
    quota_slot: int | None = None,
    more_slots: Callable[[int], list[int]] | None = None,
    trace_context: str | None = None,
) -> SubmittedRow:
    """task_insert: enqueue one task (task_insert_many of one); the insert trigger wakes waiting
    workers. run_at defaults to now() (the database clock), optionally pushed back by
    delay_seconds. Returns the stored task (a TaskRow), or only its id and status (full_row=False:
    a hot path that needs no more); with `deduplicated` true if it is the unfinished task that
    already had this unique_key (nothing was inserted)."""
    new = NewTask(
        task_type=task_type, input_json=json.dumps(input), queue=queue, priority=priority,
        max_attempts=max_attempts, timeout_seconds=timeout_seconds, run_at=run_at,
        delay_seconds=delay_seconds, callback_url=callback_url, callback_secret=callback_secret,
        fairness_key=fairness_key, concurrency_key=concurrency_key, unique_key=unique_key,
        expires_at=expires_at, expires_in_seconds=expires_in_seconds, quota_slot=quota_slot,
        trace_context=trace_context,
    )  # fmt: skip
    if callback_secret is None:  # the hot path: one INSERT that returns what the client sees
        statement = _INSERT_ONE[full_row, unique_key is not None or quota_slot is not None]
        row = conn.execute(statement, _insert_one_params(new, owner_key_id)).fetchone()
        if row is not None:
            del row["unique_key"]
            return row
    (answer,) = task_insert_many(conn, [new], owner_key_id=owner_key_id, more_slots=more_slots)
    if full_row:
        found: SubmittedRow = task_get(conn, answer.id)
    else:
        found = one_row(
            conn.execute("SELECT id, status::text AS status FROM tasks WHERE id = %s", (answer.id,))
        )
    if answer.deduplicated:
        found["deduplicated"] = True
    return found
