"""gunicorn refuses to start, in one line naming the fix, what would otherwise fail in every
worker process with a traceback each (gunicorn boots them all, then halts): settings, the
database's URL, login and schema, task modules that do not import. Checked once, before
any worker forks, by `python -m skiplock.startup` in a process of its own: the master must not
import psycopg (nor task code) before its workers patch their I/O for gevent, or every database
wait of theirs would block the whole process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

# The exit code when the master refuses (as refuse_public_bind_without_auth's).
REFUSED_EXIT = 3
# The check connects once (a 5 s connect timeout) and looks task modules up: seconds at most.
CHECK_TIMEOUT_SECONDS = 60


def serves_skiplock(app_uri: str | None) -> bool:
    """Whether gunicorn serves skiplock's API (the checkout's wsgi:app, or the installed
    skiplock.api:create_app()): the benchmarks serve their own baseline apps under the same
    config, which need no database."""
    return app_uri is None or app_uri.startswith(("wsgi:", "skiplock.api"))


def refuse_unless_startable(log: Any) -> None:
    """on_starting: log the check's warnings, and one error line and exit if the API cannot
    serve. A database that is down is waited for (a warning; /readyz answers 503 until it is
    back), not refused."""
    check = subprocess.run(
        [sys.executable, "-m", "skiplock.startup"],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_SECONDS,
        check=False,
    )
    for line in check.stderr.splitlines():
        if line.strip():
            log.warning("%s", line)
    if check.returncode != 0:
        log.error("refusing to start: %s", check.stdout.strip() or f"the check failed ({check.returncode})")
        sys.exit(REFUSED_EXIT)


def app_or_refusal(create_app: Callable[[], Any]) -> Any:
    """The app, in a worker process; a StartupError (a task module that raised on import) as
    gunicorn's AppImportError: one line, and gunicorn halts instead of booting workers forever."""
    from gunicorn.errors import AppImportError

    from skiplock.startup import StartupError

    try:
        return create_app()
    except StartupError as exc:
        raise AppImportError(f"skiplock: {exc}") from None
