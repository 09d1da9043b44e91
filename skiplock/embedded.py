"""An embedded PostgreSQL for machines without one: real Postgres binaries from the `pgserver`
package, in a data folder of our choosing, reached over a Unix socket in that folder."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import psycopg

EMBEDDED_DATABASE = "skiplock"

# In a checkout, `make run` writes the embedded database's URL here (beside its data folder,
# .skiplock/pgdata) while it runs, and the CLI reads it when DATABASE_URL is not set.
URL_FILE = Path(__file__).resolve().parent.parent / ".skiplock" / "database_url"

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


def publish_url(url: str, path: Path | None = None) -> None:
    """Write the running embedded database's URL for the CLI to find (only its owner may read it,
    as the data folder) to `path` (default URL_FILE). Written whole (a rename), so a reader never
    sees half a URL."""
    path = path or URL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(url + "\n")
    partial.chmod(0o600)
    partial.replace(path)


def published_url(path: Path | None = None) -> str | None:
    """The URL `make run` published to `path` (default URL_FILE), if it runs; None without the
    file."""
    path = path or URL_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def unpublish_url(url: str, path: Path | None = None) -> None:
    """The server is stopping: remove the URL file if it is still ours (another `make run` may
    have written its own since)."""
    path = path or URL_FILE
    if published_url(path) == url:
        path.unlink(missing_ok=True)
