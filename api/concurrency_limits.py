"""Concurrency and start-rate limits of a key's concurrency keys (PUT, GET, DELETE
/api/concurrency-limits/{key} and the list), each scoped to the calling key: a client sees and
changes its own only (another key's answers 404, as a missing one). An admin key may name
another key with ?owner_key_id=. A limit holds when the PUT answers (skiplock.sql.limits).

Queue limits are in api.queues; type limits are declared in code with the task type (read here:
GET /api/task-types/{name}/limit)."""

from __future__ import annotations

from flask.views import MethodView
from webargs.flaskparser import abort  # flask_smorest.abort, typed (NoReturn)

from skiplock.sql.keys import api_key_get
from skiplock.sql.limits import limit_delete, limit_get, limit_list, limit_put
from skiplock.submission import MAX_KEY_LENGTH, NAME_RULE, is_name

from .auth import principal, require_admin
from .extensions import Blueprint, db
from .limit_schemas import LimitSchema, LimitSetSchema, OwnerArgsSchema

blp = Blueprint(
    "concurrency_limits",
    __name__,
    url_prefix="/api",
    description="Concurrency and start-rate limits of your tasks' concurrency_key.",
)

KEY = "<path:key>"  # a concurrency key may hold a slash


def not_found():
    return blp.alt_response(404, response="DEFAULT_ERROR", description="No such limit")


def owner_of(args: dict) -> int:
    """Whose limits: the caller's (0 with auth off), or with ?owner_key_id= (admin keys only)
    that key's."""
    who = principal()
    own = who.key_id or 0
    wanted = args.get("owner_key_id", own)
    if wanted != own and not who.is_admin:
        abort(403, message="Only admin keys may name another key's limits (owner_key_id).")
    return wanted


def checked_key(key: str) -> str:
    """A concurrency key a task could have (else 404, as for a key without a limit)."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        abort(404, message=f"No concurrency key is {len(key)} characters long (1 to {MAX_KEY_LENGTH}).")
    if "\x00" in key:
        abort(404, message="No concurrency key holds a NUL character.")
    return key


def by() -> str:
    """Who set a limit (task_limits.updated_by)."""
    return principal().prefix or "auth off"


@blp.route("/concurrency-limits")
class ConcurrencyLimits(MethodView):
    @blp.arguments(OwnerArgsSchema, location="query")
    @blp.response(200, LimitSchema(many=True))
    @blp.alt_response(403, response="DEFAULT_ERROR", description="owner_key_id from a client key")
    def get(self, args):
        """Your concurrency keys' limits, each with how many of its tasks run and wait."""
        with db() as conn:
            return limit_list(conn, scope="key", owner=owner_of(args))


@blp.route(f"/concurrency-limits/{KEY}")
class ConcurrencyLimit(MethodView):
    @blp.arguments(OwnerArgsSchema, location="query")
    @blp.response(200, LimitSchema)
    @not_found()
    def get(self, args, key):
        """The limit of one of your concurrency keys, with how many of its tasks run and wait."""
        with db() as conn:
            row = limit_get(conn, scope="key", owner=owner_of(args), name=checked_key(key))
        if row is None:
            abort(404, message=f"No limit is set for the concurrency key {key!r}.")
        return row

    @blp.arguments(LimitSetSchema)
    @blp.arguments(OwnerArgsSchema, location="query")
    @blp.response(200, LimitSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR", description="owner_key_id names no key")
    def put(self, data, args, key):
        """Set (or change) the limit of a concurrency key of yours: at most max_running of its
        tasks run at once, at most max_starts_per_second start (with a burst), across every
        worker. It holds when this answers: tasks over it that a worker had claimed but not
        started go back to waiting; what runs finishes."""
        owner = owner_of(args)
        name = checked_key(key)
        with db() as conn:
            if owner and api_key_get(conn, owner) is None:
                abort(404, message=f"API key {owner} does not exist.")
            return limit_put(conn, scope="key", owner=owner, name=name, by=by(), **data)

    @blp.arguments(OwnerArgsSchema, location="query")
    @blp.response(204)
    @not_found()
    def delete(self, args, key):
        """Remove the limit of a concurrency key of yours: its waiting tasks may start at once."""
        with db() as conn:
            deleted = limit_delete(conn, scope="key", owner=owner_of(args), name=checked_key(key))
        if not deleted:
            abort(404, message=f"No limit is set for the concurrency key {key!r}.")


@blp.route("/task-types/<name>/limit")
class TaskTypeLimit(MethodView):
    @blp.response(200, LimitSchema)
    @blp.alt_response(403, response="DEFAULT_ERROR", description="Not an admin key")
    @not_found()
    def get(self, name):
        """Admin keys: a task type's limit (declared in code with the type: @task(max_running=...)),
        with how many of its tasks run and wait."""
        require_admin()
        if not is_name(name):
            abort(404, message=f"No task type can be named {name!r}: {NAME_RULE}")
        with db() as conn:
            row = limit_get(conn, scope="type", owner=0, name=name)
        if row is None:
            abort(404, message=f"No limit is declared for the task type {name!r}.")
        return row
