"""The operators' dashboard at /dashboard: server-rendered pages (Jinja) whose live parts htmx
fetches again every REFRESH_SECONDS as HTML fragments; per-queue charts of the last hour (uPlot);
retry, cancel, pause and resume buttons. Every figure comes from skiplock.queries' operator
queries. Login, session and CSRF: api.dashboard_session. The JavaScript libraries are vendored
(static/vendor/README.md): no CDN, no build step.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

from skiplock.errors import InvalidTransition, TaskGone, TaskNotFound
from skiplock.sql.operations import (
    queue_summaries,
    task_failures_recent,
    task_health_get,
    task_queue_set_paused,
    task_throughput_recent,
    tasks_running_list,
)
from skiplock.sql.tasks import task_attempts_list, task_cancel, task_get, task_retry

from ..extensions import db, store
from ..schemas import NAME_PATTERN
from . import session as sessions

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
THROUGHPUT_MINUTES = 60
RUNNING_SHOWN = 50
FAILURES_SHOWN = 20
# Fired (HX-Trigger-After-Swap) after a button's answer: the live region refreshes at once.
REFRESH_EVENT = "dashboard-refresh"
# Health figures past these are shown red.
OLDEST_DUE_WAIT_BAD_SECONDS = 60
OLDEST_TRANSACTION_BAD_SECONDS = 300
DEAD_TUPLE_SHARE_BAD = 0.2
NOTIFY_QUEUE_USAGE_BAD = 0.5
# Outcomes of attempts that failed (task_failures' list); the others are no one's fault.
FAILURE_OUTCOMES = ("failed", "timed_out", "crashed", "lost")
# Input and result beyond this many characters are cut on the task's page.
JSON_SHOWN_CHARS = 20_000
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
            flash("Your key was revoked (or is no longer an admin key): log in again.", "error")
        return _to_login()
    return None


def _to_login():
    """Where a request without a valid session goes: the login page (htmx follows HX-Redirect)."""
    if _htmx():
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
def page_globals() -> dict:
    return {
        "csrf_token": sessions.csrf_token,
        "auth_on": store().settings.auth_on,
        "who": g.get("dashboard_key"),
        "refresh_seconds": REFRESH_SECONDS,
        "refresh_event": REFRESH_EVENT,
        "htmx_config": HTMX_CONFIG,
        "duration": duration,
        "ago": ago,
        "clock": clock,
        "percent": percent,
        "when": when,
        "failure_outcomes": FAILURE_OUTCOMES,
    }


# htmx: no eval and no injected styles (the CSP allows neither); show (not drop) the answers of
# refused buttons; give up on a request after 10 s (the page then says it is not updating).
HTMX_CONFIG = json.dumps(
    {
        "allowEval": False,
        "allowScriptTags": False,
        "includeIndicatorStyles": False,
        "historyEnabled": False,
        "timeout": 10_000,
        "responseHandling": [
            {"code": "204", "swap": False},
            {"code": "[23]..", "swap": True},
            {"code": "^(403|404|409|410)$", "swap": True, "error": False},
            {"code": "[45]..", "swap": False, "error": True},
        ],
    }
)


def _htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


@bp.errorhandler(HTTPException)
def http_error(error: HTTPException):
    """Errors as the dashboard's pages (or, to htmx, as a message where the answer goes)."""
    return _error(error.description, error.code)


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
    template = "dashboard/_notice.html" if _htmx() else "dashboard/error.html"
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


# --- pages and their live fragments -----------------------------------------------------------


@bp.get("")
def overview():
    return render_template("dashboard/overview.html", **overview_data())


@bp.get("/")
def overview_slash():
    return redirect(url_for(".overview"), 308)


@bp.get("/live")
def live():
    return render_template("dashboard/_live.html", **overview_data())


@bp.get("/tasks/<task_id:task_id>")
def task(task_id: int):
    return render_template("dashboard/task.html", **task_data(task_id))


@bp.get("/tasks/<task_id:task_id>/live")
def task_live(task_id: int):
    return render_template("dashboard/_task.html", **task_data(task_id))


def overview_data() -> dict:
    with db() as conn:
        summaries = queue_summaries(conn)
        throughput = task_throughput_recent(conn, minutes=THROUGHPUT_MINUTES)
        running = tasks_running_list(conn, limit=RUNNING_SHOWN)
        failures = task_failures_recent(conn, limit=FAILURES_SHOWN)
        health = task_health_get(conn)
    now = datetime.now(UTC)
    charts = throughput_charts(throughput, now)
    queues = queue_rows(summaries, charts)
    return {
        "now": now,
        "queues": queues,
        "charts": charts,
        "running": running,
        "failures": failure_rows(failures),
        "health": health_figures(health, queues),
    }


def throughput_charts(rows: list[dict], now: datetime) -> dict:
    """Per queue, attempts completed and failed in each minute of the last hour (0 where no
    worker wrote any), on one axis of minutes (Unix seconds) that ends at the current minute."""
    last = max([now.replace(second=0, microsecond=0), *(r["minute"] for r in rows)])
    minutes = [last - timedelta(minutes=n) for n in range(THROUGHPUT_MINUTES, -1, -1)]
    index = {minute: n for n, minute in enumerate(minutes)}
    queues: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        series = queues.setdefault(
            row["queue"], {"completed": [0] * len(minutes), "failed": [0] * len(minutes)}
        )
        n = index.get(row["minute"])
        if n is not None:
            series["completed"][n] += row["completed"]
            series["failed"][n] += row["failed"]
    return {"minutes": [int(m.timestamp()) for m in minutes], "queues": dict(sorted(queues.items()))}


def queue_rows(summaries: list[dict], charts: dict) -> list[dict]:
    """Every queue with unfinished tasks, a setting or attempts in the last hour, with its
    depth, oldest wait and the hour's totals."""
    rows = {s["queue"]: dict(s) for s in summaries}
    for queue in charts["queues"]:
        rows.setdefault(
            queue,
            dict(
                queue=queue,
                due=0,
                scheduled=0,
                reserved=0,
                running=0,
                oldest_due_wait_seconds=None,
                paused=False,
            ),
        )
    for queue, row in rows.items():
        series = charts["queues"].get(queue, {"completed": [], "failed": []})
        row["completed_hour"] = sum(series["completed"])
        row["failed_hour"] = sum(series["failed"])
        row["wait_bad"] = (row["oldest_due_wait_seconds"] or 0) > OLDEST_DUE_WAIT_BAD_SECONDS
    return [rows[q] for q in sorted(rows)]


def failure_rows(failures: list[dict]) -> list[dict]:
    """The recent failures; a Retry button on the newest row of each task that can be retried."""
    seen: set[int] = set()
    rows = []
    for failure in failures:
        retry = failure["task_status"] in ("failed", "cancelled") and failure["task_id"] not in seen
        seen.add(failure["task_id"])
        rows.append({**failure, "retry": retry})
    return rows


def health_figures(health: dict, queues: list[dict]) -> list[dict]:
    """The task_health row as labelled figures, each marked bad when it calls for a look."""
    due = sum(q["due"] for q in queues)
    wait = _seconds(health["oldest_due_wait"])
    transaction = _seconds(health["oldest_transaction_age"])
    usage = health["notification_queue_usage"] or 0
    no_workers = health["workers"] == 0 and due > 0
    lapsed = health["lapsed_leases"] > 0

    def figure(label: str, value: str, bad: bool, note: str = "") -> dict:
        return {"label": label, "value": value, "bad": bad, "note": note}

    figures = [
        figure(
            "Workers alive", str(health["workers"]), no_workers, f"and {due} tasks due" if no_workers else ""
        ),
        figure("Oldest due wait", duration(wait), (wait or 0) > OLDEST_DUE_WAIT_BAD_SECONDS, "for a worker"),
        figure("Lapsed leases", str(health["lapsed_leases"]), lapsed, "a rescue is due" if lapsed else ""),
        figure(
            "Oldest transaction",
            duration(transaction),
            (transaction or 0) > OLDEST_TRANSACTION_BAD_SECONDS,
            health["oldest_transaction_holder"] or "",
        ),
        figure("NOTIFY queue in use", percent(usage), usage > NOTIFY_QUEUE_USAGE_BAD),
    ]
    for table, share, vacuumed in (
        ("tasks", health["tasks_dead_tuple_share"], health["tasks_last_vacuum"]),
        ("task_attempts", health["attempts_dead_tuple_share"], health["attempts_last_vacuum"]),
    ):
        note = f"vacuumed {ago(vacuumed)}" if vacuumed else "never vacuumed"
        figures.append(
            figure(f"Dead rows in {table}", percent(share), float(share or 0) > DEAD_TUPLE_SHARE_BAD, note)
        )
    return figures


def task_data(task_id: int) -> dict:
    with db() as conn:
        task = task_get(conn, task_id, with_input=True)
        attempts = task_attempts_list(conn, task_id)
    now = datetime.now(UTC)
    return {
        "task": task,
        "attempts": attempts,
        "timeline": attempt_timeline(task, attempts, now),
        "input_json": pretty_json(task["input"]),
        "result_json": pretty_json(task["result"]) if task["result"] is not None else None,
        "now": now,
    }


def attempt_timeline(task: dict, attempts: list[dict], now: datetime) -> dict:
    """The task's attempts on one time axis, from its creation to its end (or now): a bar per
    attempt that ran (from started_at to finished_at), a tick for one released before it
    started, and the attempt running now. Positions are percentages of the axis."""
    bars = [
        {
            "attempt": a["attempt"],
            "outcome": a["outcome"],
            "start": a["started_at"],
            "end": a["finished_at"],
            "worker": a["worker_id"],
            "error": a["error"],
        }
        for a in attempts
    ]
    if task["status"] == "processing" and task["started_at"] is not None:
        bars.append(
            {
                "attempt": task["attempts"],
                "outcome": "running",
                "start": task["started_at"],
                "end": now,
                "worker": None,
                "error": None,
            }
        )
    begin = task["created_at"]
    end = max([task["finished_at"] or now, *(b["end"] for b in bars)])
    span = max((end - begin).total_seconds(), 1e-3)

    def at(moment: datetime) -> float:
        return round(100 * min(max((moment - begin).total_seconds() / span, 0.0), 1.0), 2)

    for bar in bars:
        bar["left"] = at(bar["start"] or bar["end"])
        bar["width"] = max(round(at(bar["end"]) - bar["left"], 2), 0.6)  # a short attempt stays visible
        bar["took"] = (bar["end"] - bar["start"]).total_seconds() if bar["start"] else None
        # Its label where there is room: right of the bar, else left of it, else inside it.
        right = bar["left"] + bar["width"]
        if right < 70:
            bar["label_at"], bar["label_anchor"], bar["label_inside"] = right + 0.8, "start", False
        elif bar["left"] > 30:
            bar["label_at"], bar["label_anchor"], bar["label_inside"] = bar["left"] - 0.8, "end", False
        else:
            bar["label_at"], bar["label_anchor"], bar["label_inside"] = bar["left"] + 0.8, "start", True
    return {"begin": begin, "end": end, "bars": bars}


def pretty_json(value) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    if len(text) > JSON_SHOWN_CHARS:
        return text[:JSON_SHOWN_CHARS] + f"\n… ({len(text) - JSON_SHOWN_CHARS} more characters)"
    return text


# --- buttons ---------------------------------------------------------------------------------


@bp.post("/tasks/<task_id:task_id>/retry")
def retry(task_id: int):
    return _task_action(task_id, task_retry, "is pending again")


@bp.post("/tasks/<task_id:task_id>/cancel")
def cancel(task_id: int):
    return _task_action(task_id, task_cancel, "was cancelled")


def _task_action(task_id: int, change, done: str):
    back = url_for(".task", task_id=task_id)
    try:
        with db() as conn:
            change(conn, task_id)
    except InvalidTransition as exc:
        return _answer(str(exc), ok=False, code=409, back=back)
    except TaskNotFound as exc:
        return _answer(str(exc), ok=False, code=404, back=url_for(".overview"))
    return _answer(f"Task {task_id} {done}.", ok=True, back=back)


@bp.post("/queues/<queue>/pause")
def pause_queue(queue: str):
    return _set_paused(queue, True)


@bp.post("/queues/<queue>/resume")
def resume_queue(queue: str):
    return _set_paused(queue, False)


def _set_paused(queue: str, paused: bool):
    back = url_for(".overview")
    if not re.fullmatch(NAME_PATTERN, queue):
        return _answer(f"No queue can be named {queue!r}.", ok=False, code=404, back=back)
    key = g.get("dashboard_key")
    by = key["prefix"] if key else "dashboard (auth off)"
    with db() as conn:
        task_queue_set_paused(conn, queue=queue, paused=paused, by=by)
    return _answer(f"Queue {queue} {'paused' if paused else 'resumed'}.", ok=True, back=back)


def _answer(message: str, *, ok: bool, code: int = 200, back: str):
    """To htmx: the message, and the live region refreshes. Without JavaScript: back to the
    page, which shows the message."""
    if _htmx():
        response = make_response(render_template("dashboard/_notice.html", message=message, ok=ok), code)
        response.headers["HX-Trigger-After-Swap"] = REFRESH_EVENT
        return response
    flash(message, "ok" if ok else "error")
    return redirect(back, 303)


# --- how figures read ------------------------------------------------------------------------


def _seconds(value) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value


def duration(seconds: float | timedelta | None) -> str:
    """4.2 s, 3 min 12 s, 2 h 5 min, 3 d 4 h; an em dash for none."""
    seconds = _seconds(seconds)
    if seconds is None:
        return "—"
    seconds = max(seconds, 0.0)  # two clocks (a session's start, now()) may disagree by a little
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    whole = int(seconds)
    for unit, size, sub_unit, sub_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "min", 60),
        ("min", 60, "s", 1),
    ):
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // sub_size} {sub_unit}"
    return f"{whole} s"


def ago(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return f"{duration(datetime.now(UTC) - moment)} ago"


def clock(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def percent(share) -> str:
    return "—" if share is None else f"{float(share) * 100:.1f} %"


def when(moment: datetime | None) -> Markup:
    """A moment as "3 min ago", its exact time on hover and for machines."""
    if moment is None:
        return Markup("—")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        moment.isoformat(), clock(moment), ago(moment)
    )
