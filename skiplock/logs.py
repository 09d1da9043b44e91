"""How every skiplock process writes its log lines (SKIPLOCK_LOG_FORMAT).

text (the default), for people:   2025-06-01 12:00:00,123 WARNING skiplock.worker: task 42 attempt 1: ...
json, for log collectors: one object per line, on stderr:
    {"timestamp": "2025-06-01T12:00:00.123Z", "level": "WARNING", "logger": "skiplock.worker",
     "message": "task 42 attempt 1: ...", "pid": 4711, "worker_id": "host:4711:a1b2c3",
     "task_id": 42, "attempt": 1, "task_type": "primes", "queue": "default"}

A line carries, besides timestamp, level, logger, message and pid: the fields its call passes as
`extra=` (a task's task_id, attempt, task_type, queue; a request's method, path, status, ...),
and those bound to the whole process (`bind(worker_id=...)`). An exception's traceback is one
field, exc_info; so is a traceback sent by another process (a task's), passed as
extra={"traceback": text}: text lines leave it out (it is stored with the attempt).

worker.py, `skiplock worker` and `make run` call configure(); gunicorn uses GunicornLogger
(gunicorn.conf.py), which sends gunicorn's error log, its access log (SKIPLOCK_ACCESS_LOG) and
the app's lines (the root logger) through the same formatter.
"""

from __future__ import annotations

import logging
import os
import traceback
from datetime import UTC, datetime

from gunicorn import glogging
from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from skiplock.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A request id longer than this (it comes from the client) is cut in the access log.
MAX_REQUEST_ID_LENGTH = 128
# Where the API notes the caller's key (its id and non-secret prefix) for the access line
# (api/request_log.py).
ENVIRON_KEY_ID = "skiplock.key_id"
ENVIRON_KEY_PREFIX = "skiplock.key_prefix"

# Fields every JSON line of this process carries (bind()).
_bound: dict[str, object] = {}


def bind(**fields) -> None:
    """Add fields to every JSON line this process writes from now on (the worker's worker_id)."""
    _bound.update(fields)


def format_from_env(environ: dict[str, str] | None = None) -> str:
    """SKIPLOCK_LOG_FORMAT, checked as Settings checks it (ValueError), without reading (and
    refusing) the other settings: gunicorn sets up its logger before it loads the app."""
    env = os.environ if environ is None else environ
    return Settings.from_env({"SKIPLOCK_LOG_FORMAT": env.get("SKIPLOCK_LOG_FORMAT", "")}).log_format


class JsonFormatter(_JsonFormatter):
    """One JSON object per record, on one line (tracebacks included, as strings)."""

    def __init__(self) -> None:
        super().__init__(json_ensure_ascii=False)
        self._skip = {*RESERVED_ATTRS, "traceback"}

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        log_data["timestamp"] = (
            datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        )
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data["pid"] = record.process
        log_data.update(_bound)
        merge_record_extra(record, log_data, reserved=self._skip)
        log_data.update(message_dict)  # exc_info, stack_info
        sent = getattr(record, "traceback", None)
        if sent and "exc_info" not in log_data:
            log_data["exc_info"] = sent


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure(level: str | int, fmt: str = "text") -> None:
    """Log to stderr at `level` ("INFO", "debug", logging.INFO), as text or JSON. As
    logging.basicConfig, it leaves a root logger that already has handlers alone."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])
    if fmt == "json":
        logging.captureWarnings(True)  # warnings.warn() as JSON lines too, not bare text


class GunicornLogger(glogging.Logger):
    """gunicorn's logger (gunicorn.conf.py's logger_class). With SKIPLOCK_LOG_FORMAT=text it is
    gunicorn's own, unchanged. With json: its error log, its access log (when SKIPLOCK_ACCESS_LOG
    turns it on) and the app's lines (the root logger, at gunicorn's loglevel) are JSON lines,
    the app's on the error log's stream; an access line has the request's fields, not the
    Apache-style text of access_log_format."""

    as_json = False

    def setup(self, cfg) -> None:
        super().setup(cfg)
        try:
            self.as_json = format_from_env() == "json"
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_gunicorn", False)]:
            root.removeHandler(handler)  # ours, from a previous setup (a reload)
        if not self.as_json:
            return
        json_formatter = JsonFormatter()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(json_formatter)
        for handler in self.error_log.handlers:
            if getattr(handler, "_gunicorn", False):
                root.addHandler(handler)
                root.setLevel(self.loglevel)
        logging.captureWarnings(True)

    def access(self, resp, req, environ, request_time) -> None:
        if not self.as_json:
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled:
            return
        try:
            fields = request_fields(resp, environ, request_time)
            self.access_log.info("%s %s %s", fields["method"], fields["path"], fields["status"], extra=fields)
        except Exception:
            self.error(traceback.format_exc())


def request_fields(resp, environ: dict, request_time) -> dict:
    """An access line's fields: never a body, a header's value other than those named here, or
    a token (the key is named by its id and non-secret prefix, which the app notes in environ)."""
    status = resp.status
    if isinstance(status, str):
        status = status.split(None, 1)[0]
    fields = {
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "query": environ.get("QUERY_STRING") or None,
        "status": int(status) if str(status).isdigit() else status,
        "duration_seconds": round(request_time.total_seconds(), 6),
        "bytes": getattr(resp, "sent", None),
        "remote_addr": environ.get("REMOTE_ADDR"),
        "user_agent": environ.get("HTTP_USER_AGENT"),
        "request_id": (environ.get("HTTP_X_REQUEST_ID") or "")[:MAX_REQUEST_ID_LENGTH] or None,
        "key_id": environ.get(ENVIRON_KEY_ID),
        "key_prefix": environ.get(ENVIRON_KEY_PREFIX),
    }
    return {name: value for name, value in fields.items() if value is not None}
