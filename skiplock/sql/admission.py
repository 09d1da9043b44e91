"""Admission: the one step that makes pending tasks runnable after submit (a turn in the claim's
index), for tasks that fell due (delayed, retried after a backoff) and tasks that wait on a
concurrency or start-rate limit (task_limits). One admission runs at a time, under the advisory
lock ADMISSION_LOCK, and reads what holds each limit's slots from the task rows in a snapshot
taken after it got the lock: nothing is counted or stored per start or finish, a task that stops
running (finished, retried, rescued, cancelled) frees its slot by its own row changing, and two
admissions can never both fill the last slot. Setting a limit takes the same lock (limits.py).

The decisions between limits (a task can be under a key's, its type's and its queue's limit at
once) are made in Python, from rows read in the same transaction; the statements read and write
by index only: due tasks (tasks_scheduled_idx), waiting tasks per limit (tasks_waiting_idx),
slots (tasks_limited_idx, tasks_processing_idx; one key's: tasks_key_slots_idx). An admission of
the slots a worker's ended tasks freed (task_admit's `freed`) reads only their limits, and when
only key limits on running tasks apply decides in one statement (_ADMIT_FREED_SQL)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from skiplock.sql.fragments import ANNOUNCED, HOOK_COLUMNS, PENDING_CHANNEL, WAITING_ON, announce, outbox
from skiplock.sql.rows import Connection, one_row
from skiplock.sql.turns import turns
from skiplock.sql.workflows import workflow_tasks_ended

# Two integers for pg_advisory_xact_lock: ('skiplock', 'admission').
ADMISSION_LOCK = "hashtext('skiplock'), hashtext('admission')"

# Tasks one admission promotes, expires or admits per limit at most (the rest next time).
ADMIT_BATCH = 1000

# Limits with waiting tasks looked at per admission, at most (a skip scan, one probe each).
MAX_WAITING_GROUPS = 10_000


def group_name(scope: str, owner: int, name: str) -> str:
    """The waiting_on value of a limit (see tasks.waiting_on)."""
    return f"key:{owner}:{name}" if scope == "key" else f"{scope}:{name}"


def task_groups(owner: int, concurrency_key: str | None, task_type: str, queue: str) -> list[str]:
    """Every limit a task could be under, in the order WAITING_ON tries them."""
    groups = [f"key:{owner}:{concurrency_key}"] if concurrency_key is not None else []
    return [*groups, f"type:{task_type}", f"queue:{queue}"]


_PROMOTE_SQL = f"""
WITH due AS (
    SELECT id, coalesce(owner_key_id, 0) AS owner0, queue, priority, fairness_key, concurrency_key, task_type
    FROM tasks
    WHERE status = 'pending' AND turn IS NULL AND run_at <= now()
    ORDER BY run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gated AS (
    SELECT s.*, {WAITING_ON} AS waiting_on FROM due s
), fresh AS (
    SELECT id AS n, owner0 AS owner, queue, priority, coalesce(fairness_key, '') AS fkey FROM gated
), {turns("fresh")}
UPDATE tasks t SET turn = tr.turn, waiting_on = g.waiting_on
FROM gated g JOIN turned tr ON tr.n = g.id
WHERE t.id = g.id
RETURNING t.waiting_on IS NULL AS runnable
"""


# A waiting task keeps its turn (its place in the fair rotation, taken when it fell due): admitted,
# it is runnable at once. One primary-key probe per id (a nested loop over the ids): as a filter,
# `id = ANY(ids)` over the waiting tasks cost seconds for a few thousand ids. The conditions are
# on the updated row itself, so a task cancelled meanwhile is rechecked (EvalPlanQual) and left
# alone; no row lock beforehand (it would write each row twice).
_ADMIT_SQL = """
UPDATE tasks t SET waiting_on = NULL, limited = true
FROM unnest(%(ids)s::bigint[]) AS c(id)
WHERE t.id = c.id AND t.status::text = 'pending' AND t.waiting_on IS NOT NULL
RETURNING t.id
"""


@dataclass
class Limit:
    scope: str
    owner: int
    name: str
    max_running: int | None
    rate: float | None
    burst: float
    tokens: float  # start tokens now (refilled since tokens_at)

    @property
    def group(self) -> str:
        return group_name(self.scope, self.owner, self.name)


@dataclass
class Admitted:
    """What one admission did."""

    promoted: int = 0  # due tasks given a turn directly
    admitted: int = 0  # tasks admitted under a limit
    expired: int = 0
    waiting: int = 0  # 1 if tasks still wait on a limit
    refill_in: float | None = None  # seconds until a rate-limited group has a token again
    groups: Counter[str] = field(default_factory=Counter)  # admitted per limit
    announced: bool = False  # idle workers were woken already


def admission_try_lock(conn: Connection) -> bool:
    """Take the admission lock for the current transaction, unless another session holds it; the
    transaction commits without waiting for its WAL flush (synchronous_commit off). What an
    admission writes is derived from the rows, and lost in a crash it is as if it had not run
    yet; whatever depends on it (a claim of an admitted task) commits later in the WAL, and its
    own flush makes the admission durable first. Waiting for the flush kept the worker's loop
    from claiming, a millisecond or more per admission."""
    row = one_row(
        conn.execute(
            "SELECT set_config('synchronous_commit', 'off', true),"
            f" pg_try_advisory_xact_lock({ADMISSION_LOCK}) AS locked"
        )
    )
    locked: bool = row["locked"]
    return locked


def admission_lock(conn: Connection) -> None:
    """Take the admission lock for the current transaction, waiting for it (limit changes)."""
    conn.execute(f"SELECT pg_advisory_xact_lock({ADMISSION_LOCK})")


def task_admit(
    conn: Connection, *, batch: int = ADMIT_BATCH, freed: Collection[str] | None = None
) -> Admitted:
    """task_admit: one admission; call it in a transaction holding the admission lock, each
    statement after the lock (it reads what holds the limits' slots). Expires what is past its
    expires_at, gives due tasks a turn or puts them to wait on their limit, and admits waiting
    tasks as far as their limits allow.

    With `freed` (key limits' groups, see group_name, whose tasks this worker just ended): only
    admits, under those key limits and the type and queue limits, whatever they have room for.
    Its cost follows the slots freed, not every slot held (1,000 keys limited to 5 hold 5,000
    slots: counting them all after every write of results made a limited drain 20 times slower);
    the periodic full admission catches what others freed (rescues, cancels, other workers)."""
    done = Admitted()
    if freed is None:
        done.expired = task_expire(conn, limit=batch)
        rows = conn.execute(_PROMOTE_SQL, {"limit": batch}).fetchall()
        done.promoted = sum(1 for r in rows if r["runnable"])
    elif _admit_freed_keys(conn, done, freed, batch):
        return done
    _admit_waiting(conn, done, batch, freed)
    return done


# What holds a slot: a task admitted under a limit, runnable or processing, and whatever is
# processing (a task that started before its limit was set holds a slot too). The condition of
# schema.sql's task_limit_held view, which counts them for every limit at once.
_SLOT = "(limited AND turn IS NOT NULL AND status IN ('pending', 'processing')) OR status = 'processing'"

# The start tokens of a rate-limited limit now (refilled since tokens_at, up to its burst).
_LIMIT_RATE_COLUMNS = """l.max_starts_per_second AS rate,
       coalesce(l.burst, greatest(1, ceil(l.max_starts_per_second)))::float8 AS burst,
       CASE WHEN l.max_starts_per_second IS NULL THEN NULL
            ELSE least(coalesce(l.burst, greatest(1, ceil(l.max_starts_per_second))),
                       coalesce(l.tokens, coalesce(l.burst, greatest(1, ceil(l.max_starts_per_second))))
                       + l.max_starts_per_second * extract(epoch FROM now() - coalesce(l.tokens_at, now())))
       END AS tokens"""

# Every type and queue limit (few), and each key limit with a free slot: a key limit that is full
# (most of them, under load) costs a row in the scan of what holds slots (the task_limit_held
# view: tasks_limited_idx and tasks_processing_idx) but no row out. A full type or queue limit
# stays in: it holds the tasks of every key under it.
_LIMITS_SQL = f"""
SELECT l.scope, l.owner_key_id, l.name, l.max_running, {_LIMIT_RATE_COLUMNS},
       coalesce(h.running, 0)::int AS held
FROM task_limits l LEFT JOIN task_limit_held h USING (scope, owner_key_id, name)
WHERE l.scope <> 'key' OR l.max_running IS NULL OR coalesce(h.running, 0) < l.max_running
"""


# The slots one key limit `l` has given (what _SLOT counts, for its key): a probe of
# tasks_key_slots_idx, whose predicate the first conditions repeat.
_KEY_HELD = """(SELECT count(*) FROM tasks t
     WHERE coalesce(t.owner_key_id, 0) = l.owner_key_id AND t.concurrency_key = l.name
       AND t.status IN ('pending', 'processing') AND (t.limited OR t.status = 'processing')
       AND (t.turn IS NOT NULL OR t.status = 'processing'))"""


def _key_params(freed: Collection[str]) -> dict[str, list[Any]]:
    """The key limits among `freed` groups (group_name: key:<owner>:<name>) as the `owners` and
    `names` arrays of the statements below."""
    keys = [g.split(":", 2) for g in freed if g.startswith("key:")]
    return {"owners": [int(k[1]) for k in keys], "names": [k[2] for k in keys]}


# The same for some key limits (a probe of tasks_key_slots_idx each) and every type and queue
# limit: what holds their slots is scanned only when such a limit exists (the one-time filter).
_SOME_LIMITS_SQL = f"""
WITH wanted AS (
    SELECT * FROM unnest(%(owners)s::bigint[], %(names)s::text[]) AS w(owner_key_id, name)
), others AS MATERIALIZED (
    SELECT * FROM task_limits WHERE scope <> 'key'
), slots AS MATERIALIZED (
    SELECT task_type, queue FROM tasks
    WHERE EXISTS (SELECT FROM others) AND ({_SLOT})
), held AS (
    SELECT 'type' AS scope, task_type AS name, count(*) AS n FROM slots GROUP BY task_type
    UNION ALL
    SELECT 'queue', queue, count(*) FROM slots GROUP BY queue
), picked AS MATERIALIZED (  -- the key limits by primary key first, then their slots counted
    SELECT l.*, {_KEY_HELD} AS held
    FROM wanted w CROSS JOIN LATERAL (
        SELECT * FROM task_limits l
        WHERE (l.scope, l.owner_key_id, l.name) = ('key', w.owner_key_id, w.name)
    ) l
    UNION ALL
    SELECT o.*, coalesce(h.n, 0) FROM others o LEFT JOIN held h USING (scope, name)
)
SELECT l.scope, l.owner_key_id, l.name, l.max_running, {_LIMIT_RATE_COLUMNS}, l.held::int AS held
FROM picked l
WHERE l.scope <> 'key' OR l.max_running IS NULL OR l.held < l.max_running
"""


# Admission under the key limits of `freed` in one statement, for the common case: no type or
# queue limit exists and the key's limit caps running tasks only (no start rate). Each key's
# free slots (a probe of tasks_key_slots_idx) are filled with its first waiting tasks (a probe of
# tasks_waiting_idx), idle workers are woken. `handled` tells which keys that covered.
_ADMIT_FREED_SQL = f"""
WITH wanted AS (
    SELECT * FROM unnest(%(owners)s::bigint[], %(names)s::text[]) AS w(owner_key_id, name)
), plain AS (
    SELECT NOT EXISTS (SELECT FROM task_limits WHERE scope <> 'key') AS ok
), room AS MATERIALIZED (
    SELECT l.owner_key_id, l.name,
           l.max_running - {_KEY_HELD} AS free
    FROM plain, wanted w CROSS JOIN LATERAL (
        SELECT * FROM task_limits l
        WHERE (l.scope, l.owner_key_id, l.name) = ('key', w.owner_key_id, w.name)
    ) l
    WHERE plain.ok AND l.max_running IS NOT NULL AND l.max_starts_per_second IS NULL
), picked AS (
    SELECT c.id FROM room r CROSS JOIN LATERAL (
        SELECT t.id FROM tasks t
        WHERE t.status = 'pending' AND t.waiting_on = 'key:' || r.owner_key_id || ':' || r.name
        ORDER BY t.priority DESC, t.turn, t.id
        LIMIT least(greatest(r.free, 0), %(batch)s)
    ) c
), admitted AS (
    UPDATE tasks t SET waiting_on = NULL, limited = true
    FROM picked p
    WHERE t.id = p.id AND t.status = 'pending' AND t.waiting_on IS NOT NULL
    RETURNING t.id
), announced AS (
    SELECT pg_notify(%(channel)s, '') FROM task_waiters WHERE EXISTS (SELECT FROM admitted) LIMIT 1
)
SELECT (SELECT count(*) FROM admitted)::int AS admitted, (SELECT count(*) FROM room)::int AS handled,
       (SELECT ok FROM plain) AS plain, (SELECT count(*) FROM announced)::int AS announced
"""


def _admit_freed_keys(conn: Connection, done: Admitted, freed: Collection[str], batch: int) -> bool:
    """_ADMIT_FREED_SQL; whether that was all there was to do (else the general admission of
    `freed` follows, in the same transaction: it sees what this admitted)."""
    keys = _key_params(freed)
    row = one_row(conn.execute(_ADMIT_FREED_SQL, {**keys, "batch": batch, "channel": PENDING_CHANNEL}))
    done.admitted += row["admitted"]
    done.announced = True  # idle workers were woken for what this admitted, if anything
    done.waiting = 1  # not looked at: the next full admission tells
    return bool(row["plain"]) and row["handled"] == len(keys["names"])


def _limits(conn: Connection, freed: Collection[str] | None = None) -> tuple[dict[str, Limit], Counter[str]]:
    """The limits that may admit (see _LIMITS_SQL, or _SOME_LIMITS_SQL for the key limits of
    `freed` only) and the slots each has taken."""
    limits: dict[str, Limit] = {}
    held: Counter[str] = Counter()
    if freed is None:
        rows = conn.execute(_LIMITS_SQL).fetchall()
    else:
        rows = conn.execute(_SOME_LIMITS_SQL, _key_params(freed)).fetchall()
    for r in rows:
        limit = Limit(
            r["scope"], r["owner_key_id"], r["name"], r["max_running"], r["rate"], r["burst"],
            math.inf if r["tokens"] is None else r["tokens"],
        )  # fmt: skip
        limits[limit.group] = limit
        held[limit.group] = r["held"]
    return limits, held


def _anything_waits(conn: Connection) -> bool:
    """Whether some task waits on a limit: one probe of tasks_waiting_idx. (As a bare EXISTS,
    planned from statistics taken while every task waited, it was a sequential scan past every
    task already admitted, 1-20 ms in a limited drain; EXISTS drops an ORDER BY, a plain query
    ordered by the index's column keeps it.)"""
    row = conn.execute(
        "SELECT waiting_on FROM tasks WHERE status = 'pending' AND waiting_on IS NOT NULL"
        " ORDER BY waiting_on LIMIT 1"
    ).fetchone()
    return row is not None


def task_waiting_orphans_free(conn: Connection) -> int:
    """task_waiting_orphans_free: tasks waiting on a limit that no longer exists (a DBA deleted
    its row) wait on nothing: runnable again (they kept their turn). A skip scan of tasks_waiting_idx,
    one probe per limit waited on."""
    return conn.execute(
        f"""
        WITH RECURSIVE groups AS (
            (SELECT waiting_on, 1 AS n FROM tasks
             WHERE status = 'pending' AND waiting_on IS NOT NULL
             ORDER BY waiting_on LIMIT 1)
            UNION ALL
            SELECT (SELECT t.waiting_on FROM tasks t
                    WHERE t.status = 'pending' AND t.waiting_on > groups.waiting_on
                    ORDER BY t.waiting_on LIMIT 1), groups.n + 1
            FROM groups WHERE groups.waiting_on IS NOT NULL AND groups.n < %(max)s
        ), orphans AS (
            SELECT g.waiting_on FROM groups g
            WHERE g.waiting_on IS NOT NULL AND g.waiting_on NOT IN (  -- a hashed set of the limits
                SELECT CASE l.scope WHEN 'key' THEN 'key:' || l.owner_key_id || ':' || l.name
                                    ELSE l.scope || ':' || l.name END
                FROM task_limits l)
        )
        UPDATE tasks t SET waiting_on = {WAITING_ON}
        FROM (SELECT w.id, coalesce(w.owner_key_id, 0) AS owner0, w.concurrency_key, w.task_type, w.queue
              FROM tasks w JOIN orphans o ON w.waiting_on = o.waiting_on
              WHERE w.status = 'pending') s
        WHERE t.id = s.id
        """,
        {"max": MAX_WAITING_GROUPS},
    ).rowcount


def _candidates(conn: Connection, wanted: dict[str, int]) -> list[dict[str, Any]]:
    """Up to wanted[group] waiting tasks of each group, in claim order: priority, then the fair
    rotation (tasks_waiting_idx)."""
    if not wanted:
        return []
    return conn.execute(
        """
        SELECT c.* FROM unnest(%(groups)s::text[], %(counts)s::int[]) AS w(grp, n)
        CROSS JOIN LATERAL (
            SELECT t.id, t.waiting_on, coalesce(t.owner_key_id, 0) AS owner0, t.concurrency_key,
                   t.task_type, t.queue,
                   t.concurrency_key IS NOT NULL AND EXISTS (
                       SELECT FROM task_limits l
                       WHERE (l.scope, l.owner_key_id, l.name) = ('key', coalesce(t.owner_key_id, 0), t.concurrency_key)
                   ) AS key_limited
            FROM tasks t
            WHERE t.status = 'pending' AND t.waiting_on = w.grp
            ORDER BY t.priority DESC, t.turn, t.id
            LIMIT w.n
        ) c
        """,
        {"groups": list(wanted), "counts": list(wanted.values())},
    ).fetchall()


def _room(limit: Limit, held: int) -> float:
    """How many more tasks the limit admits now: free slots, and start tokens."""
    free = math.inf if limit.max_running is None else limit.max_running - held
    tokens = limit.tokens if math.isinf(limit.tokens) else math.floor(limit.tokens)
    return max(0.0, min(free, tokens))


def _admit_waiting(conn: Connection, done: Admitted, batch: int, freed: Collection[str] | None) -> None:
    """Every limit with room is asked for that many of its waiting tasks (a task waits on a
    limit that exists: limit_delete and task_waiting_orphans_free see to it), so a limit that is
    full costs nothing here however much waits on it. With `freed`, only those key limits and
    the type and queue limits are read."""
    if freed is None and not _anything_waits(conn):
        return
    limits, held = _limits(conn, freed)
    room = {g: _room(limit, held[g]) for g, limit in limits.items()}
    wanted = {g: int(min(batch, r)) for g, r in room.items() if r >= 1}
    admit: list[int] = []
    moved: dict[int, str] = {}
    for task in _candidates(conn, wanted):
        groups = task_groups(task["owner0"], task["concurrency_key"], task["task_type"], task["queue"])
        if task["key_limited"] and groups[0] not in limits:  # a key limit _limits left out
            if freed is not None:
                continue  # not read: full, or not freed here (the full admission decides)
            full: str | None = groups[0]  # full
            mine: list[str] = []
        else:
            mine = [g for g in groups if g in limits]
            full = next((g for g in mine if _room(limits[g], held[g]) < 1), None)
        if full is not None:
            if full != task["waiting_on"]:
                moved[task["id"]] = full  # wait on the limit that holds it now
            continue
        admit.append(task["id"])
        for g in mine:
            held[g] += 1
            limits[g].tokens -= 1
            done.groups[g] += 1
    if moved:
        conn.execute(
            """
            UPDATE tasks t SET waiting_on = m.grp
            FROM unnest(%(ids)s::bigint[], %(groups)s::text[]) AS m(id, grp)
            WHERE t.id = m.id AND t.status = 'pending' AND t.waiting_on IS NOT NULL
            """,
            {"ids": list(moved), "groups": list(moved.values())},
        )
    if admit:
        done.admitted += len(conn.execute(_ADMIT_SQL, {"ids": admit}).fetchall())
    spent = [limits[g] for g in done.groups if limits[g].rate is not None]
    if spent:
        conn.execute(
            """
            UPDATE task_limits l SET tokens = s.tokens, tokens_at = now()
            FROM unnest(%(scopes)s::text[], %(owners)s::bigint[], %(names)s::text[], %(tokens)s::float8[])
                AS s(scope, owner_key_id, name, tokens)
            WHERE (l.scope, l.owner_key_id, l.name) = (s.scope, s.owner_key_id, s.name)
            """,
            {
                "scopes": [x.scope for x in spent],
                "owners": [x.owner for x in spent],
                "names": [x.name for x in spent],
                "tokens": [x.tokens for x in spent],
            },
        )
    done.waiting = 1 if _anything_waits(conn) else 0
    refills = [
        (1 - limit.tokens) / limit.rate
        for g, limit in limits.items()
        if limit.rate is not None
        and limit.tokens < 1
        and (limit.max_running is None or held[g] < limit.max_running)
    ]
    done.refill_in = min(refills) if refills and done.waiting else None


def task_expire(conn: Connection, *, limit: int) -> int:
    """task_expire: end up to `limit` pending tasks whose expires_at has passed (expired, final,
    with an error saying so; a webhook if they have a callback; a workflow step's dependents
    settled). tasks_expiry_idx. In the caller's transaction (admission's)."""
    rows = conn.execute(
        f"""
        WITH doomed AS (
            SELECT id FROM tasks
            WHERE status = 'pending' AND expires_at <= now()
            ORDER BY expires_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ), changed AS (
            UPDATE tasks t
            SET status = 'expired', finished_at = now(), turn = NULL, waiting_on = NULL, limited = false,
                error = format('expired: not started before expires_at (%%s)', t.expires_at)
            FROM doomed d WHERE t.id = d.id
            RETURNING t.id, t.workflow_id, {HOOK_COLUMNS}
        ), {outbox("changed")}, {announce("changed", "true")}
        SELECT id, workflow_id FROM changed WHERE {ANNOUNCED}
        """,
        {"limit": limit},
    ).fetchall()
    workflow_tasks_ended(conn, [r["id"] for r in rows if r["workflow_id"] is not None])
    return len(rows)
