"""The dashboard's login, session cookie and CSRF defence.

Sessions are Flask's signed cookies, for /dashboard only (the API neither reads nor sets one).
Every API process and host must verify what another signed, so the signing key is shared: the
first dashboard request of a process reads it from api_secrets (made by whichever process asked
first) into app.secret_key.

A session holds the admin (or viewer) key's id and a fingerprint of its token's digest, never the token,
plus a CSRF token. Each request reads the key again (at most every key_cache_seconds, as the API
does), so a revoked key is logged out everywhere within that time.

Every POST must carry the session's CSRF token (form field or X-CSRF-Token header, compared in
constant time) and, when the browser says where it comes from (Origin, Sec-Fetch-Site), come from
this host. The cookie is HttpOnly and SameSite=Strict as well, and Secure over https.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from urllib.parse import urlsplit

from flask import Flask, abort, current_app, request, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import BadSignature
from psycopg_pool import PoolTimeout

from skiplock.db import SESSION_ENDED
from skiplock.errors import DatabaseUnavailable
from skiplock.keys import KeyRows
from skiplock.sql.keys import ApiKeyDigestRow, api_key_get
from skiplock.sql.operations import api_secret
from skiplock.tokens import token_digest, well_formed

from ..extensions import db, store

PREFIX = "/dashboard"
COOKIE_NAME = "skiplock_dashboard"
SECRET_NAME = "session"  # its row in api_secrets
# The keys that may log in: an admin acts, a viewer only looks (views.py refuses its POSTs).
ROLES = ("admin", "viewer")
# A session ends this long after it was last written (its login, usually), whatever the browser
# keeps.
SESSION_MAX_AGE_SECONDS = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# Sec-Fetch-Site values of a request made by this site's own pages (or typed by the user).
OWN_FETCH_SITES = ("same-origin", "none")
DATABASE_ERRORS: tuple[type[Exception], ...] = (*SESSION_ENDED, PoolTimeout, DatabaseUnavailable)
_SECRET_ERROR = "skiplock.dashboard.secret_error"  # request.environ key


def needs_session(path: str) -> bool:
    """A dashboard page or button (its static files are public and need none)."""
    return (path == PREFIX or path.startswith(PREFIX + "/")) and not path.startswith(PREFIX + "/static/")


class DashboardState:
    """Per app and process: whether the signing key was read, and the admin keys read lately
    (by id: a session has no token)."""

    def __init__(self, key_ttl: float):
        self.secret_loaded = False
        self.lock = threading.Lock()
        self.keys: KeyRows[int, ApiKeyDigestRow] = KeyRows(key_ttl, _read_key)


def _read_key(key_id: int) -> ApiKeyDigestRow | None:
    with db() as conn:
        return api_key_get(conn, key_id)


def state() -> DashboardState:
    return current_app.extensions["skiplock.dashboard"]


def install(app: Flask) -> None:
    app.extensions["skiplock.dashboard"] = DashboardState(
        app.extensions["skiplock"].settings.key_cache_seconds
    )
    app.session_interface = DashboardSessions()


class DashboardSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, on /dashboard paths only, with the dashboard's cookie."""

    def open_session(self, app: Flask, request) -> SecureCookieSession | None:
        if not needs_session(request.path):
            return None  # Flask gives the request a null session: the API has no use for one
        try:
            _load_secret(app)
        except DATABASE_ERRORS as exc:
            # Raised here, Flask would answer 500; the blueprint raises it again (503).
            request.environ[_SECRET_ERROR] = exc
            return None
        cookie = request.cookies.get(COOKIE_NAME)
        if not cookie:
            return self.session_class()
        serializer = self.get_signing_serializer(app)
        if serializer is None:  # no secret key (as Flask's own sessions: no session)
            return None
        try:
            data = serializer.loads(cookie, max_age=SESSION_MAX_AGE_SECONDS)
        except BadSignature:  # forged, from another secret, or expired: start afresh
            return self.session_class()
        return self.session_class(data)

    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE_NAME

    def get_cookie_path(self, app: Flask) -> str:
        return PREFIX

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Strict"

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure


def _load_secret(app: Flask) -> None:
    """app.secret_key from api_secrets, once per process (the same in every process and host)."""
    dashboard = app.extensions["skiplock.dashboard"]
    if dashboard.secret_loaded:
        return
    with dashboard.lock:
        if not dashboard.secret_loaded:
            with db() as conn:
                app.secret_key = api_secret(conn, name=SECRET_NAME, candidate=secrets.token_bytes(32))
            dashboard.secret_loaded = True


def raise_secret_error() -> None:
    """The database error that kept this request's session from opening, if any."""
    error = request.environ.pop(_SECRET_ERROR, None)
    if error is not None:
        raise error


# --- CSRF ------------------------------------------------------------------------------------


def csrf_token() -> str:
    """This session's CSRF token, made on first use (the login form has one too)."""
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def refuse_cross_site() -> None:
    """403 unless this state-changing request comes from a page of this dashboard."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        abort(403, f"Refused: this request came from another site ({origin}).")
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in OWN_FETCH_SITES:
        abort(403, f"Refused: this request came from another site (Sec-Fetch-Site: {fetch_site}).")
    sent = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(403, "Refused: this form has expired or was not sent by the dashboard. Reload the page.")


# --- login -----------------------------------------------------------------------------------


def fingerprint(digest: bytes) -> str:
    """What the session keeps of the key: enough to tell it from any other, useless to a reader."""
    return hashlib.sha256(b"skiplock dashboard session\0" + digest).hexdigest()[:32]


def log_in(token: str) -> tuple[int, str] | None:
    """Start a session for this admin or viewer token. None when done, else (HTTP status, why not)."""
    if not well_formed(token):
        return 401, "That is not a skiplock key: paste the whole token (skl_ and 32 letters or digits)."
    digest = token_digest(token)
    key = store().keys.get(digest)
    if key is None:
        return 401, "Unknown key."
    if key["revoked_at"] is not None:
        return 401, f"Key {key['prefix']} was revoked."
    if key["role"] not in ROLES:
        return 403, f"Key {key['prefix']} is a {key['role']} key: the dashboard needs an admin or viewer key."
    session.clear()  # a fresh session (and CSRF token): nothing carried over from before the login
    session.update(key_id=key["id"], key_fp=fingerprint(digest), csrf=secrets.token_urlsafe(32))
    return None


def logged_in_key() -> ApiKeyDigestRow | None:
    """The session's admin or viewer key, read again (at most every key_cache_seconds); None, and the
    session is emptied, if there is none or it was revoked or changed role."""
    key_id = session.get("key_id")
    if not isinstance(key_id, int):
        return None
    key = state().keys.get(key_id)
    if key is None or key["revoked_at"] is not None or key["role"] not in ROLES or not _same_key(key):
        session.clear()
        return None
    return key


def _same_key(key: ApiKeyDigestRow) -> bool:
    """The session was made for this key's token (not for another one under the same id, as a
    restored or rebuilt database could have)."""
    return hmac.compare_digest(fingerprint(bytes(key["token_sha256"])), str(session.get("key_fp", "")))
