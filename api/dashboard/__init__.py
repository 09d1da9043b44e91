"""The operators' dashboard (/dashboard): server-rendered pages behind a session of their own,
with its templates and vendored static files beside them.

    views.py       the blueprint, what every request goes through, the login
    pages.py       the overview and task pages and their live fragments
    workflow_pages.py  a workflow's page: its graph
    actions.py     the buttons: retry, cancel, pause, resume, run now
    formatting.py  how figures read
    session.py     the session cookie, CSRF, the login's checks
"""

from . import actions, pages, workflow_pages  # noqa: F401  (their routes join views.bp)
from .views import register

__all__ = ["register"]
