"""Tasks: the original contract (/api/submit-task, /api/task-status, /api/task-result) and the
same resources in REST form (/api/tasks...). A client key sees, lists, cancels and retries its
own tasks only: another key's task answers exactly as an id never issued."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime

import psycopg
from flask import g, request, url_for
from flask.views import MethodView
from flask_smorest import abort
from werkzeug.exceptions import NotFound
from werkzeug.routing import BaseConverter

from skiplock.db import pooled_connection
from skiplock.errors import QuotaSlotTaken
from skiplock.sql.inserts import Inserted, NewTask, task_insert, task_insert_many, task_unique_keys_taken
from skiplock.sql.rows import Connection
from skiplock.sql.tasks import (
    SubmittedRow,
    TaskRow,
    task_attempts_list,
    task_cancel,
    task_get,
    task_list,
    task_retry,
)
from skiplock.sql.waiting_for import task_waiting_for
from skiplock.submission import BIGINT_MAX, Submission
from skiplock.tracing import submit_context

from . import idempotency, waiting
from .auth import principal
from .extensions import Blueprint, db, store
from .idempotency import Stored
from .limits import QUOTA_ATTEMPTS, quota_applies, quota_more_slots, quota_slots, quota_took, refuse_quota
from .schemas import (
    AttemptSchema,
    BatchSubmitSchema,
    BatchSubmittedSchema,
    RestSubmitTaskSchema,
    SubmitTaskSchema,
    SubmittedSchema,
    SubmittedTaskSchema,
    TaskConflictSchema,
    TaskDetailSchema,
    TaskListArgsSchema,
    TaskListSchema,
    TaskResultSchema,
    TaskSchema,
)

blp = Blueprint(
    "tasks", __name__, url_prefix="/api", description="Submit tasks, follow them, fetch their results."
)

# Schema instances, not classes: webargs would build a schema per request from a class.
SUBMIT = SubmitTaskSchema()
REST_SUBMIT = RestSubmitTaskSchema()
# The answers' schemas too (an Idempotency-Key's first answer is dumped with them): building one
# per request cost the submit 5% of its CPU (marshmallow deep-copies the declared fields).
SUBMITTED = SubmittedSchema()
SUBMITTED_TASK = SubmittedTaskSchema()
BATCH_SUBMITTED = BatchSubmittedSchema()
# How long a client polling a running task should wait before asking again.
POLL_AGAIN_SECONDS = 1
# A pending task due later: ask again when it is due, but after this at the latest.
POLL_AGAIN_MAX_SECONDS = 3600
DEDUPLICATED = "Deduplicated: nothing created; the unfinished task of yours with this unique_key"
IDEMPOTENCY_HEADER_DOC = {
    "name": idempotency.HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": idempotency.KEY_PATTERN},
    "description": "Retry-safe submit: the same key with the same request answers the first answer "
    f"again ({idempotency.REPLAYED_HEADER}: true); with another request, 422. Remembered 24 h.",
}


class TaskIdConverter(BaseConverter):
    """Any path segment: one that is not a task id (a positive 64-bit integer) answers 404 in the
    API's error shape, saying why, instead of Werkzeug's page."""

    regex = r"(?!batch$)[^/]+"  # /api/tasks/batch is a route of its own (POST), not a task

    def to_python(self, value: str) -> int:
        if value.isascii() and value.isdigit() and value[0] != "0" and int(value) <= BIGINT_MAX:
            return int(value)
        raise NotFound(f"No task has the id {value!r}: task ids are positive 64-bit integers.")

    def to_url(self, value) -> str:
        return str(value)


TASK_ID = "<task_id:task_id>"
TASK_ID_SCHEMA = {"type": "integer", "format": "int64", "minimum": 1, "maximum": BIGINT_MAX}


# Quota slots for the tasks of a submit, in order (None: no cap, or a task that will be deduplicated).
Slots = list[int | None] | None


def enqueue(conn: Connection, task: Submission, slots: Slots, *, full_row: bool = True) -> SubmittedRow:
    with refused_as_422():
        return task_insert(
            conn,
            input=task.input,
            full_row=full_row,
            owner_key_id=principal().key_id,
            quota_slot=slots[0] if slots else None,
            more_slots=quota_more_slots if slots else None,
            trace_context=submit_context(request.headers),
            **task.columns(),
        )


def enqueue_many(conn: Connection, tasks: list[Submission], slots: Slots) -> list[Inserted]:
    trace_context = submit_context(request.headers)
    new = [
        NewTask(
            input_json=json.dumps(t.input),
            quota_slot=slots[i] if slots else None,
            trace_context=trace_context,
            **t.columns(),
        )
        for i, t in enumerate(tasks)
    ]
    with refused_as_422():
        return task_insert_many(
            conn, new, owner_key_id=principal().key_id, more_slots=quota_more_slots if slots else None
        )


def answered(task: SubmittedRow, location: str) -> Stored:
    """One submitted task: 202 if new; 200 if it is the unfinished task that already had the
    submit's unique_key (its row says deduplicated: true)."""
    new = not task.get("deduplicated")
    return Stored(task, 202 if new else 200, location, [task["id"]], int(new))


def submitted(schema, insert: Callable[[Connection, Slots], Stored], unique_keys: list[str | None]):
    """Insert the tasks (one per unique_keys entry) if the key's quota admits them: under the
    request's Idempotency-Key if it has one (a retry replays the first answer, which `schema`
    dumps, and is no new task to admit), else directly.

    A key with a quota gives each task a slot (see api/limits.py): all are stored in one
    transaction, or none if a slot was taken meanwhile (then it picks again). What would pass
    the cap is refused before the insert; a task that will be deduplicated takes no slot."""

    def within_quota(conn: Connection) -> Stored:
        if not quota_applies():
            return insert(conn, None)
        for attempt in range(QUOTA_ATTEMPTS):
            slots = _slots_for(conn, unique_keys, read=attempt > 0)
            try:
                # A batch's tasks are stored all or none; one task is one statement (but within
                # an Idempotency-Key's transaction, a savepoint: an error must not abort it).
                in_transaction = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                with conn.transaction() if len(unique_keys) > 1 or in_transaction else nullcontext():
                    stored = insert(conn, slots)
            except (QuotaSlotTaken, psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
                # (Random slots taken again after a conflict may, rarely, cross another batch's:
                # one of the two gives way, and picks anew.)
                continue
            quota_took(stored.created)
            return stored
        refuse_quota(0)  # the key's slots were taken as fast as it picked free ones

    key = idempotency.requested_key()
    if key is not None:
        return idempotency.submit(key, schema, within_quota)
    with db() as conn:
        stored = within_quota(conn)
    return stored.result, stored.status, {"Location": stored.location} if stored.location else {}


def _slots_for(conn: Connection, unique_keys: list[str | None], *, read: bool) -> list[int | None]:
    """A quota slot for each task of the submit, or 429 if the key may not have them all. When
    not all fit, tasks whose unique_key an unfinished task has (or an earlier one of the submit)
    will be deduplicated: they take none."""
    slots = quota_slots(conn, len(unique_keys), read=read) or []
    if len(slots) == len(unique_keys):
        return list(slots)
    if all(k is None for k in unique_keys):
        refuse_quota(g.quota_state)
    taken = task_unique_keys_taken(
        conn, owner_key_id=principal().key_id, keys=sorted({k for k in unique_keys if k is not None})
    )
    new: list[int] = []
    for i, key in enumerate(unique_keys):
        if key is None or key not in taken:
            new.append(i)
        if key is not None:
            taken.add(key)
    slots = (quota_slots(conn, len(new), read=True) or []) if new else []
    if len(slots) < len(new):
        refuse_quota(g.quota_state)
    placed: list[int | None] = [None] * len(unique_keys)
    for i, slot in zip(new, slots, strict=True):
        placed[i] = slot
    return placed


@contextmanager
def refused_as_422():
    """Whatever slipped past validation but Postgres refuses is still the client's input."""
    try:
        yield
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        # The primary message only: its context would echo internals (portal parameters).
        reason = exc.diag.message_primary or type(exc).__name__
        abort(422, message="The task was refused by the database.", errors={"json": {"task_input": [reason]}})


def retry_after(task: TaskRow) -> int:
    """Retry-After for a task-result asked too early: when a pending task is due (within
    POLL_AGAIN_SECONDS .. POLL_AGAIN_MAX_SECONDS), else POLL_AGAIN_SECONDS."""
    if task["status"] == "pending":
        wait = (task["run_at"] - datetime.now(UTC)).total_seconds()
        return max(POLL_AGAIN_SECONDS, min(POLL_AGAIN_MAX_SECONDS, math.ceil(wait)))
    return POLL_AGAIN_SECONDS


def not_found(description: str):
    return blp.alt_response(404, response="DEFAULT_ERROR", description=description)


@blp.route("/submit-task")
class SubmitTask(MethodView):
    @blp.arguments(SUBMIT)
    @blp.response(
        202,
        SubmittedSchema,
        headers={"Location": {"description": "URL of the task's status", "schema": {"type": "string"}}},
    )
    @blp.alt_response(200, schema=SubmittedSchema, description=DEDUPLICATED)
    @blp.doc(parameters=[IDEMPOTENCY_HEADER_DOC], **{"x-typed-submit": "original"})
    def post(self, data):
        """Submit a task; answers at once with its id (poll the Location).

        With a `unique_key` that an unfinished task of yours has (pending, scheduled, waiting
        for a slot, in retry backoff or processing), nothing is created: 200 with that task's
        id and status, and `deduplicated: true` (the field is there only then). Unlike
        Idempotency-Key, which replays the answer to one request (the same answer, whatever
        became of the task since), unique_key is about the task: any submit with the key, until
        its task is final, answers that task as it is now."""

        def insert(conn: Connection, slots: Slots) -> Stored:
            task = enqueue(
                conn, data, slots, full_row=False
            )  # the hot path: id and status are all it answers
            return answered(task, url_for("tasks.TaskStatus", task_id=task["id"]))

        return submitted(SUBMITTED, insert, [data.unique_key])


def loader(task_id: int, *, with_input: bool = False) -> Callable[[], TaskRow]:
    """Reads the task as the caller may see it, a pooled connection for each read (none is held
    while a long-poll waits). Usable outside the request's context (an event stream)."""
    owner, task_store = principal().owner, store()

    def load() -> TaskRow:
        with pooled_connection(task_store.pool()) as conn:
            return task_get(conn, task_id, with_input=with_input, owner=owner)

    return load


def waited(task_id: int, args: dict, *, with_input: bool = False) -> TaskRow:
    return waiting.until_final(task_id, loader(task_id, with_input=with_input), waiting.requested_wait(args))


PREFER_DOC = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "wait=N (RFC 7240): as ?wait=N; the answer says Preference-Applied.",
}


@blp.route(f"/task-status/{TASK_ID}")
class TaskStatus(MethodView):
    @blp.arguments(waiting.WaitArgsSchema(), location="query", as_kwargs=True)
    @blp.response(200, TaskSchema)
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    @blp.doc(parameters=[PREFER_DOC])
    def get(self, task_id, **args):
        """Status, progress, attempts and (once completed) the result of a task; with ?wait=N,
        as soon as it is final (or after N seconds)."""
        return waited(task_id, args), 200, waiting.preference_headers()


@blp.route(f"/task-result/{TASK_ID}")
class TaskResult(MethodView):
    @blp.arguments(waiting.WaitArgsSchema(), location="query", as_kwargs=True)
    @blp.response(200, TaskResultSchema)
    @blp.alt_response(409, schema=TaskConflictSchema, description="Not completed (yet): `status` says why")
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    @blp.doc(parameters=[PREFER_DOC])
    def get(self, task_id, **args):
        """The result of a completed task; with ?wait=N, as soon as the task is final (or after
        N seconds, then 409 if it is still running)."""
        task = waited(task_id, args)
        if task["status"] != "completed":
            unfinished = task["status"] in ("pending", "processing")
            abort(
                409,
                message=f"Task {task_id} is {task['status']}; "
                + ("its result is not ready yet." if unfinished else "it has no result."),
                extra={"status": task["status"], "task_id": task_id, "error": task["error"]},
                headers={
                    **waiting.preference_headers(),
                    **({"Retry-After": str(retry_after(task))} if unfinished else {}),
                },
            )
        return task, 200, waiting.preference_headers()


@blp.route("/tasks")
class Tasks(MethodView):
    @blp.arguments(TaskListArgsSchema(), location="query")
    @blp.response(200, TaskListSchema)
    def get(self, args):
        """List tasks, newest first (a client key: its own); filter by status, task_type, queue;
        page with `before`."""
        limit = args.pop("limit")
        with db() as conn:
            rows = task_list(
                conn, before_id=args.pop("before", None), limit=limit + 1, owner=principal().owner, **args
            )
        return {"tasks": rows[:limit], "next_before": rows[limit - 1]["id"] if len(rows) > limit else None}

    @blp.arguments(REST_SUBMIT)
    @blp.response(202, SubmittedTaskSchema)
    @blp.alt_response(200, schema=SubmittedTaskSchema, description=DEDUPLICATED)
    @blp.doc(parameters=[IDEMPOTENCY_HEADER_DOC], **{"x-typed-submit": "task"})
    def post(self, data):
        """Submit a task; answers with the task as stored. `task_input` is typed by `task_type`.

        With a `unique_key` that an unfinished task of yours has: 200 with that task as it is
        now and `deduplicated: true`; nothing is created (see POST /api/submit-task for how
        this differs from Idempotency-Key)."""

        def insert(conn: Connection, slots: Slots) -> Stored:
            task = enqueue(conn, data, slots)
            return answered(task, url_for("tasks.Task", task_id=task["id"]))

        return submitted(SUBMITTED_TASK, insert, [data.unique_key])


@blp.route("/tasks/batch")
class TaskBatch(MethodView):
    @blp.arguments(BatchSubmitSchema())
    @blp.response(202, BatchSubmittedSchema)
    @blp.doc(parameters=[IDEMPOTENCY_HEADER_DOC], **{"x-typed-submit": "batch"})
    def post(self, data):
        """Submit up to 1,000 tasks at once: all are validated and stored, or none (one
        transaction, one wake-up for the workers). Answers their ids in the order given.

        `deduplicated` says, per task, whether it was answered by the unfinished task that
        already had its `unique_key` (yours, or an earlier one of the same batch) instead of
        being created; the answer is 202 either way. An Idempotency-Key instead replays this
        whole answer to a repeated request. The key's quota counts only the new tasks, and the
        batch as a whole: all fit, or none is stored."""

        def insert(conn: Connection, slots: Slots) -> Stored:
            answers = enqueue_many(conn, data["tasks"], slots)
            ids, deduplicated = [a.id for a in answers], [a.deduplicated for a in answers]
            body = {"task_ids": ids, "status": "pending", "deduplicated": deduplicated}
            return Stored(body, 202, None, ids, deduplicated.count(False))

        tasks = data["tasks"]
        return submitted(BATCH_SUBMITTED, insert, [t.unique_key for t in tasks])


@blp.route(f"/tasks/{TASK_ID}")
class Task(MethodView):
    @blp.arguments(waiting.WaitArgsSchema(), location="query", as_kwargs=True)
    @blp.response(200, TaskDetailSchema)
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    @blp.doc(parameters=[PREFER_DOC])
    def get(self, task_id, **args):
        """A task, with its input; with ?wait=N, as soon as it is final (or after N seconds). A
        pending task says what it waits for (waiting_for)."""
        task: dict = dict(waited(task_id, args, with_input=True))
        task["waiting_for"] = None
        if task["status"] == "pending":
            with db() as conn:
                task["waiting_for"] = task_waiting_for(conn, task_id)
        return task, 200, waiting.preference_headers()


@blp.route(f"/tasks/{TASK_ID}/attempts")
class TaskAttempts(MethodView):
    @blp.response(200, AttemptSchema(many=True))
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    def get(self, task_id):
        """Every ended attempt of a task, oldest first: who ran it, how it ended."""
        with db() as conn:
            task_get(conn, task_id, owner=principal().owner)
            return task_attempts_list(conn, task_id)


@blp.route(f"/tasks/{TASK_ID}/cancel")
class CancelTask(MethodView):
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, schema=TaskConflictSchema, description="Already completed, failed or cancelled")
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    def post(self, task_id):
        """Cancel a pending task, or stop a processing one."""
        with db() as conn:
            return task_cancel(conn, task_id, owner=principal().owner)


@blp.route(f"/tasks/{TASK_ID}/retry")
class RetryTask(MethodView):
    @blp.response(200, TaskSchema)
    @blp.alt_response(
        409,
        schema=TaskConflictSchema,
        description="Not failed, cancelled or expired; or another unfinished task of yours has its unique_key",
    )
    @not_found("No such task")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="The task was pruned (retention)")
    @blp.alt_response(
        429, response="DEFAULT_ERROR", description="The key's quota of unfinished tasks is full"
    )
    def post(self, task_id):
        """Run a failed, cancelled or expired task again (one more attempt if it had none left;
        an expired one without its deadline). It is unfinished again: it counts against the
        key's quota of unfinished tasks."""
        with db() as conn:
            if not quota_applies():
                return task_retry(conn, task_id, owner=principal().owner)
            for attempt in range(QUOTA_ATTEMPTS):
                slots = quota_slots(conn, 1, read=attempt > 0)
                if not slots:
                    refuse_quota(g.quota_state)
                try:
                    task = task_retry(conn, task_id, owner=principal().owner, quota_slot=slots[0])
                except QuotaSlotTaken:
                    continue
                quota_took(1)
                return task
            refuse_quota(0)
