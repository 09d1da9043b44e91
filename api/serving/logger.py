"""gunicorn's logger class (gunicorn_conf.logger_class): with SKIPLOCK_LOG_FORMAT=json its error log,
its access log and the app's lines are JSON objects, one per line, in skiplock's format
(skiplock/logs.py). Lives beside the gunicorn config: only gunicorn imports it."""

from __future__ import annotations

import logging
import re
import traceback

from gunicorn import glogging

from skiplock.logs import (
    ENVIRON_KEY_ID,
    ENVIRON_KEY_PREFIX,
    MAX_REQUEST_ID_LENGTH,
    JsonFormatter,
    format_from_env,
)


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


# A stream token (…/events?token=…) is a credential for a few minutes: never logged.
_TOKEN_PARAMETER = re.compile(r"(^|&)token=[^&]*")


def redacted(query: str) -> str:
    """A query string with its stream token's value replaced."""
    return _TOKEN_PARAMETER.sub(r"\1token=[redacted]", query)


def request_fields(resp, environ: dict, request_time) -> dict:
    """An access line's fields: never a body, a header's value other than those named here, or
    a token (the key is named by its id and non-secret prefix, which the app notes in environ)."""
    status = resp.status
    if isinstance(status, str):
        status = status.split(None, 1)[0]
    fields = {
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "query": redacted(environ.get("QUERY_STRING") or "") or None,
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
