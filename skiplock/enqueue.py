"""Submit tasks from your own code, on your own psycopg connection, inside your own transaction:
the task exists if and only if that transaction commits (the transactional outbox).

    import psycopg
    from skiplock.enqueue import Enqueuer

    enqueuer = Enqueuer(task_modules=("myapp.tasks",))  # once: the task types, as the API loads them

    with psycopg.connect(DATABASE_URL) as conn, conn.transaction():
        order_id = conn.execute("INSERT INTO orders ... RETURNING id").fetchone()[0]
        enqueuer.submit(conn, "send_receipt", {"order_id": order_id}, unique_key=f"receipt-{order_id}")
    # committed: the order and its task together; idle workers are woken at the commit

The rules are the API's (skiplock/submission.py): the task type's input schema and defaults, the
bounds of every field, unique_key deduplication among the owner's unfinished tasks, and an
idempotency_key replaying the first submit's answer (the API's Idempotency-Key, in the same table).
Rate limits and quotas (max_unfinished) are the API's defence against clients: code that writes to
the database itself is trusted, and is not counted against them; a callback_url is checked against
the SSRF rules when it is delivered (the API checks it at submit too). A submit the rules refuse
raises a SubmitRefused (naming the field) before anything is written.

Nothing is committed here, and no savepoint is taken: a failure aborts the caller's transaction,
as any failed statement would. On a connection in autocommit mode each call is one transaction
of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from skiplock.registry import TaskRegistry, load_registry
from skiplock.settings import DEFAULT_IDEMPOTENCY_TTL_SECONDS
from skiplock.sql.inserts import NewTask, task_insert, task_insert_many
from skiplock.sql.keys import idempotency_key_claim, idempotency_key_record
from skiplock.submission import MAX_BATCH, BoundRefused, Submission, check_bounds, prepare
from skiplock.tracing import submit_context

# Fields of a submit besides task_type and task_input (POST /api/tasks's).
OPTIONS = (
    "queue", "priority", "max_attempts", "timeout_seconds", "run_at", "delay_seconds", "callback_url",
    "callback_secret", "fairness_key", "concurrency_key", "unique_key", "expires_at", "expires_in_seconds",
)  # fmt: skip


class IdempotencyKeyReused(BoundRefused):
    """The idempotency_key was first used with a different submit."""

    def __init__(self, key: str):
        super().__init__(
            "idempotency_key", f"{key!r} was already used with a different submit; use a new key."
        )


@dataclass(frozen=True)
class Enqueued:
    """A task a submit answers with."""

    id: int
    # An unfinished task of the owner already had the submit's unique_key: this is that task.
    deduplicated: bool = False
    # The idempotency_key's first use made it (this call inserted nothing).
    replayed: bool = False


class Enqueuer:
    """Submits on a caller's connection. Build it once (it loads the task types); it holds no
    connection and is safe to share between threads."""

    def __init__(
        self,
        task_modules: Iterable[str] = (),
        *,
        registry: TaskRegistry | None = None,
        idempotency_ttl_seconds: float = DEFAULT_IDEMPOTENCY_TTL_SECONDS,
    ):
        self.registry = registry if registry is not None else load_registry(tuple(task_modules))
        self.idempotency_ttl_seconds = idempotency_ttl_seconds

    def submit(
        self,
        conn: psycopg.Connection[Any],
        task_type: str,
        task_input: Any = None,
        *,
        owner_key_id: int | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Enqueued:
        """Submit one task (options: queue, priority, max_attempts, timeout_seconds, run_at,
        delay_seconds, callback_url, callback_secret, fairness_key, concurrency_key, unique_key,
        expires_at, expires_in_seconds; as POST /api/tasks). `owner_key_id`: the API key that
        owns it (sees it, its limits and fair share apply); None: no owner, as with auth off."""
        task = {"task_type": task_type, "task_input": task_input, **options}
        (answer,) = self.submit_many(conn, [task], owner_key_id=owner_key_id, idempotency_key=idempotency_key)
        return answer

    def submit_many(
        self,
        conn: psycopg.Connection[Any],
        tasks: Sequence[Mapping[str, Any]],
        *,
        owner_key_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> list[Enqueued]:
        """Submit up to MAX_BATCH tasks (each a mapping of the submit's fields) in one statement:
        all or none. Answers in the order given."""
        if not 1 <= len(tasks) <= MAX_BATCH:
            raise BoundRefused("tasks", f"Submit 1 to {MAX_BATCH} tasks at once.")
        submissions = [self.prepared(task) for task in tasks]
        with _dict_rows(conn) as db, _transaction(conn, needed=idempotency_key is not None):
            if idempotency_key is None:
                return _insert(db, submissions, owner_key_id)
            fingerprint = _fingerprint(tasks)
            earlier = idempotency_key_claim(
                db,
                owner=owner_key_id,
                key=idempotency_key,
                request_sha256=fingerprint,
                ttl_seconds=self.idempotency_ttl_seconds,
            )
            if earlier is not None:
                if bytes(earlier["request_sha256"]) != fingerprint:
                    raise IdempotencyKeyReused(idempotency_key)
                return [Enqueued(task_id, replayed=True) for task_id in earlier["response"]["task_ids"]]
            answers = _insert(db, submissions, owner_key_id)
            ids = [a.id for a in answers]
            idempotency_key_record(
                db,
                owner=owner_key_id,
                key=idempotency_key,
                status_code=202,
                response={"task_ids": ids},
                location=None,
                task_ids=ids,
            )
            return answers

    def prepared(self, task: Mapping[str, Any]) -> Submission:
        """A submit checked against the rules (SubmitRefused naming the field if refused)."""
        unknown = sorted(set(task) - {"task_type", "task_input", *OPTIONS})
        if unknown:
            raise BoundRefused(unknown[0], f"Unknown field {unknown[0]!r}.")
        if not isinstance(task.get("task_type"), str):
            raise BoundRefused("task_type", "A task_type is required.")
        fields = {name: task[name] for name in OPTIONS if task.get(name) is not None}
        check_bounds(
            queue=fields.get("queue", "default"),
            priority=fields.get("priority", 0),
            max_attempts=fields.get("max_attempts"),
            timeout_seconds=fields.get("timeout_seconds"),
            delay_seconds=fields.get("delay_seconds"),
            expires_in_seconds=fields.get("expires_in_seconds"),
            fairness_key=fields.get("fairness_key"),
            concurrency_key=fields.get("concurrency_key"),
            unique_key=fields.get("unique_key"),
        )
        return prepare(
            self.registry, task_type=task["task_type"], task_input=task.get("task_input"), **fields
        )


def _insert(
    conn: psycopg.Connection[Any], submissions: list[Submission], owner: int | None
) -> list[Enqueued]:
    trace_context = submit_context({})  # the caller's current span, if it traces
    if len(submissions) == 1 and submissions[0].callback_secret is None:
        one = submissions[0]  # the hot path: one INSERT of one row
        row = task_insert(
            conn,
            input=one.input,
            full_row=False,
            owner_key_id=owner,
            trace_context=trace_context,
            **one.columns(),
        )
        return [Enqueued(row["id"], deduplicated=bool(row.get("deduplicated")))]
    new = [
        NewTask(input_json=json.dumps(s.input), trace_context=trace_context, **s.columns())
        for s in submissions
    ]
    return [
        Enqueued(a.id, deduplicated=a.deduplicated) for a in task_insert_many(conn, new, owner_key_id=owner)
    ]


def _fingerprint(tasks: Sequence[Mapping[str, Any]]) -> bytes:
    """What a repeated submit must repeat exactly: its tasks' fields (key order aside)."""
    body = json.dumps([dict(t) for t in tasks], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"enqueue\n{body}".encode()).digest()


@contextlib.contextmanager
def _dict_rows(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """The caller's connection, reading rows as dicts (the engine's queries do) for the call."""
    before = conn.row_factory
    conn.row_factory = dict_row
    try:
        yield conn
    finally:
        conn.row_factory = before


def _transaction(conn: psycopg.Connection[Any], *, needed: bool) -> contextlib.AbstractContextManager[Any]:
    """The statements of a call that are more than one (an idempotency key's claim, insert and
    record) in one transaction: the caller's, or one of their own on an autocommit connection."""
    if needed and conn.autocommit:
        return conn.transaction()
    return contextlib.nullcontext()
