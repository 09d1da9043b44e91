"""The request's side of the API's JSON logs (SKIPLOCK_LOG_FORMAT=json; nothing with text).

The access line itself is gunicorn's (skiplock.logs.GunicornLogger, on with SKIPLOCK_ACCESS_LOG):
gunicorn writes it once the response is sent, so it sees every response (those refused before
Flask too), a stream's whole duration and the bytes sent, and costs nothing while it is off.
What only the app knows, the caller's key, is noted here in the WSGI environ for that line: its
id and non-secret prefix, never the token.

And the app's own lines written during a request ("unhandled error", "database unavailable")
get the request's method, path, request id and key, so they can be matched to its access line.
"""

from __future__ import annotations

import logging

from flask import Flask, g, has_request_context, request

from skiplock.logs import ENVIRON_KEY_ID, ENVIRON_KEY_PREFIX, MAX_REQUEST_ID_LENGTH


def register(app: Flask) -> None:
    if app.extensions["skiplock"].settings.log_format != "json":
        return
    app.after_request(note_key)
    logging.getLogger("skiplock.api").addFilter(add_request_fields)  # once: the same function


def note_key(response):
    """The authenticated key's id and prefix, for gunicorn's access line."""
    who = g.get("principal")
    if who is not None and who.key_id is not None:
        request.environ[ENVIRON_KEY_ID] = who.key_id
        request.environ[ENVIRON_KEY_PREFIX] = who.prefix
    return response


def add_request_fields(record: logging.LogRecord) -> bool:
    """A logging filter: the current request's fields on an app line (a line outside a request,
    or one that names them itself, is left as it is)."""
    if not has_request_context():
        return True
    fields = {"method": request.method, "path": request.path, "remote_addr": request.remote_addr}
    request_id = request.headers.get("X-Request-ID")
    if request_id:
        fields["request_id"] = request_id[:MAX_REQUEST_ID_LENGTH]
    who = g.get("principal")
    if who is not None and who.key_id is not None:
        fields["key_id"] = who.key_id
        fields["key_prefix"] = who.prefix
    for name, value in fields.items():
        if not hasattr(record, name):
            setattr(record, name, value)
    return True
