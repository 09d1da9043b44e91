"""An embedded PostgreSQL for machines without one: real Postgres binaries from the `pgserver`
package, in a data folder of our choosing, reached over a Unix socket in that folder."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import psycopg

EMBEDDED_DATABASE = "skiplock"

# The servers this process started, by data folder: stop() lets go of them.
_started: dict[Path, Any] = {}


def _pgserver():
    # pgserver picks a runtime folder at import and warns when XDG_RUNTIME_DIR is unset; the
    # fallback it takes is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ModuleNotFoundError as exc:  # an installed skiplock without its `embedded` extra
            if exc.name != "pgserver":
                raise
            raise ModuleNotFoundError(
                "the embedded PostgreSQL needs pgserver: pip install 'skiplock[embedded]' "
                "(or set DATABASE_URL to a PostgreSQL of yours)",
                name=exc.name,
            ) from exc
    return pgserver


def start(data_dir: Path, *, keep_data: bool = True, database: str | None = EMBEDDED_DATABASE) -> str:
    """Start (or join) the embedded server for data_dir; returns a connection URL to `database`
    (created if missing) or to the server's maintenance database when database is None.

    The server stops when the last process that started it exits; with keep_data=False its data
    folder is deleted too (tests)."""
    data_dir = Path(data_dir).resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = _pgserver().get_server(data_dir, cleanup_mode="stop" if keep_data else "delete")
    _started[data_dir] = server
    admin_url = server.get_uri()
    if database is None:
        return admin_url
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')
    return server.get_uri(database)


def stop(data_dir: Path) -> None:
    """Let go of the embedded server for data_dir now rather than at interpreter exit (the last
    process out stops it, and deletes it if started with keep_data=False): a process that ends
    without running its exit handlers, as pytest-xdist's workers do, would leave it running."""
    server = _started.pop(Path(data_dir).resolve(), None)
    if server is not None:
        server.cleanup()
