"""The operators' dashboard at /dashboard: server-rendered pages (Jinja) whose live parts htmx
fetches again every REFRESH_SECONDS as HTML fragments; per-queue charts of the last hour (uPlot);
retry, cancel, pause and resume buttons (for an admin key; a viewer key sees every page without
them, and its POSTs are refused). The JavaScript libraries are vendored
(static/vendor/README.md): no CDN, no build step.

This module holds the blueprint and what every request goes through (the login check, the
headers, the error pages) and the login. The pages: pages.py; the buttons: actions.py; how
figures read: formatting.py; the session, CSRF and login checks: session.py.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    abort,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException

from skiplock.errors import TaskGone, TaskNotFound

from ..extensions import store
from . import session as sessions
from .formatting import ago, ahead, clock, duration, percent, when

log = logging.getLogger("skiplock.api")

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix=sessions.PREFIX,
    static_folder="static",
    template_folder="templates",
    static_url_path="/static",
)

REFRESH_SECONDS = 2
# Fired (HX-Trigger-After-Swap) after a button's answer: the live region refreshes at once.
REFRESH_EVENT = "dashboard-refresh"
# What a viewer may POST: its own logout (every other POST is a button that changes something).
VIEWER_POSTS = ("dashboard.logout",)
# Outcomes of attempts that failed (task_failures' list); the others are no one's fault.
FAILURE_OUTCOMES = ("failed", "timed_out", "crashed", "lost")
# Own files only; styles are set through the CSSOM (uPlot) or classes, never inline.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def register(app: Flask) -> None:
    """Serve the dashboard on this app (after create_app has set it up)."""
    sessions.install(app)
    app.register_blueprint(bp)


# --- every request ---------------------------------------------------------------------------


@bp.before_request
def guard():
    if request.endpoint == "dashboard.static":
        return None
    sessions.raise_secret_error()
    if request.method == "POST":
        sessions.refuse_cross_site()
    if request.endpoint == "dashboard.login" or not store().settings.auth_on:
        return None
    was_logged_in = "key_id" in session
    g.dashboard_key = sessions.logged_in_key()
    if g.dashboard_key is None:
        if was_logged_in:
            flash("Your key was revoked: log in again.", "error")
        return _to_login()
    if request.method == "POST" and not can_act() and request.endpoint not in VIEWER_POSTS:
        abort(
            403,
            f"Key {g.dashboard_key['prefix']} is a viewer key: it may look, not act (this needs an admin key).",
        )
    return None


def can_act() -> bool:
    """The caller may press buttons: an admin key, or anyone when auth is off."""
    key = g.get("dashboard_key")
    return not store().settings.auth_on or (key is not None and key["role"] == "admin")


def _to_login():
    """Where a request without a valid session goes: the login page (htmx follows HX-Redirect)."""
    if htmx():
        page = urlsplit(request.headers.get("HX-Current-URL", ""))
        response = make_response("", 401)
        response.headers["HX-Redirect"] = url_for(".login", next=f"{page.path}?{page.query}".rstrip("?"))
        return response
    if request.method == "GET" and request.headers.get("Sec-Fetch-Site") == "cross-site":
        # A link from another site (a chat, a pager) arrives without the SameSite=Strict cookie:
        # load the page again from here, which sends it.
        return render_template("dashboard/reload.html")
    return redirect(url_for(".login", next=request.full_path.rstrip("?")), 303)


@bp.after_request
def headers(response):
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"  # pages of live data, behind a login
    return response


@bp.context_processor
def page_globals() -> dict[str, Any]:
    return {
        "csrf_token": sessions.csrf_token,
        "auth_on": store().settings.auth_on,
        "who": g.get("dashboard_key"),
        "can_act": can_act(),
        "refresh_seconds": REFRESH_SECONDS,
        "refresh_event": REFRESH_EVENT,
        "htmx_config": HTMX_CONFIG,
        "duration": duration,
        "ago": ago,
        "clock": clock,
        "percent": percent,
        "when": when,
        "ahead": ahead,
        "failure_outcomes": FAILURE_OUTCOMES,
    }


# htmx: no eval and no injected styles (the CSP allows neither); show (not drop) the answers of
# refused buttons; give up on a request after HTMX_TIMEOUT_MILLISECONDS (the page then says it
# is not updating).
HTMX_TIMEOUT_MILLISECONDS = 10_000
HTMX_CONFIG = json.dumps(
    {
        "allowEval": False,
        "allowScriptTags": False,
        "includeIndicatorStyles": False,
        "historyEnabled": False,
        "timeout": HTMX_TIMEOUT_MILLISECONDS,
        "responseHandling": [
            {"code": "204", "swap": False},
            {"code": "[23]..", "swap": True},
            {"code": "^(403|404|409|410)$", "swap": True, "error": False},
            {"code": "[45]..", "swap": False, "error": True},
        ],
    }
)


def htmx() -> bool:
    """The request is htmx's (a fragment or a button), not a page load."""
    return request.headers.get("HX-Request") == "true"


@bp.errorhandler(HTTPException)
def http_error(error: HTTPException):
    """Errors as the dashboard's pages (or, to htmx, as a message where the answer goes)."""
    return _error(str(error.description), error.code or 500)


@bp.errorhandler(TaskNotFound)
def task_not_found(error: TaskNotFound):
    """An unknown task (404) or one pruned after its retention (410)."""
    return _error(str(error), 410 if isinstance(error, TaskGone) else 404)


@bp.errorhandler(Exception)
def unexpected(error: Exception):
    log.exception("dashboard: unhandled error")
    return _error("Something went wrong on the server; it is in the API's log.", 500)


def database_unavailable(error: Exception):
    log.warning("dashboard: database unavailable: %s", str(error).strip() or type(error).__name__)
    response = _error("The database is unavailable; this page tries again by itself.", 503)
    response.headers["Retry-After"] = str(REFRESH_SECONDS)
    return response


for _error_class in sessions.DATABASE_ERRORS:
    bp.register_error_handler(_error_class, database_unavailable)


def _error(message: str, code: int):
    template = "dashboard/_notice.html" if htmx() else "dashboard/error.html"
    return make_response(render_template(template, message=message, ok=False, code=code), code)


# --- login -----------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    if not store().settings.auth_on:
        return redirect(url_for(".overview"), 303)
    target = _dashboard_path(request.values.get("next"))
    if request.method == "POST":
        refused = sessions.log_in(request.form.get("token", "").strip())
        if refused is None:
            return redirect(target, 303)
        code, message = refused
        return render_template("dashboard/login.html", error=message, next=target), code
    return render_template("dashboard/login.html", next=target)


def _dashboard_path(value: str | None) -> str:
    """`value` if it is a path of the dashboard (where to go after the login), else the overview."""
    if (
        value
        and re.fullmatch(r"/dashboard(?:[/?][^\\\s]*)?", value)
        and "//" not in value
        and ".." not in value
    ):
        return value
    return url_for(".overview")


@bp.post("/logout")
def logout():
    session.clear()
    flash("Logged out.", "ok")
    return redirect(url_for(".login"), 303)
