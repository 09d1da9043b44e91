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
from datetime import UTC, datetime

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
