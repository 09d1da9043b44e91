"""Long-polls: GET /api/tasks/{id}, /api/task-status/{id} and /api/task-result/{id} take
`?wait=N` or `Prefer: wait=N` (RFC 7240), N up to 60 s, and answer as soon as the task is final, or
after N seconds with the answer they would have given anyway. The request waits on this
process's WatchHub (api/watch.py): it holds no database connection while it waits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from flask import g, request
from marshmallow import Schema, fields, validate

from skiplock.sql.fragments import FINAL_STATUSES as FINAL
from skiplock.sql.tasks import TaskRow

from .extensions import store

MAX_WAIT_SECONDS = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?", re.IGNORECASE)


class WaitArgsSchema(Schema):
    wait = fields.Float(
        validate=validate.Range(min=0, max=MAX_WAIT_SECONDS),
        metadata={
            "description": f"Answer as soon as the task is final, or after this many seconds (at most "
            f"{MAX_WAIT_SECONDS}) with its state then. The same as the header Prefer: wait=N."
        },
    )


def requested_wait(args: dict) -> float:
    """Seconds to wait: ?wait=N, else Prefer: wait=N (a preference: capped at the maximum, and
    ignored if it does not parse, as RFC 7240 asks)."""
    if "wait" in args:
        return args["wait"]
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    if not match:
        return 0.0
    seconds = min(float(match.group(1)), float(MAX_WAIT_SECONDS))
    g.preference_applied = f"wait={seconds:g}"
    return seconds


def preference_headers() -> dict[str, str]:
    """Preference-Applied when Prefer: wait was honoured; answers vary with Prefer."""
    headers = {"Vary": "Prefer"}
    if "preference_applied" in g:
        headers["Preference-Applied"] = g.preference_applied
    return headers


def until_final(task_id: int, load: Callable[[], TaskRow], seconds: float) -> TaskRow:
    """The task from `load()`, as soon as it is final or after `seconds`, whichever is first."""
    task = load()
    if seconds <= 0 or task["status"] in FINAL:
        return task
    hub = store().watch
    waiter = hub.watch(task_id, final_only=True)
    try:
        deadline = time.monotonic() + seconds
        task = load()  # after registering: a change from now on is announced to the hub
        waiter.saw(task)
        while task["status"] not in FINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if waiter.wait(remaining):
                task = load()
                waiter.saw(task)
    finally:
        hub.unwatch(waiter)
    return task
